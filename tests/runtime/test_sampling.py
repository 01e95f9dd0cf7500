"""The per-sequence sampler: truncation, penalties, seeds, logprobs, validation."""

from __future__ import annotations

import pytest
import torch

from ragtop.runtime import InvalidRequest, SamplingParams
from ragtop.runtime.sampling import SequenceSampler

V = 10


def sampler(prompt=(), eos=(), seed=0, **kw) -> SequenceSampler:
    return SequenceSampler(SamplingParams(**kw), list(prompt), V, eos, seed=seed)


def draws(s: SequenceSampler, logits: torch.Tensor, n: int) -> list[int]:
    return [s.sample(logits).token for _ in range(n)]


LOGITS = torch.tensor([0.0, 1.0, 3.0, 2.5, -1.0, 0.5, 2.9, 0.0, 0.2, 1.5])


def test_greedy_and_top_k_one():
    assert sampler(temperature=0).sample(LOGITS).token == 2
    assert set(draws(sampler(temperature=1.0, top_k=1), LOGITS, 20)) == {2}


def test_truncations_keep_only_the_allowed_tokens():
    assert set(draws(sampler(temperature=1.0, top_k=3), LOGITS, 200)) <= {2, 3, 6}
    probs = torch.softmax(LOGITS, -1)
    order = probs.argsort(descending=True).tolist()
    assert set(draws(sampler(temperature=1.0, top_p=0.5), LOGITS, 200)) <= set(order[:2])  # 2 and 6 hold > 50%
    allowed = {i for i in range(V) if probs[i] >= 0.5 * probs.max()}
    assert set(draws(sampler(temperature=1.0, min_p=0.5), LOGITS, 200)) <= allowed


def test_seed_reproduces_and_differs_across_seeds():
    a = draws(sampler(temperature=1.0, seed=7), LOGITS, 30)
    assert draws(sampler(temperature=1.0, seed=7), LOGITS, 30) == a
    assert draws(sampler(temperature=1.0, seed=8), LOGITS, 30) != a


def test_penalties():
    s = sampler(temperature=0, repetition_penalty=10.0, prompt=[2])
    assert s.sample(LOGITS).token == 6  # token 2 (in the prompt) is penalised
    s = sampler(temperature=0, presence_penalty=2.0)
    assert draws(s, LOGITS, 3) == [2, 6, 3]  # each chosen token loses 2.0 once chosen
    s = sampler(temperature=0, frequency_penalty=0.3)
    assert draws(s, LOGITS, 3) == [2, 6, 2]  # 3.0-0.3=2.7 < 2.9, then 2.7 > 2.6


def test_min_tokens_suppresses_eos_and_logit_bias():
    s = sampler(temperature=0, eos=[2], min_tokens=2)
    assert draws(s, LOGITS, 3) == [6, 6, 2]
    assert sampler(temperature=0, logit_bias={4: 100.0}).sample(LOGITS).token == 4


def test_logprobs_are_the_raw_distribution_with_alternatives():
    out = sampler(temperature=0, logprobs=3, repetition_penalty=5.0, prompt=[2]).sample(LOGITS)
    raw = torch.log_softmax(LOGITS, -1)
    assert out.token == 6 and out.logprob == pytest.approx(float(raw[6]))
    assert [t for t, _ in out.top] == [2, 6, 3] and out.top[0][1] == pytest.approx(float(raw[2]))
    assert sampler(temperature=0).sample(LOGITS).logprob is None


@pytest.mark.parametrize(
    "kw,message",
    [
        ({"max_tokens": 0}, "max_tokens must be >= 1"),
        ({"top_p": 0.0}, "top_p must be in"),
        ({"top_k": -2}, "top_k must be"),
        ({"logprobs": 21}, "logprobs must be in"),
        ({"n": 0}, "n must be >= 1"),
        ({"stop": ("",)}, "stop strings must not be empty"),
        ({"logit_bias": {V: 1.0}}, "outside the vocabulary"),
    ],
)
def test_validation_names_the_field(kw, message):
    with pytest.raises(InvalidRequest, match=message):
        SamplingParams(**kw).validate(V)


def test_a_single_stop_string_is_accepted():
    assert SamplingParams(stop="END").stop == ("END",)


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(temperature=1.0),
        SamplingParams(temperature=0.7, top_k=4),
        SamplingParams(temperature=1.3, top_p=0.8),
        SamplingParams(temperature=0),
    ],
)
def test_speculative_rejection_sampling_keeps_the_target_distribution(params):
    """A draft d ~ q (another model's distribution) verified against the target's logits
    yields tokens distributed as the target's own sampling distribution p, whatever q is;
    drafts are kept about sum(min(p, q)) of the time (Leviathan et al. 2023)."""
    import numpy as np

    target = np.array([2.0, 1.5, 0.3, -0.5, 1.0, -2.0, 0.0, 0.9])
    draft_logits = np.array([0.5, 2.5, 0.0, 1.0, -1.0, -2.0, 1.2, 0.1])  # disagrees with the target
    s = SequenceSampler(params, [], target.size, seed=7)
    p, q = s.distribution(target), s.distribution(draft_logits)
    assert p.sum() == pytest.approx(1.0) and q.sum() == pytest.approx(1.0)
    n, counts, kept = 20000, np.zeros(target.size), 0
    for _ in range(n):
        d, q_d = s.draft(draft_logits)
        assert q_d[d] > 0
        token = s.verify_draft(target, d, q_d).token
        counts[token] += 1
        kept += token == d
    assert s.generated == n  # every verification counts its one token; drafting counts nothing
    assert 0.5 * np.abs(counts / n - p).sum() < 0.015  # total variation: sampling noise is ~0.005
    assert kept / n == pytest.approx(np.minimum(p, q).sum(), abs=0.015)


def test_distribution_is_what_sample_draws_from():
    """One-hot on the argmax when greedy; after bias, penalties and truncation otherwise."""
    import numpy as np

    logits = np.array([0.1, 3.0, 2.9, -1.0])
    assert SequenceSampler(SamplingParams(temperature=0), [], 4).distribution(logits).tolist() == [0, 1, 0, 0]
    p = SequenceSampler(SamplingParams(temperature=1.0, top_k=2, logit_bias={3: 10.0}), [], 4).distribution(logits)
    assert p[0] == p[2] == 0 and p[3] > p[1] > 0 and p.sum() == pytest.approx(1.0)
