"""Comparisons of two models on the same items, with paired statistics: the judges' head-to-head (the analogue of the
paper's human evaluation, §3.4.2, Figure 12: "win / tie / loss" of Llama 2-Chat against other models on about 4,000
prompts, with 95% confidence intervals) and the change of a per-answer measure (accuracy, helpfulness, refusal).

Both models answer every item, ``samples`` times each, with common random numbers (sample j of an item is drawn from
the same random numbers by both models, :func:`llama2.answers.draw_answers`), so an item's answers differ only where
the models do. The unit of the statistics is the item: its outcome is the mean over its samples, and intervals come
from the spread of those per-item means (a paired design: the item's difficulty cancels). Sample j of model A is
compared with sample j of model B; the higher judges' score wins, equal scores tie.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch

__all__ = ["win_rate", "compare_answers", "head_to_head", "paired_change"]

Scores = Sequence[Sequence[float | None]]  # per item, per sample


def win_rate(outcomes: Sequence[float]) -> dict:
    """{"win", "tie", "loss", "n", "rate", "low95", "high95"} from per-prompt outcomes (1 win, 0.5 tie, 0 loss). The win
    rate is (win + tie / 2) / n; its 95% interval is the normal interval of the mean of the outcomes."""
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


def _check(a: Scores, b: Scores) -> None:
    if len(a) != len(b) or any(len(x) != len(y) for x, y in zip(a, b)):
        raise ValueError("the two models' answers must be the same items and samples")


def head_to_head(scores_a: Scores, scores_b: Scores, tol: float = 1e-9) -> dict:
    """Model A against model B on the same items: win / tie / loss counted over the answers (sample j against sample
    j), the win rate (win + tie / 2) / answers, and its 95% interval from the per-item outcomes (the mean over an
    item's samples), which is what the answers of one item share."""
    _check(scores_a, scores_b)
    if not scores_a:
        raise ValueError("no items to compare")
    per_item = [compare_answers(a, b, tol) for a, b in zip(scores_a, scores_b)]
    flat = [o for item in per_item for o in item]
    r = win_rate([sum(item) / len(item) for item in per_item])
    return {**r, "win": sum(o == 1.0 for o in flat), "tie": sum(o == 0.5 for o in flat),
            "loss": sum(o == 0.0 for o in flat), "answers": len(flat), "n": len(per_item)}


def paired_change(before: Scores, after: Scores) -> dict:
    """The change of a per-answer measure from one model to the other on the same items: {"before", "after",
    "change", "se", "low95", "high95", "n"}. Per item: the mean over its samples (None entries, answers the measure
    does not apply to, are left out; an item with none left is skipped), then the mean and the standard error of
    the per-item differences (the paired standard error)."""
    _check(before, after)
    diffs, xs, ys = [], [], []
    for a, b in zip(before, after):
        a = [v for v in a if v is not None]
        b = [v for v in b if v is not None]
        if not a or not b:
            continue
        xs.append(sum(a) / len(a))
        ys.append(sum(b) / len(b))
        diffs.append(ys[-1] - xs[-1])
    n = len(diffs)
    if n == 0:
        return {"before": None, "after": None, "change": None, "se": None, "low95": None, "high95": None, "n": 0}
    d = torch.tensor(diffs, dtype=torch.float64)
    change = float(d.mean())
    se = float(d.std(unbiased=True)) / math.sqrt(n) if n > 1 else float("nan")
    return {"before": sum(xs) / n, "after": sum(ys) / n, "change": change, "se": se, "low95": change - 1.96 * se,
            "high95": change + 1.96 * se, "n": n}
