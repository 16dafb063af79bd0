#!/usr/bin/env python3
"""Plots a `pdserve_transfer_bench --json` report.

    .venv/bin/python tools/bench/plot_transfer.py transfer.json [--out FILE.png]

One panel per transport: the median time to move one request's KV against its size (log-log),
for the contiguous pull (with and without the prefill's gather), the block-fixed baseline at each
block size, and the transport's raw copy of the same bytes. FILE defaults to the JSON path with
a .png extension.
"""

import argparse
import json
import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("report")
    parser.add_argument("--out")
    args = parser.parse_args()
    with open(args.report) as f:
        report = json.load(f)
    out = args.out or os.path.splitext(args.report)[0] + ".png"
    results = report["results"]
    transports = sorted({r["transport"] for r in results})
    blocks = sorted({r["block_size"] for r in results})
    fig, axes = plt.subplots(1, len(transports), figsize=(6.5 * len(transports), 5), squeeze=False)
    for ax, transport in zip(axes[0], transports):
        rows = [r for r in results if r["transport"] == transport]
        ref_block = 16 if 16 in blocks else blocks[0]
        ref = sorted((r for r in rows if r["block_size"] == ref_block), key=lambda r: r["kv_bytes"])
        mib = [r["kv_bytes"] / 2**20 for r in ref]
        ax.plot(mib, [r["median_ms"]["raw"] for r in ref], "k--", label="raw copy of the bytes")
        ax.plot(mib, [r["median_ms"]["contiguous"] for r in ref], "o-", color="tab:blue",
                label=f"contiguous pull ({ref_block}-token blocks)")
        ax.plot(mib, [r["median_ms"]["contiguous_plus_gather"] for r in ref], "o:", color="tab:blue",
                label="contiguous + prefill gather")
        for i, bs in enumerate(blocks):
            b = sorted((r for r in rows if r["block_size"] == bs), key=lambda r: r["kv_bytes"])
            ax.plot([r["kv_bytes"] / 2**20 for r in b], [r["median_ms"]["block_fixed"] for r in b], "s-",
                    color=plt.cm.Oranges(0.4 + 0.6 * i / max(1, len(blocks) - 1)), label=f"block-fixed, {bs}-token blocks")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("KV per request (MiB)")
        ax.set_ylabel("median time (ms)")
        ax.set_title(f"{transport}: {report['num_layers']} layers x {report['kv_width']} values {report['dtype']}")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"KV transfer between two processes ({report['cpu']})")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    print(out)


if __name__ == "__main__":
    main()
