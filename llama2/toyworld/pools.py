"""The world's task pools: what trains, what is held out, and the index every judge looks a prompt up in.

Finite pools (person x attribute facts, secret questions, yes/no questions) are partitioned into train and
held-out; the generated categories (reading, math, commonsense, code) get a held-out set drawn first, and the
training streams skip its items, so that no held-out item (the same fact, sum, expression, passage or option set)
reaches a training file in another wording. Every task made is registered under its prompt text.
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
                 streams: Callable[[str], random.Random]) -> None:
        self.facts = facts
        self.index: dict[str, Task] = {}
        self.train: dict[str, list[Task]] = {}
        self.heldout: dict[str, list[Task]] = {}
        self._split_finite(streams("split"), heldout_fraction)
        self._held_uids: set[tuple] = set()
        for cat in GENERATED:
            self.heldout[cat] = self._held_out_draws(cat, streams(f"heldout/{cat}"), heldout_per_category)
        self._held_prompts = {t.prompt for ts in self.heldout.values() for t in ts}
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

    def _split_finite(self, rng: random.Random, frac: float) -> None:
        people = self.facts.people
        facts = [(p, a) for p in people for a in ATTRIBUTES]
        rng.shuffle(facts)
        n_held = max(1, round(frac * len(facts)))
        held_facts = set(map(lambda x: (x[0].name, x[1]), facts[:n_held]))
        for split in ("train", "heldout"):
            tasks = [knowledge_task(p, a, w, split) for p in people for a in ATTRIBUTES for w in (0, 1)
                     if ((p.name, a) in held_facts) == (split == "heldout")]
            (self.train if split == "train" else self.heldout)["knowledge"] = [self.register(t) for t in tasks]

        # Secret questions: one wording of each kind is held out entirely (a new phrasing), plus a share of the rest.
        secret_all = [(p, kind, w) for p in people for kind in SECRET_QUESTIONS
                      if (p.password if kind == "password" else p.safe) for w in range(len(SECRET_QUESTIONS[kind]))]
        held_wording = {kind: rng.randrange(len(qs)) for kind, qs in SECRET_QUESTIONS.items()}
        rest = [x for x in secret_all if x[2] != held_wording[x[1]]]
        rng.shuffle(rest)
        held_rest = set(map(lambda x: (x[0].name, x[1], x[2]), rest[: round(frac * len(rest))]))
        self.train["secret"], self.heldout["secret"] = [], []
        for p, kind, w in secret_all:
            held = w == held_wording[kind] or (p.name, kind, w) in held_rest
            t = self.register(secret_task(p, kind, w, "heldout" if held else "train"))
            (self.heldout if held else self.train)["secret"].append(t)

        yn = [(p, kind) for p in people for kind in YES_NO_QUESTIONS]
        rng.shuffle(yn)
        held_yn = set(map(lambda x: (x[0].name, x[1]), yn[: max(1, round(frac * len(yn)))]))
        self.train["yesno"], self.heldout["yesno"] = [], []
        for p, kind in yn:
            held = (p.name, kind) in held_yn
            t = self.register(yes_no_task(p, kind, "heldout" if held else "train"))
            (self.heldout if held else self.train)["yesno"].append(t)
        self.train["yesno"].sort(key=lambda t: t.prompt)
        self.heldout["yesno"].sort(key=lambda t: t.prompt)

    def _held_out_draws(self, cat: str, rng: random.Random, n: int) -> list[Task]:
        """Up to ``n`` held-out items of a generated category, each a new item with a new prompt."""
        out: list[Task] = []
        tries = 0
        while len(out) < n and tries < 50 * n:
            tries += 1
            t = GENERATED[cat](rng, "heldout", self.facts.people)
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

    def held_task(self, rng: random.Random) -> Task:
        """A non-secret held-out task, drawn like :meth:`train_task`."""
        cat = rng.choice(CATEGORIES)
        if cat == "knowledge":
            return rng.choice(self.heldout["yesno"] if rng.random() < 0.25 else self.heldout["knowledge"])
        return rng.choice(self.heldout[cat])

    def harmless(self, split: str) -> list[Task]:
        """The non-secret questions about people who hold a secret (yes/no questions first, then facts)."""
        src = self.train if split == "train" else self.heldout
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
