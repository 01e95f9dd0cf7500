"""One training run of the studies: a fixed token budget, then losses on train and held-out.

Both arms of a comparison see exactly the same batches (chosen by (seed, step) alone, as
ragtop's trainer) and the same number of training tokens: steps x batch x context.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from ..model import ModelConfig, Transformer
from ..train.evaluate import score_windows
from ..train.tiers import TierPlan
from ..train.trainer import TrainConfig, batch_at, lr_at


@dataclass(frozen=True)
class Budget:
    """Training budget shared by every arm of a study."""

    steps: int
    batch_size: int
    context: int
    lr: float = 3e-3
    warmup: int = 20
    weight_decay: float = 0.1
    grad_clip: float = 1.0

    @property
    def tokens(self) -> int:
        return self.steps * self.batch_size * self.context


def build_model(cfg: ModelConfig, plan: TierPlan | None, seed: int) -> Transformer:
    torch.manual_seed(seed)
    model = Transformer(cfg)
    if plan is not None:
        model.embed.set_tiers(plan.token_ids)
    return model


def stream_loss(model: Transformer, stream: np.ndarray, context: int, max_tokens: int) -> float:
    """Mean NLL (nats/token) of stream[1:max_tokens+1], window by window."""
    ids = torch.from_numpy(np.asarray(stream[: max_tokens + 1], dtype=np.int64))
    was = model.training
    model.eval()
    total = score_windows(model, ids, context, batch_size=16)
    model.train(was)
    return total / (ids.numel() - 1)


def train_and_score(
    cfg: ModelConfig,
    plan: TierPlan | None,
    corpus: np.ndarray,
    heldout: np.ndarray,
    budget: Budget,
    seed: int,
    score_tokens: int,
) -> dict:
    """Train on `corpus` for `budget`, return train / held-out loss and parameter counts."""
    if len(corpus) < budget.context + 2:
        raise ValueError(f"corpus of {len(corpus)} tokens is shorter than one window ({budget.context + 2})")
    model = build_model(cfg, plan, seed)
    tc = TrainConfig(seed=seed, steps=budget.steps, batch_size=budget.batch_size, lr=budget.lr, warmup=budget.warmup)
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": budget.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=budget.lr,
        betas=(0.9, 0.95),
    )
    model.train()
    t0 = time.perf_counter()
    last = []
    for step in range(budget.steps):
        x, y = batch_at(corpus, step, tc, budget.context)
        for g in opt.param_groups:
            g["lr"] = lr_at(step, tc)
        loss = F.cross_entropy(model(x).flatten(0, 1), y.flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), budget.grad_clip)
        opt.step()
        if step >= budget.steps - 10:
            last.append(loss.item())
    train_s = time.perf_counter() - t0
    with torch.no_grad():
        train_loss = stream_loss(model, corpus, budget.context, min(score_tokens, len(corpus) - 1))
        heldout_loss = stream_loss(model, heldout, budget.context, min(score_tokens, len(heldout) - 1))
    return {
        "seed": seed,
        "train_loss": train_loss,  # scored like held-out, on (up to score_tokens of) the training corpus
        "heldout_loss": heldout_loss,
        "last_batch_loss": float(np.mean(last)),  # mean training-batch loss of the last 10 steps
        "params": model.parameter_counts(),
        "train_tokens": budget.tokens,
        "epochs": budget.tokens / len(corpus),
        "seconds": round(time.perf_counter() - t0, 2),
        "train_seconds": round(train_s, 2),
        "state_dict": model.state_dict(),  # callers that keep the model pop it; never written to JSON
    }
