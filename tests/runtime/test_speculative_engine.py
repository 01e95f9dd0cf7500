"""Self-speculative decoding through the engine: sparse drafts, dense verification on the same
exported graph (its attention_dense input), output token-for-token the dense model's.

The dense reference is the same runner with every chunk flagged dense (the same weights
under dense attention, step by step as plain decoding runs them)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from ragtop.checkpoint import save_checkpoint
from ragtop.cli import main
from ragtop.runtime import (
    EngineConfig,
    EngineError,
    InvalidRequest,
    Request,
    SamplingParams,
    SchedulerConfig,
    load_model,
)

from .conftest import make_model

pytest.importorskip("ragtop.export.onnx", reason="the ONNX exporter has not landed")
pytest.importorskip("onnxruntime")

CONTEXT = 128


@pytest.fixture(scope="module")
def exported(tokenizer, tmp_path_factory) -> dict[str, Path]:
    """Exports (and checkpoints) of one exact top-k and one block-selection tiny model."""
    out = {}
    for variant in ("topk", "topk-block", "dense"):
        root = tmp_path_factory.mktemp(f"spec-{variant}")
        ckpt = save_checkpoint(
            root / "ckpt",
            make_model(tokenizer.get_vocab_size(), variant, max_seq_len=CONTEXT),
            tokenizer.to_str(),
            generation={"bos_token_id": 0, "eos_token_id": 0},
        )
        assert main(["export", str(ckpt), str(root / "onnx"), "--no-validate"]) == 0
        out[variant], out[f"{variant}-ckpt"] = root / "onnx", ckpt
    return out


class DenseEverywhere:
    """The runner with every chunk flagged dense: the dense model on the same weights."""

    def __init__(self, runner) -> None:
        self.inner, self.spec = runner, runner.spec

    def forward(self, chunks):
        return self.inner.forward([dataclasses.replace(c, dense=True) for c in chunks])

    def __getattr__(self, name):
        return getattr(self.inner, name)


def engine(path: Path, gamma: int = 0, dense: bool = False, dense_up_to: tuple[int, int] = (0, 0), **sched):
    model = load_model(path, threads=1)
    if dense:
        model.runner = DenseEverywhere(model.runner)
    config = SchedulerConfig(**{"max_batch_size": 4, "prefill_chunk": 16, "max_tokens_per_step": 64, **sched})
    eng = model.engine(
        EngineConfig(
            config,
            context_limit=CONTEXT,
            speculative_tokens=gamma,
            dense_prefill_tokens=dense_up_to[0],
            dense_decode_tokens=dense_up_to[1],
        )
    )
    eng.stats = []
    eng.stats_listeners.append(eng.stats.append)
    return eng


def prompts(n: int = 3, seed: int = 1) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(1, 300, (length,), generator=g).tolist() for length in (40, 9, 61, 23)[:n]]


def generate(eng, requests: list[Request]) -> dict[str, list[tuple]]:
    """Per request id: (index, text, tokens, finish_reason, stop_reason) per sequence."""
    out = eng.run_until_done(requests)
    result = {}
    for rid, outputs in out.items():
        seqs: dict[int, list] = {}
        for o in outputs:
            for d in o.deltas:
                s = seqs.setdefault(d.index, [d.index, "", [], None, None])
                s[1] += d.text
                s[2] += d.token_ids
                if d.finish_reason:
                    s[3], s[4] = d.finish_reason, d.stop_reason
        result[rid] = [tuple(seqs[i][:2]) + (tuple(seqs[i][2]), *seqs[i][3:]) for i in sorted(seqs)]
    return result


def spec_counts(eng) -> tuple[int, int]:
    return sum(s.spec_draft_tokens for s in eng.stats), sum(s.spec_accepted_tokens for s in eng.stats)


GREEDY = SamplingParams(max_tokens=30, temperature=0, ignore_eos=True)


@pytest.mark.parametrize("variant", ["topk", "topk-block"])
def test_greedy_output_is_dense_for_every_gamma(exported, variant):
    """Three requests decoding together, prefills chunked: speculation on (several draft
    lengths) gives exactly the dense model's tokens, while plain sparse decoding differs."""
    path = exported[variant]
    requests = [Request(str(i), p, GREEDY) for i, p in enumerate(prompts())]
    want = generate(engine(path, dense=True), requests)
    assert generate(engine(path), requests) != want  # sparse attention changes this output
    for gamma in (1, 3, 6):
        eng = engine(path, gamma)
        assert generate(eng, requests) == want, f"gamma={gamma}"
        drafted, accepted = spec_counts(eng)
        assert drafted > 0 and 0 < accepted <= drafted


