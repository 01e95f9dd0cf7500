"""The conversion `make serve` uses for SmolLM2-135M-Instruct, chosen from measurements.

docs/smollm2.md holds the sweep these come from (`ragtop sweep`, held-out State of the
Union speeches) and the reasoning:
- top-k attention as Quest-style block selection that keeps sinks and a local window
  (docs/models.md, "SmolLM2: sparse settings that keep what matters"); before it, exact
  top-256 (+5.0% perplexity over 4,096 tokens; k=64 lost 20%);
- uniform embeddings: ragged SVD tiers lost more than `RAGGED_MAX_PPL_INCREASE` (the
  gentlest measured, 16384:576,*:288, lost 12%);
- int4 weights in the export (`export-model --weights int4 --accuracy-level 4`): the GGUF's own
  Q4_1 / Q8_0 blocks (the same weight values as the fp32 export, 4.5x smaller), multiplied
  with int8-rounded inputs as llama.cpp multiplies them (docs/export.md, "Quantized weights:
  SmolLM2 measured" and "The lean graph").
"""

from __future__ import annotations

DEFAULT_ATTENTION = "topk"
# Quest-style block selection with attention sinks and a local window, a block budget per
# layer: every key of each layer's best 64-token blocks plus the first 64 tokens and the last
# 256. The budgets (20 blocks per layer on average, 1 to 50) are `ragtop allocate-budgets`'s
# (docs/models.md, "Block budgets per layer"): blocks go where they change a layer's output
# most, measured on training speeches. Held-out speeches: +0.14 % / +0.38 % / +0.91 %
# perplexity over dense at 2k / 4k / 8k tokens, reading 0.71 / 0.41 / 0.21 of dense's KV
# bytes -- against +0.09 % / +0.79 % / +1.61 % at 0.69 / 0.39 / 0.24 for the previous default
# (32 blocks of 32 in every layer, the first two layers dense).
DEFAULT_BLOCK_SIZE = 64
DEFAULT_LAYER_BUDGETS: tuple[int, ...] = (
    36, 25, 21, 25, 22, 24, 22, 50, 30, 20, 22, 10, 3, 1, 26,
    22, 3, 38, 43, 10, 38, 13, 9, 33, 28, 1, 11, 3, 4, 7,
)  # fmt: skip
DEFAULT_BLOCK_BUDGET = max(DEFAULT_LAYER_BUDGETS)  # 50
# The served conversion of a model without 30 layers (the budgets above are SmolLM2-135M's):
# their mean in every layer (`ragtop allocate-budgets` computes a model's own).
DEFAULT_UNIFORM_BUDGET = round(sum(DEFAULT_LAYER_BUDGETS) / len(DEFAULT_LAYER_BUDGETS))  # 20
DEFAULT_TOPK = (DEFAULT_BLOCK_BUDGET + 1) * DEFAULT_BLOCK_SIZE  # 3264: all keys of every layer's chosen blocks
DEFAULT_SINK_TOKENS = 64
DEFAULT_LOCAL_WINDOW = 256
DEFAULT_DENSE_LAYERS = 0
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
# On a CPU with AVX-512 VNNI the export's 4-bit matrices are ragtop::MatMulBlocks nodes
# (export.commands.DEFAULT_MATMUL, `--matmul auto`): the plugin's kernel computes what
# MatMulNBits + the Q4_1 minima nodes compute (their subgraph is the node's function body)
# with each weight block unpacked once for all rows: decode 1.03-1.12x per CPU-second, prefill 1.23-1.27x at 1k tokens
# (docs/kernels.md, "MatMulBlocks: measured"). A default export cached before it keeps
# MatMulNBits (same values, slower) until ~/.cache/ragtop/models is cleared.
# `export-model --kv-dtype` of the served model. float16 halves the cache (47,520 -> 24,480
# bytes per token with the block summaries) and decoded 1.34x / 1.42x / 1.30x as many tokens
# per CPU-second at 1k / 4k / 8k, prefilling in 0.78-0.89x the CPU time (docs/export.md,
# "Float16 KV cache: SmolLM2 measured"; perplexity +0.11 % / +0.00 % at 1k / 4k). Its export
# validates: the level-0 twin strictly (rtol 2e-3, greedy 32/32), level 4 at rtol 0.25
# (export.commands.tolerances). The export folder's name says so (default_model.kv_suffix).
DEFAULT_KV_DTYPE = "fp16"
# Ragged embeddings become the served default only within this perplexity increase over dense.
RAGGED_MAX_PPL_INCREASE = 0.02
