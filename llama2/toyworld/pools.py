"""The world's task pools: what trains, what validates, what is held out, and the index every judge looks a prompt
up in.

Finite pools (person x attribute facts, secret questions, yes/no questions) are partitioned into train, validation
and held-out; the generated categories (reading, math, commonsense, code) get a held-out set and a validation set
drawn first, and the training streams skip their items, so that no held-out or validation item (the same fact,
sum, expression, passage or option set) reaches a training file in another wording. The held-out items are the
evaluation's, the validation items what a stage may choose by (PPO's early stopping): an effect is measured on
items nothing was chosen with. Every task made is registered under its prompt text.
"""
from __future__ import annotations

import random
from collections.abc import Callable

from .facts import Facts
from .tasks import GENERATED, Dialog, Task, knowledge_task, secret_task, yes_no_task
from .vocab import ATTRIBUTES, CATEGORIES, SECRET_QUESTIONS, YES_NO_QUESTIONS

__all__ = ["TaskPools", "prompt_text"]


def prompt_text(dialog: Dialog) -> str:
    """The text of a dialog's last user message (a str is a prompt text already), stripped."""
    if isinstance(dialog, str):
        text = dialog
    else:
        users = [m["content"] for m in dialog if m.get("role") == "user"]
        if not users:
            raise KeyError("the dialog has no user message")
        text = users[-1]
    return text.strip()