@pytest.mark.parametrize("dense_up_to", [(CONTEXT, 0), (CONTEXT, 50), (0, 50)])
def test_dense_where_sparse_does_not_pay(exported, dense_up_to):
    """dense_prefill_tokens / dense_decode_tokens: prompt chunks ending at or below the first
    attend densely, decode steps at contexts up to the second too, the rest sparsely. Three
    requests batched with chunked prefills give, token for token, what the runner gives one
    prompt at a time under the same rule (prompts of 9-61 tokens, 30 new tokens: decoding
    crosses context 50). A dense model (no on-demand mode) ignores the settings."""
    import numpy as np

    from ragtop.runtime.runners.base import Chunk

    path = exported["topk-block"]
    ps = prompts()
    requests = [Request(str(i), p, GREEDY) for i, p in enumerate(ps)]
    got = generate(engine(path, dense_up_to=dense_up_to), requests)
    assert got != generate(engine(path), requests)  # the setting changes this output
    assert got != generate(engine(path, dense=True), requests)

    runner = load_model(path, threads=1).runner
    runner.allocate(1, CONTEXT)
    for i, p in enumerate(ps):
        runner.rollback(0, 0, 0)
        (logits,) = runner.forward([Chunk(0, p, 0, "last", dense=len(p) <= dense_up_to[0])])
        tokens = []
        for _ in range(GREEDY.max_tokens):
            tokens.append(int(np.argmax(np.asarray(logits).reshape(-1))))
            context = len(p) + len(tokens)
            (logits,) = runner.forward([Chunk(0, tokens[-1:], context - 1, "last", dense=context <= dense_up_to[1])])
        assert list(got[str(i)][0][2]) == tokens, i
    dense_model = exported["dense"]
    assert generate(engine(dense_model, dense_up_to=dense_up_to), requests) == generate(engine(dense_model), requests)


def test_speculating_and_plain_requests_share_steps(exported):
    """Per-request option: speculating requests get dense's output, plain ones (0 drafts)
    and a seeded sampled speculating one exactly what they get alone."""
    path = exported["topk-block"]
    ps = prompts(4, seed=3)
    dense = generate(engine(path, dense=True), [Request(str(i), p, GREEDY) for i, p in enumerate(ps)])
    sparse = generate(engine(path), [Request(str(i), p, GREEDY) for i, p in enumerate(ps)])
    sampled = SamplingParams(max_tokens=12, temperature=0.8, seed=5, ignore_eos=True)
    alone = generate(engine(path), [Request("s", ps[0], sampled, num_speculative_tokens=4)])
    mixed = [
        Request("0", ps[0], GREEDY, num_speculative_tokens=4),
        Request("1", ps[1], GREEDY, num_speculative_tokens=0),
        Request("2", ps[2], GREEDY, num_speculative_tokens=2),
        Request("3", ps[3], GREEDY),
        Request("s", ps[0], sampled, num_speculative_tokens=4),
    ]
    eng = engine(path, gamma=0, max_batch_size=5)
    got = generate(eng, mixed)
    assert got["0"] == dense["0"] and got["2"] == dense["2"]
    assert got["1"] == sparse["1"] and got["3"] == sparse["3"]
    assert got["s"] == alone["s"] and len(got["s"][0][2]) == 12
    assert spec_counts(eng)[0] > 0


def test_sampled_requests_speculate_with_dense_sampling_distribution(exported):
    """Sampled requests speculate by rejection sampling (drafts drawn from the sparse
    model, kept with probability min(1, p/q)): the tokens follow the dense model's sampling
    distribution. Same seeds, so the first token (from the dense prefill) is the same in
    both runs; the next two come from verification rounds, compared as joint histograms.
    (tests/runtime/test_sampling.py checks the rejection step itself to sampling noise.)"""
    from collections import Counter

    path = exported["topk-block"]
    prompt = prompts(1, seed=4)[0]
    n = 400

    def tokens(eng, gamma):
        params = [SamplingParams(max_tokens=3, temperature=1.0, top_k=3, seed=i, ignore_eos=True) for i in range(n)]
        out = generate(eng, [Request(str(i), prompt, p, num_speculative_tokens=gamma) for i, p in enumerate(params)])
        return [out[str(i)][0][2] for i in range(n)]

    dense = tokens(engine(path, dense=True, max_batch_size=16, max_waiting=n), 0)
    eng = engine(path, max_batch_size=16, max_waiting=n)
    spec = tokens(eng, 2)
    assert [t[0] for t in spec] == [t[0] for t in dense]
    assert all(len(t) == 3 for t in spec)
    drafted, accepted = spec_counts(eng)
    assert drafted > 0 and 0 < accepted < drafted  # some drafts are rejected and redrawn
    for length in (2, 3):  # (first, second) and (first, second, third): 9 and 27 cells with top_k=3
        want, got = Counter(tuple(t[:length]) for t in dense), Counter(tuple(t[:length]) for t in spec)
        tv = 0.5 * sum(abs(want[k] - got[k]) for k in {*want, *got}) / n
        assert tv < 0.1 * length, (length, tv, want.most_common(5), got.most_common(5))  # noise: ~0.05 / ~0.12


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(max_tokens=7, temperature=0, ignore_eos=True),  # ends mid-round
        SamplingParams(max_tokens=13, temperature=0, n=2, ignore_eos=True),  # n > 1: siblings copy the prompt
        SamplingParams(max_tokens=20, temperature=0, ignore_eos=True, logprobs=2, repetition_penalty=1.3),
        SamplingParams(max_tokens=25, temperature=0, min_tokens=3),  # EOS may end it
    ],
    ids=["max_tokens", "n2", "logprobs-penalty", "eos"],
)
def test_stops_behave_as_without_speculation(exported, params):
    path = exported["topk"]
    requests = [Request(str(i), p, params) for i, p in enumerate(prompts())]
    want = generate(engine(path, dense=True), requests)
    assert generate(engine(path, 4), requests) == want


