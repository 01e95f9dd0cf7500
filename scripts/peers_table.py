"""Markdown tables of scripts/peers_side_by_side.sh results: medians per system and prompt
length (each run in parentheses), peak RSS, and the ragtop default's ratio to each system
(decode tokens/s, and TTFT as the other's over ragtop's: above 1 = ragtop faster).

    python scripts/peers_table.py OUT_DIR
"""

import collections
import json
import statistics
import sys
from pathlib import Path

NAMES = {
    "default": "ragtop default (int4 level 4, lean graph, block selection + sinks/window)",
    "llamacpp": "llama.cpp (llama-cpp-python 0.3.36, the same GGUF, --no-repack)",
    "genai": "ONNX Runtime GenAI 0.18 int4 (its builder)",
    "old": "ragtop previous default (int4 level 0, exact top-256)",
}


def main(folder: str) -> None:
    rows: dict[tuple[str, int], list[dict]] = collections.defaultdict(list)
    for f in Path(folder).glob("*.json"):
        system, length, _ = f.stem.rsplit("-", 2)
        rows[system, int(length)].append(json.loads(f.read_text()))
    for L in sorted({length for _, length in rows}):
        print(
            f"\n| {L} tokens | decode tok/s (each run) | TTFT s (each run) | peak RSS MiB "
            "| ragtop default ÷ it (decode / TTFT) |"
        )
        print("|---|---|---|---|---|")
        ours = rows.get(("default", L))
        for system, name in NAMES.items():
            runs = rows.get((system, L))
            if not runs:
                continue
            d = [r["decode_tokens_per_s"] for r in runs]
            t = [r["ttft_s"] for r in runs]
            rss = max(r["peak_rss_bytes"] for r in runs) / 2**20
            ratio = ""
            if ours and system != "default":
                ours_d = statistics.median(r["decode_tokens_per_s"] for r in ours)
                ours_t = statistics.median(r["ttft_s"] for r in ours)
                ratio = f"{ours_d / statistics.median(d):.2f}× / {statistics.median(t) / ours_t:.2f}×"
            print(
                f"| {name} | {statistics.median(d):.2f} ({', '.join(f'{x:.1f}' for x in d)}) | "
                f"{statistics.median(t):.1f} ({', '.join(f'{x:.1f}' for x in t)}) | {rss:.0f} | {ratio} |"
            )


if __name__ == "__main__":
    main(sys.argv[1])
