"""Corpus slices and tokenizers for the studies.

Training text is the SOTU training split (speeches before 2010); a corpus of N tokens is
the N tokens immediately preceding the held-out period (the most recent speeches first,
each document prefixed with EOS), so every size shares its tail with the larger ones.
Held-out text is the first `heldout_tokens` tokens of the held-out speeches (2010 on):
never training text.

The summary's tiny vocabularies (100, 200 tokens) are below byte-level BPE's 256-symbol
alphabet, so those tokenizers keep only the most frequent characters (others map to UNK)
and learn merges for the rest of the vocabulary.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from ..errors import RagtopError
from ..train.corpus import load_sotu, split_by_year
from ..train.tokenizer import EOS, cached_bpe

UNK = "<|unk|>"


def small_bpe(texts: list[str], vocab_size: int) -> Tokenizer:
    """Byte-level BPE with a limited alphabet (fits vocabularies under 256): EOS=0, UNK=1."""
    alphabet = min(vocab_size - 2 - vocab_size // 4, 90)
    tok = Tokenizer(models.BPE(unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=[EOS, UNK], limit_alphabet=alphabet, show_progress=False
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return tok


def study_tokenizer(texts: list[str], vocab_size: int, cache_dir: Path) -> Tokenizer:
    """ragtop's byte-level BPE from 512 tokens up; `small_bpe` below (cached on disk)."""
    if vocab_size >= 512:
        return cached_bpe(texts, vocab_size, cache_dir)
    if vocab_size < 16:
        raise RagtopError(f"vocabulary of {vocab_size} is too small (need >= 16)")
    h = hashlib.sha256(f"small-{vocab_size}".encode())
    for t in texts:
        h.update(t.encode())
    path = Path(cache_dir) / f"small-bpe-{vocab_size}-{h.hexdigest()[:16]}.json"
    if path.is_file():
        return Tokenizer.from_file(str(path))
    tok = small_bpe(texts, vocab_size)
    if tok.get_vocab_size() != vocab_size:
        raise RagtopError(f"tokenizer came out with {tok.get_vocab_size()} tokens, asked for {vocab_size}")
    path.parent.mkdir(parents=True, exist_ok=True)
    tok.save(str(path))
    return tok


@dataclass
class StudyData:
    tokenizer: Tokenizer
    vocab_size: int
    eos: int
    train_stream: np.ndarray  # the whole training split, most recent speech first
    heldout_stream: np.ndarray
    heldout_texts: list[str]

    def corpus(self, n_tokens: int | None) -> np.ndarray:
        """The training corpus of `n_tokens` tokens (None: the full training split)."""
        if n_tokens is None:
            return self.train_stream
        if n_tokens > len(self.train_stream):
            raise RagtopError(f"corpus of {n_tokens} tokens asked, the training split has {len(self.train_stream)}")
        return self.train_stream[:n_tokens]


def encode_stream(tok: Tokenizer, texts: list[str], eos: int) -> np.ndarray:
    encoded = [e.ids for e in tok.encode_batch(texts)]
    return np.concatenate([np.asarray([eos, *ids], dtype=np.int32) for ids in encoded])


def load_study_data(data_dir: Path, vocab_size: int, heldout_tokens: int, train_tokens: int | None = None) -> StudyData:
    """Tokenizer (trained on the whole training split), held-out tokens, and the training
    stream: all of it, or only the most recent speeches that make up `train_tokens`."""
    train_docs, heldout_docs = split_by_year(load_sotu(Path(data_dir)))
    train_texts = [d.text for d in train_docs]
    tok = study_tokenizer(train_texts, vocab_size, Path(data_dir) / "tokenizers")
    eos = tok.token_to_id(EOS)
    recent_first = [d.text for d in sorted(train_docs, key=lambda d: -d.year)]
    if train_tokens is not None:  # encode only as many speeches as needed
        parts, n = [], 0
        for text in recent_first:
            parts.append(encode_stream(tok, [text], eos))
            n += len(parts[-1])
            if n >= train_tokens:
                break
        stream = np.concatenate(parts)
    else:
        stream = encode_stream(tok, recent_first, eos)
    heldout_texts = [d.text for d in heldout_docs]
    heldout = encode_stream(tok, heldout_texts[:4], eos)[:heldout_tokens]
    if len(heldout) < heldout_tokens:
        heldout = encode_stream(tok, heldout_texts, eos)[:heldout_tokens]
    return StudyData(tok, vocab_size, eos, stream, heldout, heldout_texts)
