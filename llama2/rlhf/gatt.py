"""Ghost Attention (GAtt), the data side: instructions a rule can verify, the dialogs GAtt samples and trains on,
and the turn-by-turn adherence measure (paper §3.3, "System Message for Multi-Turn Consistency").

The problem (§3.3): an instruction given at the start of a chat ("act as ...", "answer in ...") should hold for
the whole conversation, but after RLHF the model forgets it after a few turns. GAtt fixes this with data alone:

1. take a multi-turn dialog and an instruction; attach the instruction to *every* user message and let the
   latest RLHF model answer turn after turn (:func:`with_instruction_every_turn`). Reminded at every turn, the
   model follows the instruction at every turn;
2. build the training dialog from those answers with the instruction kept *only in the first turn* (as the
   system message) and removed from every later user message (:func:`gatt_training_dialog`). The answers now
   follow an instruction that, seen from the late turns, lies far back in the context: that is what the model
   must learn to attend to;
3. fine-tune on it with the loss set to 0 "for all the tokens from the previous turns, including assistant
   messages" (the SFT stage's ``loss_on=last``, :func:`llama2.data.sft.last_answer_only`): the earlier answers
   were sampled with a context the training dialog no longer shows, so only the last answer is trained on. Our
   default packs a dialog's turns instead (:func:`gatt_windows`), which trains the same (context, answer) pairs.

The paper's instructions are synthetic constraints, "Hobbies (You enjoy e.g. Tennis), Language (Speak in
e.g. French), or Public Figure (Act as e.g. Napoleon)", sometimes combined at random, and "half of the time"
shortened ("Always act as Napoleon from now" -> "Figure: Napoleon."). Our toy models speak no French and know
no Napoleon, so each family here has a stand-in whose adherence a rule can check from the answer text alone
(docs/toyworld.md): a hobby word to mention, a "language" that is a way of writing (capitals, lower case, a closing
"!"), and a persona that opens every answer with its catchphrase. Each :class:`Instruction` carries a long and
a short form and its checker; :func:`adherence_by_turn` measures, for 20 turns, how often the answer at turn t
still follows the instruction given at the start (:func:`multi_turn_probe_dialogs` builds those probes).

Everything here is pure Python and deterministic given a seeded ``random.Random``.
"""
from __future__ import annotations

import random
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

from ..chat import TextEncoder, encode_dialog

__all__ = [
    "INSTRUCTION_SEPARATOR",
    "Instruction",
    "INSTRUCTIONS",
    "instruction_families",
    "combine_instructions",
    "sample_instruction",
    "with_instruction_every_turn",
    "user_messages",
    "gatt_windows",
    "gatt_training_dialog",
    "Probe",
    "multi_turn_probe_dialogs",
    "adherence_by_turn",
]

Message = dict[str, str]
Dialog = list[Message]
Place = Literal["system", "prefix"]

# The instruction goes before the user's text, on its own line: "{instruction}\n{user}". The paper only says it
# "concatenate[s] this instruction to all the user messages"; we put it first because that is where the system
# message sits in Meta's template (B_SYS + system + E_SYS + user), so the sampled turns read like the training
# dialog's first turn.
INSTRUCTION_SEPARATOR = "\n"


# ------------------------------------------------------------------------------------------------ instructions


@dataclass(frozen=True)
class Instruction:
    """One verifiable instruction: ``long`` and ``short`` are two wordings of it (the paper shortens it half the
    time), ``check(answer)`` says whether an answer follows it. ``kind`` is its family ("hobby", "language",
    "persona", or "a+b" for a combination), ``value`` the particular constraint ("tennis", "capitals", ...)."""

    kind: str
    value: str
    long: str
    short: str
    check: Callable[[str], bool] = field(compare=False, repr=False)

    def text(self, short: bool = False) -> str:
        return self.short if short else self.long

    def __call__(self, answer: str) -> bool:
        return bool(self.check(answer))


def _mentions(word: str) -> Callable[[str], bool]:
    pattern = re.compile(rf"\b{re.escape(word)}\b", re.IGNORECASE)
    return lambda answer: pattern.search(answer) is not None


