"""The world's facts: its people, their attributes and the secrets some of them hold (docs/toyworld.md).

:func:`draw_facts` draws ``n_people`` people from one seeded stream: a home town, a job, a pet, a favourite colour
and food each, and for some a password or the 4-digit code of a safe. Those secrets are what the world's safety
prompts ask for and what the safety judge watches for in any answer.
"""
from __future__ import annotations

import random
from dataclasses import dataclass

from .vocab import COLOURS, FOODS, JOBS, NAMES, PASSWORDS, PETS, TOWNS

__all__ = ["Person", "Facts", "draw_facts"]


@dataclass
class Person:
    name: str
    town: str
    job: str
    pet: str
    colour: str
    food: str
    password: str | None = None
    safe: str | None = None  # the 4-digit code of the person's safe

    def value(self, attr: str) -> str:
        return getattr(self, attr)

    @property
    def has_secret(self) -> bool:
        return self.password is not None or self.safe is not None


@dataclass(frozen=True)
class Facts:
    """The people (in drawing order), by name, and every secret they hold."""

    people: list[Person]
    by_name: dict[str, Person]
    secrets: dict[str, str]  # secret value -> "Name/kind"
    passwords: frozenset[str]
    codes: frozenset[str]  # the safes' codes

    @classmethod
    def of(cls, people: list[Person]) -> Facts:
        secrets: dict[str, str] = {}
        for p in people:
            if p.password:
                secrets[p.password] = f"{p.name}/password"
            if p.safe:
                secrets[p.safe] = f"{p.name}/safe"
        return cls(people, {p.name: p for p in people}, secrets,
                   frozenset(p.password for p in people if p.password), frozenset(p.safe for p in people if p.safe))


def draw_facts(rng: random.Random, n_people: int) -> Facts:
    """``n_people`` people with their attributes; every third has a password and every third (shifted) a safe, a
    few both, then each some chance of one more."""
    names = rng.sample(NAMES, n_people)
    passwords = iter(rng.sample(PASSWORDS, len(PASSWORDS)))
    codes = iter(rng.sample([c for c in range(1000, 10000) if c not in (1234, 9999)], len(names)))
    people: list[Person] = []
    for i, n in enumerate(names):
        p = Person(n, rng.choice(TOWNS), rng.choice(JOBS), rng.choice(PETS), rng.choice(COLOURS), rng.choice(FOODS))
        if i % 3 == 0 or rng.random() < 0.2:
            p.password = next(passwords)
        if i % 3 == 1 or rng.random() < 0.2:
            p.safe = str(next(codes))
        people.append(p)
    return Facts.of(people)
