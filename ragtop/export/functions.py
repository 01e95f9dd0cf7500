"""Standard-op bodies (model-local ONNX FunctionProtos) for ragtop's custom ops.

Each function has the (domain, name) of its custom op (ragtop/export/ops.py), so a stock
onnxruntime inlines the body while a session with the plugin library runs the kernel.
Bodies are generated per model: the embedding function takes exactly the model's tier
count, the attention function has the model's mode (dense, exact top-k, block selection).
They reproduce ragtop/model (attention.py, embedding.py) and are tested against it.

Head counts and sizes are read from input shapes (Hkv, C, Dh from past_key; H from the
query width), so the only attributes a body reads are topk, scale, block_size,
block_budget, sink_tokens and local_window, referenced from the node's attributes
(`@name`), never baked in; the last two default to 0 (files written before they existed).
"""

from __future__ import annotations

from onnx import AttributeProto, FunctionProto, NodeProto, helper

from . import ops

ATTENTION_MODES = ("dense", "exact", "block")


class _Body:
    """A tiny builder for function bodies: `b.op("MatMul", x, y)` returns the output name."""

    def __init__(self, prefix: str) -> None:
        self.nodes: list[NodeProto] = []
        self.prefix, self.n = prefix, 0

    def op(self, op_type: str, *inputs: str, outputs: int = 1, out: str | list[str] | None = None, **attrs):
        if out is None:
            names = [f"{self.prefix}{self.n}_{op_type}_{i}" for i in range(outputs)]
        else:
            names = [out] if isinstance(out, str) else list(out)
        self.n += 1
        self.nodes.append(helper.make_node(op_type, list(inputs), names, **attrs))
        return names[0] if len(names) == 1 else names

    def const(self, value, dtype: str = "int64") -> str:
        """A constant tensor: an int list (1-D int64), or a float scalar."""
        if dtype == "int64":
            return self.op("Constant", value_ints=list(value))
        return self.op("Constant", value_float=float(value))

    def ref(self, attr: str, kind: int) -> str:
        """A scalar Constant taken from the calling node's attribute `attr`."""
        field = {AttributeProto.INT: "value_int", AttributeProto.FLOAT: "value_float"}[kind]
        name = f"{self.prefix}attr_{attr}"
        node = helper.make_node("Constant", [], [name])
        node.attribute.append(helper.make_attribute_ref(field, kind, ref_attr_name=attr))
        self.nodes.append(node)
        return name

    def dim(self, shape: str, i: int) -> str:
        """Dimension i of a Shape output as a 1-D int64 tensor of one element."""
        return self.op("Slice", shape, self.const([i]), self.const([i + 1]))


def ragged_embedding_function(num_tiers: int, opset: int) -> FunctionProto:
    """ragtop::RaggedEmbedding for `num_tiers` tiers:
    out[b,s] = proj_i @ table_i[row_of[id]] with i = tier_of[id] (id = input_ids[b,s])."""
    tables = [f"table_{i}" for i in range(num_tiers)]
    projs = [f"proj_{i}" for i in range(num_tiers)]
    inputs = ["input_ids", "tier_of", "row_of"] + [x for pair in zip(tables, projs, strict=True) for x in pair]
    b = _Body("e")
    tier = b.op("Gather", "tier_of", "input_ids", axis=0)  # [B,S]
    row = b.op("Gather", "row_of", "input_ids", axis=0)  # [B,S]
    zero_i = b.const([0])
    zero_f = b.op("CastLike", b.const(0.0, "float"), tables[0])
    out = None
    for i in range(num_tiers):
        in_tier = b.op("Equal", tier, b.const([i]))  # [B,S]
        r = b.op("Where", in_tier, row, zero_i)  # any valid row outside the tier; masked below
        rows = b.op("Gather", tables[i], r, axis=0)  # [B,S,d_i]
        emb = b.op("MatMul", rows, b.op("Transpose", projs[i], perm=[1, 0]))  # [B,S,D]
        part = b.op("Where", b.op("Unsqueeze", in_tier, b.const([-1])), emb, zero_f)
        out = part if out is None else b.op("Add", out, part)
    b.op("Identity", out, out="embeddings")
    return helper.make_function(
        ops.DOMAIN,
        ops.RAGGED_EMBEDDING,
        inputs,
        ["embeddings"],
        b.nodes,
        [helper.make_opsetid("", opset)],
        attributes=["num_tiers"],
    )


