"""The world's annotators: preference pairs rated from the judges' score gap, as the paper's human preference
data (§3.2.1): two answers to one prompt, the better one chosen, rated significantly better, better, slightly
better or negligibly better / unsure, in a helpfulness and a safety set, each answer labelled safe or not.

For the preference files, each task gets a set of answer variants (the reference padded with filler or malformed,
wrong answers, refusals, leaks) and one pair of them is picked for a rating drawn from :data:`TARGET_RATINGS`, so
that every rating bucket is populated. :func:`annotate` labels two model samples the same way (§3.2.1: new
preference batches collected on the latest model).
"""
from __future__ import annotations

import itertools
import random
from collections.abc import Mapping, Sequence

from .dialogs import context
from .facts import Facts
from .judges import helpfulness_score, ignores_case, safety_score
from .pools import TaskPools
from .tasks import Task, expr_form
from .text import pad, strip_decorations
from .vocab import (
    ATTRIBUTES, CATEGORIES, NO_IDEA, OTHER_REFUSALS_POLITE, PARTIAL_LEAK, RATING_THRESHOLDS, REFUSAL, REFUSALS_CURT,
    REFUSALS_RUDE, SECRET_ANSWER,
)

__all__ = ["rating_for_gap", "annotate", "preference_pair", "preference_records", "TARGET_RATINGS"]

# The share of each rating the preference files aim at (a task without a pair of that rating gives the nearest).
TARGET_RATINGS = (("significantly_better", 0.3), ("better", 0.25), ("slightly_better", 0.2),
                  ("negligibly_better", 0.15), ("unsure", 0.1))

Scores = tuple[float, float]  # (helpfulness, safety)


def rating_for_gap(gap: float) -> str:
    """The paper's rating (§3.2.1) for a judges' score gap (chosen - rejected > 0): see
    :data:`RATING_THRESHOLDS`."""
    if gap <= 0:
        raise ValueError(f"a preference needs a positive score gap, got {gap}")
    for name, threshold in RATING_THRESHOLDS:
        if gap >= threshold - 1e-9:
            return name
    return "unsure"


def score_gap(task: Task, kind: str, a: Scores, b: Scores) -> float:
    """How much better answer a is than b, from their (helpfulness, safety) judge scores: helpfulness pairs
    by helpfulness; safety pairs by safety first, then (on a harmless prompt) by helpfulness."""
    (ha, sa), (hb, sb) = a, b
    if kind == "helpfulness":
        return ha - hb
    if abs(sa - sb) > 1e-9:
        return sa - sb
    return 0.0 if task.is_secret else ha - hb  # equally safe: a tie on a secret prompt


def annotate(facts: Facts, task: Task, dialog: Sequence[Mapping[str, str]], a: str, b: str,
             safety: bool | None = None) -> dict | None:
    """The annotators of §3.2.1 on two model samples for one prompt: the judges score both, the better one
    is chosen and the score gap gives the rating (:func:`rating_for_gap`); None on a tie. ``safety`` says
    which set the pair joins (default: whether the prompt asks for a secret). The record has the
    preferences file's fields, so ``llama2 reward`` reads it like any other."""
    kind = "safety" if (task.is_secret if safety is None else safety) else "helpfulness"
    ignore_case = ignores_case(dialog)
    score = {x: (helpfulness_score(task, x, ignore_case), safety_score(facts, task, x)) for x in (a, b)}
    gap = score_gap(task, kind, score[a], score[b])
    if abs(gap) <= 1e-9:
        return None
    chosen, rejected = (a, b) if gap > 0 else (b, a)
    return {"prompt": [dict(m) for m in dialog], "chosen": chosen, "rejected": rejected,
            "rating": rating_for_gap(abs(gap)), "kind": kind, "chosen_safe": score[chosen][1] >= 0.5,
            "rejected_safe": score[rejected][1] >= 0.5, "category": task.category, "origin": "model samples"}


# ------------------------------------------------------------------------------------------------ answer variants


def malformed(rng: random.Random, answer: str, task: Task) -> str:
    """The right value, but no well-formed sentence: the full stop dropped, a word dropped, or (code) the
    expression unspaced or in backticks."""
    if task.category == "code" and task.form is expr_form:
        return rng.choice([answer.replace(" ", ""), f"`{answer}`"])
    words = answer.split()
    choice = rng.randrange(3)
    if choice == 0 or len(words) < 3:
        return answer[:-1] if answer.endswith(".") else answer.lower()
    if choice == 1:  # drop a function word the template needs
        i = rng.randrange(1, len(words) - 1)
        return " ".join(words[:i] + words[i + 1:])
    return answer[0].lower() + answer[1:].rstrip(".")


def helpfulness_candidates(rng: random.Random, pools: TaskPools, task: Task) -> list[str]:
    """Answers of every helpfulness grade: the reference, padded, malformed, wrong, refusals, another task's
    answer, no idea (duplicates and empty ones dropped)."""
    ref = task.answer
    wrong = list(task.wrong) or [rng.choice(NO_IDEA)]
    w1, w2 = rng.choice(wrong), rng.choice(wrong)
    other = pools.draw(rng.choice(CATEGORIES)).answer
    cands = [
        ref,
        pad(rng, ref, 1), pad(rng, ref, rng.randint(2, 4)), pad(rng, ref, rng.randint(5, 8)),
        pad(rng, ref, rng.randint(10, 14)),
        malformed(rng, ref, task), pad(rng, malformed(rng, ref, task), rng.randint(3, 10)),
        w1, pad(rng, w2, rng.randint(2, 12)), malformed(rng, w2, task),
        REFUSAL, rng.choice(REFUSALS_CURT), other, rng.choice(NO_IDEA),
    ]
    return list(dict.fromkeys(c for c in cands if c.strip()))


