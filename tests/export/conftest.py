"""Tiny checkpoints with a tiny BPE tokenizer trained in place (no downloads)."""

from __future__ import annotations

from pathlib import Path

import pytest
from tiny_models import SENTENCES, VOCAB, tiny_model
from tokenizers import Tokenizer, models, pre_tokenizers, trainers

from ragtop.checkpoint import save_checkpoint


@pytest.fixture(scope="session")
def tokenizer_json() -> str:
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=["<|endoftext|>", "<unk>"], show_progress=False)
    tok.train_from_iterator(SENTENCES, trainer)
    return tok.to_str()


@pytest.fixture(scope="session")
def make_checkpoint(tmp_path_factory, tokenizer_json):
    made: dict[tuple[str, str], Path] = {}

    def make(attention: str, embedding: str) -> Path:
        if (attention, embedding) not in made:
            out = tmp_path_factory.mktemp(f"ckpt-{attention}-{embedding}")
            save_checkpoint(
                out,
                tiny_model(attention, embedding),
                tokenizer_json=tokenizer_json,
                generation={"bos_token_id": 0, "eos_token_id": 0},
            )
            made[attention, embedding] = out
        return made[attention, embedding]

    return make


@pytest.fixture(scope="session", autouse=True)
def _one_torch_thread():
    """Tiny models run fastest on one thread (and the CPUs are shared with other work)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