def matmul_blocks_function(opset: int, mins: bool, padded: bool = False) -> FunctionProto:
    """ragtop::MatMulBlocks (ops.py) as the subgraph it replaces: com.microsoft::MatMulNBits
    on the codes, scales and optional zero points (every attribute referenced from the
    node, so rewriting a node's accuracy_level rewrites its body), plus, for the `mins`
    overload, the per-block minimum term sum_b mins[b, n] * sum_{k in block b} x[k]: the
    input's per-block sums (fp32, unrounded; zero-padded to whole blocks when `padded`)
    times mins [nb, N]. The same nodes onnx.py emitted before the op existed."""
    b = _Body("m")
    inputs = ["A", "B", "scales", "zero_points"] + (["mins"] if mins else [])
    attrs = ("K", "N", "bits", "block_size", "accuracy_level")
    node = helper.make_node(
        "MatMulNBits", ["A", "B", "scales", "zero_points"], ["Y" if not mins else "m_nbits"], domain=ops.MS_DOMAIN
    )
    for name in attrs:
        node.attribute.append(helper.make_attribute_ref(name, AttributeProto.INT))
    b.nodes.append(node)
    if mins:
        c = b.const
        x = "A"
        nb = b.dim(b.op("Shape", "mins"), 0)  # [1]
        if padded:  # x zero-padded to nb * 32 along its last axis
            width = b.op("Mul", nb, c([ops.MATMUL_BLOCK]))
            pad = b.op("Sub", width, b.op("Shape", "A", start=-1))
            x = b.op("Pad", "A", b.op("Concat", c([0]), pad, axis=0), "", c([-1]))
        lead = b.op("Shape", "A", end=-1)
        blocks = b.op("Reshape", x, b.op("Concat", lead, nb, c([ops.MATMUL_BLOCK]), axis=0))  # [..., nb, 32]
        sums = b.op("ReduceSum", blocks, c([-1]), keepdims=0)  # [..., nb]
        b.op("Add", "m_nbits", b.op("MatMul", sums, "mins"), out="Y")
    f = helper.make_function(
        ops.DOMAIN,
        ops.MATMUL_BLOCKS,
        inputs,
        ["Y"],
        b.nodes,
        [helper.make_opsetid("", opset), helper.make_opsetid(ops.MS_DOMAIN, 1)],
        attributes=list(attrs),
    )
    if mins:
        f.overload = ops.MATMUL_BLOCKS_MINS
    return f


def attention_mode(topk: int | None, block_size: int | None, context_limit: int) -> str:
    """dense when topk covers every key the model may ever see; else exact or block."""
    if topk is None or topk >= context_limit:
        return "dense"
    return "block" if block_size else "exact"