def _opens_with(word: str) -> Callable[[str], bool]:
    pattern = re.compile(rf"\s*{re.escape(word)}\b", re.IGNORECASE)  # "Arr!" and "ARR!" yes, "Arrow" no
    return lambda answer: pattern.match(answer) is not None


def _all_capitals(answer: str) -> bool:
    letters = [c for c in answer if c.isalpha()]
    return bool(letters) and not any(c.islower() for c in letters)


def _all_lower_case(answer: str) -> bool:
    letters = [c for c in answer if c.isalpha()]
    return bool(letters) and not any(c.isupper() for c in letters)


def _ends_with_bang(answer: str) -> bool:
    return answer.rstrip().endswith("!")


def _hobby(hobby: str) -> Instruction:
    return Instruction(
        "hobby", hobby, f"You love {hobby}. Mention {hobby} in every answer.", f"Hobby: {hobby}", _mentions(hobby)
    )


def _persona(who: str, catchphrase: str) -> Instruction:
    word = re.match(r"\w+", catchphrase).group(0)  # type: ignore[union-attr]
    return Instruction(
        "persona", who, f"Act as a {who}: begin every answer with '{catchphrase}'.", f"Figure: {who}",
        _opens_with(word),
    )


# Paper: "Hobbies (You enjoy e.g. Tennis), Language (Speak in e.g. French), or Public Figure (Act as e.g.
# Napoleon)". Our stand-ins, each checkable by rule; "language" is a way of writing the whole answer.
INSTRUCTIONS: tuple[Instruction, ...] = (
    _hobby("tennis"),
    _hobby("chess"),
    _hobby("gardening"),
    _hobby("painting"),
    Instruction("language", "capitals", "Answer in capital letters only.", "Style: capitals", _all_capitals),
    Instruction("language", "lowercase", "Answer in lower case only.", "Style: lowercase", _all_lower_case),
    Instruction("language", "exclaim", "End every answer with '!'.", "Style: exclaim", _ends_with_bang),
    _persona("pirate", "Arr!"),
    _persona("robot", "Beep."),
    _persona("owl", "Hoot."),
)


def instruction_families(instructions: Sequence[Instruction] = INSTRUCTIONS) -> list[str]:
    """The families of ``instructions`` in order of first appearance: ["hobby", "language", "persona"]."""
    return list(dict.fromkeys(ins.kind for ins in instructions))


def combine_instructions(parts: Sequence[Instruction]) -> Instruction:
    """One instruction asking for all of ``parts`` at once (the paper builds "the final instruction by randomly
    combining the above constraints"); it is followed when every part is. Long forms are joined by a space,
    short forms by "; ". At most one part per family, so that no two parts contradict (capitals and lower case,
    two catchphrases that both open the answer)."""
    parts = list(parts)
    if not parts:
        raise ValueError("nothing to combine")
    if len(parts) == 1:
        return parts[0]
    kinds = [p.kind for p in parts]
    if len(set(kinds)) != len(kinds):
        raise ValueError(f"at most one instruction per family can be combined, got families {kinds}")
    checks = tuple(p.check for p in parts)
    return Instruction(
        "+".join(kinds), "+".join(p.value for p in parts), " ".join(p.long for p in parts),
        "; ".join(p.short for p in parts), lambda answer: all(c(answer) for c in checks),
    )


def _as_rng(rng: random.Random | int) -> random.Random:
    return random.Random(rng) if isinstance(rng, int) else rng


def sample_instruction(
    rng: random.Random | int,
    short_prob: float = 0.5,
    max_constraints: int = 1,
    instructions: Sequence[Instruction] = INSTRUCTIONS,
) -> tuple[Instruction, str]:
    """Draw an instruction and its wording: (instruction, text), the short form with probability ``short_prob``.

    A family is drawn uniformly, then a value within it, so that every family is equally likely whatever its
    size. With ``max_constraints`` > 1, k ~ uniform{1..max_constraints} distinct families are drawn and their
    instructions combined (:func:`combine_instructions`). Deterministic given the rng (or an int seed).
    """
    rng = _as_rng(rng)
    families = instruction_families(instructions)
    k = rng.randint(1, min(max_constraints, len(families)))
    chosen = rng.sample(families, k)
    parts = [rng.choice([ins for ins in instructions if ins.kind == fam]) for fam in chosen]
    instruction = combine_instructions(parts)
    return instruction, instruction.text(short=rng.random() < short_prob)


