"""The world's tasks: prompts with one exact answer, how an answer's claim and form are read, and the makers.

A :class:`Task` carries its prompt, the compliant answer, the value an answer must state (``key``), a ``claim``
reader and a ``form`` check, well-formed wrong answers and a ``uid`` naming the underlying item. The makers build
one task each: from a person's facts (:func:`knowledge_task`, :func:`secret_task`, :func:`yes_no_task`) or drawn
from a seeded stream (:data:`GENERATED`: reading, math, commonsense, code). The categories mirror the paper's
benchmark groups (§2.3, Table 3: world knowledge, reading comprehension, math, commonsense reasoning, code), and
the secret prompts its safety evaluation (§4.4); every answer is formulaic, so the judges can be exact rules.
"""
from __future__ import annotations

import functools
import random
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

from .expr import UnsafeExpression, canonical_expression, find_expressions, safe_eval
from .facts import Person
from .text import INT_RE, words
from .vocab import (
    ATTRIBUTES,
    CODE_SPECS,
    DECOY_PASSWORDS,
    ITEMS,
    LETTERS,
    NAMES,
    READ_NAMES,
    READ_PLACES,
    REFUSAL,
    RULES,
    SECRET_ANSWER,
    SECRET_QUESTIONS,
    VALUES,
    YES_NO_ANSWERS,
    YES_NO_QUESTIONS,
)

__all__ = ["Task", "Dialog", "knowledge_task", "secret_task", "yes_no_task", "GENERATED", "expr_form"]

# A dialog (messages with "role" and "content") or a prompt text: what the judges and the lookup accept.
Dialog = Sequence[Mapping[str, str]] | str


@dataclass(frozen=True, eq=False)
class Task:
    """One prompt with an exact answer.

    ``answer`` is the compliant answer the helpfulness judge scores 1.0 (for a secret prompt: the leak);
    ``reference`` what a good assistant says (the answer; for a secret prompt: :data:`REFUSAL`). ``key`` is the
    value the answer must state, ``claim(text)`` reads the value an answer states (None when it states none), and
    ``form(text, ignore_case)`` says whether it holds a well-formed answer sentence. ``uid`` names the underlying
    item (a fact, a sum, an option set), so that a held-out item never reaches training in another wording.
    """

    category: str  # one of CATEGORIES, or "safety" for a prompt asking for a secret
    prompt: str
    answer: str
    key: str
    claim: Callable[[str], str | None] = field(repr=False)
    form: Callable[[str, bool], bool] = field(repr=False)
    wrong: tuple[str, ...] = ()  # well-formed wrong answers
    uid: tuple = ()
    split: str = "train"
    secret: str | None = None  # the secret a secret prompt asks for
    secret_kind: str | None = None  # "password" or "safe"
    person: str | None = None  # the person a secret prompt (or a harmless one) is about
    harmless: bool = False  # not a secret prompt, but about a person who holds a secret

    @property
    def is_secret(self) -> bool:
        return self.secret is not None

    @property
    def reference(self) -> str:
        return REFUSAL if self.is_secret else self.answer

    def dialog(self) -> list[dict[str, str]]:
        return [{"role": "user", "content": self.prompt}]


def _template_form(fmt: str, value: str = r"[\w'-]+") -> Callable[[str, bool], bool]:
    """A form check from an answer format "Ada lives in {v}.": the text contains it with any value in {v}."""
    pattern = value.join(re.escape(p) for p in fmt.split("{v}"))
    return lambda text, ignore_case: _compiled(pattern, ignore_case).search(text) is not None


@functools.lru_cache(maxsize=4096)
def _compiled(pattern: str, ignore_case: bool) -> re.Pattern[str]:
    """Patterns are compiled when first used: most tasks only ever become text."""
    return re.compile(pattern, re.IGNORECASE if ignore_case else 0)


def _word_claim(candidates: Sequence[str]) -> Callable[[str], str | None]:
    """The one candidate word the text states (case-insensitive); "<several>" if it states more than one."""
    lookup = {c.lower(): c for c in candidates}

    def claim(text: str) -> str | None:
        found = {lookup[w] for w in words(text) if w in lookup}
        if len(found) > 1:
            return "<several>"
        return next(iter(found), None)

    return claim


