"""Print the docs/export.md table row of each export folder from its export_report.json.

python scripts/export_table.py OUT_DIR [OUT_DIR ...]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def row(folder: Path) -> str:
    r = json.loads((folder / "export_report.json").read_text())
    s, files = r["spec"], r["files"]
    v = r.get("validation")
    diff = max(max(c["max_abs_diff"].values()) for c in v["cases"]) if v else None
    logits = max(c["max_abs_diff"]["logits"] for c in v["cases"]) if v else None
    greedy = (
        f"{sum(a == b for a, b in zip(v['greedy_torch'], v['greedy_onnx'], strict=True))}/{len(v['greedy_torch'])}"
        if v
        else "-"
    )
    ort = r.get("ort_format", {}).get("model.ort")
    q = r.get("int8")
    attention = s["attention_mode"] + (f" k={s['topk']}" if s["attention_mode"] != "dense" else "")
    if s["block_size"]:
        attention += f" bs={s['block_size']} budget={s['block_budget']}"
    embedding = f"ragged ({s['num_tiers']} tiers)" if s["num_tiers"] else "uniform"
    cells = [
        folder.name,
        attention,
        embedding,
        s["ops"],
        s["dtype"],
        f"{files['model.onnx']:.2f}",
        f"{ort:.2f}" if ort else "-",
        f"{q['model.int8.onnx']:.2f}" if q else "-",
        f"{logits:.1e}" if v else "-",
        f"{diff:.1e}" if v else "-",
        greedy,
        f"{q['top1_agreement']:.3f}" if q else "-",
    ]
    return "| " + " | ".join(cells) + " |"


if __name__ == "__main__":
    print(
        "| export | attention | embedding | ops | dtype | model.onnx MB | model.ort MB | int8 MB "
        "| max logits diff | max diff (all outputs) | greedy 32 | int8 top-1 agreement |"
    )
    print("|" + "---|" * 12)
    for arg in sys.argv[1:]:
        print(row(Path(arg)))
