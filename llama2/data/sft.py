"""SFT data (paper §3.1): a dialog encoded in the chat format with its answer-only loss mask, fitted to the
window, and packed into rows with attention kept inside each dialog.

:func:`encode_sft_example` renders a dialog with :func:`llama2.chat.encode_dialog` (loss on the assistant's
tokens and their EOS only) and fits it to the window; :func:`pack_sft` packs examples into rows and
:func:`collate` makes batches with a block-diagonal causal mask. The window-fitting rule below is also the one
the reward-model pairs use (:mod:`llama2.data.preferences`).
"""
from __future__ import annotations

import bisect
import random
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal, Protocol

import torch

from ..chat import TextEncoder, encode_dialog


__all__ = [
    "IGNORE_INDEX", "Overflow", "SFTExample", "EncodeStats", "encode_sft_example", "encode_sft_examples", "encode_all",
    "last_answer_only", "PackedRow", "pack_sft", "collate", "drop_exchanges", "count_exchanges", "last_answer_start",
    "check_overflow",
]

IGNORE_INDEX = -100  # target of a position without loss (the default ignore_index of F.cross_entropy)
Overflow = Literal["truncate", "skip"]


# ------------------------------------------------------------------------------------------------ fitting a window
#
# A dialog longer than the window loses tokens from the left, from the prompt side only, in two steps:
#
# 1. whole earliest exchanges (a user message and the assistant's answer) are dropped, one at a time, until the
#    rest fits; the system message, if any, stays and is folded into the new first user message as the chat
#    format always does. Our choice, for two reasons: every kept token then sits in a well-formed Llama 2-Chat
#    context that starts "<s>[INST] <<SYS>>..." exactly as at inference (Meta's chat_completion), and no answer
#    is ever trained on without its own question. The answers of dropped exchanges lose their loss; that is
#    counted (dropped_loss_tokens), never silent. Cutting inside the first prompt instead would keep those
#    answers but leave a headless fragment ("...ere is my question [/INST]") the model never sees when chatting,
#    and drop the system prompt first of all.
# 2. if the last exchange alone still does not fit, its prompt is cut from the left (the system prompt and the
#    start of the user message go first) while at least one prompt token stays before the answer, so every
#    answer token keeps a token to be predicted from. No token of the kept answer is ever dropped.
#
# If the final answer (plus that one token) alone exceeds the window, nothing sensible fits: the example is
# dropped (None) and the caller counts it (EncodeStats.too_long).


def drop_exchanges(dialog: Sequence[Mapping[str, str]], k: int) -> list[dict[str, str]]:
    """The dialog without its first k (user, assistant) exchanges; a leading system message is kept."""
    system = [dict(dialog[0])] if dialog[0]["role"] == "system" else []
    rest = dialog[len(system):]
    return system + [dict(m) for m in rest[2 * k:]]


def count_exchanges(dialog: Sequence[Mapping[str, str]]) -> int:
    """Finished (user, assistant) exchanges before the last user message."""
    n_users = sum(m["role"] == "user" for m in dialog)
    return n_users - 1


def _first_loss(mask: Sequence[int]) -> int:
    return next((i for i, m in enumerate(mask) if m), len(mask))


def last_answer_start(mask: Sequence[int]) -> int:
    """Index of the first token of the final answer: the mask ends with its run of 1s."""
    return max((i for i, m in enumerate(mask) if not m), default=-1) + 1


@dataclass(frozen=True)
class SFTExample:
    """An encoded SFT dialog that fits the window (at most seq_len + 1 tokens: seq_len inputs, shifted targets).

    ``ids`` and ``loss_mask`` (both length L) as :func:`llama2.chat.encode_dialog` gives them, after any
    truncation; ``loss_mask`` is 1 on the assistant's tokens and the EOS closing each answer. The ``dropped_*``
    counts say what truncation removed (0 when the dialog fitted as it was).
    """

    ids: list[int]
    loss_mask: list[int]
    dropped_exchanges: int = 0  # earliest (user, assistant) exchanges removed whole
    dropped_tokens: int = 0  # tokens removed in all, prompt and dropped answers
    dropped_loss_tokens: int = 0  # of which answer tokens (the answers of dropped exchanges)

    @property
    def truncated(self) -> bool:
        return self.dropped_tokens > 0

    def __len__(self) -> int:
        return len(self.ids)


