"""Sparse settings evaluated on the C++ kernel: one exported graph, its attributes rewritten.

`ragtop sweep --runner onnx --export DIR` and `ragtop bench retrieval --runner onnx --export
DIR` score settings through onnxruntime and the ragtop plugin instead of the PyTorch
reference (which scores every key to apply its masks). DIR is a block-selection export with
fp32 weights (`ragtop convert` with any block setting, then `ragtop export --weights fp32`).
Its weights are written once to a work folder as external data; each setting is then a
small copy of the graph whose TopKAttention nodes (one per layer, in graph order) carry the
setting's attributes (ops.py): topk, block_size, block_budget, sink_tokens, local_window,
and for the first `dense` layers the attributes that make a node exactly dense (topk >= the
context limit, a budget covering every block). No re-export; the session reads the same
weights file.

Two evaluation modes, both teacher-forced (every position's logits, `Chunk.logits="all"`):
- all sparse: every chunk of the window attends sparsely (what `ragtop sweep` measures with
  the PyTorch reference; the same numbers within float rounding);
- dense prefill, sparse decode (Quest's serving mode): the window's first n - N tokens run
  with the op's attention_dense flag, then its last N tokens run as one sparse chunk on that
  cache -- what a served request whose prompt was prefilled densely computes for them. The
  dense prefill is the same for every setting (the flag ignores the attributes), so its
  keys and values are kept once per window and restored; the block summaries are recomputed
  from them for each setting's block size (min/max: exact).
"""

from __future__ import annotations

import copy
import json
import math
import shutil
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from ..convert.sweep import Passage, SparseSetting, _record, kv_read_fraction, tail_table  # noqa: F401
from ..errors import RagtopError
from ..export import ops
from ..model import AttentionConfig

GRAPH = "sweep.onnx"
WEIGHTS = "sweep.onnx.data"


def attention_nodes(proto) -> list:
    """The TopKAttention nodes of the main graph, in graph order (= layer order)."""
    return [n for n in proto.graph.node if n.domain == ops.DOMAIN and n.op_type == ops.TOPK_ATTENTION]


