"""Rejection-sampling bookkeeping (Llama 2 §3.2.3, "Rejection Sampling"): K outputs are sampled per prompt and
the one with the highest reward is kept for the next round of fine-tuning; later iterations draw on
"top-performing samples from all prior iterations" (both in :func:`keep_best_across_iterations`). Figure 7 plots
the max reward among N samples against N (:func:`expected_max_reward`).
"""
from __future__ import annotations

import math
from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import torch

__all__ = ["keep_best_across_iterations", "expected_max_reward"]


def keep_best_across_iterations(
    previous: Mapping[Hashable, tuple[float, Any]],
    new: Mapping[Hashable, Sequence[tuple[float, Any]]],
) -> dict[Hashable, tuple[float, Any]]:
    """The best (score, sample) per prompt over all rejection-sampling iterations so far.

    The paper's fix for the regressions of training each iteration only on the previous one's samples: "we
    modified our strategy, incorporating top-performing samples from all prior iterations, such as those used
    in RLHF-V1 and RLHF-V2" (§3.2.3). ``previous`` maps a prompt id to the best (score, sample) kept so far;
    ``new`` maps a prompt id to this iteration's scored samples. Returns a new dict over the union of prompt
    ids; neither input is changed. Ties keep the earlier sample (previous, then the first in ``new``), so a
    re-run does not churn the data.

    Scores must come from one reward model to be comparable across iterations: if the reward model changed
    between iterations, re-score ``previous`` with the new one before calling.
    """
    best: dict[Hashable, tuple[float, Any]] = {k: (float(s), x) for k, (s, x) in previous.items()}
    for prompt_id, candidates in new.items():
        for score, sample in candidates:
            s = float(score)
            if prompt_id not in best or s > float(best[prompt_id][0]):
                best[prompt_id] = (s, sample)
    return best


def expected_max_reward(scores: torch.Tensor) -> torch.Tensor:
    """Figure 7's "max reward among N samples" curve: (N_prompts, K) scores -> (K,), entry k-1 for N = k.

    For each prompt, the expected maximum over k samples drawn without replacement from its K samples, averaged
    over prompts. Rather than use the first k samples only (noisy), this is the unbiased estimate over all
    C(K, k) subsets, from the order statistics: with the scores sorted s_(1) <= ... <= s_(K), s_(i) is the max
    of exactly C(i - 1, k - 1) of the subsets of size k, so

        E[max of k] = sum_{i=k}^{K} C(i - 1, k - 1) / C(K, k) * s_(i).

    The weights are exact Python integer ratios rounded once to float64, so large K is fine.
    """
    if scores.dim() != 2 or scores.shape[1] == 0:
        raise ValueError(f"scores must be (N_prompts, K) with K >= 1, got {tuple(scores.shape)}")
    K = scores.shape[1]
    s = scores.double().sort(dim=1).values  # (N, K) ascending: s_(1) .. s_(K)
    weights = torch.tensor(
        [[math.comb(i - 1, k - 1) / math.comb(K, k) for i in range(1, K + 1)] for k in range(1, K + 1)],
        dtype=torch.float64, device=scores.device,
    )  # (K, K): row k-1 holds the weight of s_(i) in E[max of k]; zero for i < k
    return (s @ weights.T).mean(dim=0).to(scores.dtype if scores.is_floating_point() else torch.float32)  # (K,)
