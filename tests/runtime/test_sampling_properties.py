"""The sampler is total over the domain `SamplingParams.validate` accepts (Hypothesis):
whatever the logits (finite) and parameters, it returns a token of the vocabulary that the
truncations allow; non-finite logits fail with SamplingError, never a crash of another kind."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ragtop.runtime import InvalidRequest, SamplingParams
from ragtop.runtime.errors import SamplingError
from ragtop.runtime.sampling import SEED_MAX, SEED_MIN, SequenceSampler

V = 40

finite32 = st.floats(allow_nan=False, allow_infinity=False, width=32)
# Random logits, plus adversarial ones: all equal, one spike, huge magnitudes, tiny differences.
logits_st = st.one_of(
    st.lists(finite32, min_size=V, max_size=V),
    st.lists(st.floats(-30, 30, width=32), min_size=V, max_size=V),
    st.builds(lambda c: [c] * V, finite32),
    st.builds(lambda i, c: [0.0] * i + [c] + [0.0] * (V - i - 1), st.integers(0, V - 1), finite32),
    st.builds(lambda b: [b + i * 1e-4 for i in range(V)], st.floats(-1e3, 1e3)),
)
positive = st.one_of(
    st.sampled_from([5e-324, 1e-300, 1e-45, 1e-8, 1.0, 1e8, 1e300, 1.7e308]),
    st.floats(min_value=5e-324, max_value=1.7e308, allow_nan=False, allow_infinity=False),
)
params_st = st.builds(
    SamplingParams,
    max_tokens=st.just(8),
    temperature=st.one_of(st.just(0.0), positive),
    top_p=st.one_of(st.just(1.0), st.floats(min_value=1e-12, max_value=1.0, exclude_min=True)),
    top_k=st.integers(-1, V + 3),
    min_p=st.floats(0.0, 1.0),
    repetition_penalty=positive,
    presence_penalty=st.floats(-2.0, 2.0),
    frequency_penalty=st.floats(-2.0, 2.0),
    min_tokens=st.integers(0, 8),
    stop_token_ids=st.lists(st.integers(0, V - 1), max_size=V).map(tuple),
    logprobs=st.one_of(st.none(), st.integers(0, 20)),
    logit_bias=st.dictionaries(st.integers(0, V - 1), st.floats(-100.0, 100.0), max_size=V),
    seed=st.integers(SEED_MIN, SEED_MAX - 1),
)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    params=params_st,
    steps=st.lists(logits_st, min_size=1, max_size=4),
    prompt=st.lists(st.integers(0, V - 1), max_size=6),
    eos=st.lists(st.integers(0, V - 1), max_size=V),
)
def test_any_valid_parameters_and_finite_logits_give_a_token(params, steps, prompt, eos):
    params.validate(V)
    s = SequenceSampler(params, prompt, V, eos, seed=params.seed)
    for raw in steps:
        logits = np.asarray(raw, dtype=np.float32)
        processed = s.process(logits)
        assert not np.isnan(processed).any()
        out = s.sample(logits)
        assert 0 <= out.token < V
        if params.greedy and np.isfinite(processed.max()) or params.top_k == 1 and processed.max() > -np.inf:
            assert processed[out.token] == processed.max()  # the best token (ties: any of them)
        if params.top_k > 0 and processed.max() > -np.inf:
            assert (processed > processed[out.token]).sum() < params.top_k  # within the k best
        if params.logprobs is not None:
            assert math.isfinite(out.logprob) and out.logprob <= 1e-9
            assert len(out.top) == params.logprobs


@settings(max_examples=50, deadline=None)
@given(bad=st.sampled_from([np.nan, np.inf, -np.inf]), where=st.integers(0, V - 1), params=params_st)
def test_non_finite_logits_fail_this_sequence_with_a_clear_error(bad, where, params):
    logits = np.zeros(V, dtype=np.float32)
    logits[where] = bad
    with pytest.raises(SamplingError, match="non-finite logits"):
        SequenceSampler(params, [], V, seed=0).sample(logits)


@pytest.mark.parametrize(
    "kw",
    [
        {"temperature": 5e-324},
        {"repetition_penalty": 1e-45},
        {"repetition_penalty": 1e-45, "temperature": 1e-300},
        {"temperature": 1.7e308},
        {"repetition_penalty": 1.7e308, "temperature": 1e-3},
    ],
)
def test_the_reported_crashes_sample_like_the_limit(kw):
    """The requests that stopped the engine: a tiny temperature samples the argmax (the limit
    of softmax as T -> 0); a tiny repetition penalty still gives a valid draw."""
    logits = np.array([0.0, 1.0, 3.0, 2.5, -1.0, 0.5, 2.9, 0.0, 0.2, 1.5] * 4, dtype=np.float32)
    s = SequenceSampler(SamplingParams(**kw), [2], V, seed=1)
    tokens = {s.sample(logits).token for _ in range(20)}
    assert tokens <= set(range(V))
    if kw == {"temperature": 5e-324}:
        assert tokens <= {2, 12, 22, 32}  # the best logit (3.0, four times): ties share the mass


def test_everything_suppressed_falls_back_to_the_models_argmax():
    p = SamplingParams(temperature=1.0, min_tokens=4, stop_token_ids=tuple(range(V)))
    logits = np.arange(V, dtype=np.float32)
    assert SequenceSampler(p, [], V, seed=0).sample(logits).token == V - 1


@pytest.mark.parametrize(
    "kw, param",
    [
        ({"seed": SEED_MAX + 1}, "seed"),
        ({"seed": SEED_MIN - 1}, "seed"),
        ({"seed": SEED_MAX, "n": 2}, "seed"),
        ({"temperature": math.inf}, "temperature"),
        ({"temperature": math.nan}, "temperature"),
        ({"repetition_penalty": math.inf}, "repetition_penalty"),
        ({"logit_bias": {1: math.nan}}, "logit_bias"),
        ({"stop_token_ids": (V,)}, "stop_token_ids"),
    ],
)
def test_validation_refuses_what_the_sampler_cannot_take_naming_the_field(kw, param):
    with pytest.raises(InvalidRequest) as e:
        SamplingParams(**kw).validate(V)
    assert e.value.param == param


def test_seed_range_edges_are_accepted_and_reproducible():
    logits = np.linspace(0, 1, V, dtype=np.float32)
    for seed in (SEED_MIN, -1, 0, SEED_MAX):
        SamplingParams(seed=seed).validate(V)
        a = [SequenceSampler(SamplingParams(seed=seed), [], V, seed=seed).sample(logits).token for _ in range(3)]
        b = [SequenceSampler(SamplingParams(seed=seed), [], V, seed=seed).sample(logits).token for _ in range(3)]
        assert a == b
