"""Data of the fine-tuning stages: JSONL readers, SFT encoding and packing, reward-model pairs, data mixing.

Three JSONL formats (one JSON object per line; blank lines are allowed; fields not named here are ignored, so
records may carry ids or metadata):

* dialogs, for supervised fine-tuning (paper §3.1)::

      {"dialog": [{"role": "system", "content": "..."},      # optional, first only
                  {"role": "user", "content": "..."}, {"role": "assistant", "content": "..."}, ...]}

  user and assistant alternate, starting with the user and ending with the assistant;
* preferences, for the reward models (§3.2.1, §3.2.2)::

      {"prompt": [... a dialog ending with a user turn ...], "chosen": "...", "rejected": "...",
       "rating": "significantly_better" | "better" | "slightly_better" | "negligibly_better" | "unsure",
       "kind": "helpfulness" | "safety", "chosen_safe": true, "rejected_safe": false}   # *_safe optional

  (the rating says how much better "chosen" is; "chosen" and "rejected" must differ);
* prompts, for rejection sampling and PPO (§3.2.3)::

      {"dialog": [... ending with a user turn ...], "safety": false}                    # safety optional

Every message content must be a non-empty string without the chat template's tags ([INST], [/INST], <<SYS>>,
<</SYS>>), which would corrupt the Llama 2-Chat layout. A bad record raises ``ValueError("FILE:LINE: FIELD:
problem")``, e.g. ``data.jsonl:7: dialog[2].role: expected 'assistant', got 'user'``; with ``skip_bad=True``
the reader skips it instead and lists it in the ``skipped`` attribute of the returned :class:`Records`.

Then, for training:

* :func:`encode_sft_example` renders a dialog with :func:`llama2.chat.encode_dialog` (loss on the assistant's
  tokens and their EOS only) and fits it to the window; :func:`pack_sft` packs examples into rows and
  :func:`collate` makes batches with a block-diagonal causal mask;
* :func:`encode_preference` renders the two finished dialogs of a pair; :func:`collate_pairs` batches chosen
  and rejected together; :func:`gather_last` reads the score at the last real token;
* :func:`mix_preferences` builds the data mix of each reward model; :func:`split_holdout` holds out a test set.
"""
from __future__ import annotations

import bisect
import json
import os
import random
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generic, Literal, TypeVar

import torch

from ..chat import SPECIAL_TAGS, TextEncoder, encode_dialog
from ..rlhf.reward import RATINGS

__all__ = [
    "KINDS",
    "IGNORE_INDEX",
    "BadLine",
    "Records",
    "Preference",
    "Prompt",
    "read_dialogs",
    "read_preferences",
    "read_prompts",
    "SFTExample",
    "EncodeStats",
    "encode_sft_example",
    "encode_sft_examples",
    "PackedRow",
    "pack_sft",
    "collate",
    "EncodedPair",
    "encode_preference",
    "encode_preferences",
    "collate_pairs",
    "gather_last",
    "mix_preferences",
    "split_holdout",
]

KINDS: tuple[str, ...] = ("helpfulness", "safety")
IGNORE_INDEX = -100  # target of a position without loss (the default ignore_index of F.cross_entropy)

T = TypeVar("T")
Overflow = Literal["truncate", "skip"]
PathArg = str | os.PathLike[str] | Sequence[str | os.PathLike[str]]


# ------------------------------------------------------------------------------------------------ records


@dataclass(frozen=True)
class Preference:
    """One human preference (§3.2.1): two responses to the same prompt, the chosen one rated better by `rating`."""

    prompt: list[dict[str, str]]  # a dialog ending with a user message
    chosen: str
    rejected: str
    rating: str  # one of llama2.rlhf.RATINGS
    kind: str  # "helpfulness" or "safety": which reward model's data it is
    chosen_safe: bool | None = None  # the annotators' safety label of each response, None when not given
    rejected_safe: bool | None = None
    source: str = ""  # "file:line" it was read from

    @property
    def chosen_dialog(self) -> list[dict[str, str]]:
        return [*self.prompt, {"role": "assistant", "content": self.chosen}]

    @property
    def rejected_dialog(self) -> list[dict[str, str]]:
        return [*self.prompt, {"role": "assistant", "content": self.rejected}]


