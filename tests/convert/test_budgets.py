"""Per-layer block budgets (ragtop/convert/budgets.py): the selection error each layer's
attention output takes at each budget, and the greedy allocation of a fixed total."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ragtop.convert.budgets import (
    SelectionShape,
    allocate,
    attention_inputs,
    attention_with_budgets,
    layer_errors,
    predicted_error,
    selection_errors,
)
from ragtop.convert.sweep import Passage
from ragtop.model import AttentionConfig, ModelConfig, Transformer

CFG = ModelConfig(vocab_size=64, d_model=32, n_layers=3, n_heads=4, n_kv_heads=2, d_ff=48, max_seq_len=160)
SHAPE = SelectionShape(block_size=8, sink_tokens=8, local_window=16, max_budget=20)


def tiny(seed: int = 0) -> Transformer:
    torch.manual_seed(seed)
    model = Transformer(CFG).eval()
    with torch.no_grad():  # sharper attention than the init's, so selection matters
        for p in model.parameters():
            p.mul_(5.0 if p.dim() > 1 else 1.0)
    return model


def passage(n: int = 160, seed: int = 1) -> Passage:
    ids = torch.randint(1, 64, (n + 1,), generator=torch.Generator().manual_seed(seed))
    return Passage(ids, n, f"random {seed}")


@torch.no_grad()
def test_errors_fall_to_zero_when_the_budget_covers_every_block():
    errors = layer_errors(tiny(), [passage()], SHAPE, query_stride=4)
    assert errors.shape == (3, 21)
    assert (errors[:, 0] > 1e-6).all()  # sinks + window + own block alone change the output
    np.testing.assert_allclose(errors[:, -1], 0.0, atol=1e-10)  # 20 blocks of 8 >= 160 keys
    assert (np.diff(errors, axis=1) <= 1e-9).mean() > 0.9  # more blocks, (nearly always) less error
    mass = layer_errors(tiny(), [passage()], SHAPE, query_stride=4, objective="mass")
    assert (mass[:, 0] > 0.01).all() and (mass <= 1).all()
    np.testing.assert_allclose(mass[:, -1], 0.0, atol=1e-6)  # every key kept: no mass dropped
    assert (np.diff(mass, axis=1) <= 1e-7).all()  # kept sets only grow with the budget
    with pytest.raises(ValueError, match="objective"):
        layer_errors(tiny(), [passage()], SHAPE, objective="loss")


@torch.no_grad()
def test_selection_error_is_the_output_change_of_block_selection():
    """The error at budget b is what TopKAttention with that budget changes in layer 1's
    output (after the output matrix) on the same input, relative to the residual stream's
    squared norm."""
    model, p = tiny(), passage()
    ids = p.ids[None, :-1]
    queries = torch.arange(80, 160, 8)
    c = attention_inputs(model, ids, queries)[1]
    errors = selection_errors(c, queries, SHAPE)
    seen = {}
    hook = model.layers[1].attn.register_forward_pre_hook(lambda mod, args: seen.setdefault("args", args))
    model(ids)
    hook.remove()
    x, ctx, _ = seen["args"]
    dense_out = model.layers[1].attn(x, ctx, None)[0, queries]
    for b in (1, 4):
        sparse = Transformer(CFG.with_attention(attention_with_budgets(SHAPE, [b] * 3))).eval()
        sparse.load_state_dict(model.state_dict())
        sparse_out = sparse.layers[1].attn(x, ctx, None)[0, queries]
        want = (((sparse_out - dense_out) ** 2).sum(-1) / c["resid"]).mean().item()
        assert want > 1e-8 and errors[b] == pytest.approx(want, rel=1e-3)


def test_allocate_gives_blocks_where_the_error_falls_fastest():
    budgets = np.arange(11)
    errors = np.stack([np.exp(-budgets / 2.0), 0.01 * np.exp(-budgets / 2.0), 0.5 * np.exp(-budgets / 4.0)])
    b = allocate(errors, mean_budget=4, floor=1)
    assert sum(b) == 12 and min(b) >= 1
    assert b[1] == 1  # the flat layer keeps the floor
    assert predicted_error(errors, b) < predicted_error(errors, [4, 4, 4])
    assert allocate(errors, mean_budget=1, floor=1) == [1, 1, 1]
    # dense layers are not counted and keep the floor
    d = allocate(errors, mean_budget=4, floor=1, dense_layers=1)
    assert d[0] == 1 and sum(d[1:]) == 8
    with pytest.raises(ValueError, match="below the floor"):
        allocate(errors, mean_budget=1, floor=2)


def test_attention_with_budgets_is_a_quest_config():
    a = attention_with_budgets(SHAPE, [2, 7, 3])
    assert a == AttentionConfig("topk", 64, 8, 7, 8, 16, 0, (2, 7, 3))
    assert Transformer(CFG.with_attention(a)).layers[1].attn.block_budget == 7


def test_cli_allocate_budgets(tmp_path, capsys):
    """`ragtop allocate-budgets` on a tiny checkpoint and a corpus folder of two training
    speeches: budgets per layer that sum to the mean, a JSON of the errors, clear errors."""
    import json

    from tokenizers import Tokenizer, models, pre_tokenizers

    from ragtop.checkpoint import save_checkpoint
    from ragtop.cli import main
    from ragtop.train.corpus import SOTU_DIRNAME

    tok = Tokenizer(models.WordLevel({f"w{i}": i for i in range(64)}, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    ckpt = save_checkpoint(tmp_path / "ckpt", tiny(), tok.to_str(), generation={"bos_token_id": 1})
    corpus = tmp_path / "data" / SOTU_DIRNAME
    corpus.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name in ("1999_a_b.txt", "2000_c_d.txt", "2011_e_f.txt"):  # 2011: held out, never measured
        (corpus / name).write_text(" ".join(f"w{i}" for i in rng.integers(1, 64, 200)))
    (corpus / ".complete").write_text("")
    out = tmp_path / "errors.json"
    args = ["allocate-budgets", str(ckpt), "--block-size", "8", "--sink-tokens", "8", "--local-window", "16"]
    common = ["--length", "128", "--data-dir", str(tmp_path / "data")]
    assert main([*args, "--mean-budget", "3", "--mean-budget", "5", *common, "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert "2000 C, 1999 A" in text and "2011" not in text
    saved = json.loads(out.read_text())
    assert sorted(saved["budgets"]) == ["3", "5"]
    assert sum(saved["budgets"]["3"]) == 9 and sum(saved["budgets"]["5"]) == 15
    assert f"--layer-budgets {','.join(map(str, saved['budgets']['5']))}" in text
    assert np.array(saved["errors"]).shape == (3, 17)  # 128 / 8 + 1 budgets
    assert main([*args, "--mean-budget", "40", *common]) == 2
    assert "--mean-budget 40: must lie in [--floor, 16]" in capsys.readouterr().err
    assert main([*args, "--mean-budget", "3", "--length", "4096", "--data-dir", str(tmp_path / "data")]) == 2
    assert "exceeds the model's context" in capsys.readouterr().err
