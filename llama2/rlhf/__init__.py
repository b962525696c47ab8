"""Losses and reward arithmetic of the RLHF stages (paper §3.2): the margin ranking loss of the reward models and
their accuracy per preference rating (:mod:`~llama2.rlhf.reward`); the combined safety/helpfulness reward and
whitening (:mod:`~llama2.rlhf.combined`); the KL penalty, GAE and clipped PPO losses (:mod:`~llama2.rlhf.ppo`);
rejection-sampling bookkeeping (:mod:`~llama2.rlhf.rejection`); Ghost Attention data (:mod:`~llama2.rlhf.gatt`)."""
from __future__ import annotations

from . import gatt
from .combined import SAFETY_THRESHOLD, combined_reward, combined_score, logit, masked_mean, masked_whiten, to_unit
from .ppo import (
    entropy_from_logits, explained_variance, gae, kl_penalty, ppo_policy_loss, token_logprobs, token_rewards,
    value_loss,
)
from .rejection import expected_max_reward, keep_best_across_iterations
from .reward import MARGINS, RATINGS, TABLE8_BUCKETS, accuracy_by_rating, format_accuracy_table, margin_values, ranking_loss

__all__ = [
    "gatt", "RATINGS", "MARGINS", "TABLE8_BUCKETS", "margin_values", "ranking_loss", "accuracy_by_rating",
    "format_accuracy_table", "SAFETY_THRESHOLD", "to_unit", "logit", "combined_reward", "combined_score",
    "masked_mean", "masked_whiten", "kl_penalty", "token_rewards", "gae",
    "ppo_policy_loss", "value_loss", "token_logprobs", "entropy_from_logits", "explained_variance",
    "keep_best_across_iterations", "expected_max_reward",
]