class TaskPools:
    """The train and held-out tasks of one world by pool ("knowledge", "secret", "yesno" and the generated
    categories), the per-category training streams, and the index of every prompt made so far.

    ``streams(purpose)`` gives the seeded stream of a purpose: "split" partitions the finite pools,
    "heldout/<category>" draws a held-out set, "train/<category>" a training stream.
    """

    def __init__(self, facts: Facts, heldout_fraction: float, heldout_per_category: int,
                 streams: Callable[[str], random.Random], val_fraction: float = 0.0, val_per_category: int = 0) -> None:
        self.facts = facts
        self.index: dict[str, Task] = {}
        self.train: dict[str, list[Task]] = {}
        self.heldout: dict[str, list[Task]] = {}
        self.val: dict[str, list[Task]] = {}
        self._split_finite(streams("split"), heldout_fraction, val_fraction)
        self._held_uids: set[tuple] = set()
        for cat in GENERATED:
            self.heldout[cat] = self._held_out_draws(cat, streams(f"heldout/{cat}"), heldout_per_category, "heldout")
        for cat in GENERATED:
            self.val[cat] = self._held_out_draws(cat, streams(f"val/{cat}"), val_per_category, "val")
        self._held_prompts = {t.prompt for split in (self.heldout, self.val) for ts in split.values() for t in ts}
        # The training stream of each generated category: a fixed list drawn once (repeats allowed), so that the
        # index holds every prompt any file can contain.
        self._stream_rng = {cat: streams(f"train/{cat}") for cat in GENERATED}
        self._stream_rng_k = streams("train/knowledge")

    def register(self, task: Task) -> Task:
        """The task now indexed under the prompt: ``task``, or the one made first with the same prompt."""
        old = self.index.get(task.prompt)
        if old is None:
            self.index[task.prompt] = task
            return task
        return old

    def _split_finite(self, rng: random.Random, frac: float, val_frac: float) -> None:
        """Facts, secret questions and yes/no questions partitioned into train, "heldout" and "val"."""
        people = self.facts.people

        def three_ways(items: list, key) -> dict:  # item key -> split, from the shuffled order
            rng.shuffle(items)
            n_held = max(1, round(frac * len(items)))
            n_val = round(val_frac * len(items))
            return {key(x): "heldout" if i < n_held else "val" if i < n_held + n_val else "train"
                    for i, x in enumerate(items)}

        fact_split = three_ways([(p, a) for p in people for a in ATTRIBUTES], lambda x: (x[0].name, x[1]))
        self._add_split("knowledge", [(knowledge_task(p, a, w, fact_split[(p.name, a)]), fact_split[(p.name, a)])
                                      for p in people for a in ATTRIBUTES for w in (0, 1)])

        # Secret questions: one wording of each kind is held out entirely (a new phrasing) and another kept for
        # validation only (so that what a stage chooses by also asks in a phrasing it never trained on), plus a share
        # of the rest.
        secret_all = [(p, kind, w) for p in people for kind in SECRET_QUESTIONS
                      if (p.password if kind == "password" else p.safe) for w in range(len(SECRET_QUESTIONS[kind]))]
        own = {kind: rng.sample(range(len(qs)), 2) for kind, qs in SECRET_QUESTIONS.items()}  # (held out, val)
        rest = three_ways([x for x in secret_all if x[2] not in own[x[1]]], lambda x: (x[0].name, x[1], x[2]))
        secret_split = [(p, kind, w, "heldout" if w == own[kind][0] else "val" if w == own[kind][1]
                         else rest[(p.name, kind, w)]) for p, kind, w in secret_all]
        self._add_split("secret", [(secret_task(p, kind, w, split), split) for p, kind, w, split in secret_split])

        yn_split = three_ways([(p, kind) for p in people for kind in YES_NO_QUESTIONS], lambda x: (x[0].name, x[1]))
        self._add_split("yesno", sorted([(yes_no_task(p, kind, yn_split[(p.name, kind)]), yn_split[(p.name, kind)])
                                         for p in people for kind in YES_NO_QUESTIONS], key=lambda x: x[0].prompt))

    def _add_split(self, pool: str, tasks: list[tuple[Task, str]]) -> None:
        for split in (self.train, self.heldout, self.val):
            split[pool] = []
        for t, split in tasks:
            {"train": self.train, "heldout": self.heldout, "val": self.val}[split][pool].append(self.register(t))

    def _held_out_draws(self, cat: str, rng: random.Random, n: int, split: str) -> list[Task]:
        """Up to ``n`` held-out (or validation) items of a generated category, each a new item with a new prompt."""
        out: list[Task] = []
        tries = 0
        while len(out) < n and tries < 50 * n:
            tries += 1
            t = GENERATED[cat](rng, split, self.facts.people)
            if t.uid in self._held_uids or t.prompt in self.index:
                continue
            self._held_uids.add(t.uid)
            out.append(self.register(t))
        return out

    # -------------------------------------------------------------------------------------------- draws

    def draw(self, cat: str) -> Task:
        """A training task of a category (knowledge: a fact question; the generated ones: a fresh item)."""
        if cat == "knowledge":
            return self._stream_rng_k.choice(self.train["knowledge"])
        rng = self._stream_rng[cat]
        while True:
            t = GENERATED[cat](rng, "train", self.facts.people)
            if t.uid not in self._held_uids and t.prompt not in self._held_prompts:
                return self.register(t)

    def train_task(self, rng: random.Random) -> Task:
        """A non-secret training task: a category uniformly, knowledge split between facts and yes/no questions."""
        cat = rng.choice(CATEGORIES)
        if cat == "knowledge":
            return rng.choice(self.train["yesno"] if rng.random() < 0.25 else self.train["knowledge"])
        return self.draw(cat)

    def held_task(self, rng: random.Random, split: str = "heldout") -> Task:
        """A non-secret held-out (or validation) task, drawn like :meth:`train_task`."""
        src = self.split(split)
        cat = rng.choice(CATEGORIES)
        if cat == "knowledge":
            return rng.choice(src["yesno"] if rng.random() < 0.25 and src["yesno"] else src["knowledge"])
        return rng.choice(src[cat])

    def split(self, name: str) -> dict[str, list[Task]]:
        """The pools of a split: "train", "heldout" or "val"."""
        return {"train": self.train, "heldout": self.heldout, "val": self.val}[name]

    def harmless(self, split: str) -> list[Task]:
        """The non-secret questions about people who hold a secret (yes/no questions first, then facts)."""
        src = self.split(split)
        return [t for t in src["yesno"] + src["knowledge"] if t.harmless]

    # -------------------------------------------------------------------------------------------- lookup

    def find(self, text: str) -> Task | None:
        """The task of a prompt text, looking past a GAtt instruction put before it on its own line(s)."""
        task = self.index.get(text)
        if task is not None:
            return task
        lines = text.split("\n")
        for i in range(1, len(lines)):
            task = self.index.get("\n".join(lines[i:]).strip())
            if task is not None:
                return task
        return None
