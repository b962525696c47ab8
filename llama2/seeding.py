"""Stable seeds derived from (seed, purpose, index ...), the same in every process.

Python's ``hash()`` of a ``str`` (or of a tuple holding one) is salted per process (PYTHONHASHSEED), so a seed
made with it changes from run to run; ``hash()`` of ints happens to be stable but mixes poorly (``hash((0, 1))``
and ``hash((1, 0))`` are unrelated only by accident of the tuple hash). Every seed in the package is made here
instead: the parts are written out as text and hashed with BLAKE2b, so any mix of ints and strings gives the
same 63-bit seed in every process, on every machine and Python version.
"""
from __future__ import annotations

import functools
import hashlib
import random

import torch

__all__ = ["derive_seed", "generator", "rng", "epoch_stream"]


def derive_seed(seed: int, *parts: object) -> int:
    """A non-negative seed (< 2**63) that depends only on ``seed`` and ``parts`` (ints, strings, floats).

    >>> derive_seed(0, "ppo/heldout", 3) == derive_seed(0, "ppo/heldout", 3)
    True
    """
    text = "\x1f".join(repr(p) for p in (int(seed), *parts))
    return int.from_bytes(hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest(), "little") >> 1


def generator(seed: int, *parts: object, device: torch.device | str = "cpu") -> torch.Generator:
    """A torch generator seeded with ``derive_seed(seed, *parts)``."""
    return torch.Generator(device=device).manual_seed(derive_seed(seed, *parts))


def rng(seed: int, *parts: object) -> random.Random:
    """A ``random.Random`` seeded with ``derive_seed(seed, *parts)``."""
    return random.Random(derive_seed(seed, *parts))


@functools.lru_cache(maxsize=8)  # a step needs at most two epochs' orders; each is drawn once, not once a step
def _epoch_order(n: int, seed: int, purpose: str, epoch: int) -> tuple[int, ...]:
    return tuple(torch.randperm(n, generator=generator(seed, purpose, epoch)).tolist())


def epoch_stream(n: int, per_step: int, seed: int, step: int, purpose: str) -> list[int]:
    """Indices into ``n`` items of step ``step``: positions ``[step * per_step, (step + 1) * per_step)`` of the
    endless stream perm(0) + perm(1) + ..., perm(e) a permutation of range(n) seeded by (seed, purpose, e).

    A function of its arguments only, so the data position is the step: a resumed run repeats the uninterrupted
    one exactly on any number of ranks, every step is full, and no item is dropped at an epoch's end (the last
    step of an epoch may take the first items of the next)."""
    if n < 1:
        raise ValueError("no items to draw from")
    return [_epoch_order(n, seed, purpose, p // n)[p % n] for p in range(step * per_step, (step + 1) * per_step)]
