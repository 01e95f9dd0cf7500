"""ragtop's custom ONNX operators: domain, names and version, defined once.

Every custom node in an exported file has a model-local FunctionProto with the same
(domain, name) whose body is standard ONNX ops, so stock onnxruntime runs the body and a
session that registered the plugin library (plugins/onnxruntime) runs the native kernel.

ragtop::TopKAttention (version 1) -- attention over a preallocated, shared KV cache
    inputs
      0 query        [B, S, H*Dh]      float, rotary already applied
      1 key          [B, S, Hkv*Dh]    float, rotary already applied (the new tokens only)
      2 value        [B, S, Hkv*Dh]    float
      3 past_key     [B, Hkv, C, Dh]   cache type (float, or float16), C = cache capacity
      4 past_value   [B, Hkv, C, Dh]   cache type
      5 past_lengths [B]               int64: tokens already cached for each sequence
      block selection only (block_size > 0):
      6 past_key_min [B, Hkv, C/bs, Dh] float: element-wise min of each block's written keys
      7 past_key_max [B, Hkv, C/bs, Dh] element-wise max (C a multiple of bs)
      optional (files exported with it; an exact-mode node passes the empty float tensor
      NO_BLOCK_SUMMARY ([0]) as inputs 6 and 7 -- not "", which onnxruntime's lite
      custom-op API cannot take in the middle of the inputs):
      8 attention_dense [B] or [1]     int64: non-zero = this sequence attends densely
                                       ([1]: one flag for all; exported graphs default to [0])
    outputs
      0 output       [B, S, H*Dh]
      1 present_key  [B, Hkv, C, Dh]   past_key with the new keys written at
                                       [past_lengths[b], past_lengths[b] + S) (cache type)
      2 present_value[B, Hkv, C, Dh]
      block selection only:
      3 present_key_min, 4 present_key_max   the summaries updated for the new keys (a block
                                       whose first key is new starts afresh from it)
    attributes
      num_heads, num_kv_heads: int
      topk: int      keys kept per query (>= visible keys: exactly dense)
      scale: float   softmax scale (1/sqrt(Dh))
      block_size: int    0 = exact selection; > 0 = block selection (see TopKAttention in
      block_budget: int  ragtop/model/attention.py, whose semantics the kernel reproduces)
      sink_tokens: int   (default 0) keys j < sink_tokens are always kept
      local_window: int  (default 0) keys j > p - local_window are always kept
    cache type
      query, key, value, output and the block summaries have the activations' type (float;
      float16 in a --dtype fp16 file); past/present key/value may be float16 under float
      activations (export --kv-dtype fp16: half the cache bytes). Then the new keys and values
      are rounded to float16 (round to nearest even) when written, every score, softmax and
      weighted sum reads the stored (rounded) rows widened to float, and the float summaries
      are the exact element-wise min/max of the *stored* keys -- so block selection picks the
      blocks a reference that rounds its cached keys to float16 picks. The plugin registers
      one kernel per cache type under the same name (onnxruntime picks by input types); the
      function body casts (CastLike) the new rows to the cache type and the cache to the
      query's type for the math.
    semantics
      query s of sequence b sits at p = past_lengths[b] + s and sees keys j <= p. Its
      always-kept keys are the visible j < sink_tokens or j > p - local_window; the others
      are candidates. It keeps the always-kept keys plus its `topk` highest-scoring
      candidates (ties -> lower j) and takes the softmax over them.
      Block mode: the candidates are only the keys of p's own block and of the
      `block_budget` earlier *eligible* blocks with the largest upper bound
      sum_d max(q_d * kmin_d, q_d * kmax_d) (ties -> lower block); a block is eligible when
      it holds a candidate (some j in it with sink_tokens <= j <= p - local_window). A
      `topk` >= (block_budget + 1) * block_size keeps every candidate of the chosen blocks
      (Quest); a `topk` >= C with block_budget >= C / block_size is exactly dense (how a
      block-mode file runs its dense first layers: same arity, per-node attributes).
      With sink_tokens = local_window = 0 this is the version-1 semantics unchanged, so
      files written before these attributes existed keep their meaning.
      attention_dense[b] != 0: every query of sequence b keeps ALL its visible keys j <= p
      (exact dense causal softmax: no top-k, no block selection, no sink/window split),
      whatever the attributes; the cache write and the block summary update are the same.
      One exported graph thus serves a sparse draft and its dense verification
      (self-speculative decoding, ragtop/runtime/engine.py) without loading weights twice.
      Absent input = all zeros (files written before it existed keep their meaning).
      9 block_table [B, M]             int64, optional (paged KV cache, files written with
                                       `ragtop export --paged-kv`): inputs 3-4 (and 6-7) are then
                                       page pools [N, Hkv, P, Dh] (summaries [N, Hkv, P/bs, Dh],
                                       P a multiple of bs) and key/value row j of sequence b is
                                       pool[block_table[b, j // P], :, j % P]; capacity C = M * P.
                                       The outputs are the pools with the new rows (and the
                                       touched summaries) written. Entries past a sequence's
                                       pages are never read for a visible key nor written.
                                       Absent or empty = the contiguous layout above.
      When present_* is bound to the same memory as past_*, a kernel writes only
      the new positions (and, with blocks, only the touched summaries). A model uses one
      mode in every layer, so its file carries one TopKAttention function of that arity.

ragtop::RaggedEmbedding (version 1) -- frequency-tiered embedding lookup
    inputs
      0 input_ids [B, S] int64
      1 tier_of   [V] int64     tier of each token id
      2 row_of    [V] int64     row of each token id inside its tier's table
      then for each tier i: table_i [n_i, d_i], proj_i [D, d_i] (Linear weight)
    outputs
      0 embeddings [B, S, D] = proj_i @ table_i[row_of[id]] for id's tier i
    attributes
      num_tiers: int

ragtop::MatMulBlocks (version 1) -- y = x @ W^T for a block-quantized W (export --matmul custom)
    inputs (com.microsoft::MatMulNBits' own, plus the per-block minima)
      0 A            [..., K]            float
      1 B            [N, nb, 32*bits/8]  uint8  nb = ceil(K / 32); 4-bit codes two per byte,
                                                low nibble first (element 2j low, 2j+1 high)
      2 scales       [N, nb]             float
      3 zero_points  packed as MatMulNBits' uint8 ([N * ceil(nb/2)] 4-bit, [N * nb] 8-bit),
                                         optional ("" = the default 2^(bits-1))
      4 mins         [nb, N]             float, optional: per-block additive term (Q4_1's
                                         m + 8d, quant.FileBlocks.matmul_blocks)
    outputs
      0 Y            [..., N]            float
    attributes (MatMulNBits' names and meanings)
      K, N: int; bits: 4 or 8; block_size: 32 (the only one the kernel takes);
      accuracy_level: 4 = the input rounded to int8 per row and block of 32 before the
      block products, exactly as MLAS's CompInt8 path rounds it (scale = amax / 127, codes
      round-half-even(x * (127 / amax))); anything else = fp32 compute on the exact weights
    semantics
      w[n, k] = scales[n, b] * (code[n, k] - zero_point[n, b]) with b = k // 32, and
      y = A~ @ w^T + sum_b mins[b, :] * (sum of A over block b, fp32, unrounded, zero-padded
      past K), A~ = A rounded as above at level 4, A itself otherwise. This is what the
      function body computes: MatMulNBits(A, B, scales, zero_points) plus, in the overload
      MATMUL_BLOCKS_MINS ("mins"), the per-block sums of A times mins (a node with input 4
      carries that overload; one without, the default body). The plugin's kernel computes
      the same up to float summation order: each weight block is unpacked once per tile of
      rows of A (MatMulNBits unpacks it again per row), and the minima are fused in.
"""

DOMAIN = "ragtop"
OPSET_VERSION = 1
TOPK_ATTENTION = "TopKAttention"
RAGGED_EMBEDDING = "RaggedEmbedding"
# the optional per-sequence dense flag of TopKAttention (input 8) and the graph input feeding it
ATTENTION_DENSE = "attention_dense"
# the optional block table of a paged KV cache (input 9) and the graph input feeding it
BLOCK_TABLE = "block_table"
NO_BLOCK_SUMMARY = "ragtop.no_block_summary"  # float [0] initializer: inputs 6-7 of an exact-mode node with input 8
# TopKAttention attributes that may be absent (files written before them): default 0
TOPK_ATTENTION_DEFAULT_ZERO = ("sink_tokens", "local_window")
# ragtop::MatMulBlocks (see above): its block length, and the overload of a node with `mins`
MATMUL_BLOCKS = "MatMulBlocks"
MATMUL_BLOCKS_MINS = "mins"
MATMUL_BLOCK = 32
MS_DOMAIN = "com.microsoft"  # MatMulNBits, which the MatMulBlocks function bodies call
