"""Which tiered-embedding layouts have a given parameter count (the summary's figures).

A layout: t tiers (2 or 3) of widths w_0 > w_1 > ... from WIDTHS, n_i >= 1 tokens each
(sum = V), tier tables n_i x w_i, and a w_i -> D projection per tier (with or without
bias; on the full-width tier optionally none). Count = sum n_i w_i + projections.

    python -m ragtop.study.layouts 200 128 48812 30464
"""

from __future__ import annotations

import itertools
import sys

import numpy as np

WIDTHS = (128, 96, 64, 48, 32, 16, 8, 4)


def layouts(V: int, D: int, target: int, tiers=(2, 3)) -> list[tuple]:
    found = []
    for t in tiers:
        for ws in itertools.combinations([w for w in WIDTHS if w <= D], t):
            for bias in (0, 1):
                for proj_full in (0, 1):
                    if proj_full and ws[0] != D:
                        continue  # a narrower first tier always has a projection
                    proj = sum(w * D + bias * D for i, w in enumerate(ws) if i > 0 or w != D or proj_full)
                    r = target - proj - V * ws[-1]  # = sum_{i<t-1} n_i (w_i - w_last)
                    if r < 0:
                        continue
                    grids = np.meshgrid(*[np.arange(1, V) for _ in ws[:-1]], indexing="ij")
                    tot = sum(n * (w - ws[-1]) for n, w in zip(grids, ws[:-1], strict=True))
                    ok = (tot == r) & (sum(grids) <= V - 1)
                    for idx in zip(*np.nonzero(ok), strict=True):
                        ns = [int(i) + 1 for i in idx]
                        found.append((ws, bool(bias), bool(proj_full), (*ns, V - sum(ns))))
    return found


if __name__ == "__main__":
    V, D = int(sys.argv[1]), int(sys.argv[2])
    for target in map(int, sys.argv[3:]):
        sols = layouts(V, D, target)
        print(f"{target}: {len(sols)} layouts (widths, proj bias, projection on the full-width tier, tier sizes)")
        for s in sols[:6]:
            print("  ", s)
