"""Token embeddings and the output head that goes with them.

`UniformEmbedding`: one [V, D] table; the head is tied to it or a separate Linear.
`RaggedEmbedding`: tier i is a [n_i, d_i] table plus a d_i -> D projection. The buffers
`tier_of[v]` and `row_of[v]` say where token v lives, so tiers follow token frequency for
any tokenizer. The tied tiered head projects the hidden state back to d_i with the same
projection and scores only tier i's rows there: rare tiers cost d_i, not D, per logit.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from .config import ConfigError, ModelConfig


class UniformEmbedding(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(cfg.vocab_size, cfg.d_model))
        nn.init.normal_(self.weight, std=0.02)

    def forward(self, ids: Tensor) -> Tensor:  # [B,S] -> [B,S,D]
        return nn.functional.embedding(ids, self.weight)

    def logits(self, h: Tensor) -> Tensor:  # tied head: [.., D] -> [.., V]
        return h @ self.weight.t()


class RaggedEmbedding(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        e = cfg.embedding
        self.vocab_size, self.d_model = cfg.vocab_size, cfg.d_model
        self.tables = nn.ParameterList(
            nn.Parameter(torch.empty(n, d)) for n, d in zip(e.tier_sizes, e.tier_widths, strict=True)
        )
        self.projs = nn.ModuleList(nn.Linear(d, cfg.d_model, bias=False) for d in e.tier_widths)
        for t in self.tables:
            nn.init.normal_(t, std=0.02)
        for p, d in zip(self.projs, e.tier_widths, strict=True):
            nn.init.normal_(p.weight, std=d**-0.5)
        self.register_buffer("tier_of", torch.zeros(cfg.vocab_size, dtype=torch.long))
        self.register_buffer("row_of", torch.zeros(cfg.vocab_size, dtype=torch.long))
        # position of token v in the concatenation of the tiers' logits
        self.register_buffer("head_order", torch.zeros(cfg.vocab_size, dtype=torch.long))
        offset, tiers = 0, []
        for n in e.tier_sizes:  # default layout: token ids in order, tier after tier
            tiers.append(list(range(offset, offset + n)))
            offset += n
        self.set_tiers(tiers)

    @property
    def n_tiers(self) -> int:
        return len(self.tables)

    def set_tiers(self, tiers: Sequence[Sequence[int]]) -> None:
        """Place tokens: `tiers[i]` lists tier i's token ids, row by row."""
        sizes = tuple(len(t) for t in tiers)
        expected = tuple(t.shape[0] for t in self.tables)
        if sizes != expected:
            raise ConfigError(f"tier assignment has sizes {sizes}, the model expects {expected}")
        flat = torch.tensor([v for t in tiers for v in t], dtype=torch.long)
        if flat.numel() != self.vocab_size or not torch.equal(flat.sort().values, torch.arange(self.vocab_size)):
            raise ConfigError(f"tiers must hold every token id 0..{self.vocab_size - 1} exactly once")
        tier_of = torch.cat([torch.full((n,), i, dtype=torch.long) for i, n in enumerate(sizes)])
        row_of = torch.cat([torch.arange(n, dtype=torch.long) for n in sizes])
        self.tier_of[flat] = tier_of
        self.row_of[flat] = row_of
        self.head_order[flat] = torch.arange(self.vocab_size)

    def tiers(self) -> list[list[int]]:
        return [
            torch.nonzero(self.tier_of == i).flatten()[self.row_of[self.tier_of == i].argsort()].tolist()
            for i in range(self.n_tiers)
        ]

    def forward(self, ids: Tensor) -> Tensor:  # [B,S] -> [B,S,D]
        tier, row = self.tier_of[ids], self.row_of[ids]
        out = ids.new_zeros(*ids.shape, self.d_model, dtype=self.projs[0].weight.dtype)
        for i, (table, proj) in enumerate(zip(self.tables, self.projs, strict=True)):
            in_tier = tier == i
            r = torch.where(in_tier, row, 0)  # any valid row; masked out below
            out = out + torch.where(in_tier[..., None], proj(nn.functional.embedding(r, table)), 0.0)
        return out

    def logits(self, h: Tensor) -> Tensor:
        """Tied tiered head: tier i's logits are (h @ P_i) @ T_i^T, d_i products each."""
        parts = [(h @ proj.weight) @ table.t() for table, proj in zip(self.tables, self.projs, strict=True)]
        return torch.cat(parts, dim=-1)[..., self.head_order]  # tier order -> token-id order


def make_embedding(cfg: ModelConfig) -> UniformEmbedding | RaggedEmbedding:
    return {"uniform": UniformEmbedding, "ragged": RaggedEmbedding}[cfg.embedding.kind](cfg)
