"""Tiny models, a tiny tokenizer and a fake runner for the runtime tests."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import pytest
import torch
from torch import Tensor

from ragtop.checkpoint import save_checkpoint
from ragtop.model import AttentionConfig, EmbeddingConfig, ModelConfig, Transformer
from ragtop.runtime.runners.base import Chunk, RunnerSpec
from ragtop.train.tokenizer import train_bpe

TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "State of the Union: the economy, the budget and the people.",
    "Unicode test: café, naïve, 日本語のテキスト, 中文字符, emoji 🚀🎉👍🏽 and more.",
    "Numbers 1234567890 and punctuation !?;:,.",
    "Hello world! Hello again, world.",
]
VARIANTS = {
    "dense": (AttentionConfig(), EmbeddingConfig()),
    "topk": (AttentionConfig(kind="topk", topk=4), EmbeddingConfig()),
    "topk-block": (AttentionConfig(kind="topk", topk=6, block_size=4, block_budget=2), EmbeddingConfig()),
    "ragged": (AttentionConfig(), None),  # tiers filled in from the vocabulary size
}


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models run fastest on one thread, and a machine shared with training stays usable."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def tokenizer():
    return train_bpe(TEXTS * 4, vocab_size=300)


def tiny_config(vocab: int, variant: str = "dense", max_seq_len: int = 64) -> ModelConfig:
    attention, embedding = VARIANTS[variant]
    if embedding is None:
        head = vocab // 4
        embedding = EmbeddingConfig(kind="ragged", tier_sizes=(head, vocab - head), tier_widths=(32, 8))
    return ModelConfig(
        vocab_size=vocab,
        d_model=32,
        n_layers=2,
        n_heads=4,
        n_kv_heads=2,
        d_ff=64,
        max_seq_len=max_seq_len,
        attention=attention,
        embedding=embedding,
    )


def make_model(vocab: int, variant: str = "dense", seed: int = 0, max_seq_len: int = 64) -> Transformer:
    torch.manual_seed(seed)
    model = Transformer(tiny_config(vocab, variant, max_seq_len)).eval()
    with torch.no_grad():  # sharper logits than the init's, so greedy ties are unlikely
        for p in model.parameters():
            p.mul_(8.0 if p.dim() > 1 else 1.0)
    return model


@pytest.fixture(scope="session")
def checkpoint(tokenizer, tmp_path_factory) -> Path:
    model = make_model(tokenizer.get_vocab_size())
    eos = tokenizer.token_to_id("<|endoftext|>")
    return save_checkpoint(
        tmp_path_factory.mktemp("ckpt"),
        model,
        tokenizer.to_str(),
        generation={"bos_token_id": eos, "eos_token_id": eos},
    )


def greedy_reference(model: Transformer, prompt: Sequence[int], n: int) -> list[int]:
    """Greedy decoding by re-running the whole sequence each step (no cache)."""
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            logits = model(torch.tensor([ids]))[0, -1]
            ids.append(int(logits.argmax()))
    return ids[len(prompt) :]


class FakeRunner:
    """A runner without a model: the next token after t is (t + 1) % V. Records every call."""

    def __init__(self, vocab_size: int = 50, max_model_len: int = 64) -> None:
        self.spec = RunnerSpec("fake", vocab_size, max_model_len, kv_bytes_per_token=8, attention="dense")
        self.calls: list[list[Chunk]] = []
        self.copies: list[tuple[int, int, int]] = []
        self.slots = 0

    def allocate(self, slots: int, capacity: int) -> None:
        self.slots, self.capacity = slots, capacity

    def forward(self, chunks: Sequence[Chunk]) -> list[Tensor | None]:
        self.calls.append(list(chunks))
        out: list[Tensor | None] = []
        for c in chunks:
            assert 0 <= c.slot < self.slots and c.start + len(c.tokens) <= self.capacity
            logits = torch.zeros(self.spec.vocab_size)
            logits[(c.tokens[-1] + 1) % self.spec.vocab_size] = 10.0
            out.append(None if c.logits == "none" else logits)
        return out

    def copy_slot(self, src: int, dst: int, length: int) -> None:
        self.copies.append((src, dst, length))

    def close(self) -> None:
        pass


class CharTokenizer:
    """Token t <-> chr(ord('a') + t % 26): enough for engine tests with the fake runner."""

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return "".join(chr(ord("a") + t % 26) for t in ids)
