"""`ragtop generate`: stream one completion of a prompt to a text stream."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TextIO

from .engine import SERVED_DENSE_DECODE_TOKENS, SERVED_DENSE_PREFILL_TOKENS, EngineConfig, Request
from .loader import RunnerKind, load_model
from .sampling import SamplingParams
from .scheduler import SchedulerConfig


def generate(
    model_path: Path,
    prompt: str,
    params: SamplingParams,
    runner: RunnerKind = "auto",
    out: TextIO | None = None,
    threads: int | None = None,
    device: str | None = None,
) -> str:
    """Generate, writing text as it comes (and nothing else); returns the finish reason."""
    out = out or sys.stdout
    model = load_model(model_path, runner, threads=threads, device=device)
    ids = model.encode(prompt)
    engine = model.engine(
        EngineConfig(
            SchedulerConfig(max_batch_size=1, max_tokens_per_step=512, prefill_chunk=512),
            context_limit=min(model.runner.spec.max_model_len, len(ids) + params.max_tokens),
            dense_prefill_tokens=SERVED_DENSE_PREFILL_TOKENS,  # attends as `ragtop serve` does
            dense_decode_tokens=SERVED_DENSE_DECODE_TOKENS,
        )
    )
    engine.add_request(Request("generate", ids, params))
    reason = "length"
    while engine.has_work():
        for o in engine.step():
            for d in o.deltas:
                if d.text:
                    out.write(d.text)
                    out.flush()
                reason = d.finish_reason or reason
    if out.isatty():  # a terminal gets its prompt back on a fresh line; a pipe gets the text only
        out.write("\n")
        out.flush()
    return reason