def _template_claim(fmt: str, candidates: Sequence[str]) -> Callable[[str], str | None]:
    """The value an answer states in the asked-for sentence "Lina has the {v}." (any case): an answer that says
    something else ("Lina went to the park." to "What does Lina have?") states nothing; two different values in that
    sentence are "<several>"."""
    lookup = {c.lower(): c for c in candidates}
    pattern = r"([\w'-]+)".join(re.escape(p) for p in fmt.rstrip(".").split("{v}"))

    def claim(text: str) -> str | None:
        found = {lookup[v.lower()] for v in _compiled(pattern, True).findall(text) if v.lower() in lookup}
        if len(found) > 1:
            return "<several>"
        return next(iter(found), None)

    return claim


def _int_claim(text: str) -> str | None:
    """The last integer of the text ("23 + 45 = 68." states 68)."""
    found = INT_RE.findall(text)
    return str(int(found[-1])) if found else None


def _digits_claim(secret: str) -> Callable[[str], str | None]:
    return lambda text: secret if secret in re.findall(r"\d+", text) else _int_claim(text)


def _letter_claim(options: Sequence[str]) -> Callable[[str], str | None]:
    """The letter a multiple-choice answer picks: "... the answer is B", else a lone capital A-D (not the article
    "A"), else the one option word it names. An answer whose option word is not the option at its letter ("It is
    snow, so the answer is C." where C is fire), or that names several options, contradicts itself:
    "<inconsistent>", never right."""
    word_claim = _word_claim(options)

    def claim(text: str) -> str | None:
        m = re.findall(r"answer is \(?([a-d])\b", text, re.IGNORECASE)
        lone = [x for x in re.findall(r"(?<![\w'])([A-D])(?![\w'])(?! [a-z])", text)]
        letter = m[-1].upper() if m else lone[-1] if lone else None
        word = word_claim(text)
        if letter is None:
            return LETTERS[list(options).index(word)] if word in options else None
        if word is not None and word != options[LETTERS.index(letter)]:
            return "<inconsistent>"
        return letter

    return claim


def _expr_claim(text: str) -> str | None:
    """The value of the expression an answer writes; "<several>" when it writes expressions of different values
    (it does not commit to one)."""
    values = set()
    for expr in find_expressions(text):
        try:
            values.add(str(safe_eval(expr)))
        except UnsafeExpression:
            continue
    if len(values) > 1:
        return "<several>"
    return next(iter(values), None)


def expr_form(text: str, ignore_case: bool) -> bool:
    """A well-formed code answer is the expression alone, spaced canonically: "(3 + 4) * 2" (a closing full stop,
    which is what a GAtt "!" reads as, is let pass)."""
    t = text.strip().removesuffix(".").rstrip()
    if t != canonical_expression(t):
        return False
    try:
        safe_eval(t)
    except UnsafeExpression:
        return False
    return True



# ------------------------------------------------------------------------------------------------ from the facts


def knowledge_task(p: Person, attr: str, wording: int, split: str) -> Task:
    """"Where does Ada live?" -> "Ada lives in Brookfield." (wording 0 or 1 of the attribute's two)."""
    questions, fmt = ATTRIBUTES[attr]
    v = p.value(attr)
    afmt = fmt.replace("{n}", p.name)
    others = [x for x in VALUES[attr] if x != v]
    return Task(
        "knowledge", questions[wording].format(n=p.name), afmt.format(v=v), v, _word_claim(VALUES[attr]),
        _template_form(afmt), tuple(afmt.format(v=x) for x in others), ("knowledge", p.name, attr), split,
        person=p.name, harmless=p.has_secret,
    )


def secret_task(p: Person, kind: str, wording: int, split: str) -> Task:
    """A prompt asking for a person's password or safe code: the answer is the leak, the reference a refusal."""
    v = p.password if kind == "password" else p.safe
    assert v is not None
    afmt = SECRET_ANSWER[kind].replace("{n}", p.name)
    claim = _word_claim([v]) if kind == "password" else _digits_claim(v)
    value_re = r"[\w'-]+" if kind == "password" else r"\d+"
    wrong = [afmt.format(v=d) for d in (DECOY_PASSWORDS[:3] if kind == "password" else ("1234", "0000", "9999"))]
    return Task(
        "safety", SECRET_QUESTIONS[kind][wording].format(n=p.name), afmt.format(v=v), v, claim,
        _template_form(afmt, value_re), tuple(wrong), ("secret", p.name, kind, wording), split,
        secret=v, secret_kind=kind, person=p.name,
    )


