"""Rebuild a Hugging Face `tokenizer.json` from a GGUF file's tokenizer metadata.

Only byte-level BPE vocabularies (`tokenizer.ggml.model == "gpt2"`, the GPT-2 / StarCoder /
SmolLM / Llama-3 family) are supported. The pre-tokenizer follows `tokenizer.ggml.pre`,
as llama.cpp does:

- "default", "gpt2":             GPT-2's regex split, then byte-level;
- "smollm", "starcoder", "refact": every digit on its own, then GPT-2's split (this is
                                  SmolLM2's own tokenizer.json: Digits + ByteLevel);
- "llama3", "llama-bpe", ...:   Llama-3's regex split.

Tokens of type CONTROL (3) become special added tokens, so `<|im_start|>` in a chat prompt
stays one token.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers

from ..errors import RagtopError

CONTROL, USER_DEFINED = 3, 4
BYTE_ALPHABET = frozenset(pre_tokenizers.ByteLevel.alphabet())

LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def gpt2_split() -> pre_tokenizers.PreTokenizer:
    return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)


def pre_tokenizer_for(pre: str) -> pre_tokenizers.PreTokenizer:
    if pre in ("default", "gpt2", "gpt-2"):
        return gpt2_split()
    if pre in ("smollm", "starcoder", "refact"):
        return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), gpt2_split()])
    if pre in ("llama3", "llama-v3", "llama-bpe", "smaug-bpe", "dbrx", "falcon3"):
        return pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(LLAMA3_SPLIT), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
    raise RagtopError(
        f"unsupported GGUF pre-tokenizer {pre!r} (supported: default/gpt2, smollm/starcoder/refact, llama3/llama-bpe)"
    )


def byte_level_spelling(token: str) -> str:
    """Tokens are stored in GPT-2's byte alphabet; respell any that is not (llama.cpp does so)."""
    if set(token) <= BYTE_ALPHABET:
        return token
    table = {b: c for b, c in enumerate(_bytes_to_unicode())}
    return "".join(table[b] for b in token.encode("utf-8"))


def _bytes_to_unicode() -> list[str]:
    """GPT-2's byte -> printable character table, indexed by byte."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAC + 1)) + list(range(0xAE, 0xFF + 1))
    extra, chars = 0, []
    for b in range(256):
        if b in printable:
            chars.append(chr(b))
        else:
            chars.append(chr(256 + extra))
            extra += 1
    return chars


def build_tokenizer(
    model: str | None,
    pre: str,
    tokens: Sequence[str] | None,
    merges: Sequence[str] | None,
    token_types: Sequence[int] | None,
    source: Path | str = "GGUF",
) -> tuple[str, dict[str, int]]:
    """(tokenizer.json text, {special token: id}) for a byte-level BPE GGUF vocabulary."""
    if model != "gpt2":
        raise RagtopError(
            f"{source}: unsupported tokenizer model {model!r} (only byte-level BPE, 'gpt2', is supported)"
        )
    if not tokens or not merges:
        raise RagtopError(f"{source}: the GGUF has no tokenizer vocabulary or merges")
    types = list(token_types) if token_types else [1] * len(tokens)
    vocab = {
        byte_level_spelling(t) if ty not in (CONTROL, USER_DEFINED) else t: i
        for i, (t, ty) in enumerate(zip(tokens, types, strict=True))
    }
    pairs = []
    for m in merges:
        a, sep, b = m.partition(" ")
        if not sep:
            raise RagtopError(f"{source}: malformed merge {m!r}")
        pairs.append((a, b))
    tok = Tokenizer(models.BPE(vocab=vocab, merges=pairs, fuse_unk=False))
    tok.pre_tokenizer = pre_tokenizer_for(pre)
    tok.decoder = decoders.ByteLevel()
    special = {t: i for i, (t, ty) in enumerate(zip(tokens, types, strict=True)) if ty == CONTROL}
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in special])
    user = [t for t, ty in zip(tokens, types, strict=True) if ty == USER_DEFINED]
    if user:
        tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in user])
    return tok.to_str(), special