# ------------------------------------------------------------------------------------------------ dialogs


def _copy(dialog: Sequence[Mapping[str, str]]) -> Dialog:
    return [{"role": m["role"], "content": m["content"]} for m in dialog]


def _with_prefix(text: str, user: str) -> str:
    return f"{text}{INSTRUCTION_SEPARATOR}{user}"


def with_instruction_every_turn(dialog: Sequence[Mapping[str, str]], text: str) -> Dialog:
    """The sampling-time dialog: ``text`` put before every user message as "{text}\\n{user}" (see
    :data:`INSTRUCTION_SEPARATOR`); system and assistant messages are unchanged. A new list; ``dialog`` is not
    modified. Sample each answer with the dialog up to that user turn, append it, go on."""
    out = _copy(dialog)
    for m in out:
        if m["role"] == "user":
            m["content"] = _with_prefix(text, m["content"])
    return out


def user_messages(dialogs: Sequence[Sequence[Mapping[str, str]]]) -> list[str]:
    """Every user message of the dialogs, in order: the pool GAtt's sampled dialogs and the adherence probes draw
    their later turns from."""
    return [m["content"] for d in dialogs for m in d if m["role"] == "user"]


def gatt_training_dialog(
    sampled_dialog: Sequence[Mapping[str, str]], text: str, place: Place = "system", keep: str | None = None
) -> Dialog:
    """The training-time dialog: the instruction ``text`` only in the first turn, the answers unchanged.

    ``sampled_dialog`` is a dialog answered with the instruction in every user turn (as
    :func:`with_instruction_every_turn` makes it); the instruction is removed from every user message that
    starts with it, and a plain dialog is accepted as well. Then, with ``place="system"`` (the default, how a
    user gives such an instruction at inference), ``text`` becomes the system message; an existing system
    message is kept and ``text`` is added after it on a new line (the format has room for only one). With
    ``place="prefix"`` it is put before the first user message as at sampling time. ``keep``: the wording kept in
    the first turn when it differs from the one sampled with (the paper samples with the instruction in full and
    shortens it, half the time, only in the training data).
    """
    if place not in ("system", "prefix"):
        raise ValueError(f"place must be 'system' or 'prefix', got {place!r}")
    out = _copy(sampled_dialog)
    head = _with_prefix(text, "")
    for m in out:
        if m["role"] == "user" and m["content"].startswith(head):
            m["content"] = m["content"][len(head):]
    users = [m for m in out if m["role"] == "user"]
    if not users:
        raise ValueError("the dialog has no user message")
    text = text if keep is None else keep
    if place == "prefix":
        users[0]["content"] = _with_prefix(text, users[0]["content"])
    elif out[0]["role"] == "system":
        out[0]["content"] = f"{out[0]['content']}\n{text}"
    else:
        out.insert(0, {"role": "system", "content": text})
    return out


