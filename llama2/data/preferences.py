"""Reward-model data (paper §3.2.1, §3.2.2): preference pairs encoded as two finished dialogs with the same
prompt, batched chosen-then-rejected for one forward pass, scored at the last real token; and each reward
model's data mix.

:func:`encode_preference` renders the two finished dialogs of a pair; :func:`collate_pairs` batches chosen and
rejected together; :func:`gather_last` reads the score at the last real token; :func:`mix_preferences` builds
the data mix of each reward model.
"""
from __future__ import annotations

import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch

from ..chat import TextEncoder, encode_dialog
from .batching import causal_padding_mask, pad_sequences
from .records import KINDS, Preference
from .sft import EncodeStats, Overflow, check_overflow, drop_exchanges, last_answer_start, count_exchanges, encode_all

__all__ = ["EncodedPair", "encode_preference", "encode_preferences", "collate_pairs", "gather_last", "mix_preferences"]


# ------------------------------------------------------------------------------------------------ reward pairs


@dataclass(frozen=True)
class EncodedPair:
    """The token ids of a preference's two finished dialogs, prompt + chosen and prompt + rejected, each ending
    with the EOS that closes the answer, fitted to the window with the same prompt. Unpacks as
    ``chosen, rejected = pair``."""

    chosen: list[int]
    rejected: list[int]
    rating: str  # the preference's rating, for the margin (llama2.rlhf.margin_values)
    dropped_exchanges: int = 0
    dropped_tokens: int = 0  # prompt tokens removed (the same from both sequences)
    chosen_safe: bool | None = None  # the annotators' safety labels, for the safety RM's auxiliary loss
    rejected_safe: bool | None = None

    def __iter__(self):
        yield self.chosen
        yield self.rejected


def encode_preference(
    tokenizer: TextEncoder,
    pref: Preference,
    seq_len: int,
    overflow: Overflow = "truncate",
) -> EncodedPair | None:
    """Encode both responses of a preference as finished dialogs of at most ``seq_len`` tokens.

    The reward model reads the whole sequence and is scored at its last token (the EOS), so a sequence fits
    when it has at most seq_len tokens. Overflow is handled as for SFT (earliest prompt exchanges first, then
    the start of the last prompt; never a token of the responses), and identically for both sequences so
    that they keep the same prompt. None when too long with ``overflow="skip"``, or when a response alone
    does not fit.
    """
    check_overflow(overflow, seq_len)
    dialogs = (pref.chosen_dialog, pref.rejected_dialog)

    def encode(k: int) -> list[tuple[list[int], int]]:
        """(ids, index of the first response token) of both dialogs without their first k exchanges."""
        out = []
        for d in dialogs:
            ids, mask = encode_dialog(tokenizer, drop_exchanges(d, k))
            out.append((ids, last_answer_start(mask)))
        return out

    def fits(enc: list[tuple[list[int], int]]) -> bool:
        return all(len(ids) <= seq_len for ids, _ in enc)

    full = encode(0)
    if fits(full):
        return EncodedPair(full[0][0], full[1][0], pref.rating, chosen_safe=pref.chosen_safe,
                           rejected_safe=pref.rejected_safe)
    if overflow == "skip":
        return None
    k, enc = 0, full
    while not fits(enc) and k < count_exchanges(pref.prompt):
        k += 1
        enc = encode(k)
    cut = max(len(ids) for ids, _ in enc) - seq_len
    if cut > 0:
        if cut >= min(first for _, first in enc):  # keep at least one prompt token before each response
            return None
        enc = [(ids[cut:], first - cut) for ids, first in enc]
    (c, _), (r, _) = enc
    return EncodedPair(c, r, pref.rating, dropped_exchanges=k, dropped_tokens=len(full[0][0]) - len(c),
                       chosen_safe=pref.chosen_safe, rejected_safe=pref.rejected_safe)


def encode_preferences(
    tokenizer: TextEncoder,
    prefs: Iterable[Preference],
    seq_len: int,
    overflow: Overflow = "truncate",
) -> tuple[list[EncodedPair], EncodeStats]:
    """:func:`encode_preference` over a data set: the pairs that fit and the counts to report."""
    return encode_all(encode_preference, tokenizer, prefs, seq_len, overflow)


