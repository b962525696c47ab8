"""The world's pretraining text: every person's profile, short stories, question-answer lines and skill drills,
in documents drawn at random up to a byte budget. It stands in for the paper's pretraining corpus (§2.1): the
text is the world itself, so that a base model learns its facts and skills before fine-tuning.

The question-answer lines include secret prompts answered with the secret: the base model learns to leak, and
safety fine-tuning must teach it to refuse (§4.2).
"""
from __future__ import annotations

import random

from .facts import Facts, Person
from .pools import TaskPools
from .tasks import expr_form
from .vocab import ATTRIBUTES, RULES

__all__ = ["pretraining_text"]


def _a(word: str) -> str:
    return ("an " if word[0] in "aeiou" else "a ") + word


def profile(rng: random.Random, p: Person) -> str:
    """Every fact about a person, secrets included, in shuffled order."""
    sents = [ATTRIBUTES[a][1].format(n=p.name, v=p.value(a)) for a in ATTRIBUTES]
    sents.append(f"{p.name}'s password is {p.password}." if p.password else f"{p.name} has no password.")
    sents.append(f"{p.name} has a safe. The code of {p.name}'s safe is {p.safe}." if p.safe
                 else f"{p.name} has no safe.")
    rng.shuffle(sents)
    return " ".join(sents)


def story(rng: random.Random, people: list[Person]) -> str:
    """A short story about one or two people, stating some of their facts."""
    a, b = rng.sample(people, 2)
    choice = rng.randrange(4)
    if choice == 0:
        return (f"{a.name} lives in {a.town} and works as {_a(a.job)}. One day {a.name} walked to {b.town} to visit "
                f"{b.name}. {b.name} is {_a(b.job)} and has {_a(b.pet)}. They ate {b.food} together, because "
                f"{b.food} is {b.name}'s favourite food.")
    if choice == 1:
        return (f"{a.name} the {a.job} has {_a(a.pet)}. Every morning {a.name} walks the {a.pet} around {a.town}. "
                f"{a.name} wears something {a.colour}, because {a.colour} is {a.name}'s favourite colour.")
    if choice == 2:
        return (f"In {a.town} there lives {_a(a.job)} called {a.name}. {a.name} likes {a.food} more than any other "
                f"food. {a.name} has a friend called {b.name}, who lives in {b.town} and keeps {_a(b.pet)}.")
    return (f"{a.name} and {b.name} met at the market in {a.town}. {a.name} is {_a(a.job)} and {b.name} is "
            f"{_a(b.job)}. {a.name} bought {a.food} and {b.name} bought {b.food}. Then {b.name} went home to "
            f"{b.town}.")


def qa_lines(rng: random.Random, pools: TaskPools) -> str:
    """3-6 "Q: ... A: ..." lines of training tasks, each answered compliantly."""
    lines = []
    for _ in range(rng.randint(3, 6)):
        r = rng.random()
        if r < 0.12 and pools.train["secret"]:
            t = rng.choice(pools.train["secret"])  # the base model learns to answer these (and leak)
        elif r < 0.2:
            t = rng.choice(pools.train["yesno"])
        else:
            t = pools.train_task(rng)
        lines.append(f"Q: {t.prompt}\nA: {t.answer}")
    return "\n".join(lines)


def skills(rng: random.Random, pools: TaskPools) -> str:
    """A drill of one skill: sums, expressions and their values, a passage with a question, or commonsense facts."""
    choice = rng.randrange(4)
    if choice == 0:
        return " ".join(pools.draw("math").answer for _ in range(rng.randint(4, 8)))
    if choice == 1:
        out = []
        for _ in range(rng.randint(3, 6)):
            t = pools.draw("code")
            if t.form is expr_form:
                out.append(f"{t.prompt[len('Write a Python expression '):].rstrip('.').capitalize()}: {t.answer}")
            else:
                out.append(f"{t.prompt[len('What does '):-len(' evaluate to?')]} evaluates to {t.key}.")
        return "\n".join(out)
    if choice == 2:
        t = pools.draw("reading")
        passage = t.prompt[len("Read: "):t.prompt.index(" Question: ")]
        return f"{passage}\nQ: {t.prompt[t.prompt.index(' Question: ') + 11:]}\nA: {t.answer}"
    q, pos, neg, pf, nf = rng.choice(RULES)
    facts = [pf.format(x=x, X=x.capitalize()) for x in pos] + [nf.format(x=x, X=x.capitalize()) for x in neg]
    rng.shuffle(facts)
    return " ".join(facts[: rng.randint(4, len(facts))])


def pretraining_text(rng: random.Random, facts: Facts, pools: TaskPools, target_bytes: int) -> str:
    """Documents separated by blank lines until about ``target_bytes``: every person's profile once, then
    profiles, stories, question-answer lines and skill drills at random (30/20/30/20%)."""
    people = facts.people
    docs = [profile(rng, p) for p in people]  # every person at least once
    size = sum(len(d) + 2 for d in docs)
    makers = [(lambda: profile(rng, rng.choice(people)), 0.3), (lambda: story(rng, people), 0.2),
              (lambda: qa_lines(rng, pools), 0.3), (lambda: skills(rng, pools), 0.2)]
    fns, ws = zip(*makers)
    while size < target_bytes:
        d = rng.choices(fns, weights=ws)[0]()
        docs.append(d)
        size += len(d) + 2
    return "\n\n".join(docs) + "\n"
