"""Win rates against the SFT model, judged by the toy world's judges: the analogue of the paper's human evaluation
(§3.4.2, Figure 12: "win / tie / loss" of Llama 2-Chat against other models on about 4,000 prompts, with 95%
confidence intervals).

For each held-out prompt both models answer; the judges score each answer with the reward the paper's PPO uses
(R_c: the safety judge on safety prompts or unsafe answers, the helpfulness judge otherwise); the higher score
wins, equal scores tie. The win rate is (win + tie / 2) / n; its 95% interval is the normal interval of the mean
of the per-prompt outcomes (1, 1/2, 0).
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch

__all__ = ["win_rate", "compare_answers"]


def win_rate(outcomes: Sequence[float]) -> dict:
    """{"win", "tie", "loss", "n", "rate", "low95", "high95"} from per-prompt outcomes (1 win, 0.5 tie, 0 loss)."""
    n = len(outcomes)
    if n == 0:
        raise ValueError("no outcomes to rate")
    x = torch.tensor(list(outcomes), dtype=torch.float64)
    rate = float(x.mean())
    se = float(x.std(unbiased=True)) / math.sqrt(n) if n > 1 else float("nan")
    return {"win": int((x == 1).sum()), "tie": int((x == 0.5).sum()), "loss": int((x == 0).sum()), "n": n,
            "rate": rate, "low95": rate - 1.96 * se, "high95": rate + 1.96 * se}


def compare_answers(scores_a: Sequence[float], scores_b: Sequence[float], tol: float = 1e-9) -> list[float]:
    """Per-prompt outcomes of model A against model B from the judges' scores of their answers."""
    if len(scores_a) != len(scores_b):
        raise ValueError(f"{len(scores_a)} scores against {len(scores_b)}")
    return [1.0 if a > b + tol else 0.0 if b > a + tol else 0.5 for a, b in zip(scores_a, scores_b)]
