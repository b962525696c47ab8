"""One choice (one engine request) as its tokens arrive: its text, released only when it can no longer change (not
inside a multi-byte UTF-8 character, not while it ends with the start of a stop string), and its tokens as the
OpenAI logprobs report them."""
from __future__ import annotations

import re
from dataclasses import dataclass, field

from ..generate import StepOutput, find_stop

__all__ = ["Choice", "token_text"]


def _held_back(text: str, stops: tuple[str, ...]) -> int:
    """How many trailing characters of ``text`` might be the beginning of a stop string (not safe to send yet)."""
    best = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), best, -1):
            if text.endswith(s[:k]):
                best = k
                break
    return best


_BYTE_PIECE = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")


def token_text(tokenizer, token_id: int) -> tuple[str, list[int]]:
    """A token as the OpenAI logprobs report it: its text (SentencePiece's "▁" as a space) and its UTF-8 bytes.
    A byte-fallback piece ("<0xE2>") is one byte of a character; its text is written "bytes:\\xe2" as OpenAI does."""
    piece = tokenizer.id_to_piece(token_id)
    m = _BYTE_PIECE.match(piece)
    if m:
        b = int(m.group(1), 16)
        return f"bytes:\\x{b:02x}", [b]
    if token_id in (tokenizer.bos_id, tokenizer.eos_id):
        return piece, list(piece.encode())
    text = piece.replace("\u2581", " ")
    return text, list(text.encode())


@dataclass
class Choice:
    """The state of one choice (one engine request): its tokens, the text already sent, why it finished."""

    index: int
    stops: tuple[str, ...]
    strip: bool  # chat content is stripped, as Llama.chat_completion strips it
    eos_id: int
    ids: list[int] = field(default_factory=list)
    logprobs: list[float | None] = field(default_factory=list)
    sent: str = ""
    reported: int = 0  # tokens whose logprobs were sent
    finish_reason: str | None = None
    engine_done: bool = False  # the engine finished it (else, once done, it is to be cancelled)

    def add(self, outs: list[StepOutput]) -> None:
        for o in outs:
            self.ids.append(o.token)
            self.logprobs.append(o.logprob)
            if o.finished:
                self.engine_done = True
                # "context": the sequence filled the model's context; OpenAI calls every budget limit "length"
                self.finish_reason = "stop" if o.finish_reason == "stop" else "length"

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    def shown_ids(self) -> list[int]:
        """The generated ids whose text is shown: the final EOS is not (as ``generate`` shows a completion)."""
        return self.ids[:-1] if self.ids and self.ids[-1] == self.eos_id else self.ids

    def text(self, tokenizer) -> tuple[str, bool]:
        """(the text that can no longer change, whether a stop string was found in it)."""
        text = tokenizer.decode(self.shown_ids())
        cut = find_stop(text, self.stops)
        if cut >= 0:
            text, final = text[:cut], True
        else:
            final = self.done
        if not final:
            text = text.rstrip("\ufffd")  # the start of a multi-byte character whose other bytes are still to come
            text = text[: len(text) - _held_back(text, self.stops)]
        if self.strip:
            text = text.lstrip()
            text = text.strip() if final else text.rstrip()  # trailing spaces wait for what follows them
        return text, cut >= 0

    def delta(self, tokenizer) -> str:
        """The text not sent yet (and mark it sent)."""
        text, _ = self.text(tokenizer)
        if not text.startswith(self.sent):  # cannot happen with SentencePiece: decoding more ids only appends
            return ""
        new, self.sent = text[len(self.sent):], text
        return new

    def new_tokens(self, start: int) -> tuple[int, int]:
        """The range [start, end) of tokens to report logprobs for: all received, less a final EOS."""
        end = len(self.ids) - 1 if self.done and self.ids and self.ids[-1] == self.eos_id else len(self.ids)
        return start, max(start, end)

    def take_new(self, tokenizer) -> tuple[str, int, int]:
        """What a stream sends next: the text not sent yet, and the range [k0, k1) of the tokens whose logprobs are
        not reported yet; both are marked sent."""
        text = self.delta(tokenizer)
        k0, k1 = self.new_tokens(self.reported)
        self.reported = k1
        return text, k0, k1