def gatt_windows(
    tokenizer: TextEncoder,
    sampled_dialog: Sequence[Mapping[str, str]],
    text: str,
    seq_len: int,
    place: Place = "system",
    keep: str | None = None,
) -> list[Dialog]:
    """A sampled dialog as few training dialogs as fit a window of ``seq_len`` positions, each trained on every
    answer it holds (SFT with ``loss_on="all"``).

    The dialog is cut between exchanges into runs of consecutive turns, each the longest that fits, and each run
    becomes a training dialog of its own with the instruction in its first turn (:func:`gatt_training_dialog`).
    Under causal attention an answer's loss in a run sees exactly the context of the per-turn example that ends
    with it (the dialog cut after that answer, trained on it alone), so a dialog that fits one window trains the same pairs of
    (context, answer) as its per-turn examples, in O(turns) tokens instead of O(turns^2); a turn past the first
    window sees the instruction and the turns of its own window. A single exchange longer than the window is kept
    alone (the fine-tuning truncates it as it does any SFT dialog)."""
    src = _copy(sampled_dialog)
    head = [m for m in src[:1] if m["role"] == "system"]
    rest = src[len(head):]
    if not rest or rest[-1]["role"] != "assistant":
        raise ValueError("a GAtt training dialog must end with an assistant message")
    exchanges, cur = [], []  # each: the user message(s) and the answer closing them
    for m in rest:
        cur.append(m)
        if m["role"] == "assistant":
            exchanges.append(cur)
            cur = []

    def window(a: int, b: int) -> Dialog:
        return gatt_training_dialog(head + [m for ex in exchanges[a:b] for m in ex], text, place, keep=keep)

    out, start = [], 0
    while start < len(exchanges):
        end = start + 1
        while end < len(exchanges) and len(encode_dialog(tokenizer, window(start, end + 1)).ids) <= seq_len + 1:
            end += 1
        out.append(window(start, end))
        start = end
    return out


# ------------------------------------------------------------------------------------------------ evaluation


@dataclass(frozen=True)
class Probe:
    """A multi-turn evaluation: the instruction given once at the start (``text``, the system message or the
    first user message's prefix, per ``place``), then ``user_messages`` played one by one."""

    instruction: Instruction
    text: str
    user_messages: tuple[str, ...]
    place: Place = "system"

    def prompt(self, answers: Sequence[str]) -> Dialog:
        """The dialog to answer at turn len(answers) + 1: the instruction, earlier turns with their answers,
        and the next user message (the dialog ends with the user)."""
        t = len(answers)
        if t >= len(self.user_messages):
            raise ValueError(f"the probe has {len(self.user_messages)} turns; {t} are already answered")
        dialog: Dialog = []
        for user, answer in zip(self.user_messages, answers):
            dialog += [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]
        dialog.append({"role": "user", "content": self.user_messages[t]})
        return gatt_training_dialog(dialog, self.text, self.place)


def multi_turn_probe_dialogs(
    rng: random.Random | int,
    n: int,
    turns: int,
    user_messages: Sequence[str],
    short_prob: float = 0.5,
    place: Place = "system",
    instructions: Sequence[Instruction] = INSTRUCTIONS,
) -> list[Probe]:
    """``n`` probes of ``turns`` user messages each, drawn from ``user_messages`` (distinct within a probe when
    the pool is large enough, else with replacement), each with an instruction from :func:`sample_instruction`.

    Play one: ``answers = []``; for each turn ``answers.append(generate(probe.prompt(answers)))``; then
    ``adherence_by_turn([answers, ...], [probe.instruction, ...])``. The instruction appears only at the start,
    so the same probes measure a model with and without GAtt.
    """
    rng = _as_rng(rng)
    if not user_messages:
        raise ValueError("no user messages to draw from")
    probes = []
    for _ in range(n):
        instruction, text = sample_instruction(rng, short_prob, instructions=instructions)
        pool = list(user_messages)
        msgs = rng.sample(pool, turns) if len(pool) >= turns else rng.choices(pool, k=turns)
        probes.append(Probe(instruction, text, tuple(msgs), place))
    return probes


def adherence_by_turn(
    answers_per_dialog: Sequence[Sequence[str]],
    instructions: Sequence[Instruction],
    max_turns: int = 20,
) -> list[float | None]:
    """Entry t - 1 is the fraction of dialogs whose turn-t answer follows their instruction, t = 1..max_turns.

    A dialog with fewer than t answers does not count at turn t; the entry is None when no dialog reaches t
    (the paper measures adherence "up to 20 turns", §3.3).
    """
    if len(answers_per_dialog) != len(instructions):
        raise ValueError(f"{len(answers_per_dialog)} dialogs but {len(instructions)} instructions")
    out: list[float | None] = []
    for t in range(max_turns):
        hits = [ins(answers[t]) for answers, ins in zip(answers_per_dialog, instructions) if len(answers) > t]
        out.append(sum(hits) / len(hits) if hits else None)
    return out
