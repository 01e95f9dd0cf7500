"""TorchRunner with the Triton kernels (what `--device cuda` runs) against the reference
TorchRunner: prefill, mixed-length decode with an idle row in the batch, a prefix copied
between slots; block-selection attention and ragged embeddings. On CPU through Triton's
interpreter."""

import copy

import pytest
import torch

pytest.importorskip("triton", reason="triton is not installed (pip install 'ragtop[test]')")

from ragtop.errors import RagtopError  # noqa: E402
from ragtop.gpu import resolve_device, triton_path  # noqa: E402
from ragtop.gpu.layers import TritonBlockTopKAttention, TritonRaggedEmbedding  # noqa: E402
from ragtop.model import AttentionConfig, EmbeddingConfig, ModelConfig, Transformer  # noqa: E402
from ragtop.runtime.runners.base import Chunk  # noqa: E402
from ragtop.runtime.runners.torch import TorchRunner  # noqa: E402

from .conftest import DEVICE  # noqa: E402


def tiny_model(embedding: EmbeddingConfig) -> Transformer:
    torch.manual_seed(0)
    cfg = ModelConfig(
        vocab_size=64,
        d_model=16,
        n_layers=2,
        n_heads=2,
        n_kv_heads=1,
        d_ff=32,
        max_seq_len=64,
        attention=AttentionConfig(kind="topk", topk=5, block_size=4, block_budget=2, sink_tokens=1, local_window=2),
        embedding=embedding,
    )
    model = Transformer(cfg).eval()
    with torch.no_grad():  # sharper attention than the init's, so block choices matter
        for p in model.parameters():
            p.mul_(4.0 if p.dim() > 1 else 1.0)
    return model


@pytest.mark.parametrize(
    "embedding",
    [EmbeddingConfig(), EmbeddingConfig(kind="ragged", tier_sizes=(16, 48), tier_widths=(16, 8))],
    ids=["uniform", "ragged"],
)
def test_runner_with_triton_matches_reference(embedding):
    model = tiny_model(embedding)
    ref = TorchRunner(copy.deepcopy(model), device=DEVICE, triton=False)
    fast = TorchRunner(model, device=DEVICE, triton=True)
    assert fast.triton is not None and ref.triton is None
    assert all(isinstance(layer.attn, TritonBlockTopKAttention) for layer in model.layers)
    assert isinstance(model.embed, TritonRaggedEmbedding) == (embedding.kind == "ragged")
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, 64, (n,), generator=g).tolist() for n in (13, 0, 7)]

    def both(chunks):
        for want, got in zip(ref.forward(chunks), fast.forward(chunks), strict=True):
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)

    for r in (ref, fast):
        r.allocate(3, 40)
    both([Chunk(0, prompts[0], 0)])
    both([Chunk(2, prompts[2], 0)])
    lengths = {0: 13, 2: 7}
    for step in range(2):  # slots 0 and 2 decode together; slot 1, idle, gets a garbage write
        both([Chunk(s, [(step * 7 + s) % 64], n) for s, n in lengths.items()])
        lengths = {s: n + 1 for s, n in lengths.items()}
    for r in (ref, fast):  # a cached prefix ending inside a block
        r.copy_slot(0, 1, 10)
    lengths[1] = 10
    for step in range(1):
        both([Chunk(s, [(step * 5 + s) % 64], n) for s, n in sorted(lengths.items())])
        lengths = {s: n + 1 for s, n in lengths.items()}
    fast.close()
    assert all(layer.attn.kmin is None for layer in model.layers)  # the summaries go with the cache


def test_device_and_triton_errors(monkeypatch):
    if not torch.cuda.is_available():
        with pytest.raises(RagtopError, match="--device cuda: CUDA is not available here"):
            resolve_device("cuda")
    with pytest.raises(RagtopError, match="--device nonsense"):
        resolve_device("nonsense")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    model = tiny_model(EmbeddingConfig())
    with pytest.raises(RagtopError, match="cannot use the Triton kernels: .*TRITON_INTERPRET=1"):
        triton_path(model, torch.device("cpu"), True)
    assert triton_path(model, torch.device("cpu"), None) is None  # the CPU default: reference code


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error of a machine without CUDA")
def test_generate_device_cuda_without_cuda_is_a_one_line_error(tmp_path, capsys):
    from ragtop.checkpoint import save_checkpoint
    from ragtop.cli import main

    save_checkpoint(tmp_path / "ckpt", tiny_model(EmbeddingConfig()))
    assert main(["generate", str(tmp_path / "ckpt"), "--prompt", "x", "--device", "cuda"]) == 2
    err = capsys.readouterr().err
    assert "--device cuda: CUDA is not available here" in err and err.count("\n") == 1