def test_stop_strings_and_stop_tokens_mid_round(exported):
    """Stop strings and stop token ids taken from inside dense's output: speculation stops at
    the same token with the same text, even when the stop falls inside an accepted run."""
    path = exported["topk"]
    ps = prompts()
    base = generate(engine(path, dense=True), [Request(str(i), p, GREEDY) for i, p in enumerate(ps)])
    requests = []
    for i, p in enumerate(ps):
        _, text, tokens, *_ = base[str(i)][0]
        stop = text[len(text) // 2 : len(text) // 2 + 3]
        requests.append(Request(f"str{i}", p, dataclasses.replace(GREEDY, stop=(stop,))))
        requests.append(Request(f"tok{i}", p, dataclasses.replace(GREEDY, stop_token_ids=(tokens[11],))))
    want = generate(engine(path, dense=True), requests)
    got = generate(engine(path, 5), requests)
    assert got == want
    assert all(got[f"tok{i}"][0][3] == "stop" for i in range(len(ps)))
    assert any(got[f"str{i}"][0][3] == "stop" for i in range(len(ps)))  # (a cut may split a character)


def test_torch_runner_speculates_too(exported):
    ckpt = exported["topk-block-ckpt"]
    requests = [Request(str(i), p, GREEDY) for i, p in enumerate(prompts(2))]
    want = generate(engine(ckpt, dense=True), requests)
    assert generate(engine(ckpt, 3), requests) == want


def test_prefix_cache_keeps_dense_and_sparse_caches_apart(exported):
    """A speculating request's cache holds dense keys/values: a plain request never reuses it
    (nor the reverse), while requests of the same kind do. Outputs stay what they are alone."""
    path = exported["topk"]
    doc = prompts(1, seed=7)[0]
    first, follow = doc + [5, 6], doc + [7, 8, 9]
    eng = engine(path, gamma=0)
    cached = []
    for rid, prompt, gamma in (("s1", first, 3), ("p1", follow, 0), ("p2", follow, 0), ("s2", follow, 3)):
        alone = generate(engine(path, gamma), [Request(rid, prompt, GREEDY)])[rid][0][2]
        out = eng.run_until_done([Request(rid, prompt, GREEDY, num_speculative_tokens=gamma)])[rid]
        cached.append(out[-1].usage.cached_tokens)
        assert generate_tokens(out) == alone
    assert cached[0] == 0 and cached[1] == 0  # the speculating request's cache is not the plain one's
    assert cached[2] > 0 and cached[3] > 0  # same kind: reused


def generate_tokens(outputs) -> tuple[int, ...]:
    return tuple(t for o in outputs for d in o.deltas for t in d.token_ids)


def test_bad_settings_are_clear_errors(exported):
    eng = engine(exported["topk"])
    for bad in (-1, 17):
        with pytest.raises(InvalidRequest, match="num_speculative_tokens must be in 0..16"):
            eng.add_request(Request("x", [1, 2], GREEDY, num_speculative_tokens=bad))
    dense = engine(exported["dense"])
    with pytest.raises(InvalidRequest, match="needs a sparse"):
        dense.add_request(Request("x", [1, 2], GREEDY, num_speculative_tokens=2))
    dense.add_request(Request("y", [1, 2], GREEDY, num_speculative_tokens=0))  # off: fine
    with pytest.raises(EngineError, match="needs a sparse"):
        engine(exported["dense"], 2)
    with pytest.raises(EngineError, match="num_speculative_tokens must be in"):
        EngineConfig(speculative_tokens=-2)


def test_rollback_leaves_exact_block_summaries(exported):
    """Rejected drafts merged their keys into the block summaries; after each verification
    the runner rebuilds them, so every written block's min/max is exactly that of the keys
    the sequence kept (what a run without drafts holds)."""
    import numpy as np

    eng = engine(exported["topk-block"], 4)
    eng.run_until_done([Request("r", prompts(1)[0], GREEDY)])
    drafted, accepted = spec_counts(eng)
    assert accepted < drafted  # some drafts were rejected and rolled back
    runner, slot = eng.runner, 0
    kept = len(eng.cache.held[slot])
    bs = runner.block_size
    for i in range(runner.n_layers):
        keys = runner.buffers[i, "key"][slot]
        for blk in range(-(-kept // bs)):
            rows = keys[:, blk * bs : min((blk + 1) * bs, kept)]
            np.testing.assert_array_equal(runner.buffers[i, "key_min"][slot, :, blk], rows.min(axis=1))
            np.testing.assert_array_equal(runner.buffers[i, "key_max"][slot, :, blk], rows.max(axis=1))
