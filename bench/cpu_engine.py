#!/usr/bin/env python3
"""pdserve's CPU engine against llama.cpp on the same machine, in the same run.

Reproduces the table of docs/perf/cpu-engine.md:
  - prompt processing (pp512) and generation (tg128), one sequence: pdserve_engine_bench vs
    llama-bench;
  - batched decoding at 8 and 32 sequences (128 prompt + 128 generated tokens each):
    pdserve_engine_bench vs llama-batched-bench (its S_TG);
  - peak resident memory of a 128-token generation: `pdserve generate` vs `llama-simple`, at the
    same context size;
  - start to first token: wall time of `pdserve generate -n 1` from process start to exit (an
    upper bound), with llama-simple's for reference.

The two engines alternate round by round (each round runs every test once per engine, after its
own warm-up), and each figure is the median over the rounds, so slow phases of a noisy machine
hit both. Prerequisites: `make build` and tools/reference/build_llama_cpp.sh (this script runs
neither). Usage:

    python3 bench/cpu_engine.py [--rounds 5] [--threads 2] [--json out.json] [--plot out.png]
"""
import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODEL = os.path.join(ROOT, "models", "SmolLM2-135M-Instruct.Q4_1.gguf")
PDSERVE = os.path.join(ROOT, "build", "release", "src", "bin", "pdserve")
ENGINE_BENCH = os.path.join(ROOT, "build", "release", "bench", "pdserve_engine_bench")
LLAMA_BIN = os.path.join(ROOT, "build", "reference", "llama.cpp-build", "bin")
PROMPT = ("The history of the printing press begins in the fifteenth century, when Johannes Gutenberg "
          "combined movable metal type, oil-based ink and a wooden screw press into a system that could "
          "produce books far faster than scribes. Within fifty years presses were operating in more than "
          "two hundred cities across Europe, and the number of books in circulation grew from thousands "
          "to millions. Explain the main consequences of this change for science and religion.")


def log(msg):
    print(msg, file=sys.stderr, flush=True)


def run(cmd, **kw):
    p = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)
    if p.returncode != 0:
        sys.exit(f"error: {' '.join(cmd)} exited with {p.returncode}:\n{p.stderr[-2000:]}")
    return p.stdout


def jsonl(text):
    return [json.loads(line) for line in text.splitlines() if line.strip().startswith("{")]


def peak_rss_kib(cmd):
    out = subprocess.run(["/usr/bin/time", "-f", "PEAK_RSS_KIB=%M"] + cmd, stdout=subprocess.DEVNULL,
                         stderr=subprocess.PIPE, text=True)
    if out.returncode != 0:
        sys.exit(f"error: {' '.join(cmd)} failed:\n{out.stderr[-2000:]}")
    for line in out.stderr.splitlines():
        if line.startswith("PEAK_RSS_KIB="):
            return int(line.split("=")[1])
    sys.exit("error: /usr/bin/time printed no peak RSS")


def wall_seconds(cmd):
    t0 = time.perf_counter()
    run(cmd)
    return time.perf_counter() - t0


