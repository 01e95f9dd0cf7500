"""The docs/models.md table of the `small` models from `ragtop eval --json` lines.

ragtop eval runs/small-dense-uniform runs/small-topk32-uniform ... --json | python scripts/models_table.py
"""

from __future__ import annotations

import json
import sys


def main() -> None:
    rows = [json.loads(line) for line in sys.stdin if line.strip().startswith("{")]
    base = next((r for r in rows if r["checkpoint"].rstrip("/").endswith("dense-uniform")), rows[0])
    print("| model | held-out ppl | Δ ppl vs dense-uniform | bits/byte | embedding + head | attention | MLP | total |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        p = r["parameters"]
        name = r["checkpoint"].rstrip("/").split("/")[-1]
        delta = 100 * (r["perplexity"] / base["perplexity"] - 1)
        print(
            f"| {name} | {r['perplexity']:.1f} | {delta:+.1f} % | {r['bits_per_byte']:.4f} | "
            f"{(p['embedding'] + p['head']) / 1e6:.3f}M | {p['attention'] / 1e6:.3f}M | {p['mlp'] / 1e6:.3f}M | "
            f"{p['total'] / 1e6:.3f}M |"
        )


if __name__ == "__main__":
    main()
