"""Arrival schedules (Poisson with a fixed seed) and exact-length prompts."""

import numpy as np
import pytest

from loadtests.workload import arrival_times, make_requests, tile


def test_poisson_arrivals_are_fixed_by_the_seed():
    a = arrival_times(50, rate=4.0, seed=7)
    assert a == arrival_times(50, rate=4.0, seed=7)
    assert a != arrival_times(50, rate=4.0, seed=8)
    assert all(x < y for x, y in zip(a, a[1:], strict=False)) and a[0] > 0
    # exactly numpy's exponential draws (gamma with shape 1) with mean 1/rate
    gaps = np.random.default_rng(7).gamma(1.0, 1 / 4.0, 50)
    np.testing.assert_allclose(a, np.cumsum(gaps))


def test_poisson_rate_and_dispersion():
    a = np.asarray(arrival_times(20000, rate=10.0, seed=0))
    gaps = np.diff(np.concatenate([[0.0], a]))
    assert gaps.mean() == pytest.approx(0.1, rel=0.03)
    assert gaps.std() / gaps.mean() == pytest.approx(1.0, rel=0.05)  # exponential: CV = 1
    # counts per 1-second window are Poisson(10): variance ~ mean
    counts = np.bincount(a.astype(int))[:-1]
    assert counts.mean() == pytest.approx(10, rel=0.05) and counts.var() == pytest.approx(10, rel=0.15)
    regular = np.diff(arrival_times(5000, rate=10.0, seed=0, burstiness=4.0))
    assert regular.std() / regular.mean() == pytest.approx(0.5, rel=0.1)  # gamma shape 4: CV = 1/2


def test_all_at_once_and_bad_rates():
    assert arrival_times(3, float("inf")) == [0.0, 0.0, 0.0]
    assert arrival_times(0, 1.0) == []
    for bad in (0.0, -1.0):
        with pytest.raises(ValueError):
            arrival_times(3, bad)
    with pytest.raises(ValueError):
        arrival_times(3, 1.0, burstiness=0)


def test_prompts_have_exact_lengths():
    base = list(range(10))
    assert tile(base, 25, 3) == (base * 3)[3:28]
    reqs = make_requests(base, 5, input_len=37, output_len=9, seed=1)
    assert [len(r.prompt) for r in reqs] == [37] * 5 and {r.max_tokens for r in reqs} == {9}
    assert len({tuple(r.prompt) for r in reqs}) > 1  # different offsets
    assert make_requests(base, 5, 37, 9, seed=1) == reqs


def test_mix_draws_lengths_around_the_medians():
    reqs = make_requests(list(range(50)), 400, input_len=100, output_len=20, dataset="mix", seed=3)
    ins = np.array([len(r.prompt) for r in reqs])
    outs = np.array([r.max_tokens for r in reqs])
    assert np.median(ins) == pytest.approx(100, rel=0.15) and np.median(outs) == pytest.approx(20, rel=0.15)
    assert ins.min() >= 1 and ins.max() <= 400 and outs.max() <= 80 and len(set(ins)) > 20
    assert make_requests(list(range(50)), 400, 100, 20, "mix", seed=3) == reqs
    with pytest.raises(ValueError):
        make_requests([1], 1, 1, 1, dataset="sharegpt")
    with pytest.raises(ValueError):
        make_requests([1], 1, 0, 1)
