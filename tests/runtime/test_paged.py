"""Paged KV cache: block allocator, paged cache manager, and the paged graph (plugin kernel and
standard-op body) against the contiguous layout, greedy token for token; preemption when the
pool runs out of pages."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from ragtop.checkpoint import save_checkpoint
from ragtop.cli import main
from ragtop.runtime import EngineConfig, Request, SamplingParams, SchedulerConfig, load_model
from ragtop.runtime.errors import EngineError
from ragtop.runtime.kv_cache import BlockAllocator, PagedKVCacheManager, PagePlan, plan_pages

from .conftest import make_model

pytest.importorskip("onnxruntime")


# -- allocator and manager (no model) ------------------------------------------------------
def test_block_allocator_counts_references():
    a = BlockAllocator(3)
    p, q = a.allocate(), a.allocate()
    assert (p, q) == (0, 1) and a.num_free == 1
    a.incref([p])
    a.decref([p])
    assert a.num_free == 1  # still referenced once
    a.decref([p, q])
    assert a.num_free == 3
    with pytest.raises(EngineError, match="freed twice"):
        a.decref([p])


def test_paged_manager_grows_shares_and_evicts():
    m = PagedKVCacheManager(PagePlan(num_pages=8, page_size=4, slots=4, context_limit=28, bytes_per_token=10))
    (s,) = m.allocate(1)
    assert m.ensure(s, 5) and len(m.tables[s]) == 2  # positions 0..4: two pages
    assert m.ensure(s, 8) and len(m.tables[s]) == 2 and m.ensure(s, 9) and len(m.tables[s]) == 3
    tokens = list(range(9))
    m.lengths[s] = 9
    m.free(s, tokens)  # full pages (8 tokens) stay cached, the partial third page is freed
    assert len(m.tables[s]) == 2 and m.allocator.num_free == 6
    hit = m.match(tokens[:8] + [99, 98], n=1)
    assert hit is not None and hit.tokens == 8
    pinned = m.pin(hit.slot, hit.tokens)
    (t,) = m.allocate(1, avoid=hit.slot)
    m.attach(t, pinned)
    assert m.tables[t] == m.tables[s] and m.allocator.refs[m.tables[t]].tolist() == [2, 2]  # shared, not copied
    assert m.usage().blocks_used == 2
    (u,) = m.allocate(1)
    assert m.ensure(u, 24) and m.allocator.num_free == 0 and len(m.tables[s]) == 2
    # the pool runs short: the freed slot's cached prefix is evicted (its pages survive: t shares them)
    assert not m.ensure(u, 28)
    assert m.tables[s] == [] and m.allocator.refs[m.tables[t]].tolist() == [1, 1]
    assert not m.can_admit(4)
    m.free(u, ())  # no tokens to keep: its 6 pages go back
    assert m.allocator.num_free == 6 and m.can_admit(4 * 5) and not m.can_admit(4 * 6)  # watermark: 1 page


def test_plan_pages_fits_the_budget_and_caps_one_sequence():
    plan = plan_pages(bytes_per_token=100, max_model_len=8192, page_size=32, max_batch_size=8, memory_bytes=320_000)
    assert plan.num_pages == 100 and plan.context_limit == (100 - 1) * 32 and plan.shrunk_from == 8192
    default = plan_pages(bytes_per_token=100, max_model_len=64, page_size=16, max_batch_size=8)
    assert default.num_pages == 8 * 4 and default.context_limit == 64 and default.shrunk_from is None


# -- the paged graph ----------------------------------------------------------------------
@pytest.fixture(scope="module", params=["dense", "topk", "topk-block"])
def exported(request, tokenizer, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp(f"paged-{request.param}")
    ckpt = save_checkpoint(
        root / "ckpt",
        make_model(tokenizer.get_vocab_size(), request.param),
        tokenizer.to_str(),
        generation={"bos_token_id": 0, "eos_token_id": 0},
    )
    assert main(["export", str(ckpt), str(root / "onnx"), "--no-validate", "--paged-kv"]) == 0
    return root / "onnx"


def run(path: Path, prompts, paged: bool, use_plugin: bool = True, max_tokens: int = 10, stats=None, **config):
    sched = config.pop("sched", {})
    model = load_model(path, threads=1, use_plugin=use_plugin, paged=paged)
    engine = model.engine(EngineConfig(SchedulerConfig(**sched), context_limit=64, **config))
    if stats is not None:
        engine.stats_listeners.append(stats.append)
    params = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)
    out = engine.run_until_done([Request(str(i), p, params) for i, p in enumerate(prompts)])
    engine.close()
    return [[t for o in out[str(i)] for d in o.deltas for t in d.token_ids] for i in range(len(prompts))], out


def prompts_of(lengths, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(1, 300, (n,), generator=g).tolist() for n in lengths]


@pytest.mark.parametrize("use_plugin", [True, False], ids=["plugin", "function-body"])
def test_paged_greedy_equals_contiguous(exported, use_plugin):
    prompts = prompts_of((3, 9, 17, 1, 30, 12, 5, 22))
    sched = {"max_batch_size": 8, "prefill_chunk": 4, "max_tokens_per_step": 16}
    want, _ = run(exported, prompts, paged=False, use_plugin=use_plugin, sched=sched)
    got, _ = run(exported, prompts, paged=True, use_plugin=use_plugin, sched=sched)
    assert got == want
    model = load_model(exported, threads=1, use_plugin=use_plugin, paged=True)
    assert model.runner.plugin == (use_plugin and model.runner.plugin)  # the body runs when asked
    assert model.runner.spec.page_size > 0


def test_preemption_when_pages_run_out_keeps_every_output(exported):
    """A pool far smaller than the requests' contexts: sequences are preempted (recomputed) and
    every request still finishes with exactly the tokens an ample pool gives."""
    prompts = prompts_of((20, 5, 33, 12, 27, 8), seed=3)
    sched = {"max_batch_size": 6, "prefill_chunk": 8, "max_tokens_per_step": 32}
    want, _ = run(exported, prompts, paged=True, max_tokens=24, sched=sched)
    spec = load_model(exported, threads=1, paged=True).runner.spec
    pages = 192 // spec.page_size  # 192 tokens of cache for 6 requests of up to 57 tokens (342)
    stats: list = []
    got, out = run(
        exported,
        prompts,
        paged=True,
        max_tokens=24,
        stats=stats,
        sched=sched,
        cache_memory_bytes=pages * spec.page_size * spec.kv_bytes_per_token,
    )
    assert got == want
    assert all(o[-1].finished and o[-1].deltas[-1].finish_reason == "length" for o in out.values())
    assert sum(s.num_preemptions for s in stats) > 0  # the pool did run out
    assert max(s.kv_cache_blocks_used for s in stats) <= pages
    # streamed tokens are never repeated: each request's deltas add up to max_tokens exactly
    assert all(len(t) == 24 for t in got)


def test_paged_prefix_cache_shares_pages(exported):
    g = torch.Generator().manual_seed(2)
    doc = torch.randint(1, 300, (36,), generator=g).tolist()
    prompts = [doc + [5, 6, 7], doc + [8, 9], doc[:20] + [10, 11]]
    params = SamplingParams(max_tokens=10, temperature=0, ignore_eos=True)
    cold = load_model(exported, threads=1, paged=True).engine(EngineConfig(context_limit=64, prefix_caching=False))
    warm = load_model(exported, threads=1, paged=True).engine(EngineConfig(context_limit=64))
    P = warm.cache.page_size
    for i, p in enumerate(prompts):
        want = cold.run_until_done([Request(f"c{i}", p, params)])[f"c{i}"]
        got = warm.run_until_done([Request(f"w{i}", p, params)])[f"w{i}"]
        assert [d.token_ids for o in got for d in o.deltas] == [d.token_ids for o in want for d in o.deltas]
        if i:
            assert got[-1].usage.cached_tokens == min(len(p) - 1, 36 if i == 1 else 20) // P * P > 0
    # a running request's prefix is shared by reference: the follow-up's first pages are its pages
    warm.add_request(Request("long", doc + [20, 21], SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)))
    warm.step()
    warm.add_request(Request("follow", prompts[1], params))
    warm.step()
    long, follow = (
        next(s for g in warm.scheduler.running for s in g.seqs if g.request_id == r) for r in ("long", "follow")
    )
    k = 36 // P
    assert warm.cache.tables[follow.slot][:k] == warm.cache.tables[long.slot][:k]
    assert (warm.cache.allocator.refs[warm.cache.tables[long.slot][:k]] >= 2).all()
    warm.run_until_done()
    cold.close()
    warm.close()


def test_n_siblings_share_the_prompt_pages(exported):
    prompt = prompts_of((13,))[0]
    params = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True, n=3)
    outs = []
    for paged in (False, True):
        engine = load_model(exported, threads=1, paged=paged).engine(EngineConfig(context_limit=64))
        out = engine.run_until_done([Request("n", prompt, params)])["n"]
        outs.append(sorted((d.index, d.token_ids) for o in out for d in o.deltas))
        engine.close()
    assert outs[0] == outs[1]


def test_files_without_a_paged_graph_say_how_to_get_one(exported, tmp_path):
    plain = tmp_path / "plain"
    shutil.copytree(exported, plain)
    cfg = (plain / "genai_config.json").read_text()
    import json

    data = json.loads(cfg)
    del data["ragtop"]["kv_cache"]["paged"]
    (plain / "genai_config.json").write_text(json.dumps(data))
    with pytest.raises(Exception, match="--paged-kv"):
        load_model(plain, paged=True)


def test_paged_runner_writes_only_its_pages(exported):
    runner = load_model(exported, threads=1, paged=True).runner
    runner.allocate_pages(6)
    P = runner.page_size
    runner.block_tables = [[4, 1], [], [2]]
    key = runner.buffers[0, "key"]
    ptr = key.ctypes.data
    runner.forward([__import__("ragtop.runtime.runners.base", fromlist=["Chunk"]).Chunk(0, list(range(1, P + 3)), 0)])
    assert key.ctypes.data == ptr  # the pool itself, bound as past and present
    written = [p for p in range(6) if np.abs(key[p]).sum() > 0]
    assert written == [1, 4]
    assert np.abs(key[1, :, 2:]).sum() == 0  # page 1 holds positions P, P+1 only


def test_speculative_decoding_is_unchanged_by_paging(exported):
    """Drafts write past the sequence (pages reserved ahead: SequenceGroup.lookahead), the dense
    verification rewrites them, rollback rebuilds the summaries of the touched page blocks:
    the tokens equal the contiguous cache's (greedy, and a seeded sampled request speculating
    by rejection sampling), greedy ones also when the pool is small enough to preempt."""
    if "dense" in str(exported.parent.name):
        pytest.skip("a dense model does not speculate")
    prompts = prompts_of((9, 22, 14, 30, 11), seed=5)
    greedy = SamplingParams(max_tokens=16, temperature=0, ignore_eos=True)
    sampled = SamplingParams(max_tokens=16, temperature=0.8, seed=3, ignore_eos=True)

    def tokens(paged: bool, **config):
        engine = load_model(exported, threads=1, paged=paged).engine(EngineConfig(context_limit=64, **config))
        reqs = [
            Request(str(i), p, sampled if i == 4 else greedy, num_speculative_tokens=(3, 0, 5, 2, 3)[i])
            for i, p in enumerate(prompts)
        ]
        out = engine.run_until_done(reqs)
        engine.close()
        return [[t for o in out[str(i)] for d in o.deltas for t in d.token_ids] for i in range(len(prompts))]

    want = tokens(False)
    assert tokens(True) == want
    spec = load_model(exported, threads=1, paged=True).runner.spec
    small = tokens(True, cache_memory_bytes=128 * spec.kv_bytes_per_token)
    assert small[:4] == want[:4] and len(small[4]) == 16


def test_a_request_that_cannot_fit_an_empty_pool_is_refused_up_front():
    from ragtop.runtime.errors import InvalidRequest
    from ragtop.runtime.scheduler import Scheduler, SequenceGroup

    cache = PagedKVCacheManager(PagePlan(num_pages=8, page_size=4, slots=8, context_limit=28, bytes_per_token=10))
    sched = Scheduler(SchedulerConfig(max_batch_size=4, max_tokens_per_step=64), cache)
    sched.add(SequenceGroup("fits", list(range(1, 26))))  # 7 pages of the 8 - 1 (watermark)
    with pytest.raises(InvalidRequest, match="does not fit"):
        sched.add(SequenceGroup("siblings", list(range(1, 26)), n=2))  # 7 + 1 for the second sibling
    assert [g.request_id for g in sched.waiting] == ["fits"]


@pytest.mark.parametrize("use_plugin", [True, False], ids=["plugin", "function-body"])
def test_pages_holding_several_selection_blocks(exported, tmp_path, use_plugin):
    """Page size 8 with selection blocks of 4: two block summaries per page (kernel and body)."""
    if not exported.parent.name.startswith("paged-topk-block"):
        pytest.skip("block selection only")
    from ragtop.export.onnx import write_paged_graph

    folder = tmp_path / "p8"
    shutil.copytree(exported, folder)
    write_paged_graph(folder, page_size=8)
    prompts = prompts_of((3, 9, 17, 30, 12), seed=7)
    sched = {"max_batch_size": 5, "prefill_chunk": 5, "max_tokens_per_step": 16}
    want, _ = run(exported, prompts, paged=False, use_plugin=use_plugin, sched=sched)
    got, _ = run(folder, prompts, paged=True, use_plugin=use_plugin, sched=sched)
    assert load_model(folder, paged=True).runner.spec.page_size == 8
    assert got == want


@pytest.mark.parametrize("use_plugin", [True, False], ids=["plugin", "function-body"])
def test_paged_float16_cache_equals_contiguous(tokenizer, tmp_path_factory, use_plugin):
    """--kv-dtype fp16 --paged-kv: float16 page pools (float summaries), the same tokens as the
    contiguous float16 cache."""
    root = tmp_path_factory.mktemp("paged-fp16")
    ckpt = save_checkpoint(
        root / "ckpt",
        make_model(tokenizer.get_vocab_size(), "topk-block"),
        tokenizer.to_str(),
        generation={"bos_token_id": 0, "eos_token_id": 0},
    )
    args = ["export", str(ckpt), str(root / "onnx"), "--no-validate", "--paged-kv", "--kv-dtype", "fp16"]
    assert main(args) == 0
    runner = load_model(root / "onnx", paged=True).runner
    runner.allocate_pages(4)
    assert runner.buffers[0, "key"].dtype == np.float16 and runner.buffers[0, "key_min"].dtype == np.float32
    prompts = prompts_of((3, 9, 17, 30), seed=11)
    sched = {"max_batch_size": 4, "prefill_chunk": 5, "max_tokens_per_step": 16}
    want, _ = run(root / "onnx", prompts, paged=False, use_plugin=use_plugin, sched=sched)
    got, _ = run(root / "onnx", prompts, paged=True, use_plugin=use_plugin, sched=sched)
    assert got == want
