"""The conversion `make serve` uses for SmolLM2-135M-Instruct, chosen from measurements.

See docs/smollm2.md for the sweep these come from (`ragtop sweep`) and why. Ragged
embeddings are used only when they stay within `RAGGED_MAX_PPL_INCREASE` of dense
perplexity on the held-out speeches.
"""

from __future__ import annotations

DEFAULT_ATTENTION = "topk"
DEFAULT_TOPK = 64
DEFAULT_EMBEDDING = "uniform"
# Used with --embedding ragged when no --tiers is given: (tier size:width, most frequent first)
DEFAULT_TIERS = "4096:576,12288:288,*:96"
RAGGED_MAX_PPL_INCREASE = 0.02
