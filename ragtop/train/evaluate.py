"""Held-out perplexity and bits per byte.

Each document is scored on its own: [EOS] + tokens, cut into non-overlapping windows of
`context` tokens, every token predicted exactly once from the window it sits in. Bits per
byte divide the total NLL (in bits) by the UTF-8 bytes of the documents, so models with
different tokenizers compare fairly.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..model import Transformer


@dataclass(frozen=True)
class EvalResult:
    nll: float  # total negative log-likelihood, nats
    tokens: int
    bytes: int
    documents: int
    context: int

    @property
    def loss(self) -> float:
        return self.nll / max(self.tokens, 1)

    @property
    def perplexity(self) -> float:
        return math.exp(self.loss)

    @property
    def bits_per_byte(self) -> float:
        return self.nll / math.log(2) / max(self.bytes, 1)

    def as_dict(self) -> dict:
        return {
            "loss": self.loss,
            "perplexity": self.perplexity,
            "bits_per_byte": self.bits_per_byte,
            "tokens": self.tokens,
            "bytes": self.bytes,
            "documents": self.documents,
            "context": self.context,
        }


@torch.no_grad()
def score_windows(model: Transformer, ids: torch.Tensor, context: int, batch_size: int = 4) -> float:
    """Total NLL (nats) of ids[1:] given what precedes each token, window by window."""
    n = ids.numel() - 1
    starts = list(range(0, n, context))
    full = [s for s in starts if s + context <= n]
    total = 0.0
    for i in range(0, len(full), batch_size):  # equal-length windows batch together
        group = full[i : i + batch_size]
        x = torch.stack([ids[s : s + context] for s in group])
        y = torch.stack([ids[s + 1 : s + context + 1] for s in group])
        total += F.cross_entropy(model(x).flatten(0, 1), y.flatten(), reduction="sum").item()
    if starts and starts[-1] + context > n:  # the ragged tail
        s = starts[-1]
        x, y = ids[s:n][None], ids[s + 1 : n + 1][None]
        total += F.cross_entropy(model(x)[0], y[0], reduction="sum").item()
    return total


def evaluate_texts(
    model: Transformer,
    tokenizer,
    texts: Sequence[str],
    bos_id: int,
    context: int | None = None,
    max_tokens: int | None = None,
    batch_size: int = 4,
    progress=None,
) -> EvalResult:
    """Score whole documents until `max_tokens` predicted tokens are reached (if given)."""
    context = context or model.config.max_seq_len
    was_training = model.training
    model.eval()
    nll, tokens, nbytes, docs = 0.0, 0, 0, 0
    for text in texts:
        ids = torch.tensor([bos_id, *tokenizer.encode(text).ids], dtype=torch.long)
        nll += score_windows(model, ids, context, batch_size)
        tokens += ids.numel() - 1
        nbytes += len(text.encode("utf-8"))
        docs += 1
        if progress is not None:
            progress(tokens)
        if max_tokens is not None and tokens >= max_tokens:
            break
    model.train(was_training)
    return EvalResult(nll, tokens, nbytes, docs, context)
