import json

import numpy as np
import pytest
import torch

from ragtop.checkpoint import load_checkpoint, save_checkpoint
from ragtop.errors import RagtopError
from ragtop.train.corpus import HELDOUT_FROM_YEAR, load_sotu, split_by_year
from ragtop.train.tiers import plan_tiers
from ragtop.train.trainer import TrainConfig, train


def test_corpus_split_by_year(data_dir):
    train_docs, heldout = split_by_year(load_sotu(data_dir))
    assert len(train_docs) > 200 and len(heldout) >= 10
    assert max(d.year for d in train_docs) < HELDOUT_FROM_YEAR <= min(d.year for d in heldout)
    assert "Congress" in train_docs[0].text


def test_tiers_cut_by_cumulative_mass():
    counts = np.array([50, 1, 30, 0, 10, 5, 3, 1])  # total 100
    plan = plan_tiers(counts, d_model=64, mass_cuts=(0.8, 0.95), width_factors=(1, 0.25, 0.0625))
    assert plan.token_ids == ((0, 2), (4, 5), (6, 1, 7, 3))
    assert plan.widths == (64, 16, 4)
    assert plan.mass == pytest.approx((0.8, 0.15, 0.05))
    with pytest.raises(RagtopError, match="mass cuts"):
        plan_tiers(counts, 64, (0.9, 0.5), (1, 0.5, 0.25))


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, data_dir):
    out = tmp_path_factory.mktemp("run") / "tiny"
    tc = TrainConfig(preset="tiny", attention="topk", topk=8, embedding="ragged", steps=30, eval_every=30, log_every=5)
    train(tc, out, data_dir, progress=False)
    return tc, out


def test_tiny_preset_trains_and_loss_falls(tiny_run):
    _, out = tiny_run
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in log if "loss" in r]
    assert losses[-1] < losses[0] - 0.5
    assert any("heldout_ppl" in r for r in log)
    for f in ("config.json", "model.safetensors", "tokenizer.json", "tiers.json", "generation_config.json"):
        assert (out / f).is_file(), f
    tiers = json.loads((out / "tiers.json").read_text())["tiers"]
    assert sum(len(t["token_ids"]) for t in tiers) == 512


def test_checkpoint_round_trip_is_exact(tiny_run, tmp_path):
    _, out = tiny_run
    ckpt = load_checkpoint(out)
    save_checkpoint(tmp_path / "copy", ckpt.model, (out / "tokenizer.json").read_text(), ckpt.meta, ckpt.generation)
    again = load_checkpoint(tmp_path / "copy")
    assert again.config == ckpt.config
    for (n, a), (_, b) in zip(ckpt.model.state_dict().items(), again.model.state_dict().items(), strict=True):
        assert torch.equal(a, b), n
    assert again.model.embed.tiers() == ckpt.model.embed.tiers()


def test_resume_takes_the_same_steps(tiny_run, tmp_path, data_dir):
    """Same batches, same optimizer state: the resumed weights equal the uninterrupted ones.

    (Ragged runs match to float rounding, ~1e-7, not bit for bit: two identical ragged runs
    differ by as much on this machine; dense runs are bit-identical.)
    """
    tc, out = tiny_run
    train(tc, tmp_path / "resumed", data_dir, progress=False, until=12)
    train(tc, tmp_path / "resumed", data_dir, progress=False)
    a, b = load_checkpoint(out).model.state_dict(), load_checkpoint(tmp_path / "resumed").model.state_dict()
    for n in a:
        torch.testing.assert_close(a[n], b[n], rtol=1e-5, atol=1e-6, msg=n)


def test_resume_with_other_settings_is_refused(tiny_run, data_dir):
    tc, out = tiny_run
    other = TrainConfig(**{**tc.__dict__, "topk": 4})
    with pytest.raises(RagtopError, match="different settings"):
        train(other, out, data_dir, progress=False)