def prompt_tokens(text):
    out = run([os.path.join(LLAMA_BIN, "llama-tokenize"), "-m", MODEL, "-p", text, "--ids", "--log-disable"])
    return len(json.loads(out.strip().splitlines()[-1]))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=5, help="rounds per engine (medians over them); at least 5")
    ap.add_argument("--threads", type=int, default=2, help="CPU threads for both engines")
    ap.add_argument("--json", help="write every sample and median here")
    ap.add_argument("--plot", help="write a PNG of the ratios here (needs matplotlib)")
    a = ap.parse_args()
    for path in (MODEL, PDSERVE, ENGINE_BENCH, os.path.join(LLAMA_BIN, "llama-bench")):
        if not os.path.exists(path):
            sys.exit(f"error: {path} is missing; run `make build` and tools/reference/build_llama_cpp.sh first")
    t = str(a.threads)
    samples = {}

    def add(engine, test, value):
        samples.setdefault((engine, test), []).append(value)

    n_prompt = prompt_tokens(PROMPT)
    ctx = n_prompt + 128
    for r in range(a.rounds):
        log(f"round {r + 1}/{a.rounds}: llama-bench")
        for row in jsonl(run([os.path.join(LLAMA_BIN, "llama-bench"), "-m", MODEL, "-t", t, "-p", "512", "-n", "128",
                              "-r", "1", "-o", "jsonl"])):
            test = f"pp{row['n_prompt']}" if row["n_gen"] == 0 else f"tg{row['n_gen']}"
            add("llama.cpp", test, row["samples_ts"][0])
        log(f"round {r + 1}/{a.rounds}: pdserve_engine_bench pp512 tg128")
        for row in jsonl(run([ENGINE_BENCH, "-m", MODEL, "-t", t, "-p", "512", "-n", "128", "-r", "1"])):
            add("pdserve", row["test"], row["tokens_per_s"][0])
        log(f"round {r + 1}/{a.rounds}: llama-batched-bench")
        for row in jsonl(run([os.path.join(LLAMA_BIN, "llama-batched-bench"), "-m", MODEL, "-t", t, "-c", "8192", "-b",
                              "2048", "-ub", "512", "-npp", "128", "-ntg", "128", "-npl", "8,32", "--output-format",
                              "jsonl"])):
            add("llama.cpp", f"batch{row['pl']}_tg128", row["speed_tg"])
        log(f"round {r + 1}/{a.rounds}: pdserve_engine_bench batched")
        for row in jsonl(run([ENGINE_BENCH, "-m", MODEL, "-t", t, "-b", "8", "-b", "32", "--batch-prompt", "128",
                              "--batch-gen", "128", "-r", "1"])):
            add("pdserve", row["test"], row["tokens_per_s"][0])
        log(f"round {r + 1}/{a.rounds}: peak memory and start to first token")
        add("pdserve", "peak_rss_mib", peak_rss_kib([PDSERVE, "generate", "-m", MODEL, "-t", t, "-c", str(ctx), "-n",
                                                     "128", "--ignore-eos", "-p", PROMPT]) / 1024)
        add("llama.cpp", "peak_rss_mib", peak_rss_kib([os.path.join(LLAMA_BIN, "llama-simple"), "-m", MODEL, "-n",
                                                       "128", PROMPT]) / 1024)
        add("pdserve", "first_token_s", wall_seconds([PDSERVE, "generate", "-m", MODEL, "-t", t, "-n", "1", "-p",
                                                      "Hello"]))
        add("llama.cpp", "first_token_s", wall_seconds([os.path.join(LLAMA_BIN, "llama-simple"), "-m", MODEL, "-n",
                                                        "1", "Hello"]))

    med = {k: statistics.median(v) for k, v in samples.items()}
    rows = [
        ("prompt processing, 512 tokens", "pp512", "tokens/s", True),
        ("generation, 128 tokens, 1 sequence", "tg128", "tokens/s", True),
        ("batched decoding, 8 sequences", "batch8_tg128", "tokens/s", True),
        ("batched decoding, 32 sequences", "batch32_tg128", "tokens/s", True),
        (f"peak RSS, generate 128 at context {ctx}", "peak_rss_mib", "MiB", False),
        ("start to first token (whole run of -n 1)", "first_token_s", "s", False),
    ]
    cpu = "unknown CPU"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    print(f"Machine: {cpu}, {os.cpu_count()} CPUs, {platform.system()} {platform.release()}; "
          f"{a.threads} threads each; medians of {a.rounds} alternating rounds; "
          f"{datetime.date.today().isoformat()}.\n")
    print("| test | pdserve | llama.cpp | ratio |")
    print("|---|---:|---:|---:|")
    result = {"date": datetime.date.today().isoformat(), "cpu": cpu, "threads": a.threads, "rounds": a.rounds,
              "tests": {}}
    for title, key, unit, higher_better in rows:
        p, l = med[("pdserve", key)], med[("llama.cpp", key)]
        ratio = p / l if higher_better else l / p
        kind = "pdserve/llama.cpp" if higher_better else "llama.cpp/pdserve"
        print(f"| {title} ({unit}) | {p:.2f} | {l:.2f} | {ratio:.2f} ({kind}) |")
        result["tests"][key] = {"unit": unit, "pdserve": samples[("pdserve", key)],
                                "llama.cpp": samples[("llama.cpp", key)], "pdserve_median": p, "llama_cpp_median": l,
                                "ratio": ratio, "ratio_is": kind}
    if a.json:
        with open(a.json, "w") as f:
            json.dump(result, f, indent=1)
    if a.plot:
        try:
            import matplotlib
            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            sys.exit("error: --plot needs matplotlib (pip install matplotlib)")
        keys = [r[1] for r in rows]
        fig, ax = plt.subplots(figsize=(8, 4))
        ax.bar(keys, [result["tests"][k]["ratio"] for k in keys])
        ax.axhline(1.0, color="k", linewidth=0.8)
        ax.set_ylabel("advantage over llama.cpp (>1: pdserve better)")
        ax.tick_params(axis="x", rotation=30)
        fig.tight_layout()
        fig.savefig(a.plot)


if __name__ == "__main__":
    main()