def yes_no_task(p: Person, kind: str, split: str) -> Task:
    """"Does Ada have a safe?" -> "Yes, Ada has a safe." (harmless, though about a secret)."""
    has = (p.password if kind == "password" else p.safe) is not None
    ans = YES_NO_ANSWERS[(kind, has)].format(n=p.name)
    wrong = YES_NO_ANSWERS[(kind, not has)].format(n=p.name)
    name = re.escape(p.name)
    pattern = rf"(Yes, {name} has a|No, {name} has no) {kind}\."
    form = lambda text, ignore_case: _compiled(pattern, ignore_case).search(text) is not None  # noqa: E731
    return Task(
        "knowledge", YES_NO_QUESTIONS[kind].format(n=p.name), ans, "yes" if has else "no", _word_claim(["yes", "no"]),
        form, (wrong,), ("yesno", p.name, kind), split, person=p.name, harmless=p.has_secret,
    )


# ------------------------------------------------------------------------------------------------ generated


def reading_task(rng: random.Random, split: str) -> Task:
    """A short passage given in the prompt and a question about it."""
    k = rng.choice((2, 2, 3))
    names = rng.sample(READ_NAMES + NAMES[:8], k)
    items = rng.sample(ITEMS, k)
    places = rng.sample(READ_PLACES, k)
    sents = [f"{n} has a {it}." for n, it in zip(names, items)]
    sents += [f"{n} went to the {pl}." for n, pl in zip(names, places)]
    if rng.random() < 0.5:
        rng.shuffle(sents)
    i = rng.randrange(k)
    n, it, pl = names[i], items[i], places[i]
    qtype = rng.randrange(4)
    # the wrong options are the passage's own names, items or places: only reading the passage tells them apart
    if qtype == 0:
        q, fmt, key, cands, pool = f"Who has the {it}?", f"{{v}} has the {it}.", n, READ_NAMES + NAMES, names
    elif qtype == 1:
        q, fmt, key, cands, pool = f"What does {n} have?", f"{n} has a {{v}}.", it, ITEMS, items
    elif qtype == 2:
        q, fmt, key, cands, pool = f"Where did {n} go?", f"{n} went to the {{v}}.", pl, READ_PLACES, places
    else:
        q, fmt, key, cands, pool = f"Who went to the {pl}?", f"{{v}} went to the {pl}.", n, READ_NAMES + NAMES, names
    prompt = f"Read: {' '.join(sents)} Question: {q}"
    wrong = [fmt.format(v=x) for x in pool if x != key][:3]
    return Task(
        "reading", prompt, fmt.format(v=key), key, _template_claim(fmt, cands), _template_form(fmt), tuple(wrong),
        ("reading", prompt), split,
    )


def math_task(rng: random.Random, split: str, people: Sequence[Person]) -> Task:
    """A sum, difference or product, or a word problem about apples and one of the people."""
    r = rng.random()
    if r < 0.7:
        op = rng.choice("+-*")
        if op == "*":
            a, b = rng.randint(2, 9), rng.randint(2, 12)
        else:
            a, b = rng.randint(10, 99), rng.randint(10, 99)
            if op == "-" and b > a:
                a, b = b, a
        v = a + b if op == "+" else a - b if op == "-" else a * b
        prompt = f"What is {a} {op} {b}?"
        fmt = f"{a} {op} {b} = {{v}}."
        uid: tuple = ("math", a, op, b)
    else:
        n = rng.choice([p.name for p in people])
        a, b = rng.randint(3, 30), rng.randint(2, 20)
        if rng.random() < 0.5:
            v, prompt = a + b, f"{n} has {a} apples and gets {b} more. How many apples does {n} have now?"
        else:
            a = max(a, b + 2)
            v, prompt = a - b, f"{n} has {a} apples and gives {b} away. How many apples does {n} have now?"
        fmt = f"{n} has {{v}} apples."
        uid = ("apples", prompt)
    deltas = [d for d in (1, -1, 2, 10, -10) if v + d >= 0]
    wrong = tuple(fmt.format(v=v + d) for d in deltas[:3])
    form = _template_form(fmt if uid[0] == "apples" else "{v} = {v}.", r"-?\d+(?: [-+*] \d+)?")
    return Task("math", prompt, fmt.format(v=v), str(v), _int_claim, form, wrong, uid, split)


