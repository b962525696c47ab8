"""Padding token sequences of different lengths into one batch: the one implementation every stage uses.

Reward-model pairs, reward-model scoring, PPO rollouts and evaluation all batch sequences of different lengths.
They share :func:`pad_sequences` (tokens, which positions are real, rotary positions that count real tokens
only, the index of each row's last real token) and :func:`causal_padding_mask` (causal attention blind to
padding keys). Packed SFT rows are not padded sequences but several dialogs per row: their block-diagonal mask
is in :mod:`llama2.data.sft`.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch

__all__ = ["Padded", "pad_sequences", "causal_padding_mask"]


@dataclass(frozen=True)
class Padded:
    """A padded batch of N sequences in T columns."""

    tokens: torch.Tensor  # (N, T) long, padding filled with pad_id
    real: torch.Tensor  # (N, T) bool, True on real tokens
    position_ids: torch.Tensor  # (N, T) long, counting real tokens only (left padding does not shift rotary positions)
    last_index: torch.Tensor  # (N,) long, the column of each row's last real token
    lengths: torch.Tensor  # (N,) long


def pad_sequences(seqs: Sequence[Sequence[int]], pad_id: int = 0, side: Literal["right", "left"] = "right",
                  width: int | None = None) -> Padded:
    """Pad token id sequences to a common width (the longest, or ``width``) on ``side``."""
    if side not in ("right", "left"):
        raise ValueError(f"side must be 'right' or 'left', got {side!r}")
    if not seqs:
        raise ValueError("no sequences to pad")
    lengths = torch.tensor([len(s) for s in seqs], dtype=torch.long)
    if int(lengths.min()) == 0:
        raise ValueError("cannot pad an empty sequence")
    N, T = len(seqs), int(lengths.max()) if width is None else width
    if T < int(lengths.max()):
        raise ValueError(f"width {T} is shorter than the longest sequence ({int(lengths.max())} tokens)")
    tokens = torch.full((N, T), pad_id, dtype=torch.long)
    real = torch.zeros(N, T, dtype=torch.bool)
    for i, s in enumerate(seqs):
        cols = slice(0, len(s)) if side == "right" else slice(T - len(s), T)
        tokens[i, cols] = torch.as_tensor(list(s), dtype=torch.long)
        real[i, cols] = True
    position_ids = (real.long().cumsum(1) - 1).clamp(min=0)  # (N, T); padding gets 0 or the last position
    last_index = lengths - 1 if side == "right" else torch.full((N,), T - 1, dtype=torch.long)
    return Padded(tokens, real, position_ids, last_index, lengths)


def causal_padding_mask(real: torch.Tensor) -> torch.Tensor:
    """(N, T, T) bool from (N, T) real-token flags: a query sees a key iff the key is not later and both are real;
    a padding query sees only itself, so no softmax row is empty (no NaN)."""
    T = real.shape[1]
    causal = torch.ones(T, T, dtype=torch.bool, device=real.device).tril()
    eye = torch.eye(T, dtype=torch.bool, device=real.device)
    return (causal & real[:, None, :] & real[:, :, None]) | eye