class Fitted(Protocol):
    """An encoded example as EncodeStats counts it: an ``SFTExample`` or a preference's ``EncodedPair``."""

    dropped_exchanges: int
    dropped_tokens: int


@dataclass
class EncodeStats:
    """Counts of what encoding did to a data set, for the training log (nothing is dropped silently)."""

    total: int = 0  # examples seen
    kept: int = 0  # examples returned (including truncated ones)
    truncated: int = 0  # kept, with tokens dropped from the prompt side
    skipped: int = 0  # too long and dropped whole, overflow="skip"
    too_long: int = 0  # dropped whole with overflow="truncate": the final answer alone exceeds the window
    dropped_exchanges: int = 0
    dropped_tokens: int = 0
    dropped_loss_tokens: int = 0

    def add(self, example: Fitted | None, overflow: Overflow) -> None:
        self.total += 1
        if example is None:
            if overflow == "skip":
                self.skipped += 1
            else:
                self.too_long += 1
            return
        self.kept += 1
        self.truncated += int(example.dropped_tokens > 0)
        self.dropped_exchanges += example.dropped_exchanges
        self.dropped_tokens += example.dropped_tokens
        self.dropped_loss_tokens += getattr(example, "dropped_loss_tokens", 0)

    def __str__(self) -> str:
        s = f"{self.kept}/{self.total} kept"
        if self.truncated:
            s += (f", {self.truncated} truncated ({self.dropped_exchanges} exchanges, {self.dropped_tokens} tokens "
                  f"dropped, {self.dropped_loss_tokens} of them answer tokens)")
        if self.skipped:
            s += f", {self.skipped} skipped as too long"
        if self.too_long:
            s += f", {self.too_long} dropped: final answer longer than the window"
        return s


def check_overflow(overflow: str, seq_len: int) -> None:
    """Refuse an unknown overflow policy or a window too short for one prompt token and one answer token."""
    if overflow not in ("truncate", "skip"):
        raise ValueError(f"overflow must be 'truncate' or 'skip', got {overflow!r}")
    if seq_len < 2:
        raise ValueError(f"seq_len must be >= 2, got {seq_len}")


def encode_sft_example(
    tokenizer: TextEncoder,
    dialog: Sequence[Mapping[str, str]],
    seq_len: int,
    overflow: Overflow = "truncate",
) -> SFTExample | None:
    """Encode an SFT dialog (ending with the assistant) and fit it to a window of ``seq_len`` positions.

    A dialog of L tokens trains on L - 1 positions (inputs ids[:-1], targets ids[1:]), so it fits when
    L <= seq_len + 1. A longer one is, with ``overflow="skip"``, dropped (None); with ``"truncate"``, cut from the
    left on the prompt side as the comment above this function explains: earliest whole exchanges first, then
    the start of the last prompt. It returns None, for the caller to count, when the final answer alone does
    not fit. :func:`encode_sft_examples` does the counting for a whole data set.
    """
    check_overflow(overflow, seq_len)
    limit = seq_len + 1
    full = encode_dialog(tokenizer, dialog)
    if full.loss_mask is None:
        raise ValueError("an SFT dialog must end with an assistant message")
    if len(full.ids) <= limit:
        return SFTExample(full.ids, full.loss_mask)
    if overflow == "skip":
        return None

    n_loss = sum(full.loss_mask)
    for k in range(1, count_exchanges(dialog) + 1):  # step 1: drop whole earliest exchanges
        ids, mask = encode_dialog(tokenizer, drop_exchanges(dialog, k))
        if len(ids) <= limit or k == count_exchanges(dialog):
            break
    else:  # a single exchange: nothing to drop whole
        k, ids, mask = 0, full.ids, full.loss_mask
    assert mask is not None
    cut = len(ids) - limit  # step 2: cut the start of the last prompt
    if cut > 0:
        if cut >= _first_loss(mask):  # at least one prompt token must stay before the answer
            return None
        ids, mask = ids[cut:], mask[cut:]
    return SFTExample(ids, mask, dropped_exchanges=k, dropped_tokens=len(full.ids) - len(ids),
                      dropped_loss_tokens=n_loss - sum(mask))


