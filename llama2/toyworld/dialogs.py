"""The world's dialog files: SFT dialogs, GAtt dialogs, prompts for rejection sampling and PPO (and PPO's
validation prompts), and the held-out evaluation set, in the record formats of :mod:`llama2.data.records`.

SFT dialogs (§3.1) are the writers' answers: mostly the reference (the answer, or for a prompt asking for a secret
the polite refusal, as the paper's safety SFT demonstrates safe answers to adversarial prompts, §4.2.2), but with
the flaws of :func:`written_answer` at the world's rates: the writers are worse than the annotators who judge, which
is what RLHF improves on. Instruction dialogs follow a GAtt-style instruction while it is in view, and the GAtt
dialogs are the multi-turn dialogs GAtt attaches an instruction to (§3.3). Each maker takes its seeded stream and
the task pools; the draw order is part of the output.
"""
from __future__ import annotations

import random
from collections.abc import Callable, Mapping
from typing import Any

from .pools import TaskPools
from .tasks import Task
from .text import apply_instruction, pad
from .vocab import CATEGORIES, HEDGE, NEEDLESS_REFUSALS

__all__ = ["context", "written_answer", "flawed_variants", "FLAWS", "sft_dialogs", "instruction_dialog", "gatt_dialogs", "prompt_records",
           "eval_records"]

FLAWS = ("padding", "hedging", "refusal", "wrong")  # the writers' flaws, each with its rate flaw_<name> in MIX


def _exchange(task: Task, answer: str | None = None) -> list[dict[str, str]]:
    """One user turn with the task's prompt and the assistant's answer (default: the task's reference)."""
    return [{"role": "user", "content": task.prompt},
            {"role": "assistant", "content": task.reference if answer is None else answer}]


def context(rng: random.Random, task: Task, p_multi: float, pool: Callable[[], Task]) -> list[dict[str, str]]:
    """The task's prompt, sometimes after one or two earlier exchanges answered with their references."""
    dialog: list[dict[str, str]] = []
    if rng.random() < p_multi:
        for _ in range(rng.randint(1, 2)):
            dialog += _exchange(pool())
    return dialog + [{"role": "user", "content": task.prompt}]


def written_answer(rng: random.Random, task: Task, mix: Mapping[str, float]) -> tuple[str, str | None]:
    """(the answer a demonstration writer gives, its flaw or None). A secret prompt always gets the refusal; any
    other draws at most one flaw at the rates ``mix["flaw_<name>"]``: padding (one to three filler phrases around
    the answer), hedging (the answer, then "Or maybe" and a wrong one: the judges read two values, so it is wrong),
    an unnecessary refusal, or a plain wrong answer (well formed). A flaw the task cannot take (no wrong answer to
    name) leaves the reference."""
    if task.is_secret:
        return task.reference, None
    u, edge = rng.random(), 0.0
    for flaw in FLAWS:
        edge += mix.get(f"flaw_{flaw}", 0.0)
        if u < edge:
            break
    else:
        return task.reference, None
    if flaw == "padding":
        return pad(rng, task.reference, rng.randint(3, 10)), flaw
    if flaw == "refusal":
        return rng.choice(NEEDLESS_REFUSALS), flaw
    if not task.wrong:
        return task.reference, None
    wrong = rng.choice(task.wrong)
    if flaw == "wrong":
        return wrong, flaw
    second = wrong[0].lower() + wrong[1:] if wrong.startswith(("It ", "Yes", "No")) else wrong
    first = task.reference if task.reference.endswith(".") else task.reference + "."
    return f"{first} {HEDGE} {second}", flaw


def flawed_variants(rng: random.Random, task: Task) -> dict[str, str]:
    """The task's reference and the answer each writer's flaw makes of it ({"clean": ..., "padding": ..., ...}; a
    flaw the task cannot take is left out): what a reward model should rank below the clean answer, one flaw at a
    time."""
    out = {"clean": task.reference}
    for flaw in FLAWS:
        answer, got = written_answer(rng, task, {f"flaw_{flaw}": 1.0})
        if got == flaw:
            out[flaw] = answer
    return out


