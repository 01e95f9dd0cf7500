"""LLMEngine over the fake runner (engine logic) and over TorchRunner (numerics)."""

from __future__ import annotations

import pytest
import torch

from ragtop.runtime import (
    EngineConfig,
    InvalidRequest,
    IterationStats,
    LLMEngine,
    PromptTooLong,
    QueueFull,
    Request,
    SamplingParams,
    SchedulerConfig,
)
from ragtop.runtime.runners.torch import TorchRunner

from .conftest import CharTokenizer, FakeRunner, greedy_reference, make_model


def fake_engine(**sched) -> tuple[LLMEngine, FakeRunner]:
    runner = FakeRunner()
    return LLMEngine(runner, CharTokenizer(), eos_token_ids=[49], config=EngineConfig(SchedulerConfig(**sched))), runner


def tokens_of(outputs, index=0) -> list[int]:
    return [t for o in outputs for d in o.deltas if d.index == index for t in d.token_ids]


def text_of(outputs, index=0) -> str:
    return "".join(d.text for o in outputs for d in o.deltas if d.index == index)


def test_fake_engine_generates_streams_and_reports_usage():
    engine, runner = fake_engine()
    stats: list[IterationStats] = []
    engine.stats_listeners.append(stats.append)
    out = engine.run_until_done([Request("r", [0, 1, 2], SamplingParams(max_tokens=4, temperature=0))])["r"]
    assert tokens_of(out) == [3, 4, 5, 6] and text_of(out) == "defg"
    assert out[-1].finished and out[-1].deltas[-1].finish_reason == "length"
    assert out[-1].usage.prompt_tokens == 3 and out[-1].usage.completion_tokens == 4
    assert sum(s.generation_tokens for s in stats) == 4 and stats[0].prompt_tokens == 3
    assert stats[-1].finished[0].finish_reason == "length" and stats[-1].num_running == 0


def test_eos_stop_token_and_ignore_eos():
    engine, _ = fake_engine()
    out = engine.run_until_done(
        [
            Request("eos", [46], SamplingParams(max_tokens=10, temperature=0)),
            Request("ignore", [46], SamplingParams(max_tokens=5, temperature=0, ignore_eos=True)),
            Request("stop_id", [1], SamplingParams(max_tokens=10, temperature=0, stop_token_ids=(4,))),
        ]
    )
    assert tokens_of(out["eos"]) == [47, 48, 49] and out["eos"][-1].deltas[-1].finish_reason == "stop"
    assert tokens_of(out["ignore"]) == [47, 48, 49, 0, 1]
    last = out["stop_id"][-1].deltas[-1]
    assert (last.finish_reason, last.stop_reason) == ("stop", 4) and text_of(out["stop_id"]) == "cd"


def test_stop_strings_across_tokens_are_cut_and_held_back():
    engine, _ = fake_engine()
    engine.add_request(Request("r", [0], SamplingParams(max_tokens=20, temperature=0, stop=("efg", "xyz"))))
    texts = []
    while engine.has_work():
        texts += [d.text for o in engine.step() for d in o.deltas]
    # tokens b c d e f ...: "e" and "ef" are held back (could start "efg"), then cut
    assert texts == ["b", "c", "d", "", "", ""] and "".join(texts) == "bcd"


def test_held_back_text_is_released_when_generation_ends_without_the_stop():
    engine, _ = fake_engine()
    out = engine.run_until_done([Request("r", [0], SamplingParams(max_tokens=3, temperature=0, stop=("de", "dx")))])[
        "r"
    ]
    assert text_of(out) == "bcd" and out[-1].deltas[-1].finish_reason == "length"


def test_n_sequences_share_the_prompt_cache():
    engine, runner = fake_engine()
    out = engine.run_until_done([Request("r", [0, 1, 2, 3], SamplingParams(n=3, max_tokens=2, temperature=0))])["r"]
    assert [tokens_of(out, i) for i in range(3)] == [[4, 5]] * 3
    assert sorted(dst for _, dst, _ in runner.copies) == [1, 2] and all(n == 4 for *_, n in runner.copies)
    assert out[-1].usage.completion_tokens == 6
    assert sum(len(c.tokens) for call in runner.calls for c in call) == 4 + 3  # prompt once, 3 decodes


def test_abort_frees_the_slot_within_one_step():
    engine, _ = fake_engine(max_batch_size=1, max_tokens_per_step=4)
    engine.add_request(Request("a", [0], SamplingParams(max_tokens=50, temperature=0)))
    engine.add_request(Request("b", [0], SamplingParams(max_tokens=2, temperature=0)))
    engine.step()
    assert engine.cache.num_free == 0
    engine.abort_request("a")
    out = engine.step()
    assert [(o.request_id, o.finished, o.deltas[0].finish_reason) for o in out][0] == ("a", True, "abort")
    assert any(o.request_id == "b" for o in out)  # b took the freed slot in the same step
    engine.run_until_done()
    assert engine.cache.num_free == 1


