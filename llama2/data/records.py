"""The JSONL records of the fine-tuning stages and their readers, with errors that name the file, line and field.

Three formats (one JSON object per line; blank lines are allowed; fields not named here are ignored, so
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
:func:`split_holdout` holds out a test set.
"""
from __future__ import annotations

import json
import os
import random
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generic, Literal, TypeVar

from ..chat import SPECIAL_TAGS

__all__ = [
    "KINDS", "RATINGS", "BadLine", "Records", "Preference", "Prompt", "read_objects", "read_dialogs", "read_preferences",
    "read_prompts", "read_eval_items", "split_holdout", "split_paths",
]

KINDS: tuple[str, ...] = ("helpfulness", "safety")
# The four-point scale of §3.2.1 ("significantly better, better, slightly better, or negligibly better/
# unsure"); "negligibly better" and "unsure" are kept apart in the data and merged only where the paper does.
RATINGS: tuple[str, ...] = ("significantly_better", "better", "slightly_better", "negligibly_better", "unsure")

T = TypeVar("T")
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
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:
        raise _Invalid(f"{where}: not valid Unicode (a lone surrogate at character {e.start})") from None
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


def _parse_eval_item(obj: Mapping[str, Any], source: str) -> dict:
    return {**obj, "dialog": _dialog(_field(obj, "dialog"), f"{source}: dialog", last="user")}


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
        if path.is_dir():
            raise IsADirectoryError(f"{path} is a directory; give a JSONL file (or several, comma-separated)")
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no such file")
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
                    except RecursionError:
                        raise _Invalid("JSON nested too deeply") from None
                    if not isinstance(obj, dict):
                        raise _Invalid(f"expected a JSON object, got {_type_name(obj)}")
                    out.append(parse(obj, source))
                except _Invalid as e:
                    if not skip_bad:
                        raise ValueError(f"{source}: {e}") from None
                    out.skipped.append(BadLine(source, str(e)))
    return out


def read_objects(paths: PathArg, missing_ok: bool = False) -> list[dict[str, Any]]:
    """Every JSON object of a JSONL file (metrics, samples, evaluation items), errors naming FILE:LINE; a missing
    file is [] with ``missing_ok``."""
    if missing_ok and not any(p.is_file() for p in _paths(paths)):
        return []
    return list(_read(paths, lambda obj, source: dict(obj), False))


def read_dialogs(paths: PathArg, skip_bad: bool = False) -> Records[list[dict[str, str]]]:
    """SFT dialogs (each a list of {"role", "content"} ending with the assistant) from one JSONL file or several."""
    return _read(paths, _parse_dialog, skip_bad)


def read_preferences(paths: PathArg, skip_bad: bool = False) -> Records[Preference]:
    """Preference pairs from one JSONL file or several; see the module docstring for the format."""
    return _read(paths, _parse_preference, skip_bad)


def read_prompts(paths: PathArg, skip_bad: bool = False) -> Records[Prompt]:
    """Prompts (dialogs ending with the user, optionally tagged "safety") from one JSONL file or several."""
    return _read(paths, _parse_prompt, skip_bad)



def read_eval_items(paths: PathArg, skip_bad: bool = False) -> Records[dict]:
    """Evaluation items: objects whose "dialog" ends with the user turn to answer, their other fields kept as they
    are (the toy world's eval.jsonl carries "category" and the judges' fields)."""
    return _read(paths, _parse_eval_item, skip_bad)


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


def split_paths(spec: str | Sequence[str]) -> list[str]:
    """Input files given as one path, comma-separated paths, or a list (from YAML)."""
    items = spec if isinstance(spec, (list, tuple)) else [spec]
    return [p.strip() for item in items for p in str(item).split(",") if p.strip()]
