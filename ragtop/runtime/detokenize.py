"""Incremental detokenization and stop strings.

`IncrementalDetokenizer` turns a growing list of token ids into text deltas. Byte-level
BPE tokens can split a multi-byte character: decoding such a prefix ends in U+FFFD, so the
delta is held until the character completes (the offsets scheme of vLLM / TGI). Decoding
restarts a few tokens back (`prefix_offset`) so tokenizers that drop a leading space when
decoding a lone token still give the right text.

`StopStringMatcher` finds stop strings across token boundaries: it holds back any tail of
the text that could begin a stop string, and cuts the output at the first stop string.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

REPLACEMENT = "\ufffd"
CONTEXT_TOKENS = 5  # tokens of prompt decoded with the first output tokens


class Decoder(Protocol):
    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str: ...


class IncrementalDetokenizer:
    def __init__(self, tokenizer: Decoder, prompt_ids: Sequence[int] = (), skip_special_tokens: bool = True) -> None:
        self.tokenizer, self.skip_special = tokenizer, skip_special_tokens
        self.ids = list(prompt_ids[-CONTEXT_TOKENS:])
        self.prefix_offset = 0  # start of the window decoded for context
        self.read_offset = len(self.ids)  # tokens before this have been emitted as text

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special)

    def add(self, token_ids: Sequence[int]) -> str:
        """Append tokens; return the text that is now complete (maybe "")."""
        self.ids.extend(token_ids)
        prefix = self._decode(self.ids[self.prefix_offset : self.read_offset])
        full = self._decode(self.ids[self.prefix_offset :])
        if len(full) <= len(prefix) or full.endswith(REPLACEMENT):
            return ""  # nothing new, or an incomplete character at the end: wait
        self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
        return full[len(prefix) :]

    def flush(self) -> str:
        """Whatever is still held (an incomplete character at the very end), as decoded."""
        prefix = self._decode(self.ids[self.prefix_offset : self.read_offset])
        full = self._decode(self.ids[self.prefix_offset :])
        self.prefix_offset = self.read_offset = len(self.ids)
        return full[len(prefix) :] if full.startswith(prefix) else ""


class StopStringMatcher:
    """Holds back text that might start a stop string; stops at the first one seen."""

    def __init__(self, stops: Sequence[str]) -> None:
        self.stops = tuple(s for s in stops if s)
        self.held = ""
        self.stopped: str | None = None  # the stop string that ended the text

    def feed(self, text: str) -> str:
        """Add decoded text; return what may be emitted now (never part of a stop string)."""
        if self.stopped is not None:
            return ""
        if not self.stops:
            return text
        buf = self.held + text
        hits = [(i, s) for s in self.stops if (i := buf.find(s)) >= 0]
        if hits:
            i, self.stopped = min(hits)
            self.held = ""
            return buf[:i]
        keep = self._partial_tail(buf)
        self.held = buf[len(buf) - keep :] if keep else ""
        return buf[: len(buf) - keep]

    def flush(self) -> str:
        """At the end of generation the held text was not a stop string: release it."""
        out, self.held = ("" if self.stopped is not None else self.held), ""
        return out

    def _partial_tail(self, buf: str) -> int:
        """Length of the longest tail of buf that is a proper prefix of a stop string."""
        longest = min(len(buf), max(len(s) for s in self.stops) - 1)
        for n in range(longest, 0, -1):
            tail = buf[-n:]
            if any(s.startswith(tail) for s in self.stops):
                return n
        return 0
