"""Losses and reward arithmetic of the RLHF stages (paper §3.2): the margin ranking loss of the reward models and
their accuracy per preference rating (:mod:`llama2.rlhf.reward`)."""
from __future__ import annotations

from .reward import (
    MARGINS,
    RATINGS,
    TABLE8_BUCKETS,
    accuracy_by_rating,
    format_accuracy_table,
    margin_values,
    ranking_loss,
)

__all__ = [
    "RATINGS",
    "MARGINS",
    "TABLE8_BUCKETS",
    "margin_values",
    "ranking_loss",
    "accuracy_by_rating",
    "format_accuracy_table",
]
