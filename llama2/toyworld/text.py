"""Rules on answer text that hold in any toy world: words, refusals, and the decorations GAtt instructions add.

:func:`apply_instruction` writes an answer the way a GAtt instruction asks (the paper's §3.3 "System Message for
Multi-Turn Consistency", with the rule-checkable stand-ins of :mod:`llama2.rlhf.gatt`), and
:func:`strip_decorations` takes those decorations off again, so that the judges score what an answer says, not
how it is dressed. :func:`is_refusal` tells a declining answer, whatever its wording or case.
"""
from __future__ import annotations

import random
import re

from ..rlhf.gatt import INSTRUCTIONS, Instruction
from .vocab import FILLER_AFTER, FILLER_BEFORE

__all__ = ["is_refusal", "strip_decorations", "apply_instruction", "pad"]

REFUSAL_RE = re.compile(
    r"\b(i'm sorry|i am sorry|sorry|i can't|i cannot|i can not|i won't|i will not|i'm not able|i am not able|"
    r"i'm unable|i am unable|not allowed to|none of your business|go away)\b"
)
RUDE_RE = re.compile(r"\b(none of your business|go away|stop asking)\b")
POLITE_RE = re.compile(r"\b(sorry|apologi[sz]e)\b")
_CATCHPHRASES = tuple(
    m.group(1) for ins in INSTRUCTIONS if ins.kind == "persona" and (m := re.search(r"with '([^']+)'", ins.long))
)
_HOBBIES = tuple(ins.value for ins in INSTRUCTIONS if ins.kind == "hobby")
_LEAD_RE = re.compile(r"^\s*(?:" + "|".join(re.escape(c) for c in _CATCHPHRASES) + r")\s*", re.IGNORECASE)
_HOBBY_TAIL_RE = re.compile(r"\s*\bI love (?:" + "|".join(_HOBBIES) + r")\s*[.!]?\s*$", re.IGNORECASE)
_CATCH_INITIALS = {c[0].lower() for c in _CATCHPHRASES}

WORD_RE, INT_RE, DIGITS_RE = re.compile(r"[a-z]+"), re.compile(r"-?\d+"), re.compile(r"\d+")


def words(text: str) -> list[str]:
    """The lower-case words of a text (letters only)."""
    return WORD_RE.findall(text.lower())


def n_words(text: str) -> int:
    return len(text.split())


def norm_quotes(text: str) -> str:
    return text.replace("\u2019", "'").replace("\u2018", "'")


def is_refusal(answer: str) -> bool:
    """Whether an answer declines ("I'm sorry", "I can't", "I won't", "go away", ...), in any case, after GAtt
    decorations are removed. None of the world's proper answers contains such a phrase."""
    return REFUSAL_RE.search(norm_quotes(strip_decorations(answer)).lower()) is not None


def strip_decorations(answer: str) -> str:
    """The answer without what GAtt instructions add: a leading catchphrase ("Arr!", "Beep.", "Hoot."), a closing
    "I love <hobby>." and a final "!" (read as "."); whitespace collapsed. Case is left alone."""
    text = " ".join(answer.split())
    while text[:1].lower() in _CATCH_INITIALS:
        stripped = _LEAD_RE.sub("", text, count=1)
        if stripped == text:
            break
        text = stripped
    if "love" in text.lower():
        text = _HOBBY_TAIL_RE.sub("", text).strip()
    if text.endswith("!"):
        text = text[:-1].rstrip() + "."
    return text


def apply_instruction(instruction: Instruction, answer: str) -> str:
    """``answer`` rewritten to follow a GAtt instruction (§3.3; one of llama2.rlhf.gatt.INSTRUCTIONS, or a
    combination): a persona's catchphrase first, a hobby's "I love <hobby>." last, then the writing style
    (capitals, lower case, a closing "!"). ``instruction(apply_instruction(instruction, a))`` is always True."""
    kinds, values = instruction.kind.split("+"), instruction.value.split("+")
    parts = dict(zip(kinds, values))
    out = answer.strip()
    if "persona" in parts:
        ins = next(i for i in INSTRUCTIONS if i.kind == "persona" and i.value == parts["persona"])
        phrase = re.search(r"with '([^']+)'", ins.long).group(1)  # type: ignore[union-attr]
        out = f"{phrase} {out}"
    if "hobby" in parts:
        out = f"{out} I love {parts['hobby']}."
    style = parts.get("language")
    if style == "capitals":
        out = out.upper()
    elif style == "lowercase":
        out = out.lower()
    elif style == "exclaim":
        out = out[:-1] + "!" if out.endswith(".") else out + "!"
    return out


def pad(rng: random.Random, answer: str, extra: int) -> str:
    """``answer`` with about ``extra`` words of filler before and/or after it."""
    before, after = [], []
    n = 0
    while n < extra:
        phrase = rng.choice(FILLER_BEFORE + FILLER_AFTER)
        (before if phrase in FILLER_BEFORE else after).append(phrase)
        n += n_words(phrase)
    return " ".join([*before, answer, *after])
