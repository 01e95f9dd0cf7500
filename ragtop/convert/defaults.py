"""The conversion `make serve` uses for SmolLM2-135M-Instruct, chosen from measurements.

docs/smollm2.md holds the sweep these come from (`ragtop sweep`, held-out State of the
Union speeches) and the reasoning:
- top-k attention (the project's served default) with the k that lost least: 256
  (+5.0% perplexity over 4,096 tokens, +0.2% over 512-token windows; k=64 lost 20%);
- uniform embeddings: ragged SVD tiers lost more than `RAGGED_MAX_PPL_INCREASE` (the
  gentlest measured, 16384:576,*:288, lost 12%);
- int4 weights in the export (`export-model --weights int4`, fp32 compute): the GGUF's own
  Q4_1 / Q8_0 blocks, so the same values as the fp32 export — perplexity and greedy tokens
  equal, 4.5x smaller, faster decode (docs/export.md, "Quantized weights: SmolLM2 measured").
"""

from __future__ import annotations

DEFAULT_ATTENTION = "topk"
DEFAULT_TOPK = 256
DEFAULT_EMBEDDING = "uniform"
# Used with --embedding ragged when no --tiers is given (SIZE:WIDTH, most frequent first):
# the least lossy tier setting measured.
DEFAULT_TIERS = "16384:576,*:288"
# `export-model --weights` of the served model (and its MatMulNBits accuracy level: 0 = fp32
# compute; level 4 rounds activations to int8 and was measured to cost quality, docs/export.md)
DEFAULT_WEIGHTS = "int4"
DEFAULT_ACCURACY_LEVEL = 0
# Ragged embeddings become the served default only within this perplexity increase over dense.
RAGGED_MAX_PPL_INCREASE = 0.02
