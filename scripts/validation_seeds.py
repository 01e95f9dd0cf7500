"""The export validation's mixed_batch case (B=3, random caches, past 0 / 3 / L-1, 4 new tokens,
every position's logits) over several seeds, for one or more exports of one checkpoint, each
against the PyTorch reference validation uses (the same dequantized weights, level-4 int8
input rounding when the export has it). Tells a real difference from a case whose outcome
depends on the seed.

    python scripts/validation_seeds.py CKPT SEEDS EXPORT [EXPORT ...]

Prints per export: (max |logits difference|, tolerance) per seed, the tolerance being the
export's default (`commands.tolerances`).
"""

import json
import sys
from pathlib import Path

import torch

from ragtop.checkpoint import load_checkpoint
from ragtop.export import weights as qweights
from ragtop.export.commands import ExportOptions, tolerances
from ragtop.export.onnx import ExportSpec
from ragtop.export.verify import compare_case, reference_cache, round_capacity, selecting_length, session
from ragtop.quant import load_file_blocks


def main(argv: list[str]) -> None:
    ckpt = load_checkpoint(Path(argv[0]))
    seeds, exports = int(argv[1]), argv[2:]
    torch.set_num_threads(1)
    for ex in exports:
        report = json.loads((Path(ex) / "export_report.json").read_text())
        spec = ExportSpec(**report["spec"])
        planned = qweights.plan(ckpt.model, spec.weights, load_file_blocks(ckpt.path))
        ref = qweights.reference_model(ckpt.model, planned, spec.accuracy_level)
        opts = ExportOptions(Path(argv[0]), Path(ex), **{k: report["options"][k] for k in ("weights", "kv_dtype")})
        opts = ExportOptions(**{**opts.__dict__, "dtype": spec.dtype, "accuracy_level": spec.accuracy_level})
        atol, rtol = tolerances(opts, spec.attention_mode)
        sess = session(Path(ex) / "model.onnx")
        long = selecting_length(spec)
        C = round_capacity(long + 4, spec)
        rows = []
        for seed in range(seeds):
            g = torch.Generator().manual_seed(seed)
            cache = reference_cache(ref, spec, 3, C)
            for t in cache.keys + cache.values:
                t.normal_(generator=g)
            cache.lengths = torch.tensor([0, min(3, long - 1), long - 1])
            ids = torch.randint(0, ref.config.vocab_size, (3, 4), generator=g)
            r = compare_case(ref, sess, spec, "mixed_batch", ids, cache, torch.arange(4).repeat(3, 1), atol, rtol=rtol)
            rows.append((round(r.max_abs_diff["logits"], 3), round(r.tolerance["logits"], 3)))
        print(f"{ex} (kv {spec.kv_dtype}, rtol {rtol:g}): {rows}", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
