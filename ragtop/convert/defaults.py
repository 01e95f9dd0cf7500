"""The conversion `make serve` uses for SmolLM2-135M-Instruct, chosen from measurements.

docs/smollm2.md holds the sweep these come from (`ragtop sweep`, held-out State of the
Union speeches) and the reasoning:
- top-k attention (the project's served default) with the k that lost least: 256
  (+5.0% perplexity over 4,096 tokens, +0.2% over 512-token windows; k=64 lost 20%);
- uniform embeddings: ragged SVD tiers lost more than `RAGGED_MAX_PPL_INCREASE` (the
  gentlest measured, 16384:576,*:288, lost 12%).
"""

from __future__ import annotations

DEFAULT_ATTENTION = "topk"
DEFAULT_TOPK = 256
DEFAULT_EMBEDDING = "uniform"
# Used with --embedding ragged when no --tiers is given (SIZE:WIDTH, most frequent first):
# the least lossy tier setting measured.
DEFAULT_TIERS = "16384:576,*:288"
# Ragged embeddings become the served default only within this perplexity increase over dense.
RAGGED_MAX_PPL_INCREASE = 0.02
