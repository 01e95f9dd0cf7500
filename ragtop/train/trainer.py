"""Training small models on the default corpus.

Deterministic and resumable: batch contents depend only on (seed, step), and the
optimizer state is saved with the weights (safetensors + JSON, no pickle), so a run
stopped and resumed takes the same steps as one that never stopped.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from ..checkpoint import save_checkpoint
from ..errors import RagtopError
from ..model import AttentionConfig, EmbeddingConfig, ModelConfig, Transformer
from .corpus import HELDOUT_FROM_YEAR, load_sotu, split_by_year
from .evaluate import evaluate_texts
from .tiers import DEFAULT_MASS_CUTS, DEFAULT_WIDTH_FACTORS, plan_tiers, token_counts
from .tokenizer import EOS, cached_bpe

STATE_JSON, STATE_TENSORS, LOG = "trainer_state.json", "trainer_state.safetensors", "train_log.jsonl"


@dataclass(frozen=True)
class Preset:
    vocab_size: int
    d_model: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    d_ff: int
    context: int
    batch_size: int
    lr: float
    steps: int
    eval_tokens: int  # held-out tokens scored at each evaluation


PRESETS = {
    # trains in seconds: for tests and smoke runs
    "tiny": Preset(
        vocab_size=512,
        d_model=64,
        n_layers=2,
        n_heads=4,
        n_kv_heads=2,
        d_ff=176,
        context=128,
        batch_size=8,
        lr=3e-3,
        steps=200,
        eval_tokens=4096,
    ),
    # a usable model trained in <= 30 minutes on 2 cores; the long-context benchmarks use it
    "small": Preset(
        vocab_size=8192,
        d_model=256,
        n_layers=6,
        n_heads=8,
        n_kv_heads=8,
        d_ff=688,
        context=1024,
        batch_size=8,
        lr=2e-3,
        steps=200,
        eval_tokens=65536,
    ),
}


@dataclass(frozen=True)
class TrainConfig:
    preset: str = "tiny"
    attention: str = "dense"
    topk: int | None = None
    embedding: str = "uniform"
    steps: int | None = None  # default: the preset's
    batch_size: int | None = None
    lr: float | None = None
    warmup: int = 20
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    seed: int = 0
    eval_every: int = 200
    log_every: int = 10
    save_every: int = 50
    heldout_from: int = HELDOUT_FROM_YEAR
    mass_cuts: tuple[float, ...] = DEFAULT_MASS_CUTS
    width_factors: tuple[float, ...] = DEFAULT_WIDTH_FACTORS

    def resolved(self) -> TrainConfig:
        if self.preset not in PRESETS:
            raise RagtopError(f"unknown preset {self.preset!r}: choose one of {', '.join(PRESETS)}")
        p = PRESETS[self.preset]
        if self.attention == "topk" and (self.topk is None or self.topk < 1):
            raise RagtopError(f"--topk must be >= 1 for top-k attention, got {self.topk}")
        if self.attention == "dense" and self.topk is not None:
            raise RagtopError("--topk only applies with --attention topk")
        c = replace(self, steps=self.steps or p.steps, batch_size=self.batch_size or p.batch_size, lr=self.lr or p.lr)
        if c.steps < 1 or c.batch_size < 1:
            raise RagtopError(f"--steps and --batch-size must be >= 1, got {c.steps}, {c.batch_size}")
        return c


def model_config(tc: TrainConfig, tier_sizes: tuple[int, ...] = (), tier_widths: tuple[int, ...] = ()) -> ModelConfig:
    p = PRESETS[tc.preset]
    attn = AttentionConfig("topk", topk=tc.topk) if tc.attention == "topk" else AttentionConfig()
    emb = EmbeddingConfig("ragged", tier_sizes, tier_widths) if tc.embedding == "ragged" else EmbeddingConfig()
    return ModelConfig(
        vocab_size=p.vocab_size,
        d_model=p.d_model,
        n_layers=p.n_layers,
        n_heads=p.n_heads,
        n_kv_heads=p.n_kv_heads,
        d_ff=p.d_ff,
        max_seq_len=p.context,
        attention=attn,
        embedding=emb,
    )


def lr_at(step: int, tc: TrainConfig) -> float:
    """Linear warm-up, then cosine decay to 10% of the peak."""
    if step < tc.warmup:
        return tc.lr * (step + 1) / tc.warmup
    t = (step - tc.warmup) / max(tc.steps - tc.warmup, 1)
    return tc.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(t, 1.0))))


def batch_at(stream: np.ndarray, step: int, tc: TrainConfig, context: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Random windows chosen by (seed, step) alone: resuming replays the same batches."""
    g = np.random.default_rng([tc.seed, step])
    starts = g.integers(0, len(stream) - context - 1, size=tc.batch_size)
    w = torch.from_numpy(np.stack([stream[s : s + context + 1] for s in starts]).astype(np.int64))
    return w[:, :-1], w[:, 1:]


# -- optimizer state without pickle ---------------------------------------------------
def save_trainer_state(out: Path, opt: torch.optim.Optimizer, step: int, tc: TrainConfig) -> None:
    sd = opt.state_dict()
    tensors = {f"{i}.{k}": v.contiguous() for i, st in sd["state"].items() for k, v in st.items()}
    save_file(tensors, str(out / STATE_TENSORS))
    (out / STATE_JSON).write_text(
        json.dumps({"step": step, "train_config": asdict(tc), "param_groups": sd["param_groups"]})
    )


