"""The Triton kernels against the PyTorch reference (TopKAttention, RaggedEmbedding), on tiny
shapes: on CPU through Triton's interpreter, on a GPU when there is one."""

import pytest
import torch

pytest.importorskip("triton", reason="triton is not installed (pip install 'ragtop[test]')")

from ragtop.gpu.kernels import block_topk_decode, ragged_embedding, update_block_summaries  # noqa: E402
from ragtop.model.attention import AttnContext, TopKAttention  # noqa: E402
from ragtop.model.config import AttentionConfig, EmbeddingConfig, ModelConfig  # noqa: E402
from ragtop.model.embedding import RaggedEmbedding  # noqa: E402

from .conftest import DEVICE  # noqa: E402


def attention(H, Hkv, Dh, L, **attn) -> TopKAttention:
    cfg = ModelConfig(
        vocab_size=8,
        d_model=H * Dh,
        n_layers=1,
        n_heads=H,
        n_kv_heads=Hkv,
        d_ff=8,
        max_seq_len=L,
        attention=AttentionConfig(kind="topk", **attn),
    )
    return TopKAttention(cfg).to(DEVICE)


def decode_context(pos: torch.Tensor, L: int) -> AttnContext:
    """A decode step's context: query b at position pos[b] sees keys j <= pos[b]."""
    j = torch.arange(L, device=pos.device)
    return AttnContext(None, None, pos[:, None], (j <= pos[:, None])[:, None, None, :], pos, False)