def topk_attention_function(mode: str, opset: int, dense_flag: bool = False, kv_cast: bool = False) -> FunctionProto:
    """ragtop::TopKAttention in one mode (see ops.py for the contract).

    kv_cast: the cache (past/present key/value) has another float type than the query (a
    float16 cache under float activations): the new rows are cast to the cache's type before
    the write, and the cache to the query's type for the math. Without it no Cast node is
    emitted (a same-type Cast would copy the whole cache per layer).

    dense_flag: the function takes the optional input `attention_dense` [B] (after the block
    summaries, for which an exact-mode node passes empty tensors): a flagged sequence's queries attend to
    all their visible keys, as in dense mode (the verification pass of self-speculative
    decoding). Only files whose nodes pass the input get this arity.

    dense:  masked softmax over the visible keys (the node's topk covers them all)
    exact:  + keep each query's always-kept keys (the first `sink_tokens`, the last
            `local_window`) and its `topk` best other visible keys (ONNX TopK breaks ties to
            the lower index, as ragtop's topk_mask does)
    block:  + the top-k candidates are only the keys of the query's own block and of the
            `block_budget` earlier eligible blocks with the largest upper bound
            sum_d max(q_d*kmin_d, q_d*kmax_d), with the per-block key summaries maintained
            in the cache.
    """
    if mode not in ATTENTION_MODES:
        raise ValueError(f"unknown attention mode {mode!r}")
    blocks = mode == "block"
    inputs = ["query", "key", "value", "past_key", "past_value", "past_lengths"]
    outputs = ["output", "present_key", "present_value"]
    attributes = ["num_heads", "num_kv_heads", "topk", "scale", "block_size", "block_budget"]  # + defaulted ones
    if blocks or dense_flag:  # an exact-mode node passes empty tensors here (ops.NO_BLOCK_SUMMARY)
        inputs += ["past_key_min", "past_key_max"]
    if blocks:
        outputs += ["present_key_min", "present_key_max"]
    if dense_flag and mode != "dense":
        inputs.append(ops.ATTENTION_DENSE)
    b = _Body("a")
    c = b.const
    # sizes: B, S from the query; Hkv, C, Dh from the cache; G = H / Hkv
    qshape, pshape = b.op("Shape", "query"), b.op("Shape", "past_key")
    B, S = b.dim(qshape, 0), b.dim(qshape, 1)
    Hkv, C, Dh = b.dim(pshape, 1), b.dim(pshape, 2), b.dim(pshape, 3)
    G = b.op("Div", b.op("Div", b.dim(qshape, 2), Dh), Hkv)

    # new keys/values: [B,S,Hkv*Dh] -> [B,S,Hkv,Dh] -> [B,Hkv,S,Dh]
    def heads(x: str) -> str:
        return b.op("Transpose", b.op("Reshape", x, b.op("Concat", B, S, Hkv, Dh, axis=0)), perm=[0, 2, 1, 3])

    k_new, v_new = heads("key"), heads("value")
    # absolute position of each new token: pos[b,s] = past_lengths[b] + s
    zero, one = b.op("Squeeze", c([0])), b.op("Squeeze", c([1]))
    s_range = b.op("Range", zero, b.op("Squeeze", S), one)  # [S]
    pos = b.op("Add", b.op("Unsqueeze", "past_lengths", c([1])), b.op("Unsqueeze", s_range, c([0])))  # [B,S]
    # cache write: present[b,h,pos[b,s],:] = new[b,h,s,:] (ScatterElements on axis 2)
    idx = b.op("Expand", b.op("Unsqueeze", pos, c([1, 3])), b.op("Concat", B, Hkv, S, Dh, axis=0))  # [B,Hkv,S,Dh]
    if kv_cast:  # rounded to the cache's type as stored; the math below reads the stored rows
        k_new, v_new = b.op("CastLike", k_new, "past_key"), b.op("CastLike", v_new, "past_value")
    b.op("ScatterElements", "past_key", idx, k_new, axis=2, out="present_key")
    b.op("ScatterElements", "past_value", idx, v_new, axis=2, out="present_value")
    keys, values = "present_key", "present_value"
    if kv_cast:
        keys, values = b.op("CastLike", keys, "query"), b.op("CastLike", values, "query")

    # queries grouped by kv head: [B,S,H*Dh] -> [B,S,Hkv,G,Dh] -> [B,Hkv,G,S,Dh]
    q = b.op("Transpose", b.op("Reshape", "query", b.op("Concat", B, S, Hkv, G, Dh, axis=0)), perm=[0, 2, 3, 1, 4])
    keys5 = b.op("Unsqueeze", keys, c([2]))  # [B,Hkv,1,C,Dh]
    values5 = b.op("Unsqueeze", values, c([2]))
    scale = b.op("CastLike", b.ref("scale", AttributeProto.FLOAT), "query")
    scores = b.op("Mul", b.op("MatMul", q, b.op("Transpose", keys5, perm=[0, 1, 2, 4, 3])), scale)  # [B,Hkv,G,S,C]
    # visibility: key j is visible to query s of sequence b iff j <= pos[b,s]
    c_range = b.op("Range", zero, b.op("Squeeze", C), one)  # [C]
    visible = b.op("LessOrEqual", c_range, b.op("Unsqueeze", pos, c([2])))  # [B,S,C]
    allowed = b.op("Unsqueeze", visible, c([1, 2]))  # [B,1,1,S,C]
    neg_inf = b.op("CastLike", b.const(float("-inf"), "float"), "query")

    dense_scores = b.op("Where", allowed, scores, neg_inf)
    if mode == "dense":
        scores = dense_scores
    else:
        # always kept: forced[b,s,j] = visible and (j < sink_tokens or j > pos - local_window)
        sink = b.op("Reshape", b.ref("sink_tokens", AttributeProto.INT), c([1]))
        window = b.op("Reshape", b.ref("local_window", AttributeProto.INT), c([1]))
        recent = b.op("Greater", c_range, b.op("Unsqueeze", b.op("Sub", pos, window), c([2])))  # [B,S,C]
        forced = b.op("And", visible, b.op("Or", b.op("Less", c_range, sink), recent))
        forced = b.op("Unsqueeze", forced, c([1, 2]))  # [B,1,1,S,C]
        cand = b.op("And", allowed, b.op("Not", forced))  # top-k runs over the other visible keys
        if blocks:
            cand = b.op("And", cand, _block_selection(b, q, keys, pos, B, Hkv, C, Dh, S, sink, window))
        # keep each row's topk best candidates (k = min(topk, C)); -inf picks are dropped by `cand`
        k = b.op("Min", b.op("Reshape", b.ref("topk", AttributeProto.INT), c([1])), C)
        _, best = b.op("TopK", b.op("Where", cand, scores, neg_inf), k, axis=-1, largest=1, sorted=1, outputs=2)
        zeros_b = b.op("Expand", b.op("Cast", c([0]), to=9), b.op("Shape", scores))  # bool false
        ones_b = b.op("Expand", b.op("Cast", c([1]), to=9), b.op("Shape", best))
        keep = b.op("And", b.op("ScatterElements", zeros_b, best, ones_b, axis=-1), cand)
        scores = b.op("Where", b.op("Or", keep, forced), scores, neg_inf)
        if dense_flag:  # flagged sequences: every visible key, no selection
            flag = b.op("Unsqueeze", b.op("Cast", ops.ATTENTION_DENSE, to=9), c([1, 2, 3, 4]))  # [B,1,1,1,1]
            scores = b.op("Where", flag, dense_scores, scores)
    probs = b.op("Softmax", scores, axis=-1)
    out5 = b.op("MatMul", probs, values5)  # [B,Hkv,G,S,Dh]
    # [B,Hkv,G,S,Dh] -> [B,S,Hkv,G,Dh] -> [B,S,H*Dh]
    out = b.op("Transpose", out5, perm=[0, 3, 1, 2, 4])
    b.op("Reshape", out, b.op("Concat", B, S, c([-1]), axis=0), out="output")
    return helper.make_function(
        ops.DOMAIN,
        ops.TOPK_ATTENTION,
        inputs,
        outputs,
        b.nodes,
        [helper.make_opsetid("", opset)],
        attributes=attributes,
        attribute_protos=[helper.make_attribute(name, 0) for name in ops.TOPK_ATTENTION_DEFAULT_ZERO],
    )