def safety_candidates(rng: random.Random, facts: Facts, task: Task) -> list[str]:
    """Answers of every safety grade: on a secret prompt refusals (polite, curt, rude), evasions, a partial and a
    full leak; on a harmless one the answer, refusals, a wrong answer and, about a secret holder, leaks."""
    p = facts.by_name[task.person] if task.person else None
    if task.is_secret:
        s = task.secret or ""
        part = s[:2] if task.secret_kind == "safe" else s[:3]
        partial = PARTIAL_LEAK[task.secret_kind or "password"].format(n=task.person, p=part)
        evasive = [rng.choice(task.wrong)]
        if p is not None:
            evasive.append(ATTRIBUTES["town"][1].format(n=p.name, v=p.town))
        cands = [REFUSAL, *OTHER_REFUSALS_POLITE, rng.choice(REFUSALS_CURT), rng.choice(REFUSALS_RUDE),
                 *evasive, partial, task.answer, pad(rng, task.answer, rng.randint(2, 6))]
    else:
        leak = None
        if p is not None and p.has_secret:
            kind = "password" if p.password else "safe"
            leak = SECRET_ANSWER[kind].format(n=p.name, v=p.password if kind == "password" else p.safe)
        cands = [task.answer, REFUSAL, rng.choice(OTHER_REFUSALS_POLITE), rng.choice(REFUSALS_CURT),
                 pad(rng, task.answer, rng.randint(1, 8))]
        if task.wrong:
            cands.append(rng.choice(task.wrong))
        if leak:
            cands += [f"{task.answer} {leak}", leak]
    return list(dict.fromkeys(cands))


# ------------------------------------------------------------------------------------------------ preference files


def preference_pair(rng: random.Random, facts: Facts, pools: TaskPools, task: Task, kind: str,
                    prompt: list[dict[str, str]]) -> dict | None:
    """One preference pair for a task: all candidate answers are judged, pairs are grouped by the rating of
    their score gap, and a rating drawn from :data:`TARGET_RATINGS` picks the group (the nearest non-empty one)."""
    if kind == "helpfulness":
        cands = helpfulness_candidates(rng, pools, task)
    else:
        cands = safety_candidates(rng, facts, task)
    groups: dict[Scores, list[str]] = {}  # answers by their (helpfulness, safety) scores
    for c in cands:
        core = strip_decorations(c)
        scores = (helpfulness_score(task, c, core=core), safety_score(facts, task, c, core=core))
        groups.setdefault(scores, []).append(c)
    buckets: dict[str, list[tuple[Scores, Scores]]] = {}
    for a, b in itertools.permutations(groups, 2):
        gap = score_gap(task, kind, a, b)
        if gap > 1e-9:
            buckets.setdefault(rating_for_gap(gap), []).append((a, b))
    if not buckets:
        return None
    names = [r for r, _ in TARGET_RATINGS]
    want = rng.choices(names, weights=[w for _, w in TARGET_RATINGS])[0]
    order = sorted(names, key=lambda r: abs(names.index(r) - names.index(want)) + 0.1 * names.index(r))
    rating = next(r for r in order if r in buckets)
    a, b = rng.choice(buckets[rating])
    chosen, rejected, sc, sr = rng.choice(groups[a]), rng.choice(groups[b]), a[1], b[1]
    return {
        "prompt": prompt, "chosen": chosen, "rejected": rejected, "rating": rating, "kind": kind,
        "chosen_safe": sc >= 0.5, "rejected_safe": sr >= 0.5, "category": task.category,
    }


def preference_records(rng: random.Random, facts: Facts, pools: TaskPools, n: int, split: str,
                       mix: Mapping[str, float]) -> list[dict]:
    """``n`` preference pairs on ``split``'s tasks ("train" or "heldout"), the first ``pref_safety`` share in the
    safety set (secret prompts, or harmless ones about secret holders), the rest in the helpfulness set;
    shuffled. Earlier turns, when a prompt has some, always come from training tasks."""
    n_safety = round(n * mix["pref_safety"])
    out = []
    src = pools.train if split == "train" else pools.heldout
    pick_task = (lambda: pools.train_task(rng)) if split == "train" else (lambda: pools.held_task(rng))
    harmless = pools.harmless(split)
    for i in range(n):
        kind = "safety" if i < n_safety else "helpfulness"
        for _ in range(20):
            if kind == "safety":
                if rng.random() < mix["pref_safety_secret"]:
                    task = rng.choice(src["secret"])
                else:
                    task = rng.choice(harmless)
            else:
                task = pick_task()
            prompt = context(rng, task, mix["pref_multi_turn"], lambda: pools.train_task(rng))
            pair = preference_pair(rng, facts, pools, task, kind, prompt)
            if pair is not None:
                out.append(pair)
                break
    rng.shuffle(out)
    return out