def summaries(k: torch.Tensor, block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The kernel's summaries of a cache written in one go."""
    B, Hkv, L, Dh = k.shape
    kmin = torch.zeros(B, Hkv, -(-L // block_size), Dh, device=k.device)
    kmax = torch.zeros_like(kmin)
    update_block_summaries(k, kmin, kmax, torch.zeros(B, dtype=torch.long, device=k.device), L, block_size)
    return kmin, kmax


def run_both(attn: TopKAttention, q, k, v, pos, kernel_attn: TopKAttention | None = None):
    """(kernel, reference) outputs [B, H, Dh] of one decode step; the kernel may run another
    configuration (`kernel_attn`) than the reference."""
    a = kernel_attn or attn
    kmin, kmax = summaries(k, a.block_size)
    out = block_topk_decode(
        q[:, :, 0],
        k,
        v,
        kmin,
        kmax,
        pos,
        topk=a.topk,
        block_size=a.block_size,
        block_budget=a.block_budget,
        scale=a.scale,
        sink_tokens=a.sink_tokens,
        local_window=a.local_window,
    )
    return out, attn.attend(q, k, v, decode_context(pos, k.shape[2]))[:, :, 0]


CASES = {  # (H, Hkv, Dh, L, attention config)
    "gqa": (4, 2, 16, 80, dict(topk=5, block_size=8, block_budget=3)),
    "sinks and window": (4, 2, 16, 80, dict(topk=5, block_size=8, block_budget=3, sink_tokens=3, local_window=6)),
    "quest (topk >= candidates)": (2, 2, 16, 80, dict(topk=64, block_size=8, block_budget=3)),
    "odd sizes": (3, 1, 12, 37, dict(topk=3, block_size=5, block_budget=2, sink_tokens=1, local_window=3)),
}


@pytest.mark.parametrize("case", CASES)
def test_decode_matches_reference(case):
    H, Hkv, Dh, L, cfg = CASES[case]
    torch.manual_seed(0)
    q, k, v = torch.randn(3, H, 1, Dh), torch.randn(3, Hkv, L, Dh), torch.randn(3, Hkv, L, Dh)
    pos = torch.tensor([L - 1, 0, cfg["block_size"]])  # full cache, first token, first key of a block
    out, ref = run_both(attention(H, Hkv, Dh, L, **cfg), *(t.to(DEVICE) for t in (q, k, v, pos)))
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_ties_go_to_the_lower_index():
    """Integer keys and queries (a power-of-two scale): many exactly equal scores and block
    bounds in both implementations; the kept keys and blocks must be the same ones."""
    torch.manual_seed(1)
    H, Hkv, Dh, L = 2, 1, 16, 64
    q = torch.randint(-1, 2, (2, H, 1, Dh)).float()
    k = torch.randint(-1, 2, (2, Hkv, 8, Dh)).float().repeat(1, 1, L // 8, 1)  # every block the same
    v = torch.randn(2, Hkv, L, Dh)  # distinct values: a different pick shows
    pos = torch.tensor([L - 1, 37])
    attn = attention(H, Hkv, Dh, L, topk=4, block_size=8, block_budget=2)
    out, ref = run_both(attn, *(t.to(DEVICE) for t in (q, k, v, pos)))
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_budget_covering_every_block_is_exact_topk():
    torch.manual_seed(2)
    H, Hkv, Dh, L = 2, 1, 8, 48
    q, k, v = torch.randn(2, H, 1, Dh), torch.randn(2, Hkv, L, Dh), torch.randn(2, Hkv, L, Dh)
    pos = torch.tensor([L - 1, 20])
    exact = attention(H, Hkv, Dh, L, topk=6)
    blocks = attention(H, Hkv, Dh, L, topk=6, block_size=8, block_budget=6)
    out, ref = run_both(exact, *(t.to(DEVICE) for t in (q, k, v, pos)), kernel_attn=blocks)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_summary_update_is_exact_after_chunked_writes_and_garbage():
    """Prefill, decode steps, a garbage write past the length (an idle runner row), then the
    real write at that length: the summaries equal the reference's, bit for bit."""
    torch.manual_seed(3)
    B, Hkv, Dh, L, bs = 2, 2, 8, 40, 6
    k = torch.zeros(B, Hkv, L, Dh, device=DEVICE)
    kmin, kmax = (
        torch.zeros(B, Hkv, -(-L // bs), Dh, device=DEVICE),
        torch.zeros(B, Hkv, -(-L // bs), Dh, device=DEVICE),
    )
    ref = attention(2, Hkv, Dh, L, topk=4, block_size=bs, block_budget=2)
    length = torch.tensor([0, 3], device=DEVICE)
    for S, garbage in ((13, False), (1, False), (1, False), (5, True), (1, False), (7, False)):
        idx = length[:, None] + torch.arange(S, device=DEVICE)
        k[torch.arange(B)[:, None], :, idx] = torch.randn(B, S, Hkv, Dh, device=DEVICE) * (100 if garbage else 1)
        update_block_summaries(k, kmin, kmax, length, S, bs)
        if garbage:
            continue  # the row's length stays: its next real write goes to the same place
        length = length + S
        want_min, want_max = ref.block_summaries(k, decode_context(length - 1, L))
        for b in range(B):
            n = -(-int(length[b]) // bs)
            assert torch.equal(kmin[b, :, :n], want_min[b, :, :n]) and torch.equal(kmax[b, :, :n], want_max[b, :, :n])


def test_ragged_embedding_matches_reference():
    torch.manual_seed(4)
    cfg = ModelConfig(
        vocab_size=50,
        d_model=40,
        n_layers=1,
        n_heads=4,
        n_kv_heads=2,
        d_ff=8,
        max_seq_len=8,
        embedding=EmbeddingConfig(kind="ragged", tier_sizes=(10, 15, 25), tier_widths=(40, 20, 9)),
    )
    emb = RaggedEmbedding(cfg)
    perm = torch.randperm(50).tolist()
    emb.set_tiers([perm[:10], perm[10:25], perm[25:]])  # tiers follow no id order
    emb = emb.to(DEVICE)
    ids = torch.randint(0, 50, (3, 7), device=DEVICE)
    out = ragged_embedding(ids, emb.tier_of, emb.row_of, list(emb.tables), [p.weight for p in emb.projs])
    torch.testing.assert_close(out, emb(ids), rtol=1e-5, atol=1e-6)
    with pytest.raises(IndexError, match="token id 50 is out of range for a vocabulary of 50"):
        ragged_embedding(
            torch.tensor([[1, 50]], device=DEVICE),
            emb.tier_of,
            emb.row_of,
            list(emb.tables),
            [p.weight for p in emb.projs],
        )


def test_bad_layouts_are_named():
    k = torch.zeros(1, 1, 8, 4, device=DEVICE)
    kmin = torch.zeros(1, 1, 4, 2, device=DEVICE).transpose(2, 3)  # [1, 1, 2, 4], last-dim stride 2
    with pytest.raises(ValueError, match="kmin must have a contiguous last dimension"):
        update_block_summaries(k, kmin, kmin, torch.zeros(1, dtype=torch.long, device=DEVICE), 1, 4)
    q = torch.zeros(1, 3, 4, device=DEVICE)
    with pytest.raises(ValueError, match="3 query heads do not group over 2 KV heads"):
        block_topk_decode(
            q,
            torch.zeros(1, 2, 8, 4),
            torch.zeros(1, 2, 8, 4),
            torch.zeros(1, 2, 2, 4),
            torch.zeros(1, 2, 2, 4),
            torch.zeros(1, dtype=torch.long),
            topk=2,
            block_size=4,
            block_budget=1,
            scale=0.5,
        )


@pytest.mark.gpu
@pytest.mark.skipif(DEVICE != "cuda", reason="needs a CUDA device (the interpreter is too slow for these sizes)")
def test_decode_matches_reference_at_served_sizes_on_cuda():
    """The served settings' sizes (block 64, budget 16, k 256, sinks and a window) at 8k
    tokens, SmolLM2's heads: the compiled kernels, not the interpreter."""
    torch.manual_seed(5)
    H, Hkv, Dh, L = 9, 3, 64, 8192
    q, k, v = torch.randn(4, H, 1, Dh), torch.randn(4, Hkv, L, Dh), torch.randn(4, Hkv, L, Dh)
    pos = torch.tensor([L - 1, 5000, 64, 1])
    attn = attention(H, Hkv, Dh, L, topk=256, block_size=64, block_budget=16, sink_tokens=4, local_window=64)
    out, ref = run_both(attn, *(t.to(DEVICE) for t in (q, k, v, pos)))
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)


def test_too_many_candidates_is_refused_with_its_reason():
    k = torch.zeros(1, 1, 32768, 4, device=DEVICE)
    kmin = torch.zeros(1, 1, 512, 4, device=DEVICE)
    with pytest.raises(ValueError, match="block_budget 300 x block_size 64 gives more than 16384 candidate keys"):
        block_topk_decode(
            torch.zeros(1, 1, 4, device=DEVICE),
            k,
            k,
            kmin,
            kmin,
            torch.zeros(1, dtype=torch.long, device=DEVICE),
            topk=8,
            block_size=64,
            block_budget=300,
            scale=0.5,
        )


def test_layer_runs_the_reference_for_a_budget_too_large_for_one_program():
    from ragtop.gpu.layers import TritonBlockTopKAttention

    torch.manual_seed(6)
    L = 32768  # (300 + 1) blocks of 64 candidates > MAX_CANDIDATES
    ref = attention(2, 1, 4, L, topk=4, block_size=64, block_budget=300)
    layer = TritonBlockTopKAttention(
        ModelConfig(
            vocab_size=8,
            d_model=8,
            n_layers=1,
            n_heads=2,
            n_kv_heads=1,
            d_ff=8,
            max_seq_len=L,
            attention=AttentionConfig(kind="topk", topk=4, block_size=64, block_budget=300),
        )
    ).to(DEVICE)
    layer.allocate_summaries(1, L, layer.q_proj.weight)
    layer.rows = slice(0, 1)
    q, k, v = torch.randn(1, 2, 1, 4), torch.randn(1, 1, L, 4), torch.randn(1, 1, L, 4)
    pos = torch.tensor([20000])
    q, k, v, pos = (t.to(DEVICE) for t in (q, k, v, pos))
    torch.testing.assert_close(
        layer.attend(q, k, v, decode_context(pos, L)), ref.attend(q, k, v, decode_context(pos, L))
    )