def encode_sft_examples(
    tokenizer: TextEncoder,
    dialogs: Iterable[Sequence[Mapping[str, str]]],
    seq_len: int,
    overflow: Overflow = "truncate",
) -> tuple[list[SFTExample], EncodeStats]:
    """:func:`encode_sft_example` over a data set: the examples that fit and the counts to report."""
    return encode_all(encode_sft_example, tokenizer, dialogs, seq_len, overflow)


def encode_all(encode_one, tokenizer: TextEncoder, items: Iterable, seq_len: int, overflow: Overflow) -> tuple[list, EncodeStats]:
    """``encode_one(tokenizer, item, seq_len, overflow)`` over a data set: what fits, and the counts of what did not
    (a data set is never cut silently)."""
    out, stats = [], EncodeStats()
    for item in items:
        enc = encode_one(tokenizer, item, seq_len, overflow)
        stats.add(enc, overflow)
        if enc is not None:
            out.append(enc)
    return out, stats




def last_answer_only(ex: SFTExample) -> SFTExample:
    """The example with loss on its final answer (the last run of loss tokens) only: Ghost Attention trains only
    the last answer of a dialog whose earlier turns were sampled under another system message (§3.3)."""
    mask = list(ex.loss_mask)
    end = len(mask)
    while end and not mask[end - 1]:
        end -= 1
    start = end
    while start and mask[start - 1]:
        start -= 1
    return SFTExample(ex.ids, [0] * start + mask[start:end] + [0] * (len(mask) - end), ex.dropped_exchanges,
                      ex.dropped_tokens, ex.dropped_loss_tokens)


# ------------------------------------------------------------------------------------------------ SFT packing
#
# The paper (§3.1) concatenates "all the prompts and answers from the training set" with "a special token ... to
# separate the prompt and answer segments" and fills the 4096-token window. We pack too, but keep the examples
# independent: attention is block-diagonal by dialog (a token sees only earlier tokens of its own dialog) and
# the rotary positions restart at 0 for every dialog. Our choice, because each packed dialog then trains
# exactly as it would alone (the same logits, see the tests) and as the model meets it at inference, where a
# chat never follows an unrelated one; the BOS/EOS of the chat format are the separators. It costs a (T, T)
# mask per row (SDPA then cannot use its flash kernel); at scale, a varlen attention kernel would do the same.


@dataclass(frozen=True)
class PackedRow:
    """One training row of ``seq_len`` positions holding one or more whole dialogs, then padding.

    The tensors are built on demand from ``docs`` (a row stores only its examples):
    ``tokens`` (T,) inputs, ``targets`` (T,) the next token where it carries loss else -100, ``position_ids``
    (T,) restarting at 0 for each dialog, ``doc_ids`` (T,) the dialog's index in the row, -1 on padding.
    A dialog of L tokens takes L - 1 positions: its last token (the EOS) is only ever a target.
    """

    docs: tuple[SFTExample, ...]
    seq_len: int

    @property
    def n_positions(self) -> int:
        return sum(len(d.ids) - 1 for d in self.docs)

    @property
    def n_targets(self) -> int:
        """Positions that carry loss, ``(targets != IGNORE_INDEX).sum()``, without building the tensors."""
        return sum(sum(d.loss_mask[1:]) for d in self.docs)

    def tensors(self, pad_id: int = 0) -> dict[str, torch.Tensor]:
        T = self.seq_len
        tokens = torch.full((T,), pad_id, dtype=torch.long)
        targets = torch.full((T,), IGNORE_INDEX, dtype=torch.long)
        position_ids = torch.zeros(T, dtype=torch.long)
        doc_ids = torch.full((T,), -1, dtype=torch.long)
        t = 0
        for i, d in enumerate(self.docs):
            n = len(d.ids) - 1
            ids = torch.tensor(d.ids, dtype=torch.long)  # (n + 1,)
            loss = torch.tensor(d.loss_mask, dtype=torch.bool)
            tokens[t:t + n] = ids[:-1]
            targets[t:t + n] = torch.where(loss[1:], ids[1:], IGNORE_INDEX)  # targets[t] = ids[t+1] if loss
            position_ids[t:t + n] = torch.arange(n)
            doc_ids[t:t + n] = i
            t += n
        return {"tokens": tokens, "targets": targets, "position_ids": position_ids, "doc_ids": doc_ids}

    # each (T,), built on demand (see tensors())
    tokens = property(lambda self: self.tensors()["tokens"])
    targets = property(lambda self: self.tensors()["targets"])
    position_ids = property(lambda self: self.tensors()["position_ids"])
    doc_ids = property(lambda self: self.tensors()["doc_ids"])


