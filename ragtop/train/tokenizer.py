"""Byte-level BPE tokenizers trained offline with Hugging Face `tokenizers`."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

EOS = "<|endoftext|>"


def train_bpe(texts: Sequence[str], vocab_size: int) -> Tokenizer:
    """A GPT-2-style byte-level BPE with one special token, EOS (id 0)."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return tok


def cached_bpe(texts: Sequence[str], vocab_size: int, cache_dir: Path) -> Tokenizer:
    """`train_bpe`, cached on disk by (texts, vocab size): training is deterministic."""
    h = hashlib.sha256(str(vocab_size).encode())
    for t in texts:
        h.update(t.encode())
    path = Path(cache_dir) / f"bpe-{vocab_size}-{h.hexdigest()[:16]}.json"
    if path.is_file():
        return Tokenizer.from_file(str(path))
    tok = train_bpe(texts, vocab_size)
    path.parent.mkdir(parents=True, exist_ok=True)
    tok.save(str(path))
    return tok
