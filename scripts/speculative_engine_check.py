"""Self-speculative decoding on a real export, in process (no server): greedy tokens with
speculation vs the same graph with every chunk flagged dense (the dense model), interleaved
repeats, decode seconds of each and the acceptance rate.

    python scripts/speculative_engine_check.py EXPORT_DIR --prompt-tokens 1024 --new-tokens 32 --gamma 4
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

from ragtop.runtime import EngineConfig, Request, SamplingParams, SchedulerConfig, load_model

TEXT = (
    "The committee reviewed the budget for the coming year and found the costs of the program higher "
    "than planned. Farmers in the western states reported a good harvest, while the eastern ports handled "
    "more trade than ever. "
)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("export", type=Path)
    p.add_argument("--prompt-tokens", type=int, default=1024)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--gamma", type=int, default=4)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--threads", type=int, default=2)
    a = p.parse_args()
    model = load_model(a.export, threads=a.threads)
    prompt = model.encode(TEXT * (a.prompt_tokens // 30 + 1))[: a.prompt_tokens]
    forward = model.runner.forward
    engine = model.engine(
        EngineConfig(
            SchedulerConfig(max_batch_size=4, prefill_chunk=256),
            context_limit=a.prompt_tokens + a.new_tokens + a.gamma + 64,
        )
    )
    stats = []
    engine.stats_listeners.append(stats.append)
    params = SamplingParams(max_tokens=a.new_tokens, temperature=0, ignore_eos=True)
    rows = []
    for r in range(a.repeats + 1):  # the first round prefills (cached afterwards), not timed
        for kind in ("dense", "speculative"):
            model.runner.forward = (
                (lambda ch: forward([dataclasses.replace(c, dense=True) for c in ch])) if kind == "dense" else forward
            )
            stats.clear()
            t0 = time.perf_counter()
            out = engine.run_until_done(
                [Request(f"{kind}{r}", prompt, params, num_speculative_tokens=a.gamma if kind == "speculative" else 0)]
            )
            total = time.perf_counter() - t0
            tokens = [t for o in out[f"{kind}{r}"] for d in o.deltas for t in d.token_ids]
            prefill = sum(s.prefill_time_s for s in stats if s.prompt_tokens)  # steps that prefilled
            rows.append(
                {
                    "repeat": r,
                    "kind": kind,
                    "tokens": tokens,
                    "seconds": round(total, 2),
                    "cached": out[f"{kind}{r}"][-1].usage.cached_tokens,
                    "steps": len(stats),
                    "decode_calls_s": round(sum(s.decode_time_s for s in stats), 2),
                    "other_calls_s": round(sum(s.prefill_time_s for s in stats), 2),
                    "drafted": sum(s.spec_draft_tokens for s in stats),
                    "accepted": sum(s.spec_accepted_tokens for s in stats),
                    "prefill_s": round(prefill, 2),
                }
            )
            print(json.dumps({k: v for k, v in rows[-1].items() if k != "tokens"}), flush=True)
    dense = [x for x in rows if x["kind"] == "dense"]
    spec = [x for x in rows if x["kind"] == "speculative"]
    print(
        json.dumps(
            {
                "identical": all(x["tokens"] == dense[0]["tokens"] for x in spec),
                "dense_s": [x["seconds"] for x in dense[1:]],
                "speculative_s": [x["seconds"] for x in spec[1:]],
                "acceptance": sum(x["accepted"] for x in spec) / max(1, sum(x["drafted"] for x in spec)),
            }
        )
    )


if __name__ == "__main__":
    main()