def pack_sft(examples: Sequence[SFTExample], seq_len: int, seed: int | None = None) -> list[PackedRow]:
    """Pack examples into rows of ``seq_len`` positions, best fit: each example goes to the open row with the
    least room that still holds it (a new row if none does), so rows come out nearly full.

    ``seed``: None keeps the given order; an int shuffles the examples first with ``random.Random(seed)``.
    Deterministic either way. Every example must fit a row (len(ids) <= seq_len + 1, as
    :func:`encode_sft_example` guarantees), else ValueError.
    """
    order = list(range(len(examples)))
    if seed is not None:
        random.Random(seed).shuffle(order)
    rows: list[list[SFTExample]] = []
    free: list[tuple[int, int]] = []  # sorted (room left, row index) of rows with room for a 2-token dialog
    for i in order:
        ex = examples[i]
        need = len(ex.ids) - 1
        if not 1 <= need <= seq_len:
            raise ValueError(f"example {i} has {len(ex.ids)} tokens; a row of {seq_len} holds 2..{seq_len + 1}")
        j = bisect.bisect_left(free, (need, -1))  # the row with the least room >= need
        if j < len(free):
            room, r = free.pop(j)
        else:
            room, r = seq_len, len(rows)
            rows.append([])
        rows[r].append(ex)
        if room - need >= 1:
            bisect.insort(free, (room - need, r))
    return [PackedRow(tuple(docs), seq_len) for docs in rows]


def _block_causal_mask(doc_ids: torch.Tensor) -> torch.Tensor:
    """(B, T, T) bool from (B, T) document ids (-1 = padding): query t sees key s iff s <= t and both are in
    the same document; a padding position sees only itself, so no softmax row is empty (no NaN)."""
    B, T = doc_ids.shape
    same = doc_ids[:, :, None] == doc_ids[:, None, :]  # (B, T, T)
    causal = torch.ones(T, T, dtype=torch.bool, device=doc_ids.device).tril()
    real_query = (doc_ids >= 0)[:, :, None]  # (B, T, 1)
    eye = torch.eye(T, dtype=torch.bool, device=doc_ids.device)
    return (same & causal & real_query) | eye


def collate(rows: Sequence[PackedRow], pad_id: int = 0) -> dict[str, torch.Tensor]:
    """Stack packed rows into a batch for ``model(tokens, mask=mask, position_ids=position_ids)``.

    Returns tokens, targets, position_ids, doc_ids (B, T) long and mask (B, T, T) bool (True where a query may
    attend to a key: causal within its own dialog). The SFT loss is
    ``F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-100)``, a mean over answer tokens.
    """
    if not rows:
        raise ValueError("no rows to collate")
    if len({r.seq_len for r in rows}) != 1:
        raise ValueError(f"rows of different lengths: {sorted({r.seq_len for r in rows})}")
    parts = [r.tensors(pad_id) for r in rows]
    batch = {k: torch.stack([p[k] for p in parts]) for k in parts[0]}  # each (B, T)
    batch["mask"] = _block_causal_mask(batch["doc_ids"])  # (B, T, T)
    return batch
