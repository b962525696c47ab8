"""Reward-model accuracy per preference rating (Llama 2 §3.2.2, Table 8): how often the chosen response scores
higher, in each "significantly better / better / slightly better / negligibly better or unsure" bucket."""
from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import torch
import torch.distributed as dist

from ..data.preferences import EncodedPair, collate_pairs, encode_preferences
from ..data.records import Preference
from ..model import Transformer
from ..rlhf.reward import accuracy_by_rating
from ..rlhf.reward_model import RewardModel, score_batch
from ..tokenizer import Tokenizer
from ..train.dist import Dist, autocast_for, unwrap

__all__ = ["score_pairs", "evaluate_reward"]


@torch.no_grad()
def score_pairs(model, pairs: Sequence[EncodedPair], micro_batch: int, padding: str, d: Dist, autocast
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """(r_chosen, r_rejected), each (len(pairs),) on the CPU, split across ranks. Every rank runs the same number
    of forwards (FSDP gathers weights collectively); a rank short of pairs scores a stand-in and drops it."""
    was_training = model.training
    model.eval()
    n = len(pairs)
    per_rank = -(-n // d.world)
    mine = list(range(d.rank * per_rank, min(n, (d.rank + 1) * per_rank)))
    rc, rr = torch.zeros(n), torch.zeros(n)
    for i in range(0, per_rank, micro_batch):
        idx = mine[i : i + micro_batch]
        batch = collate_pairs([pairs[j] for j in idx] or [pairs[0]], side=padding)
        with autocast:
            r = score_batch(model, batch, d.device).float().cpu()  # (2b,)
        c, rj = r.chunk(2)
        if idx:
            rc[idx], rr[idx] = c, rj
    if d.world > 1:  # each rank filled its own slice; the others are zero
        both = torch.stack([rc, rr]).to(d.device)
        dist.all_reduce(both)
        rc, rr = both.cpu().unbind(0)
    model.train(was_training)
    return rc, rr


def evaluate_reward(
    model_or_path: Transformer | RewardModel | str | Path,
    prefs: Sequence[Preference | EncodedPair],
    tokenizer: Tokenizer | None = None,
    seq_len: int | None = None,
    batch_size: int = 16,
    overflow: Literal["truncate", "skip"] = "truncate",
    padding: Literal["right", "left"] = "right",
    device: torch.device | str | None = None,
) -> dict:
    """Accuracy of a reward model on preference pairs, per rating bucket and overall (``accuracy_by_rating``:
    the columns of Table 8; feed a dict of these to ``format_accuracy_table``).

    ``model_or_path``: a scalar-head Transformer (then ``tokenizer`` is needed for Preference records), a
    :class:`RewardModel`, or a checkpoint directory. ``prefs``: Preference records (encoded here like training
    data, with ``seq_len`` defaulting to the model's window; pairs that do not fit are left out and reported on
    stderr) or already encoded pairs. One process; ``batch_size`` pairs per forward.
    """
    if isinstance(model_or_path, (str, Path)):
        model_or_path = RewardModel.from_pretrained(model_or_path, device=device or "cpu")
    if isinstance(model_or_path, RewardModel):
        model, tokenizer = model_or_path.model, tokenizer or model_or_path.tokenizer
        seq_len = seq_len or model_or_path.seq_len
    else:
        model = model_or_path
    if unwrap(model).args.head != "scalar":
        raise ValueError("evaluate_reward needs a reward model (scalar head); this model has an LM head")
    seq_len = seq_len or unwrap(model).args.max_seq_len
    to_encode = [p for p in prefs if isinstance(p, Preference)]
    pairs = [p for p in prefs if isinstance(p, EncodedPair)]
    if to_encode:
        if tokenizer is None:
            raise ValueError("evaluate_reward: Preference records need a tokenizer to encode them")
        encoded, stats = encode_preferences(tokenizer, to_encode, seq_len, overflow)
        if stats.kept < stats.total:
            print(f"evaluate_reward: {stats}", file=sys.stderr)
        pairs += encoded
    if not pairs:
        raise ValueError("evaluate_reward: no preference pairs to evaluate")
    dev = next(unwrap(model).parameters()).device
    rc, rr = score_pairs(model, pairs, batch_size, padding, Dist(device=dev), autocast_for(dev))
    return accuracy_by_rating(rc, rr, [p.rating for p in pairs])
