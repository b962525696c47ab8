"""How a sequence ends, and the per-row record of a batch being decoded (both whole-batch loops record through it):
a row ends on a stop token or a stop string ("stop"), else on max_new_tokens ("length") or a full context
("context")."""
from __future__ import annotations

from typing import Callable, Sequence

__all__ = ["find_stop", "ends_in_stop", "Outputs"]


def find_stop(text: str, stop_strings: Sequence[str]) -> int:
    """Index of the earliest stop string in ``text``, or -1."""
    hits = [text.find(s) for s in stop_strings if s and s in text]
    return min(hits) if hits else -1


def ends_in_stop(tokenizer, tokens: Sequence[int], stop_strings: Sequence[str]) -> bool:
    """Whether the text of the last tokens holds a stop string, checked after every new token. The window is long
    enough for the longest stop string however it is tokenized (a character is at most 4 byte-fallback pieces),
    plus two tokens so that a leading space is not lost at the window's start."""
    if not stop_strings:
        return False
    window = 4 * max(len(s) for s in stop_strings) + 2
    return find_stop(tokenizer.decode(list(tokens[-window:])), stop_strings) >= 0


class Outputs:
    """Per-row tokens, logprobs and finish reasons of a batch being decoded; ``on_token(row, token)`` is called in
    row order as tokens are recorded. ``reason`` is how a row ends that meets no stop: "length" or "context"."""

    def __init__(self, B: int, cfg, stop_tokens: Sequence[int], tokenizer, on_token: Callable[[int, int], None] | None,
                 reason: str):
        self.cfg, self.tokenizer, self.on_token, self.stops = cfg, tokenizer, on_token, set(stop_tokens)
        self.tokens: list[list[int]] = [[] for _ in range(B)]
        self.logprobs: list[list[float]] | None = [[] for _ in range(B)] if cfg.logprobs else None
        self.finish = [reason] * B
        self.done = [False] * B

    def record(self, rows: Sequence[int], toks: list[int], lps: list[float] | None) -> int:
        """Record ``toks[i]`` (and ``lps[i]``) for row ``rows[i]`` unless that row is done; returns how many of
        ``rows`` are done."""
        for i, b in enumerate(rows):
            if self.done[b]:
                continue
            t = toks[i]
            self.tokens[b].append(t)
            if self.logprobs is not None:
                self.logprobs[b].append(lps[i])
            if self.on_token is not None:
                self.on_token(b, t)
            if t in self.stops or ends_in_stop(self.tokenizer, self.tokens[b], self.cfg.stop_strings):
                self.done[b], self.finish[b] = True, "stop"
        return sum(self.done[b] for b in rows)

    def rows(self) -> list[tuple[list[int], list[float] | None, str]]:
        return [(self.tokens[b], self.logprobs[b] if self.logprobs is not None else None, self.finish[b])
                for b in range(len(self.tokens))]
