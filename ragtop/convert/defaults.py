"""The conversion `make serve` uses for SmolLM2-135M-Instruct, chosen from measurements.

docs/smollm2.md holds the sweep these come from (`ragtop sweep`, held-out State of the
Union speeches) and the reasoning:
- top-k attention (the project's served default) with the k that lost least: 256
  (+5.0% perplexity over 4,096 tokens, +0.2% over 512-token windows; k=64 lost 20%);
- uniform embeddings: ragged SVD tiers lost more than `RAGGED_MAX_PPL_INCREASE` (the
  gentlest measured, 16384:576,*:288, lost 12%);
- int4 weights in the export (`export-model --weights int4 --accuracy-level 4`): the GGUF's own
  Q4_1 / Q8_0 blocks (the same weight values as the fp32 export, 4.5x smaller), multiplied
  with int8-rounded inputs as llama.cpp multiplies them (docs/export.md, "Quantized weights:
  SmolLM2 measured" and "The lean graph").
"""

from __future__ import annotations

DEFAULT_ATTENTION = "topk"
DEFAULT_TOPK = 256
DEFAULT_EMBEDDING = "uniform"
# Used with --embedding ragged when no --tiers is given (SIZE:WIDTH, most frequent first):
# the least lossy tier setting measured.
DEFAULT_TIERS = "16384:576,*:288"
# `export-model --weights` of the served model, and its MatMulNBits accuracy level: 4 rounds
# each matmul's input to int8 per block of 32, as llama.cpp does with these Q4_1 / Q8_0 blocks
# (perplexity +0.05 % over fp32 compute on held-out text; decode 1.48x the level-0 graph of
# the previous default per CPU-second: docs/export.md, "The lean graph")
DEFAULT_WEIGHTS = "int4"
DEFAULT_ACCURACY_LEVEL = 4
# Ragged embeddings become the served default only within this perplexity increase over dense.
RAGGED_MAX_PPL_INCREASE = 0.02
