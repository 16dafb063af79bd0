#!/usr/bin/env python3
"""Plots a `pdserve bench --json` report.

    .venv/bin/python tools/bench/plot.py bench.json [--out PREFIX]

Writes PREFIX_latency_cdf.png (TTFT, TPOT, inter-token and E2E latency CDFs, one curve per run
or scenario), PREFIX_timeline.png (completed requests/s, output tokens/s, TTFT and in-flight
requests over the run) and, for a sweep (--sweep-rates), PREFIX_sweep.png (SLO attainment,
goodput and latency percentiles against the offered rate). PREFIX defaults to the JSON path
without its extension.
"""

import argparse
import json
import os
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def ok_requests(run):
    return [q for q in run["requests"] if "error" not in q]


def cdf(ax, values, label):
    values = sorted(v for v in values if v is not None)
    if not values:
        return
    n = len(values)
    ax.plot(values, [(i + 1) / n for i in range(n)], label=f"{label} (n={n})")


def itls(requests):
    out = []
    for q in requests:
        t = q.get("chunk_s") or []
        out.extend((b - a) * 1e3 for a, b in zip(t, t[1:]))
    return out


def groups(report, run):
    """(label, requests) per scenario when there are several, else the whole run."""
    reqs = ok_requests(run)
    names = report.get("scenarios") or []
    if len(names) > 1:
        return [(f"{run['label']} / {n}", [q for q in reqs if q["scenario"] == i]) for i, n in enumerate(names)]
    return [(run["label"], reqs)]


def plot_cdfs(report, prefix):
    fig, axes = plt.subplots(2, 2, figsize=(11, 8))
    panels = [("ttft_ms", "TTFT (ms)"), ("tpot_ms", "TPOT (ms)"), ("itl", "inter-token latency (ms)"),
              ("e2e_ms", "E2E latency (ms)")]
    for run in report["runs"]:
        for label, reqs in groups(report, run):
            for ax, (key, _) in zip(axes.flat, panels):
                cdf(ax, itls(reqs) if key == "itl" else [q[key] for q in reqs], label)
    for ax, (key, title) in zip(axes.flat, panels):
        ax.set_xlabel(title)
        ax.set_ylabel("fraction of requests" if key != "itl" else "fraction of chunks")
        ax.grid(alpha=0.3)
        slo = report["runs"][0]["summary"]["slo"]
        limit = {"ttft_ms": slo.get("ttft_ms"), "tpot_ms": slo.get("tpot_ms")}.get(key)
        if limit:
            ax.axvline(limit, color="red", linestyle="--", linewidth=1, label="SLO")
        if ax.lines:
            ax.legend(fontsize=7)
    fig.suptitle(f"pdserve bench: {report.get('base_url', '')} {report.get('api', '')} — {report.get('date_utc', '')}",
                 fontsize=9)
    fig.tight_layout()
    path = prefix + "_latency_cdf.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_timeline(report, prefix):
    run = report["runs"][-1] if len(report["runs"]) == 1 else report["runs"][0]
    reqs = [q for q in run["requests"] if q["send_s"] >= 0]
    if not reqs:
        return None
    end = max((q["end_s"] for q in reqs if q["end_s"] >= 0), default=1)
    width = max(end / 80, 1e-3)  # about 80 bins
    nbins = int(end / width) + 1
    done = [0] * nbins
    tokens = [0] * nbins
    ttft = [[] for _ in range(nbins)]
    inflight = [0] * nbins
    for q in reqs:
        if q["end_s"] >= 0 and "error" not in q:
            done[min(int(q["end_s"] / width), nbins - 1)] += 1
        for t in q.get("chunk_s") or []:
            tokens[min(int(t / width), nbins - 1)] += 1
        if q.get("ttft_ms") is not None:
            ttft[min(int(q["send_s"] / width), nbins - 1)].append(q["ttft_ms"])
        # in flight at each bin's centre
        e = q["end_s"] if q["end_s"] >= 0 else end
        first = max(0, int(q["send_s"] / width - 0.5) + 1) if q["send_s"] / width > 0.5 else 0
        for b in range(first, nbins):
            c = (b + 0.5) * width
            if c >= e:
                break
            if c >= q["send_s"]:
                inflight[b] += 1
    xs = [(i + 0.5) * width for i in range(nbins)]
    fig, axes = plt.subplots(4, 1, figsize=(10, 10), sharex=True)
    axes[0].plot(xs, [d / width for d in done])
    axes[0].set_ylabel("completed req/s")
    axes[1].plot(xs, [t / width for t in tokens])
    axes[1].set_ylabel("output chunks/s")
    med = [sorted(v)[len(v) // 2] if v else None for v in ttft]
    p99 = [sorted(v)[min(len(v) - 1, int(len(v) * 0.99))] if v else None for v in ttft]
    axes[2].plot(xs, med, label="p50")
    axes[2].plot(xs, p99, label="p99")
    axes[2].set_ylabel("TTFT (ms), by send time")
    axes[2].legend(fontsize=8)
    axes[3].plot(xs, inflight)
    axes[3].set_ylabel("requests in flight")
    axes[3].set_xlabel("time since start (s)")
    for ax in axes:
        ax.grid(alpha=0.3)
    fig.suptitle(f"{run['label']}: {report.get('workload', '')}", fontsize=8)
    fig.tight_layout()
    path = prefix + "_timeline.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_sweep(report, prefix):
    runs = sorted((r for r in report["runs"] if r.get("rate_rps")), key=lambda r: r["rate_rps"])
    if len(runs) < 2:
        return None
    rates = [r["rate_rps"] for r in runs]
    s = [r["summary"] for r in runs]
    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    axes[0].plot(rates, [x["slo_attainment"] * 100 for x in s], marker="o", label="TTFT and TPOT")
    axes[0].plot(rates, [x["ttft_attainment"] * 100 for x in s], marker=".", label="TTFT")
    axes[0].plot(rates, [x["tpot_attainment"] * 100 for x in s], marker=".", label="TPOT")
    axes[0].set_ylabel("SLO attainment (%)")
    axes[0].set_ylim(0, 105)
    axes[0].legend(fontsize=8)
    axes[1].plot(rates, [x["goodput_rps"] for x in s], marker="o", label="goodput")
    axes[1].plot(rates, [x["requests_per_s"] for x in s], marker=".", label="throughput")
    axes[1].set_ylabel("requests/s")
    axes[1].legend(fontsize=8)
    for key, name in [("ttft_ms", "TTFT"), ("tpot_ms", "TPOT")]:
        axes[2].plot(rates, [x[key]["p50"] for x in s], marker="o", label=f"{name} p50")
        axes[2].plot(rates, [x[key]["p99"] for x in s], marker=".", label=f"{name} p99")
    axes[2].set_ylabel("ms")
    axes[2].set_yscale("log")
    axes[2].legend(fontsize=8)
    for ax in axes:
        ax.set_xlabel("offered rate (req/s)")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    path = prefix + "_sweep.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("json", help="a report written by pdserve bench --json")
    ap.add_argument("--out", help="prefix of the PNG files (default: the JSON path without .json)")
    a = ap.parse_args()
    with open(a.json) as f:
        report = json.load(f)
    if report.get("tool") != "pdserve bench":
        sys.exit(f"{a.json}: not a pdserve bench report")
    prefix = a.out or os.path.splitext(a.json)[0]
    for path in [plot_cdfs(report, prefix), plot_timeline(report, prefix), plot_sweep(report, prefix)]:
        if path:
            print(path)


if __name__ == "__main__":
    main()