def test_bad_requests_are_refused_with_the_problem():
    engine, _ = fake_engine(max_batch_size=1, max_waiting=1)
    with pytest.raises(PromptTooLong, match="64 tokens but the context limit is 64"):
        engine.add_request(Request("long", [1] * 64))
    with pytest.raises(InvalidRequest, match="temperature must be >= 0"):
        engine.add_request(Request("t", [1], SamplingParams(temperature=-1)))
    with pytest.raises(InvalidRequest, match="outside the vocabulary"):
        engine.add_request(Request("s", [1], SamplingParams(stop_token_ids=(999,))))
    engine.add_request(Request("a", [1]))  # starts at the next step: it does not count as waiting
    engine.add_request(Request("b", [1]))
    with pytest.raises(QueueFull):
        engine.add_request(Request("c", [1]))


def test_generation_stops_at_the_context_limit():
    engine, _ = fake_engine()
    out = engine.run_until_done(
        [Request("r", [i % 40 for i in range(60)], SamplingParams(max_tokens=100, temperature=0, ignore_eos=True))]
    )["r"]
    assert len(tokens_of(out)) == 4 and out[-1].deltas[-1].finish_reason == "length"


# -- TorchRunner: numerics ----------------------------------------------------------------
def torch_engine(model, **sched) -> LLMEngine:
    return LLMEngine(TorchRunner(model), CharTokenizer(), config=EngineConfig(SchedulerConfig(**sched)))


@pytest.mark.parametrize("variant", ["dense", "topk", "topk-block", "ragged"])
def test_torch_runner_greedy_equals_plain_model_greedy(variant):
    model = make_model(100, variant)
    prompt = [5, 17, 42, 8, 99, 3, 61]
    want = greedy_reference(model, prompt, 12)
    out = torch_engine(model).run_until_done([Request("r", prompt, SamplingParams(max_tokens=12, temperature=0))])
    assert tokens_of(out["r"]) == want


@pytest.mark.parametrize("variant", ["dense", "topk-block"])
def test_batch_invariance_and_chunked_prefill(variant):
    """8 requests of different lengths at once, with prompts prefilled in small chunks, give
    each the tokens it gets alone with unchunked prefill."""
    model = make_model(100, variant)
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, 100, (n,), generator=g).tolist() for n in (3, 9, 17, 1, 30, 12, 5, 22)]
    params = SamplingParams(max_tokens=10, temperature=0, ignore_eos=True)
    alone = [
        tokens_of(
            torch_engine(model, max_batch_size=1, prefill_chunk=64, max_tokens_per_step=64).run_until_done(
                [Request("r", p, params)]
            )["r"]
        )
        for p in prompts
    ]
    engine = torch_engine(model, max_batch_size=8, prefill_chunk=4, max_tokens_per_step=16)
    together = engine.run_until_done([Request(str(i), p, params) for i, p in enumerate(prompts)])
    assert [tokens_of(together[str(i)]) for i in range(8)] == alone


def test_seeded_sampling_is_reproducible_whatever_the_batch():
    model = make_model(100)
    params = SamplingParams(max_tokens=16, temperature=1.5, top_p=0.95, top_k=50, seed=1234)
    alone = tokens_of(torch_engine(model).run_until_done([Request("r", [1, 2, 3], params)])["r"])
    others = [Request(f"o{i}", [7] * (i + 2), SamplingParams(max_tokens=20, temperature=1.0)) for i in range(5)]
    together = torch_engine(model).run_until_done([*others[:2], Request("r", [1, 2, 3], params), *others[2:]])
    assert tokens_of(together["r"]) == alone
    different = tokens_of(
        torch_engine(model).run_until_done(
            [Request("r", [1, 2, 3], SamplingParams(max_tokens=16, temperature=1.5, top_p=0.95, top_k=50, seed=4321))]
        )["r"]
    )
    assert different != alone


def test_torch_runner_n_greater_than_one_forks_the_real_cache():
    model = make_model(100)
    prompt = [4, 8, 15, 16, 23, 42]
    want = greedy_reference(model, prompt, 6)
    out = torch_engine(model).run_until_done([Request("r", prompt, SamplingParams(n=3, max_tokens=6, temperature=0))])[
        "r"
    ]
    assert [tokens_of(out, i) for i in range(3)] == [want] * 3


def test_logprobs_and_iteration_stats():
    engine, _ = fake_engine(max_batch_size=2)
    stats: list[IterationStats] = []
    engine.stats_listeners.append(stats.append)
    out = engine.run_until_done(
        [
            Request("a", [0, 1, 2, 3], SamplingParams(max_tokens=3, temperature=0, logprobs=2)),
            Request("b", [9], SamplingParams(max_tokens=2, temperature=0)),
        ]
    )
    lp = [d.logprobs[0] for o in out["a"] for d in o.deltas]
    assert [x.token for x in lp] == [4, 5, 6] and all(len(x.top) == 2 and x.top[0][0] == x.token for x in lp)
    assert all(d.logprobs is None for o in out["b"] for d in o.deltas)
    first, second = stats[0], stats[1]
    assert (first.batch_size, first.prompt_tokens, first.generation_tokens) == (2, 5, 2)
    assert second.context_lengths == [5, 2] and second.attention == "dense" and second.runner == "fake"
    assert second.kv_cache_bytes_used == 5 * 8 and second.kv_cache_reserved_perc == 0.5  # b finished: slot freed
    assert len(first.time_to_first_tokens_s) == 2 and len(second.inter_token_latencies_s) == 2
    assert [f.request_id for s in stats for f in s.finished] == ["b", "a"]
