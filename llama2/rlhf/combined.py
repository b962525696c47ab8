"""The combined safety/helpfulness reward of PPO and rejection sampling (Llama 2 §3.2.3), and whitening.

PPO optimises the reward of eq. 4

    R(g | p) = R~_c(g | p) - beta * D_KL(pi_theta(g | p) || pi_0(g | p)),    R~_c = WHITEN(LOGIT(R_c))

where R_c is the piecewise combination of the two reward models

    R_c(g | p) = R_s(g | p)   if IS_SAFETY(p) or R_s(g | p) < 0.15
                 R_h(g | p)   otherwise

("we also find it important to whiten the final linear scores (shown here by reversing the sigmoid with the
logit function) in order to increase stability"). Rejection sampling ranks its K samples by the same R_c.
:func:`combined_score` is the one place where the two reward models' scores are combined.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

__all__ = [
    "SAFETY_THRESHOLD", "to_unit", "logit", "combined_reward", "combined_score", "score_with_reward_models",
    "masked_mean", "masked_whiten",
]

# The R_s threshold of the piecewise R_c: below it a response is treated as unsafe whatever the prompt.
SAFETY_THRESHOLD = 0.15


def to_unit(scores: torch.Tensor) -> torch.Tensor:
    """Map reward-model scores to (0, 1) with a sigmoid.

    Our reward models output unbounded logits: they are trained with -log sigmoid(r_c - r_r - m)
    (:func:`llama2.rlhf.reward.ranking_loss`), so only score differences are pinned down, and sigmoid(r) is the
    model's probability that the response beats a zero-score one. The paper's 0.15 threshold on R_s only has a
    meaning on that (0, 1) scale, which is why R_c is defined there and R~_c of eq. 4 reverses the sigmoid with
    a logit afterwards.
    """
    return torch.sigmoid(scores.float())


def logit(p: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """log(p / (1 - p)), the inverse of the sigmoid: eq. 4's LOGIT, "reversing the sigmoid".

    p is clamped to [eps, 1 - eps] first, so a score that saturated to exactly 0 or 1 in fp32 (|logit| above
    about 17) gives a finite |logit| <= log((1 - eps) / eps) (13.8 for the default) instead of inf.
    """
    p = p.float().clamp(eps, 1.0 - eps)
    return torch.log(p) - torch.log1p(-p)


def safety_decides(r_safety: torch.Tensor, other: torch.Tensor, is_safety_prompt: torch.Tensor,
                   threshold: float = SAFETY_THRESHOLD) -> torch.Tensor:
    """The 0.15 rule of §3.2.3 as a (B,) mask: where the safety model's reward R_s (in (0, 1)) is the one that
    counts: on every prompt tagged safety and on any response it judges unsafe (R_s < threshold). ``other``, the
    helpfulness scores, is only checked for its shape."""
    if r_safety.shape != other.shape or r_safety.shape != is_safety_prompt.shape:
        raise ValueError(f"safety {tuple(r_safety.shape)}, helpfulness {tuple(other.shape)} and "
                         f"is_safety_prompt {tuple(is_safety_prompt.shape)} must have one shape")
    return is_safety_prompt.bool() | (r_safety < threshold)


def combined_reward(
    r_safety: torch.Tensor,
    r_helpfulness: torch.Tensor,
    is_safety_prompt: torch.Tensor,
    threshold: float = SAFETY_THRESHOLD,
) -> torch.Tensor:
    """The piecewise R_c of §3.2.3 (under eq. 4): R_s if the prompt is tagged safety or R_s < threshold, else R_h.

    r_safety, r_helpfulness: (B,) scores already in (0, 1) (see :func:`to_unit`); is_safety_prompt: (B,) bool,
    the prompt's tag from the data (prompts that might elicit unsafe responses). Returns (B,).
    The safety model thus overrides helpfulness both on every safety prompt and on any response it judges
    unsafe (R_s < 0.15, chosen in the paper for a precision of 0.89 and recall of 0.55 on the Meta Safety test
    set).
    """
    return torch.where(safety_decides(r_safety, r_helpfulness, is_safety_prompt, threshold), r_safety, r_helpfulness)


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean of x over the positions where mask is 1 (over ``dim``, or over everything when dim is None).

    An all-zero mask gives 0 rather than nan (the sum of nothing over a count clamped to 1).
    """
    mask = mask.to(x.dtype)
    if dim is None:
        return (x * mask).sum() / mask.sum().clamp_min(1.0)
    return (x * mask).sum(dim) / mask.sum(dim).clamp_min(1.0)


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, eps: float = 1e-8) -> torch.Tensor:
    """(x - mean) / sqrt(var + eps), the mean and (population) variance taken over the masked positions only:
    eq. 4's WHITEN, applied to the advantages, whose padding must not enter the statistics. Masked-out positions
    come back 0. With ``shift_mean=False`` the mean is added back: only the scale is normalised. (The scores'
    WHITEN is :func:`llama2.rlhf.ppo.score_scale` with :func:`llama2.rlhf.ppo.to_whitened`, which keep the batch's
    statistics to put the value model on the same scale.)
    """
    x = x.float()
    m = mask.to(x.dtype)
    mean = masked_mean(x, m)
    var = masked_mean((x - mean).pow(2), m)
    out = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return out * m


def combined_score(
    safety_scores: torch.Tensor | None,
    helpfulness_scores: torch.Tensor | None,
    is_safety_prompt: torch.Tensor,
    threshold: float = SAFETY_THRESHOLD,
) -> torch.Tensor:
    """R_c in raw (logit) units: the safety model's raw score where the 0.15 rule picks it, else the helpfulness
    model's. LOGIT(R_c) of eq. 4 is exactly this score; taking it directly avoids the sigmoid-then-logit round
    trip, which saturates in fp32 (|score| above about 17) and is clamped by :func:`logit` at about 13.8.

    Either model may be missing (None): the other then judges every answer. Scores (B,); returns (B,) float32.
    """
    if safety_scores is None and helpfulness_scores is None:
        raise ValueError("combined_score needs at least one reward model's scores")
    if safety_scores is None:
        return helpfulness_scores.float()
    if helpfulness_scores is None:
        return safety_scores.float()
    use_safety = safety_decides(to_unit(safety_scores), helpfulness_scores, is_safety_prompt, threshold)  # (B,)
    return torch.where(use_safety, safety_scores.float(), helpfulness_scores.float())


def score_with_reward_models(
    reward_models: Mapping[str, object],
    dialogs: Sequence,
    answers: Sequence[str],
    is_safety_prompt: torch.Tensor,
    threshold: float = SAFETY_THRESHOLD,
) -> dict[str, torch.Tensor | None]:
    """Score answers with the reward models present in ``reward_models`` ({"helpfulness": RewardModel,
    "safety": RewardModel}, either optional) and combine them: {"helpfulness", "safety" (raw scores or None),
    "combined" (R_c, raw units, :func:`combined_score`)}, each (B,)."""
    r_h = reward_models["helpfulness"].score(dialogs, answers) if "helpfulness" in reward_models else None
    r_s = reward_models["safety"].score(dialogs, answers) if "safety" in reward_models else None
    return {"helpfulness": r_h, "safety": r_s,
            "combined": combined_score(r_s, r_h, torch.as_tensor(is_safety_prompt).bool(), threshold)}