def node_attributes(a: AttentionConfig, layer: int, limit: int, export_block_size: int) -> dict[str, int]:
    """TopKAttention attributes of layer `layer` under `a` in a graph of context limit `limit`."""
    bs = a.block_size or export_block_size
    dense_budget = -(-limit // bs)
    if a.kind == "dense" or layer < a.dense_layers:  # exactly dense (ops.py): topk >= C, every block
        return {"topk": limit, "block_size": bs, "block_budget": dense_budget, "sink_tokens": 0, "local_window": 0}
    budget = a.budget_of(layer) if a.block_size else dense_budget
    return {
        "topk": int(a.topk),
        "block_size": bs,
        "block_budget": int(budget),
        "sink_tokens": a.sink_tokens,
        "local_window": a.local_window,
    }


def rewrite_attention(proto, a: AttentionConfig, limit: int, export_block_size: int) -> int:
    """Set every TopKAttention node's attributes for `a` (in place); returns the block size."""
    import onnx

    nodes = attention_nodes(proto)
    if not nodes:
        raise RagtopError("the graph has no ragtop::TopKAttention node (export with --ops custom)")
    for layer, node in enumerate(nodes):
        attrs = node_attributes(a, layer, limit, export_block_size)
        keep = [x for x in node.attribute if x.name not in attrs]
        del node.attribute[:]
        node.attribute.extend(keep)
        node.attribute.extend(onnx.helper.make_attribute(k, int(v)) for k, v in sorted(attrs.items()))
    return a.block_size or export_block_size


class OnnxEvaluator:
    """Sessions of one block-selection export under any sparse setting (see the module doc)."""

    def __init__(self, export_dir: Path, work_dir: Path | None = None, threads: int | None = None) -> None:
        import onnx

        export_dir = Path(export_dir)
        try:
            genai = json.loads((export_dir / "genai_config.json").read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise RagtopError(f"{export_dir} is not a ragtop export ({e})") from None
        att = genai["ragtop"]["attention"]
        if att.get("mode") != "block":
            raise RagtopError(
                f"{export_dir}: the onnx runner rewrites a block-selection export (this one is {att.get('mode')!r}): "
                "ragtop convert CKPT --attention topk --block-size 32 --block-budget 32 ... then ragtop export"
            )
        if genai["ragtop"]["kv_cache"]["dtype"] != "float32":
            raise RagtopError(f"{export_dir}: export with --dtype fp32 to compare with the reference")
        self.limit = int(genai["model"]["context_length"])
        self.export_block_size = int(att["block_size"])
        self.n_layers = int(genai["model"]["decoder"]["num_hidden_layers"])
        self.threads = threads
        self.work = Path(work_dir) if work_dir else export_dir / "sweep"
        self.work.mkdir(parents=True, exist_ok=True)
        src = export_dir / genai["model"]["decoder"]["filename"]
        stamp = f"{src.stat().st_size}:{src.stat().st_mtime_ns}"
        marker = self.work / "source"
        if not (self.work / WEIGHTS).is_file() or not marker.is_file() or marker.read_text() != stamp:
            full = onnx.load(str(src))  # weights once to external data, so a setting's graph is small
            onnx.save_model(
                full,
                str(self.work / GRAPH),
                save_as_external_data=True,
                all_tensors_to_one_file=True,
                location=WEIGHTS,
                size_threshold=1024,
            )
            del full
            marker.write_text(stamp)
        self.stamp = stamp
        shutil.copy(export_dir / "genai_config.json", self.work / "genai_config.json")
        self.graph = onnx.load(str(self.work / GRAPH), load_external_data=False)
        if len(attention_nodes(self.graph)) != self.n_layers:
            raise RagtopError(f"{export_dir}: expected one TopKAttention node per layer ({self.n_layers})")
        self.sessions = 0

    def runner(self, a: AttentionConfig):
        """An OrtRunner whose graph carries `a`'s attributes (the plugin kernel runs them)."""
        import onnx

        from ..runtime.runners.onnxruntime import OrtRunner

        if a.layer_budgets and len(a.layer_budgets) != self.n_layers:
            raise RagtopError(f"{len(a.layer_budgets)} layer budgets for a model of {self.n_layers} layers")
        proto = copy.deepcopy(self.graph)
        bs = rewrite_attention(proto, a, self.limit, self.export_block_size)
        self.sessions += 1
        name = f"setting-{self.sessions % 2}.onnx"  # the previous session may still hold the other
        onnx.save_model(proto, str(self.work / name))  # initializers stay external: WEIGHTS
        r = OrtRunner(self.work, self.threads, model_file=name)
        if not r.plugin:
            raise RagtopError("the ragtop onnxruntime plugin is not built (make install): the onnx runner needs it")
        if not r.dense_flag:
            raise RagtopError("this export has no attention_dense input: re-export it")
        r.block_size = bs  # the summaries' shape follows the rewritten block size
        return r


# -- teacher-forced scoring ---------------------------------------------------------------------
def _nll(logits: np.ndarray, targets: np.ndarray) -> np.ndarray:
    x = logits.astype(np.float64)
    m = x.max(axis=1, keepdims=True)
    lse = m[:, 0] + np.log(np.exp(x - m).sum(axis=1))
    return lse - x[np.arange(len(targets)), targets]


def score_positions(
    runner, x: Sequence[int], y: Sequence[int], chunk: int = 512, dense_until: int = 0, start: int = 0
) -> np.ndarray:
    """NLL (nats) of y[i] given x[:i + 1] for i >= start, chunk by chunk through the cache
    (positions < dense_until attend densely). The cache must hold x[:start] already."""
    from ..runtime.runners.base import Chunk

    x, y = np.asarray(x, dtype=np.int64), np.asarray(y, dtype=np.int64)
    out = np.zeros(len(x) - start)
    s = start
    while s < len(x):
        e = min(len(x), s + chunk)
        if s < dense_until < e:
            e = dense_until
        (logits,) = runner.forward([Chunk(0, x[s:e].tolist(), s, "all", dense=s < dense_until)])
        out[s - start : e - start] = _nll(logits, y[s:e])
        s = e
    return out


def allocate(runner, capacity: int) -> None:
    bs = max(runner.block_size, 1)
    runner.allocate(1, -(-capacity // bs) * bs)


def snapshot(runner, length: int) -> dict:
    """The first `length` cached keys/values of slot 0, per layer (copies)."""
    return {k: buf[0, :, :length].copy() for k, buf in runner.buffers.items() if k[1] in ("key", "value")}


def restore(runner, snap: dict, length: int) -> None:
    """Slot 0 holds `snap`'s keys/values and their block summaries (runner's block size)."""
    bs = runner.block_size
    for (i, kind), rows in snap.items():
        runner.buffers[i, kind][0, :, :length] = rows
        if kind == "key" and bs:
            nb = -(-length // bs)
            pad = nb * bs - length
            keys = rows if not pad else np.concatenate([rows, np.repeat(rows[:, -1:], pad, axis=1)], axis=1)
            blocks = keys.reshape(keys.shape[0], nb, bs, keys.shape[-1])
            runner.buffers[i, "key_min"][0, :, :nb] = blocks.min(axis=2)
            runner.buffers[i, "key_max"][0, :, :nb] = blocks.max(axis=2)
    runner.lengths[0] = length


def _summary(nll: np.ndarray, nbytes: int | None = None) -> dict:
    out = {"perplexity": math.exp(float(nll.sum()) / len(nll)), "tokens": len(nll)}
    if nbytes is not None:
        out["bits_per_byte"] = float(nll.sum()) / math.log(2) / nbytes
    return out


def shared_windows(sets: dict[int, list[Passage]]) -> tuple[list[Passage], dict[tuple[int, int], int]]:
    """The windows to run: a window that is a prefix of a longer one (the same speech's first
    tokens) is read off the longer run -- the model is causal and a query's selection depends
    only on the keys before it. Returns the runs and, per (length, index), its run."""
    runs: list[Passage] = []
    where: dict[tuple[int, int], int] = {}
    order = sorted(((n, i, p) for n, ps in sets.items() for i, p in enumerate(ps)), key=lambda t: -len(t[2].ids))
    for n, i, p in order:
        hit = next(
            (k for k, q in enumerate(runs) if len(q.ids) >= len(p.ids) and bool((q.ids[: len(p.ids)] == p.ids).all())),
            None,
        )
        if hit is None:
            runs.append(p)
            hit = len(runs) - 1
        where[n, i] = hit
    return runs, where


def dense_cache(ev: OnnxEvaluator, ids: Sequence[int], tail: int) -> Path:
    """Where the dense run of a window is kept (its NLL per position and the keys/values of
    its prefill), so a later sweep on the same export need not run it again."""
    import hashlib

    key = hashlib.sha256(json.dumps([ev.stamp, list(ids), tail]).encode()).hexdigest()[:16]
    return ev.work / f"dense-{key}.npz"


def run_calibration_onnx(
    ev: OnnxEvaluator,
    settings: Sequence[SparseSetting | None],
    sets: dict[int, list[Passage]],
    tail: int = 512,
    chunk: int = 512,
    out: Path | None = None,
    log: Callable[[str], None] = print,
) -> list[dict]:
    """`ragtop sweep --setting` rows, scored on the kernel, plus the last `tail` tokens of
    each window under dense prefill + sparse chunk (see the module doc). None = dense.

    Every token of a window is predicted once (input ids[:-1], targets ids[1:]), as the
    reference's `score` does; windows that are prefixes of longer ones share their run."""
    from ..convert.sweep import format_calibration_row

    runs, where = shared_windows(sets)
    # dense first: its per-position NLL and its prefill cache serve every setting's tail
    # (tail = 0 and no dense row: all-sparse perplexity only, no dense run)
    need_dense = tail > 0 or any(s is None for s in settings)
    t0 = time.perf_counter()
    dense_runner = ev.runner(AttentionConfig()) if need_dense else None
    dense_nll, snaps = [], []
    for p in runs if need_dense else ():
        ids = p.ids.tolist()
        n = len(ids) - 1
        cached = dense_cache(ev, ids, tail)
        if cached.is_file():  # an earlier sweep's dense run of the same window (same export)
            with np.load(cached) as z:
                dense_nll.append(z["nll"])
                snaps.append({(int(k.split(".")[0]), k.split(".")[1]): z[k] for k in z.files if k != "nll"})
            log(f"  dense run of {n} tokens ({p.title}) read from {cached}")
            continue
        allocate(dense_runner, n)
        dense_nll.append(score_positions(dense_runner, ids[:-1], ids[1:], chunk, dense_until=n))
        snaps.append(snapshot(dense_runner, n - tail))
        np.savez(cached, nll=dense_nll[-1], **{f"{i}.{kind}": v for (i, kind), v in snaps[-1].items()})
        log(f"  dense run of {n} tokens ({p.title}) done at {time.perf_counter() - t0:.0f}s")
    if dense_runner is not None:
        dense_runner.close()
    dense_seconds = round(time.perf_counter() - t0, 1)
    rows = []
    for s in settings:
        t0 = time.perf_counter()
        a = AttentionConfig() if s is None else s.attention()
        row = {"setting": "dense" if s is None else s.name, "attention": a.to_dict(), "runner": "onnx", "lengths": {}}
        r = None if s is None else ev.runner(a)
        full_nll = []
        for p in runs:
            if r is None:
                full_nll.append(None)
                continue
            ids = p.ids.tolist()
            allocate(r, len(ids) - 1)
            full_nll.append(score_positions(r, ids[:-1], ids[1:], chunk))
        for n, ps in sets.items():
            full, tails_sparse, tails_prefill, tails_dense = [], [], [], []
            for i, p in enumerate(ps):
                k = where[n, i]
                dnll = dense_nll[k][:n] if need_dense else None
                nll = dnll if r is None else full_nll[k][:n]
                full.append(nll)
                if not tail:
                    continue
                tails_dense.append(dnll[n - tail :])
                tails_sparse.append(nll[n - tail :])
                if r is None:
                    tails_prefill.append(dnll[n - tail :])
                    continue
                ids = p.ids.tolist()
                allocate(r, n)
                restore(r, {key: rows_[:, : n - tail] for key, rows_ in snaps[k].items()}, n - tail)
                tails_prefill.append(score_positions(r, ids[:-1], ids[1:], tail, start=n - tail))
            row["lengths"][str(n)] = {
                **_summary(np.concatenate(full), sum(p.bytes for p in ps)),
                "kv_read": kv_read_fraction(a, ev.n_layers, n),
            }
            if tail:
                row["lengths"][str(n)]["tail"] = {
                    "tokens": tail * len(ps),
                    "dense": _summary(np.concatenate(tails_dense))["perplexity"],
                    "sparse": _summary(np.concatenate(tails_sparse))["perplexity"],
                    "dense_prefill": _summary(np.concatenate(tails_prefill))["perplexity"],
                }
        if r is not None:
            r.close()
        row["seconds"] = dense_seconds if s is None else round(time.perf_counter() - t0, 1)
        _record(row, rows, out, log, format_calibration_row)
    return rows


def greedy_onnx(runner, ids: Sequence[int], new_tokens: int, dense: bool = False, dense_prefill: bool = False):
    """Greedy continuation: prefill once, then one token per step (dense: every call dense;
    dense_prefill: only the prompt)."""
    from ..runtime.runners.base import Chunk

    allocate(runner, len(ids) + new_tokens)
    (logits,) = runner.forward([Chunk(0, list(ids), 0, "last", dense=dense or dense_prefill)])
    out, pos = [], len(ids)
    for _ in range(new_tokens):
        nxt = int(np.argmax(logits))
        out.append(nxt)
        (logits,) = runner.forward([Chunk(0, [nxt], pos, "last", dense=dense)])
        pos += 1
    return out


def calibration_command(a) -> int:
    """`ragtop sweep CKPT --setting ... --runner onnx` (wired in ragtop/cli.py: the sweep
    itself lives in convert, which may not import the runtime)."""
    from ..convert.commands import calibration_inputs, report_calibration
    from ..convert.sweep import calibration_table, make_passages

    ckpt, settings, heldout = calibration_inputs(a)

    if a.export is None:
        raise RagtopError("--runner onnx needs --export DIR (a block-selection export with fp32 weights)")
    if a.tail < 0 or any(a.tail >= n for n in a.lengths):
        raise RagtopError(f"--tail {a.tail}: must be shorter than every length (0: no dense-prefill scoring)")
    tok = ckpt.tokenizer()
    sep = int(ckpt.generation.get("document_separator_id", ckpt.generation.get("bos_token_id", 0)))
    sets = {n: make_passages(heldout, tok, sep, n, a.passages) for n in a.lengths}
    for n, ps in sets.items():
        print(f"{n} tokens: {len(ps)} passage(s): {', '.join(p.title for p in ps)}", flush=True)
    ev = OnnxEvaluator(a.export, threads=a.threads)
    rows = run_calibration_onnx(
        ev, ([] if a.no_dense else [None]) + settings, sets, a.tail, out=a.jsonl, log=lambda m: print(m, flush=True)
    )
    return report_calibration(a, rows, calibration_table(rows) + "\n\n" + tail_table(rows))