def load_trainer_state(out: Path, opt: torch.optim.Optimizer) -> int:
    meta = json.loads((out / STATE_JSON).read_text())
    tensors = load_file(str(out / STATE_TENSORS))
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, v in tensors.items():
        i, name = key.split(".", 1)
        state.setdefault(int(i), {})[name] = v
    opt.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
    return int(meta["step"])


def _run_identity(tc: dict) -> dict:
    """The settings a resumed run must share (cadences and the step target may change)."""
    return {k: v for k, v in tc.items() if k not in ("steps", "eval_every", "log_every", "save_every")}


def train(tc: TrainConfig, out: Path, data_dir: Path, progress: bool = True, until: int | None = None) -> Path:
    """Train (or resume) a model into the checkpoint folder `out`.

    `until` stops early after that many steps (of `tc.steps`), leaving a checkpoint that a
    later call resumes exactly.
    """
    tc = tc.resolved()
    out = Path(out)
    p = PRESETS[tc.preset]
    resuming = (out / STATE_JSON).is_file()
    if resuming:  # refuse a different run before reading the corpus
        saved = json.loads((out / STATE_JSON).read_text())["train_config"]
        if _run_identity(saved) != _run_identity(json.loads(json.dumps(asdict(tc)))):
            raise RagtopError(f"{out} holds a run with different settings; choose another --out")
    train_docs, heldout_docs = split_by_year(load_sotu(data_dir), tc.heldout_from)
    tokenizer = cached_bpe([d.text for d in train_docs], p.vocab_size, Path(data_dir) / "tokenizers")
    eos = tokenizer.token_to_id(EOS)
    encoded = [e.ids for e in tokenizer.encode_batch([d.text for d in train_docs])]
    stream = np.concatenate([np.asarray([eos, *ids], dtype=np.int32) for ids in encoded])

    tiers_meta: dict = {}
    if tc.embedding == "ragged":
        plan = plan_tiers(token_counts(encoded, p.vocab_size), p.d_model, tc.mass_cuts, tc.width_factors)
        cfg = model_config(tc, plan.sizes, plan.widths)
        tiers_meta = {"mass": plan.mass, "mass_cuts": list(tc.mass_cuts), "source": "training split token counts"}
    else:
        cfg = model_config(tc)
    torch.manual_seed(tc.seed)
    model = Transformer(cfg)
    if tc.embedding == "ragged":
        model.embed.set_tiers(plan.token_ids)
    decay = [q for n, q in model.named_parameters() if q.ndim >= 2]
    no_decay = [q for n, q in model.named_parameters() if q.ndim < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": tc.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=tc.lr,
        betas=(0.9, 0.95),
    )

    start = 0
    if resuming:
        from ..checkpoint import load_checkpoint

        model.load_state_dict(load_checkpoint(out).model.state_dict())
        start = load_trainer_state(out, opt)
    out.mkdir(parents=True, exist_ok=True)
    heldout_texts = [d.text for d in heldout_docs]
    meta = {
        "train": {
            **asdict(tc),
            "tokens_per_step": tc.batch_size * p.context,
            "corpus": "sotu",
            "train_documents": len(train_docs),
            "train_tokens": int(len(stream)),
        }
    }
    generation = {"bos_token_id": eos, "eos_token_id": eos, "max_length": p.context}

    def checkpoint(step: int, extra: dict) -> None:
        save_checkpoint(out, model, tokenizer.to_str(), {**meta, "step": step, **extra}, generation, tiers_meta)
        save_trainer_state(out, opt, step, tc)

    log = (out / LOG).open("a")
    bar = tqdm(total=tc.steps, initial=start, disable=not progress, unit="step", dynamic_ncols=True)
    model.train()
    t0, tokens_seen, last = time.perf_counter(), 0, {}
    stop = tc.steps if until is None else min(until, tc.steps)
    for step in range(start, stop):
        x, y = batch_at(stream, step, tc, p.context)
        for g in opt.param_groups:
            g["lr"] = lr_at(step, tc)
        loss = F.cross_entropy(model(x).flatten(0, 1), y.flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip)
        opt.step()
        tokens_seen += x.numel()
        done = step + 1
        if done % tc.log_every == 0 or done == tc.steps:
            tps = tokens_seen / (time.perf_counter() - t0)
            last = {"step": done, "loss": round(loss.item(), 4), "lr": lr_at(step, tc), "tokens_per_s": round(tps, 1)}
            log.write(json.dumps(last) + "\n")
            bar.set_postfix(loss=f"{loss.item():.3f}", tok_s=f"{tps:,.0f}")
        if done % tc.eval_every == 0 or done == tc.steps:
            r = evaluate_texts(model, tokenizer, heldout_texts, eos, p.context, max_tokens=p.eval_tokens)
            last = {"step": done, "heldout_loss": round(r.loss, 4), "heldout_ppl": round(r.perplexity, 3)}
            log.write(json.dumps(last) + "\n")
            bar.write(f"step {done}: held-out loss {r.loss:.4f}, perplexity {r.perplexity:.2f}")
        if done % tc.save_every == 0 or done == stop:
            checkpoint(done, {})
        log.flush()
        bar.update(1)
    bar.close()
    log.close()
    if start >= stop:  # nothing left to do: make sure the folder is complete
        checkpoint(start, {})
    return out