@dataclass(frozen=True)
class Prompt:
    """A prompt to sample answers for (rejection sampling, PPO); `safety` tags it for the safety reward (§3.2.3)."""

    dialog: list[dict[str, str]]  # ends with a user message
    safety: bool = False
    source: str = ""


@dataclass(frozen=True)
class BadLine:
    """A line skipped by a reader with ``skip_bad=True``."""

    source: str  # "file:line"
    error: str  # "FIELD: problem"

    def __str__(self) -> str:
        return f"{self.source}: {self.error}"


class Records(list, Generic[T]):  # type: ignore[type-arg]
    """What the readers return: a plain list of records, plus ``skipped``, the bad lines passed over when
    reading with ``skip_bad=True`` (always empty otherwise, since a bad line then raises)."""

    def __init__(self, items: Iterable[T] = (), skipped: Iterable[BadLine] = ()) -> None:
        super().__init__(items)
        self.skipped: list[BadLine] = list(skipped)


class _Invalid(ValueError):
    """A bad record; the message names the field, the reader prefixes FILE:LINE."""


def _type_name(value: object) -> str:
    """The JSON name of a value's type, for messages about JSON input."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "list"
    if isinstance(value, dict):
        return "object"
    return type(value).__name__


def _field(obj: Mapping[str, Any], key: str) -> Any:
    if key not in obj:
        raise _Invalid(f"{key}: missing field")
    return obj[key]


def _text(value: object, where: str) -> str:
    if not isinstance(value, str):
        raise _Invalid(f"{where}: expected a string, got {_type_name(value)}")
    if not value.strip():
        raise _Invalid(f"{where}: empty content")
    for tag in SPECIAL_TAGS:
        if tag in value:
            raise _Invalid(f"{where}: contains the chat template tag {tag!r}")
    return value


def _optional_bool(obj: Mapping[str, Any], key: str, default: bool | None) -> bool | None:
    value = obj.get(key)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise _Invalid(f"{key}: expected true or false, got {_type_name(value)}")
    return value


def _dialog(value: object, where: str, last: Literal["user", "assistant"]) -> list[dict[str, str]]:
    """Validate a dialog (optional system, then user/assistant alternating from the user, ending with `last`)."""
    if not isinstance(value, list):
        raise _Invalid(f"{where}: expected a list of messages, got {_type_name(value)}")
    if not value:
        raise _Invalid(f"{where}: empty dialog")
    start = 1 if isinstance(value[0], dict) and value[0].get("role") == "system" else 0
    messages = []
    for i, msg in enumerate(value):
        at = f"{where}[{i}]"
        if not isinstance(msg, dict):
            raise _Invalid(f"{at}: expected an object with 'role' and 'content', got {_type_name(msg)}")
        for key in ("role", "content"):
            if key not in msg:
                raise _Invalid(f"{at}.{key}: missing field")
        role = msg["role"]
        if role not in ("system", "user", "assistant"):
            shown = repr(role) if isinstance(role, str) else _type_name(role)
            raise _Invalid(f"{at}.role: unknown role {shown} (expected 'system', 'user' or 'assistant')")
        expected = "system" if i < start else ("user" if (i - start) % 2 == 0 else "assistant")
        if role != expected:
            hint = " (a system message may only come first)" if role == "system" else ""
            raise _Invalid(f"{at}.role: expected {expected!r}, got {role!r}{hint}")
        messages.append({"role": role, "content": _text(msg["content"], f"{at}.content")})
    if messages[-1]["role"] != last:
        raise _Invalid(
            f"{where}: must end with a{'n' if last == 'assistant' else ''} {last} message, "
            f"but {where}[{len(messages) - 1}] is {messages[-1]['role']!r}"
        )
    return messages


def _parse_dialog(obj: Mapping[str, Any], source: str) -> list[dict[str, str]]:
    return _dialog(_field(obj, "dialog"), "dialog", last="assistant")


def _parse_preference(obj: Mapping[str, Any], source: str) -> Preference:
    prompt = _dialog(_field(obj, "prompt"), "prompt", last="user")
    chosen = _text(_field(obj, "chosen"), "chosen")
    rejected = _text(_field(obj, "rejected"), "rejected")
    if chosen.strip() == rejected.strip():  # the chat format strips answers: these would be the same tokens
        raise _Invalid("rejected: same text as chosen (a preference needs two different responses)")
    rating = _field(obj, "rating")
    if rating not in RATINGS:
        shown = repr(rating) if isinstance(rating, str) else _type_name(rating)
        raise _Invalid(f"rating: unknown rating {shown} (expected one of {', '.join(RATINGS)})")
    kind = _field(obj, "kind")
    if kind not in KINDS:
        shown = repr(kind) if isinstance(kind, str) else _type_name(kind)
        raise _Invalid(f"kind: unknown kind {shown} (expected 'helpfulness' or 'safety')")
    return Preference(
        prompt=prompt, chosen=chosen, rejected=rejected, rating=rating, kind=kind,
        chosen_safe=_optional_bool(obj, "chosen_safe", None),
        rejected_safe=_optional_bool(obj, "rejected_safe", None),
        source=source,
    )


def _parse_prompt(obj: Mapping[str, Any], source: str) -> Prompt:
    dialog = _dialog(_field(obj, "dialog"), "dialog", last="user")
    return Prompt(dialog=dialog, safety=bool(_optional_bool(obj, "safety", False)), source=source)


def _paths(paths: PathArg) -> list[Path]:
    if isinstance(paths, (str, os.PathLike)):
        return [Path(paths)]
    out = [Path(p) for p in paths]
    if not out:
        raise ValueError("no input files given")
    return out


def _read(paths: PathArg, parse: Callable[[Mapping[str, Any], str], T], skip_bad: bool) -> Records[T]:
    """Parse every non-blank line of every file; a bad line raises ValueError("FILE:LINE: ...") or is skipped."""
    out: Records[T] = Records()
    for path in _paths(paths):
        with open(path, "rb") as f:
            for lineno, raw in enumerate(f, 1):
                source = f"{path}:{lineno}"
                try:
                    try:
                        line = raw.decode("utf-8")
                    except UnicodeDecodeError as e:
                        raise _Invalid(f"invalid UTF-8 (byte {e.start} of the line)") from None
                    if lineno == 1:
                        line = line.removeprefix("\ufeff")  # a byte-order mark
                    if not line.strip():
                        continue
                    try:
                        obj = json.loads(line)
                    except json.JSONDecodeError as e:
                        raise _Invalid(f"not valid JSON: {e.msg} (column {e.colno})") from None
                    if not isinstance(obj, dict):
                        raise _Invalid(f"expected a JSON object, got {_type_name(obj)}")
                    out.append(parse(obj, source))
                except _Invalid as e:
                    if not skip_bad:
                        raise ValueError(f"{source}: {e}") from None
                    out.skipped.append(BadLine(source, str(e)))
    return out


def read_dialogs(paths: PathArg, skip_bad: bool = False) -> Records[list[dict[str, str]]]:
    """SFT dialogs (each a list of {"role", "content"} ending with the assistant) from one JSONL file or several."""
    return _read(paths, _parse_dialog, skip_bad)


def read_preferences(paths: PathArg, skip_bad: bool = False) -> Records[Preference]:
    """Preference pairs from one JSONL file or several; see the module docstring for the format."""
    return _read(paths, _parse_preference, skip_bad)


def read_prompts(paths: PathArg, skip_bad: bool = False) -> Records[Prompt]:
    """Prompts (dialogs ending with the user, optionally tagged "safety") from one JSONL file or several."""
    return _read(paths, _parse_prompt, skip_bad)


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


def _exchanges_dropped(dialog: Sequence[Mapping[str, str]], k: int) -> list[dict[str, str]]:
    """The dialog without its first k (user, assistant) exchanges; a leading system message is kept."""
    system = [dict(dialog[0])] if dialog[0]["role"] == "system" else []
    rest = dialog[len(system):]
    return system + [dict(m) for m in rest[2 * k:]]


def _n_exchanges(dialog: Sequence[Mapping[str, str]]) -> int:
    """Finished (user, assistant) exchanges before the last user message."""
    n_users = sum(m["role"] == "user" for m in dialog)
    return n_users - 1


def _first_loss(mask: Sequence[int]) -> int:
    return next((i for i, m in enumerate(mask) if m), len(mask))


def _last_answer_start(mask: Sequence[int]) -> int:
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

    def add(self, example: SFTExample | EncodedPair | None, overflow: Overflow) -> None:
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


def _check_overflow(overflow: str, seq_len: int) -> None:
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
    _check_overflow(overflow, seq_len)
    limit = seq_len + 1
    full = encode_dialog(tokenizer, dialog)
    if full.loss_mask is None:
        raise ValueError("an SFT dialog must end with an assistant message")
    if len(full.ids) <= limit:
        return SFTExample(full.ids, full.loss_mask)
    if overflow == "skip":
        return None

    n_loss = sum(full.loss_mask)
    for k in range(1, _n_exchanges(dialog) + 1):  # step 1: drop whole earliest exchanges
        ids, mask = encode_dialog(tokenizer, _exchanges_dropped(dialog, k))
        if len(ids) <= limit or k == _n_exchanges(dialog):
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
    examples, stats = [], EncodeStats()
    for dialog in dialogs:
        ex = encode_sft_example(tokenizer, dialog, seq_len, overflow)
        stats.add(ex, overflow)
        if ex is not None:
            examples.append(ex)
    return examples, stats


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

    @property
    def tokens(self) -> torch.Tensor:
        return self.tensors()["tokens"]

    @property
    def targets(self) -> torch.Tensor:
        return self.tensors()["targets"]

    @property
    def position_ids(self) -> torch.Tensor:
        return self.tensors()["position_ids"]

    @property
    def doc_ids(self) -> torch.Tensor:
        return self.tensors()["doc_ids"]


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


# ------------------------------------------------------------------------------------------------ reward pairs


@dataclass(frozen=True)
class EncodedPair:
    """The token ids of a preference's two finished dialogs, prompt + chosen and prompt + rejected, each ending
    with the EOS that closes the answer, fitted to the window with the same prompt. Unpacks as
    ``chosen, rejected = pair``."""

    chosen: list[int]
    rejected: list[int]
    rating: str  # the preference's rating, for the margin (llama2.rlhf.margin_values)
    dropped_exchanges: int = 0
    dropped_tokens: int = 0  # prompt tokens removed (the same from both sequences)

    def __iter__(self):
        yield self.chosen
        yield self.rejected


def encode_preference(
    tokenizer: TextEncoder,
    pref: Preference,
    seq_len: int,
    overflow: Overflow = "truncate",
) -> EncodedPair | None:
    """Encode both responses of a preference as finished dialogs of at most ``seq_len`` tokens.

    The reward model reads the whole sequence and is scored at its last token (the EOS), so a sequence fits
    when it has at most seq_len tokens. Overflow is handled as for SFT (earliest prompt exchanges first, then
    the start of the last prompt; never a token of the responses), and identically for both sequences so
    that they keep the same prompt. None when too long with ``overflow="skip"``, or when a response alone
    does not fit.
    """
    _check_overflow(overflow, seq_len)
    dialogs = (pref.chosen_dialog, pref.rejected_dialog)

    def encode(k: int) -> list[tuple[list[int], int]]:
        """(ids, index of the first response token) of both dialogs without their first k exchanges."""
        out = []
        for d in dialogs:
            ids, mask = encode_dialog(tokenizer, _exchanges_dropped(d, k))
            out.append((ids, _last_answer_start(mask)))
        return out

    def fits(enc: list[tuple[list[int], int]]) -> bool:
        return all(len(ids) <= seq_len for ids, _ in enc)

    full = encode(0)
    if fits(full):
        return EncodedPair(full[0][0], full[1][0], pref.rating)
    if overflow == "skip":
        return None
    k, enc = 0, full
    while not fits(enc) and k < _n_exchanges(pref.prompt):
        k += 1
        enc = encode(k)
    cut = max(len(ids) for ids, _ in enc) - seq_len
    if cut > 0:
        if cut >= min(first for _, first in enc):  # keep at least one prompt token before each response
            return None
        enc = [(ids[cut:], first - cut) for ids, first in enc]
    (c, _), (r, _) = enc
    return EncodedPair(c, r, pref.rating, dropped_exchanges=k, dropped_tokens=len(full[0][0]) - len(c))


def encode_preferences(
    tokenizer: TextEncoder,
    prefs: Iterable[Preference],
    seq_len: int,
    overflow: Overflow = "truncate",
) -> tuple[list[EncodedPair], EncodeStats]:
    """:func:`encode_preference` over a data set: the pairs that fit and the counts to report."""
    pairs, stats = [], EncodeStats()
    for pref in prefs:
        pair = encode_preference(tokenizer, pref, seq_len, overflow)
        stats.add(pair, overflow)
        if pair is not None:
            pairs.append(pair)
    return pairs, stats


def collate_pairs(
    pairs: Sequence[EncodedPair | tuple[Sequence[int], Sequence[int]]],
    pad_id: int = 0,
    side: Literal["right", "left"] = "right",
) -> dict[str, Any]:
    """Batch B pairs as 2B rows, chosen rows first (0..B-1) then rejected (B..2B-1), so that one forward pass
    scores both: ``r = gather_last(model(tokens, mask=mask, position_ids=position_ids), last_index)``,
    ``r_chosen, r_rejected = r.chunk(2)``.

    Returns tokens (2B, T) long padded with ``pad_id`` on ``side``; attention_mask (2B, T) bool, True on real
    tokens; mask (2B, T, T) bool, causal and blind to padding keys (a padding query sees only itself, so no
    NaN); position_ids (2B, T), counting real tokens only, so left padding does not shift the rotary positions;
    last_index (2B,) the index of each row's last real token; ratings (list of B str) when the pairs carry them.
    With right padding ``mask`` may also be left out (plain causal attention gives the same scores, faster).
    """
    if side not in ("right", "left"):
        raise ValueError(f"side must be 'right' or 'left', got {side!r}")
    if not pairs:
        raise ValueError("no pairs to collate")
    unpacked = [tuple(p) for p in pairs]
    seqs = [list(c) for c, _ in unpacked] + [list(r) for _, r in unpacked]  # chosen first, then rejected
    if any(len(s) == 0 for s in seqs):
        raise ValueError("empty sequence in a pair")
    N, T = len(seqs), max(len(s) for s in seqs)
    tokens = torch.full((N, T), pad_id, dtype=torch.long)
    real = torch.zeros(N, T, dtype=torch.bool)
    for i, s in enumerate(seqs):
        cols = slice(0, len(s)) if side == "right" else slice(T - len(s), T)
        tokens[i, cols] = torch.tensor(s, dtype=torch.long)
        real[i, cols] = True
    position_ids = (real.long().cumsum(1) - 1).clamp(min=0)  # (N, T); padding gets 0 or the last position
    last_index = T - 1 - real.flip(1).long().argmax(1) if side == "right" else torch.full((N,), T - 1)
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    eye = torch.eye(T, dtype=torch.bool)
    mask = (causal & real[:, None, :] & real[:, :, None]) | eye  # (N, T, T)
    batch: dict[str, Any] = {
        "tokens": tokens, "attention_mask": real, "mask": mask, "position_ids": position_ids,
        "last_index": last_index.long(),
    }
    if all(isinstance(p, EncodedPair) for p in pairs):
        batch["ratings"] = [p.rating for p in pairs]  # type: ignore[union-attr]
    return batch


def gather_last(values: torch.Tensor, last_index: torch.Tensor) -> torch.Tensor:
    """values (B, T) per position (e.g. the scalar head's output), last_index (B,) -> (B,) value at that index.

    The reward is read at the last real token, never at padding (§3.2.2: the model "outputs a scalar score").
    """
    return values.gather(1, last_index.to(values.device).long()[:, None]).squeeze(1)


# ------------------------------------------------------------------------------------------------ mixing, holdout


def mix_preferences(
    prefs: Sequence[Preference],
    kind: str,
    other_ratio: float | None = None,
    seed: int = 0,
) -> list[Preference]:
    """The training mix of the ``kind`` reward model: all preferences of that kind plus others, sampled.

    Paper §3.2.2 ("Data Composition"): "Helpfulness reward model is eventually trained on all Meta Helpfulness
    data, combined with an equal parts of the remaining data uniformly sampled from Meta Safety and from the
    open-source datasets. Meta Safety reward model is trained on all Meta Safety and Anthropic Harmless data,
    mixed with Meta Helpfulness and open-source helpfulness data in a 90/10 proportion."

    ``other_ratio`` is the fraction of the final mix drawn from the other kind: default 0.5 for helpfulness
    (equal parts) and 0.1 for safety (90/10); 0 gives the ``kind`` data alone. With N of the kind, the mix holds
    M = round(N * r / (1 - r)) others, drawn uniformly without replacement. Our choice when fewer than M others
    exist: take all of them as many whole times as needed and draw the rest without replacement, which keeps
    the ratio and repeats no example more than once more than any other. The result is shuffled;
    deterministic given ``seed``.
    """
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    r = {"helpfulness": 0.5, "safety": 0.1}[kind] if other_ratio is None else float(other_ratio)
    if not 0 <= r < 1:
        raise ValueError(f"other_ratio must be in [0, 1), got {r}")
    own = [p for p in prefs if p.kind == kind]
    other = [p for p in prefs if p.kind != kind]
    m = round(len(own) * r / (1 - r))
    if m and not other:
        raise ValueError(f"other_ratio={r} asks for {m} non-{kind} preferences but there are none")
    rng = random.Random(seed)
    sampled: list[Preference] = []
    while m - len(sampled) >= len(other) > 0:  # fewer others than asked: whole copies first
        sampled += other
    sampled += rng.sample(other, m - len(sampled))
    mix = own + sampled
    rng.shuffle(mix)
    return mix


def split_holdout(items: Sequence[T], fraction: float, seed: int = 0) -> tuple[list[T], list[T]]:
    """(train, held): a random ``fraction`` of the items held out, deterministic given ``seed``; both keep the
    input order. round(fraction * n) items are held, but at least one when fraction > 0 and n >= 2 (a test set
    is never silently empty) and never all of them unless fraction == 1."""
    if not 0 <= fraction <= 1:
        raise ValueError(f"fraction must be in [0, 1], got {fraction}")
    n = len(items)
    n_held = round(fraction * n)
    if fraction > 0 and n >= 2:
        n_held = max(n_held, 1)
    if fraction < 1:
        n_held = min(n_held, n - 1) if n >= 1 else 0
    held_idx = set(random.Random(seed).sample(range(n), n_held))
    train = [x for i, x in enumerate(items) if i not in held_idx]
    held = [x for i, x in enumerate(items) if i in held_idx]
    return train, held