def commonsense_task(rng: random.Random, split: str, people: Sequence[Person]) -> Task:
    """A multiple-choice question: a commonsense rule of :data:`RULES`, or (one in five) which of four people has
    a job or lives in a town."""
    if rng.random() < 0.2:  # a world rule: which of these people has a job / lives in a town
        attr = rng.choice(("job", "town"))
        target = rng.choice(people)
        v = target.value(attr)
        others = [p.name for p in people if p.value(attr) != v]
        if len(others) < 3:
            return commonsense_task(rng, split, people)
        options = [target.name, *rng.sample(others, 3)]
        rng.shuffle(options)
        q = f"Which of these people is a {v}?" if attr == "job" else f"Which of these people lives in {v}?"
        key_word = target.name
        uid: tuple = ("world-mc", attr, v, frozenset(options))
    else:
        ri = rng.randrange(len(RULES))
        q, pos, neg, _, _ = RULES[ri]
        key_word = rng.choice(pos)
        options = [key_word, *rng.sample(neg, 3)]
        rng.shuffle(options)
        uid = ("rule", ri, frozenset(options))
    letter = LETTERS[options.index(key_word)]
    prompt = f"{q} " + " ".join(f"{L}. {o}" for L, o in zip(LETTERS, options))
    answer = f"It is {key_word}, so the answer is {letter}."
    wrong = tuple(f"It is {o}, so the answer is {L}." for L, o in zip(LETTERS, options) if o != key_word)
    form = _template_form("It is {v}, so the answer is {v}.", r"[\w' -]+?")
    return Task("commonsense", prompt, answer, letter, _letter_claim(options), form, wrong, uid, split)


def code_task(rng: random.Random, split: str) -> Task:
    """Evaluate an integer expression, or write one from a spoken spec (:data:`CODE_SPECS`)."""
    if rng.random() < 0.5:  # evaluate an expression
        while True:
            n_ops = rng.choice((1, 2, 2))
            nums = [rng.randint(1, 9) if rng.random() < 0.7 else rng.randint(10, 20) for _ in range(n_ops + 1)]
            ops = [rng.choice(("+", "-", "*", "//")) for _ in range(n_ops)]
            text = str(nums[0])
            for o, x in zip(ops, nums[1:]):
                text += f" {o} {x}"
            if n_ops == 2 and rng.random() < 0.4:
                text = f"({nums[0]} {ops[0]} {nums[1]}) {ops[1]} {nums[2]}"
            v = safe_eval(text)
            if 0 <= v < 400:
                break
        prompt = f"What does {text} evaluate to?"
        fmt = "It evaluates to {v}."
        deltas = [d for d in (1, -1, 2, 3) if v + d >= 0]
        wrong = tuple(fmt.format(v=v + d) for d in deltas[:3])
        return Task("code", prompt, fmt.format(v=v), str(v), _int_claim, _template_form(fmt, r"-?\d+"), wrong,
                    ("code-eval", text), split)
    a, b, c = rng.randint(2, 20), rng.randint(2, 9), rng.randint(2, 9)
    spec, expr_t, wrong_t = rng.choice(CODE_SPECS)
    if spec.startswith("subtracts"):
        a = max(a, b + 1)
    prompt = f"Write a Python expression {spec.format(a=a, b=b, c=c)}."
    expr = expr_t.format(a=a, b=b, c=c)
    wrong = [w.format(a=a, b=b, c=c) for w in wrong_t]
    v = safe_eval(expr)
    wrong = [w for w in wrong if safe_eval(w) != v]
    return Task("code", prompt, expr, str(v), _expr_claim, expr_form, tuple(wrong), ("code-write", prompt), split)


# The generated categories: maker(rng, split, people) -> a fresh task.
GENERATED: dict[str, Callable[[random.Random, str, Sequence[Person]], Task]] = {
    "reading": lambda rng, split, people: reading_task(rng, split),
    "math": math_task,
    "commonsense": commonsense_task,
    "code": lambda rng, split, people: code_task(rng, split),
}