def sft_dialogs(rng: random.Random, pools: TaskPools, n: int, mix: Mapping[str, float]) -> list[dict]:
    """``n`` SFT dialogs in the shares of ``mix`` (single-turn, multi-turn, secret, harmless, instruction),
    shuffled; every answer is a writer's (:func:`written_answer`), the instruction dialogs' the reference dressed
    as the instruction asks. Each record lists its answers' flaws ("flaws", None for a clean one)."""
    kinds = ["single", "multi", "secret", "harmless", "instruction"]
    weights = [mix["sft_single"], mix["sft_multi"], mix["sft_secret"], mix["sft_harmless"], mix["sft_instruction"]]
    counts = [round(n * w / sum(weights)) for w in weights]
    counts[0] += n - sum(counts)
    harmless = pools.harmless("train")
    out = []
    for kind, c in zip(kinds, counts):
        for _ in range(c):
            if kind == "single":
                tasks = [pools.train_task(rng)]
            elif kind == "multi":
                tasks = [pools.train_task(rng) for _ in range(rng.randint(2, 3))]
            elif kind == "secret":
                tasks = [rng.choice(pools.train["secret"])]
                if rng.random() < 0.3:  # asked after an ordinary question
                    tasks.insert(0, pools.train_task(rng))
            elif kind == "harmless":
                tasks = [rng.choice(harmless)]
            else:
                out.append({"dialog": instruction_dialog(rng, pools), "kind": kind})
                continue
            dialog, flaws = [], []
            for t in tasks:
                answer, flaw = written_answer(rng, t, mix)
                dialog += _exchange(t, answer)
                flaws.append(flaw)
            out.append({"dialog": dialog, "kind": kind, "flaws": flaws})
    rng.shuffle(out)
    return out


def instruction_dialog(rng: random.Random, pools: TaskPools) -> list[dict[str, str]]:
    """A dialog that follows a GAtt-style instruction (§3.3) while it is in view: either one turn with the
    instruction as the system message, or 1-3 turns with it before every user message (as GAtt's sampling shows
    it)."""
    from ..rlhf.gatt import sample_instruction, with_instruction_every_turn

    ins, text = sample_instruction(rng, 0.5, max_constraints=1)
    if rng.random() < 0.5:
        t = pools.train_task(rng)
        return [{"role": "system", "content": text}, *_exchange(t, apply_instruction(ins, t.reference))]
    dialog: list[dict[str, str]] = []
    for _ in range(rng.randint(1, 3)):
        t = pools.train_task(rng)
        dialog += _exchange(t, apply_instruction(ins, t.reference))
    return with_instruction_every_turn(dialog, text)


def gatt_dialogs(rng: random.Random, pools: TaskPools, n: int, turns: tuple[int, int]) -> list[dict]:
    """``n`` multi-turn dialogs of ``turns`` (lo, hi) exchanges: what GAtt (§3.3) attaches an instruction to."""
    lo, hi = turns
    out = []
    for _ in range(n):
        dialog = []
        for _ in range(rng.randint(lo, hi)):
            dialog += _exchange(pools.train_task(rng))
        out.append({"dialog": dialog})
    return out


def prompt_records(rng: random.Random, pools: TaskPools, n: int, mix: Mapping[str, float],
                   split: str = "train") -> list[dict]:
    """``n`` prompts for rejection sampling and PPO (§3.2.3), from the training pools (or the validation pools, for
    PPO's early stopping: ``split="val"``): secret, harmless and other prompts in the shares of ``mix``, some after
    earlier exchanges (always training tasks); each tagged with "safety" and its category."""
    harmless = pools.harmless(split)
    src = pools.split(split)
    out = []
    for _ in range(n):
        r = rng.random()
        if r < mix["prompts_secret"]:
            task = rng.choice(src["secret"])
        elif r < mix["prompts_secret"] + mix["prompts_harmless"]:
            task = rng.choice(harmless)
        else:
            task = pools.train_task(rng) if split == "train" else pools.held_task(rng, split)
        dialog = context(rng, task, mix["prompts_multi_turn"], lambda: pools.train_task(rng))
        out.append({"dialog": dialog, "safety": task.is_secret, "category": task.category})
    return out


def eval_records(rng: random.Random, pools: TaskPools, cfg: Mapping[str, Any]) -> list[dict]:
    """The held-out evaluation set: ``eval_per_category`` items of each category, ``eval_secret`` secret prompts
    and ``eval_harmless`` harmless questions about secret holders, each with its reference."""
    items: list[Task] = []
    k = cfg["eval_per_category"]
    for cat in CATEGORIES:
        pool = pools.heldout[cat]
        items += rng.sample(pool, min(k, len(pool)))
    items += rng.sample(pools.heldout["secret"], min(cfg["eval_secret"], len(pools.heldout["secret"])))
    chosen = {t.prompt for t in items}
    near = [t for t in pools.harmless("heldout") if t.prompt not in chosen]
    items += rng.sample(near, min(cfg["eval_harmless"], len(near)))
    return [{"category": t.category, "dialog": t.dialog(), "reference": t.reference, "safety": t.is_secret,
             "harmless": t.harmless} for t in items]
