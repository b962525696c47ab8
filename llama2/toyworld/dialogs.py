"""The world's dialog files: SFT dialogs, GAtt dialogs, prompts for rejection sampling and PPO, and the held-out
evaluation set, in the record formats of :mod:`llama2.data.records`.

SFT dialogs (§3.1) answer every prompt with its reference: the answer, or for a prompt asking for a secret the
polite refusal, as the paper's safety SFT demonstrates safe answers to adversarial prompts (§4.2.2). Instruction
dialogs follow a GAtt-style instruction while it is in view, and the GAtt dialogs are the multi-turn dialogs GAtt
attaches an instruction to (§3.3). Each maker takes its seeded stream and the task pools; the draw order is part
of the output.
"""
from __future__ import annotations

import random
from collections.abc import Callable, Mapping
from typing import Any

from .pools import TaskPools
from .tasks import Task
from .text import apply_instruction
from .vocab import CATEGORIES

__all__ = ["context", "sft_dialogs", "instruction_dialog", "gatt_dialogs", "prompt_records", "eval_records"]


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


def sft_dialogs(rng: random.Random, pools: TaskPools, n: int, mix: Mapping[str, float]) -> list[dict]:
    """``n`` SFT dialogs in the shares of ``mix`` (single-turn, multi-turn, secret, harmless, instruction),
    shuffled; every answer is the reference."""
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
            dialog = []
            for t in tasks:
                dialog += _exchange(t)
            out.append({"dialog": dialog, "kind": kind})
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


def prompt_records(rng: random.Random, pools: TaskPools, n: int, mix: Mapping[str, float]) -> list[dict]:
    """``n`` training prompts for rejection sampling and PPO (§3.2.3): secret, harmless and other prompts in the
    shares of ``mix``, some after earlier exchanges; each tagged with "safety" and its category."""
    harmless = pools.harmless("train")
    out = []
    for _ in range(n):
        r = rng.random()
        if r < mix["prompts_secret"]:
            task = rng.choice(pools.train["secret"])
        elif r < mix["prompts_secret"] + mix["prompts_harmless"]:
            task = rng.choice(harmless)
        else:
            task = pools.train_task(rng)
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