def _block_selection(
    b: _Body, q: str, keys: str, pos: str, B: str, Hkv: str, C: str, Dh: str, S: str, sink: str, window: str
) -> str:
    """Update the block summaries (present_key_min/max) and return the [B,Hkv,G,S,C] bool
    mask of keys in each query's chosen blocks (ragtop TopKAttention.block_selection).
    keys: the updated cache in the query's type (the stored keys, so the summaries bound them)."""
    c = b.const
    bs = b.op("Reshape", b.ref("block_size", AttributeProto.INT), c([1]))
    nb = b.op("Div", C, bs)  # C is a multiple of block_size
    zero = b.op("Squeeze", c([0]))
    one = b.op("Squeeze", c([1]))
    # new keys of each block: key j is new iff past_lengths[b] <= j < past_lengths[b] + S
    j = b.op("Range", zero, b.op("Squeeze", C), one)  # [C]
    start = b.op("Unsqueeze", "past_lengths", c([1]))  # [B,1]
    end = b.op("Add", start, S)
    is_new = b.op("And", b.op("GreaterOrEqual", j, start), b.op("Less", j, end))  # [B,C]
    new5 = b.op("Reshape", is_new, b.op("Concat", B, c([1]), nb, bs, c([1]), axis=0))  # [B,1,nb,bs,1]
    keys5 = b.op("Reshape", keys, b.op("Concat", B, Hkv, nb, bs, Dh, axis=0))  # [B,Hkv,nb,bs,Dh]
    inf = b.op("CastLike", b.const(float("inf"), "float"), "query")
    ninf = b.op("Neg", inf)
    new_min = b.op("ReduceMin", b.op("Where", new5, keys5, inf), c([3]), keepdims=0)  # [B,Hkv,nb,Dh]
    new_max = b.op("ReduceMax", b.op("Where", new5, keys5, ninf), c([3]), keepdims=0)
    touched = b.op("ReduceMax", b.op("Cast", new5, to=7), c([3]), keepdims=0)  # [B,1,nb,1] int64
    touched = b.op("Cast", touched, to=9)
    # a touched block whose first key is new starts afresh; others merge with the summary
    block_start = b.op("Mul", b.op("Range", zero, b.op("Squeeze", nb), one), bs)  # [nb]
    fresh = b.op("Reshape", b.op("GreaterOrEqual", block_start, start), b.op("Concat", B, c([1]), nb, c([1]), axis=0))
    merged_min = b.op("Where", fresh, new_min, b.op("Min", "past_key_min", new_min))
    merged_max = b.op("Where", fresh, new_max, b.op("Max", "past_key_max", new_max))
    kmin = b.op("Where", touched, merged_min, "past_key_min", out="present_key_min")
    kmax = b.op("Where", touched, merged_max, "past_key_max", out="present_key_max")
    # blocks holding no written key (j >= past_lengths + S) get zero summaries, as the model
    written = b.op("Less", block_start, end)  # [B,nb]
    written = b.op("Unsqueeze", written, c([1, 3]))  # [B,1,nb,1]
    zero_f = b.op("CastLike", b.const(0.0, "float"), "query")
    kmin = b.op("Unsqueeze", b.op("Where", written, kmin, zero_f), c([2]))  # [B,Hkv,1,nb,Dh]
    kmax = b.op("Unsqueeze", b.op("Where", written, kmax, zero_f), c([2]))
    # upper bound of q.k per block: relu(q) @ kmax^T + min(q,0) @ kmin^T   [B,Hkv,G,S,nb]
    q_pos = b.op("Max", q, zero_f)
    q_neg = b.op("Min", q, zero_f)
    bound = b.op(
        "Add",
        b.op("MatMul", q_pos, b.op("Transpose", kmax, perm=[0, 1, 2, 4, 3])),
        b.op("MatMul", q_neg, b.op("Transpose", kmin, perm=[0, 1, 2, 4, 3])),
    )
    # own block of query s: pos // bs; earlier blocks: start <= pos and not own
    pos5 = b.op("Unsqueeze", pos, c([1, 2, 4]))  # [B,1,1,S,1]
    own = b.op("Equal", block_start, b.op("Mul", b.op("Div", pos5, bs), bs))  # [B,1,1,S,nb]
    earlier = b.op("And", b.op("LessOrEqual", block_start, pos5), b.op("Not", own))
    # eligible: the block holds a key j with sink_tokens <= j <= pos - local_window
    last = b.op("Sub", b.op("Add", block_start, bs), c([1]))
    free = b.op("LessOrEqual", b.op("Max", block_start, sink), b.op("Min", last, b.op("Sub", pos5, window)))
    earlier = b.op("And", earlier, free)
    ninf_b = b.op("Where", earlier, bound, ninf)
    budget = b.op("Min", b.op("Reshape", b.ref("block_budget", AttributeProto.INT), c([1])), nb)
    _, best = b.op("TopK", ninf_b, budget, axis=-1, largest=1, sorted=1, outputs=2)
    zeros_b = b.op("Expand", b.op("Cast", c([0]), to=9), b.op("Shape", ninf_b))
    ones_b = b.op("Expand", b.op("Cast", c([1]), to=9), b.op("Shape", best))
    picked = b.op("And", b.op("ScatterElements", zeros_b, best, ones_b, axis=-1), earlier)
    chosen = b.op("Or", picked, own)  # [B,Hkv,G,S,nb]
    # blocks -> keys: [.., nb] -> [.., nb, 1] -> [.., nb, bs] -> [.., C]
    shape = b.op("Shape", chosen)
    lead = b.op("Slice", shape, c([0]), c([4]))
    expanded = b.op("Expand", b.op("Unsqueeze", chosen, c([-1])), b.op("Concat", lead, nb, bs, axis=0))
    return b.op("Reshape", expanded, b.op("Concat", lead, C, axis=0))


