"""Losses and reward arithmetic of the RLHF stages (paper §3.2): the margin ranking loss of the reward models and
their accuracy per preference rating (:mod:`llama2.rlhf.reward`); the combined safety/helpfulness reward, KL
penalty, GAE, clipped PPO losses and rejection-sampling bookkeeping (:mod:`llama2.rlhf.ppo`)."""
from __future__ import annotations

from .ppo import (
    PAPER_KL_BETA,
    SAFETY_THRESHOLD,
    best_of,
    combined_reward,
    entropy_from_logits,
    expected_max_reward,
    gae,
    keep_best_across_iterations,
    kl_penalty,
    logit,
    masked_mean,
    masked_whiten,
    ppo_policy_loss,
    ppo_score,
    to_unit,
    token_logprobs,
    token_rewards,
    value_loss,
    whiten,
)
from .reward import (
    MARGINS,
    RATINGS,
    TABLE8_BUCKETS,
    accuracy_by_rating,
    format_accuracy_table,
    margin_values,
    ranking_loss,
)

from . import gatt  # Ghost Attention data: instructions with rule checkers, training dialogs, adherence

__all__ = [
    "gatt",
    "RATINGS",
    "MARGINS",
    "TABLE8_BUCKETS",
    "margin_values",
    "ranking_loss",
    "accuracy_by_rating",
    "format_accuracy_table",
    # ppo
    "PAPER_KL_BETA",
    "SAFETY_THRESHOLD",
    "to_unit",
    "logit",
    "combined_reward",
    "whiten",
    "masked_mean",
    "masked_whiten",
    "ppo_score",
    "kl_penalty",
    "token_rewards",
    "gae",
    "ppo_policy_loss",
    "value_loss",
    "token_logprobs",
    "entropy_from_logits",
    "best_of",
    "keep_best_across_iterations",
    "expected_max_reward",
]