def collate_pairs(
    pairs: Sequence[EncodedPair | tuple[Sequence[int], Sequence[int]]],
    pad_id: int = 0,
    side: Literal["right", "left"] = "right",
) -> dict[str, Any]:
    """Batch B pairs as 2B rows, chosen rows first (0..B-1) then rejected (B..2B-1), so that one forward pass
    scores both: ``r = gather_last(model(tokens, mask=mask, position_ids=position_ids), last_index)``,
    ``r_chosen, r_rejected = r.chunk(2)``.

    Returns tokens (2B, T) long padded with ``pad_id`` on ``side``; attention_mask (2B, T) bool, True on real
    tokens; mask (2B, T, T) bool, causal and blind to padding keys (a padding query sees only itself, so no
    NaN); position_ids (2B, T), counting real tokens only, so left padding does not shift the rotary positions;
    last_index (2B,) the index of each row's last real token; ratings (list of B str) and safe (2B,) (1 safe, 0
    unsafe, -1 not labelled) when the pairs carry them.
    With right padding ``mask`` may also be left out (plain causal attention gives the same scores, faster).
    """
    if side not in ("right", "left"):
        raise ValueError(f"side must be 'right' or 'left', got {side!r}")
    if not pairs:
        raise ValueError("no pairs to collate")
    unpacked = [tuple(p) for p in pairs]
    seqs = [list(c) for c, _ in unpacked] + [list(r) for _, r in unpacked]  # chosen first, then rejected
    if any(len(s) == 0 for s in seqs):
        raise ValueError("empty sequence in a pair")
    padded = pad_sequences(seqs, pad_id, side)
    tokens, real, position_ids, last_index = padded.tokens, padded.real, padded.position_ids, padded.last_index
    mask = causal_padding_mask(real)  # (N, T, T)
    batch: dict[str, Any] = {
        "tokens": tokens, "attention_mask": real, "mask": mask, "position_ids": position_ids,
        "last_index": last_index.long(),
    }
    if all(isinstance(p, EncodedPair) for p in pairs):
        batch["ratings"] = [p.rating for p in pairs]  # type: ignore[union-attr]
        # (2B,) safety label of each row, chosen rows first: 1 safe, 0 unsafe, -1 not labelled
        labels = [p.chosen_safe for p in pairs] + [p.rejected_safe for p in pairs]  # type: ignore[union-attr]
        batch["safe"] = torch.tensor([-1 if x is None else int(x) for x in labels], dtype=torch.long)
    return batch


def gather_last(values: torch.Tensor, last_index: torch.Tensor) -> torch.Tensor:
    """values (B, T) per position (e.g. the scalar head's output), last_index (B,) -> (B,) value at that index.

    The reward is read at the last real token, never at padding (§3.2.2: the model "outputs a scalar score").
    """
    return values.gather(1, last_index.to(values.device).long()[:, None]).squeeze(1)


# ------------------------------------------------------------------------------------------------ mixing, holdout


def mix_preferences(
    prefs: Sequence[Preference],
    kind: str,
    other_ratio: float | None = None,
    seed: int = 0,
) -> list[Preference]:
    """The training mix of the ``kind`` reward model: all preferences of that kind plus others, sampled.

    Paper §3.2.2 ("Data Composition"): "Helpfulness reward model is eventually trained on all Meta Helpfulness
    data, combined with an equal parts of the remaining data uniformly sampled from Meta Safety and from the
    open-source datasets. Meta Safety reward model is trained on all Meta Safety and Anthropic Harmless data,
    mixed with Meta Helpfulness and open-source helpfulness data in a 90/10 proportion."

    ``other_ratio`` is the fraction of the final mix drawn from the other kind: default 0.5 for helpfulness
    (equal parts) and 0.1 for safety (90/10); 0 gives the ``kind`` data alone. With N of the kind, the mix holds
    M = round(N * r / (1 - r)) others, drawn uniformly without replacement. Our choice when fewer than M others
    exist: take all of them as many whole times as needed and draw the rest without replacement, which keeps
    the ratio and repeats no example more than once more than any other. The result is shuffled;
    deterministic given ``seed``.
    """
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    r = {"helpfulness": 0.5, "safety": 0.1}[kind] if other_ratio is None else float(other_ratio)
    if not 0 <= r < 1:
        raise ValueError(f"other_ratio must be in [0, 1), got {r}")
    own = [p for p in prefs if p.kind == kind]
    other = [p for p in prefs if p.kind != kind]
    m = round(len(own) * r / (1 - r))
    if m and not other:
        raise ValueError(f"other_ratio={r} asks for {m} non-{kind} preferences but there are none")
    rng = random.Random(seed)
    sampled: list[Preference] = []
    while m - len(sampled) >= len(other) > 0:  # fewer others than asked: whole copies first
        sampled += other
    sampled += rng.sample(other, m - len(sampled))
    mix = own + sampled
    rng.shuffle(mix)
    return mix