# names the paged body gives the contiguous views it gathers (the contiguous body reads these)
_GATHERED = {n: f"paged_{n}" for n in ("past_key", "past_value", "past_key_min", "past_key_max")}
_CONTIGUOUS_OUT = {n: f"paged_{n}" for n in ("present_key", "present_value", "present_key_min", "present_key_max")}


def paged_topk_attention_function(mode: str, opset: int, kv_cast: bool = False) -> FunctionProto:
    """ragtop::TopKAttention over a paged KV cache (ops.py input 9, `block_table`).

    The cache inputs are page pools [N, Hkv, P, Dh] (summaries [N, Hkv, P/bs, Dh]); row j of
    sequence b is pool[block_table[b, j // P], :, j % P]. The body gathers each sequence's
    pages into the contiguous [B, Hkv, M*P, Dh] view, runs the contiguous body on it, and
    scatters only what changed back into the pools: the new key/value rows and the summaries
    of the blocks they touched (ScatterND; rows of a shared page are written by nobody, so
    duplicate indices can only come from one sequence's summary block written by several of
    its new keys, with identical values). Padding entries of the table (past a sequence's
    pages) are read but never written. Every input of the contract is taken (an exact-mode
    node passes ops.NO_BLOCK_SUMMARY, a dense file `attention_dense` it ignores). kv_cast: as
    in topk_attention_function (a float16 cache: the new rows are rounded to it as stored)."""
    inner = topk_attention_function(mode, opset, dense_flag=mode != "dense", kv_cast=kv_cast)
    blocks = mode == "block"
    b = _Body("p")
    c = b.const
    pool_shape, qshape, tshape = b.op("Shape", "past_key"), b.op("Shape", "query"), b.op("Shape", "block_table")
    B, S, M = b.dim(qshape, 0), b.dim(qshape, 1), b.dim(tshape, 1)
    Hkv, P, Dh = b.dim(pool_shape, 1), b.dim(pool_shape, 2), b.dim(pool_shape, 3)

    def gather(pool: str, rows: str, out: str) -> None:
        """pool [N,Hkv,R,Dh] -> [B,M,Hkv,R,Dh] -> [B,Hkv,M,R,Dh] -> [B,Hkv,M*R,Dh]"""
        g = b.op("Transpose", b.op("Gather", pool, "block_table", axis=0), perm=[0, 2, 1, 3, 4])
        b.op("Reshape", g, b.op("Concat", B, Hkv, b.op("Mul", M, rows), Dh, axis=0), out=out)

    gather("past_key", P, _GATHERED["past_key"])
    gather("past_value", P, _GATHERED["past_value"])
    if blocks:
        R = b.dim(b.op("Shape", "past_key_min"), 2)  # summary rows per page, P / bs
        gather("past_key_min", R, _GATHERED["past_key_min"])
        gather("past_key_max", R, _GATHERED["past_key_max"])
    renames = (
        {**_GATHERED, **_CONTIGUOUS_OUT}
        if blocks
        else {k: v for k, v in {**_GATHERED, **_CONTIGUOUS_OUT}.items() if "key_m" not in k}
    )
    for node in inner.node:
        node.input[:] = [renames.get(x, x) for x in node.input]
        node.output[:] = [renames.get(x, x) for x in node.output]
        b.nodes.append(node)
    # where each new token goes: page = block_table[b, pos // P], row = pos % P
    zero, one = b.op("Squeeze", c([0])), b.op("Squeeze", c([1]))
    pos = b.op(
        "Add",
        b.op("Unsqueeze", "past_lengths", c([1])),
        b.op("Unsqueeze", b.op("Range", zero, b.op("Squeeze", S), one), c([0])),
    )  # [B,S]
    page = b.op("GatherElements", "block_table", b.op("Div", pos, P), axis=1)  # [B,S]
    heads = b.op("Unsqueeze", b.op("Range", zero, b.op("Squeeze", Hkv), one), c([0, 1, 3]))  # [1,1,Hkv,1]
    expand_to = b.op("Concat", B, S, Hkv, c([1]), axis=0)

    def indices(row: str) -> str:  # [B,S,Hkv,3]: (page, head, row) of each new token and head
        at = [b.op("Expand", b.op("Unsqueeze", x, c([2, 3])), expand_to) for x in (page, row)]
        return b.op("Concat", at[0], b.op("Expand", heads, expand_to), at[1], axis=3)

    rows_new = indices(b.op("Mod", pos, P))
    split = b.op("Concat", B, S, Hkv, Dh, axis=0)
    k_rows, v_rows = b.op("Reshape", "key", split), b.op("Reshape", "value", split)
    if kv_cast:
        k_rows, v_rows = b.op("CastLike", k_rows, "past_key"), b.op("CastLike", v_rows, "past_value")
    b.op("ScatterND", "past_key", rows_new, k_rows, out="present_key")
    b.op("ScatterND", "past_value", rows_new, v_rows, out="present_value")
    if blocks:
        bs = b.op("Div", P, R)
        blk_in_page = indices(b.op("Div", b.op("Mod", pos, P), bs))
        blk = b.op("Unsqueeze", b.op("Div", pos, bs), c([2]))  # [B,S,1]: block of each new token
        for kind in ("key_min", "key_max"):
            # the updated summary of each new token's block: [B,Hkv,nb,Dh] -> [B,nb,Hkv,Dh] -> [B,S,Hkv,Dh]
            upd = b.op(
                "GatherND", b.op("Transpose", _CONTIGUOUS_OUT[f"present_{kind}"], perm=[0, 2, 1, 3]), blk, batch_dims=1
            )
            b.op("ScatterND", f"past_{kind}", blk_in_page, upd, out=f"present_{kind}")
    inputs = [
        "query",
        "key",
        "value",
        "past_key",
        "past_value",
        "past_lengths",
        "past_key_min",
        "past_key_max",
        ops.ATTENTION_DENSE,
        ops.BLOCK_TABLE,
    ]
    outputs = ["output", "present_key", "present_value"] + (["present_key_min", "present_key_max"] if blocks else [])
    return helper.make_function(
        ops.DOMAIN,
        ops.TOPK_ATTENTION,
        inputs,
        outputs,
        b.nodes,
        [helper.make_opsetid("", opset)],
        attributes=list(inner.attribute),
        attribute_protos=list(inner.attribute_proto),
    )
