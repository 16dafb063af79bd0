#!/usr/bin/env python3
"""PyTorch + transformers on the same GPU, the side-by-side reference of docs/perf/gpu.md.

LlamaForCausalLM built from Llama-3.1-8B's config with random bf16 weights (no download), SDPA
attention, static KV cache. Measures, like pdserve_gpu_bench's model section:
  - decode tokens/s at batch 1 and 16 after a prompt of CONTEXT tokens: (time of generating 1 + N
    tokens - time of generating 1 token) / N, greedy, both from the same prompt;
  - prefill time of 1 x 4096 and 8 x 512 tokens (one forward pass, logits of the last token only).
Each figure is the median of --reps runs after a warm-up. torch.compile is tried for decode
(--compile) and reported separately when it works.

  python3 bench/gpu_torch_baseline.py [--json PATH] [--context 1024] [--new-tokens 64] [--compile]
"""
import argparse
import json
import statistics
import sys
import time


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", help="write the results as JSON here")
    ap.add_argument("--context", type=int, default=1024, help="prompt tokens before decoding (default 1024)")
    ap.add_argument("--new-tokens", type=int, default=64, help="decoded tokens timed (default 64)")
    ap.add_argument("--reps", type=int, default=3, help="timed repetitions of each figure (default 3)")
    ap.add_argument("--compile", action="store_true", help="also time decode with torch.compile")
    args = ap.parse_args()

    import torch
    import transformers
    from transformers import LlamaConfig, LlamaForCausalLM

    if not torch.cuda.is_available():
        print("gpu_torch_baseline: no CUDA device", file=sys.stderr)
        return 1
    config = LlamaConfig(
        vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=131072,
        rms_norm_eps=1e-5, rope_theta=500000.0, tie_word_embeddings=False,
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                      "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
    )
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    t0 = time.time()
    with torch.device("cuda"):
        model = LlamaForCausalLM(config).to(torch.bfloat16).eval()
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, "
          f"{torch.cuda.get_device_name(0)}; model made in {time.time() - t0:.1f} s", flush=True)
    out = {"torch": torch.__version__, "transformers": transformers.__version__,
           "gpu": torch.cuda.get_device_name(0), "context": args.context, "new_tokens": args.new_tokens}

    def timed(fn, reps):
        fn()  # warm-up
        times = []
        for _ in range(reps):
            torch.cuda.synchronize()
            t = time.perf_counter()
            fn()
            torch.cuda.synchronize()
            times.append(time.perf_counter() - t)
        return statistics.median(times)

    def generate(ids, n):
        with torch.inference_mode():
            return model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                                  cache_implementation="static", pad_token_id=0)

    def decode_rates(tag):
        for batch in (1, 16):
            ids = torch.randint(0, config.vocab_size, (batch, args.context), device="cuda")
            one = timed(lambda: generate(ids, 1), args.reps)
            many = timed(lambda: generate(ids, 1 + args.new_tokens), args.reps)
            step_ms = (many - one) / args.new_tokens * 1e3
            print(f"{tag} decode batch {batch:2d} ctx {args.context}: {step_ms:.2f} ms a step, "
                  f"{batch / step_ms * 1e3:.0f} tokens/s", flush=True)
            out[f"{tag}_decode_b{batch}_step_ms"] = step_ms

    decode_rates("eager")
    for seqs, length in ((1, 4096), (8, 512)):
        ids = torch.randint(0, config.vocab_size, (seqs, length), device="cuda")

        def prefill():
            with torch.inference_mode():
                try:
                    model(ids, use_cache=False, logits_to_keep=1)
                except TypeError:
                    model(ids, use_cache=False)

        ms = timed(prefill, args.reps) * 1e3
        print(f"prefill {seqs} x {length}: {ms:.1f} ms", flush=True)
        out[f"prefill_{seqs}x{length}_ms"] = ms
    if args.compile:
        eager_forward = model.forward
        for mode in ("reduce-overhead", "default"):
            try:
                torch._dynamo.reset()
                model.forward = torch.compile(eager_forward, mode=mode, fullgraph=True)
                decode_rates(f"compiled-{mode}")
                break
            except Exception as e:  # report and try the next mode; the eager figures stay
                first_line = str(e).splitlines()[0] if str(e) else ""
                print(f"torch.compile mode={mode} failed: {type(e).__name__}: {first_line}", flush=True)
                out[f"compile_error_{mode}"] = f"{type(e).__name__}: {first_line}"[:300]
                model.forward = eager_forward
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
