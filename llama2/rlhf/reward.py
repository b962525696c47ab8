"""Reward-model arithmetic: the binary ranking loss with a rating-dependent margin, and accuracy per rating.

Paper §3.2.2 ("Training Objectives"). The reward model r_theta(x, y) scores a prompt x and a response y with
one scalar. It is trained on pairs (y_c chosen, y_r rejected) with the binary ranking loss of Ouyang et al.
(2022), eq. (1):

    L_ranking = -log(sigma(r_theta(x, y_c) - r_theta(x, y_r)))

and, since annotators also rate *how much* better y_c is, with a margin m(r) that is "a discrete function of
the preference rating", eq. (2):

    L_ranking = -log(sigma(r_theta(x, y_c) - r_theta(x, y_r) - m(r)))

so pairs with distinct responses must be separated by more. Table 27 gives the two margin tables that were
tried (small and large); Table 28 reports the small one as the better trade-off on the "negligibly better /
unsure" pairs. Table 8 reports the accuracy of each reward model per rating bucket, with "negligibly better"
and "unsure" merged into one column.

Scores here are plain tensors: ``r_chosen`` and ``r_rejected`` of shape (B,), one scalar per pair, e.g. the
scalar head of :class:`llama2.Transformer` gathered at the last real token of each sequence
(:func:`llama2.data.preferences.gather_last`).
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Literal

import torch
import torch.nn.functional as F

from ..data.records import RATINGS  # the four-point scale of §3.2.1, defined with the preference records

__all__ = [
    "RATINGS",
    "MARGINS",
    "TABLE8_BUCKETS",
    "margin_values",
    "ranking_loss",
    "safety_auxiliary_loss",
    "centring_loss",
    "accuracy_by_rating",
    "format_accuracy_table",
]


MarginType = Literal["none", "small", "large"]

# Table 27: "Two variants of preference rating based margin with different magnitude."
#                     Significantly Better  Better  Slightly Better  Negligibly Better / Unsure
#   Margin Small               1             2/3         1/3                   0
#   Margin Large               3              2           1                    0
MARGINS: dict[str, dict[str, float]] = {
    "none": {r: 0.0 for r in RATINGS},
    "small": {"significantly_better": 1.0, "better": 2 / 3, "slightly_better": 1 / 3,
              "negligibly_better": 0.0, "unsure": 0.0},
    "large": {"significantly_better": 3.0, "better": 2.0, "slightly_better": 1.0,
              "negligibly_better": 0.0, "unsure": 0.0},
}

# Table 8's columns, in its order; "overall" (the table's "Avg") is added by accuracy_by_rating.
TABLE8_BUCKETS: tuple[str, ...] = ("significantly_better", "better", "slightly_better", "negligibly_better_or_unsure")
_BUCKET_OF = {
    "significantly_better": "significantly_better",
    "better": "better",
    "slightly_better": "slightly_better",
    "negligibly_better": "negligibly_better_or_unsure",
    "unsure": "negligibly_better_or_unsure",
}
_COLUMN_TITLES = {
    "significantly_better": "Significantly Better",
    "better": "Better",
    "slightly_better": "Slightly Better",
    "negligibly_better_or_unsure": "Negligibly Better / Unsure",
    "overall": "Avg",
}


def _check_rating(rating: object, i: int) -> str:
    if not isinstance(rating, str) or rating not in _BUCKET_OF:
        raise ValueError(f"ratings[{i}]: unknown rating {rating!r} (expected one of {', '.join(RATINGS)})")
    return rating  # type: ignore[return-value]


def margin_values(
    ratings: Sequence[str],
    margin: MarginType,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """m(r) of eq. (2) for each pair: a (B,) tensor read from Table 27 ("none" gives zeros, i.e. eq. (1))."""
    if margin not in MARGINS:
        raise ValueError(f"margin must be one of {', '.join(MARGINS)}, got {margin!r}")
    table = MARGINS[margin]
    values = [table[_check_rating(r, i)] for i, r in enumerate(ratings)]
    return torch.tensor(values, dtype=dtype, device=device)  # (B,)


def ranking_loss(
    r_chosen: torch.Tensor,
    r_rejected: torch.Tensor,
    margin_values: torch.Tensor | None = None,
) -> torch.Tensor:
    """Mean over pairs of -log sigmoid(r_c - r_r - m), paper eq. (1) (no margin) and eq. (2).

    r_chosen, r_rejected: (B,) scores; margin_values: (B,) margins (see :func:`margin_values`) or None.
    Computed in fp32 with ``logsigmoid``, which is exact for large gaps of either sign (no log(0)).
    """
    if r_chosen.shape != r_rejected.shape:
        raise ValueError(f"r_chosen {tuple(r_chosen.shape)} and r_rejected {tuple(r_rejected.shape)} differ in shape")
    diff = r_chosen.float() - r_rejected.float()  # (B,)
    if margin_values is not None:
        if margin_values.shape != diff.shape:
            raise ValueError(f"margin_values {tuple(margin_values.shape)} must match the scores {tuple(diff.shape)}")
        diff = diff - margin_values.to(diff.device, torch.float32)
    return -F.logsigmoid(diff).mean()


def centring_loss(r_chosen: torch.Tensor, r_rejected: torch.Tensor) -> torch.Tensor:
    """Mean over pairs of (r_c + r_r)^2: keeps a reward model's scores near 0. The ranking loss, eq. (1)-(2), sees
    only differences, so without it the scores' offset drifts freely and sigmoid(score) can crowd 0 or 1 (Eisenstein
    et al. 2023, "Helping or Herding?", whose reward centring TRL calls ``center_rewards_coefficient``). Not in the
    Llama 2 paper, which anchors only the safety reward model (appendix A.3.4)."""
    if r_chosen.shape != r_rejected.shape:
        raise ValueError(f"r_chosen {tuple(r_chosen.shape)} and r_rejected {tuple(r_rejected.shape)} differ in shape")
    return (r_chosen.float() + r_rejected.float()).pow(2).mean()


def safety_auxiliary_loss(scores: torch.Tensor, safe: torch.Tensor) -> torch.Tensor:
    """Summed binary cross-entropy of the scores of responses labelled safe (target 1) or unsafe (target 0):
    the auxiliary loss of the safety reward model (Llama 2, appendix A.3.4).

    The ranking loss only sees score *differences*, so it leaves each prompt's offset free, and "R_s < 0.15"
    (the sigmoid of a raw score) would fire arbitrarily. The paper adds a term on responses whose safety is
    labelled so that a raw score below 0 (0.5 after the sigmoid) means unsafe: it "improves the recall of unsafe
    responses when using a reward score of 0.5 as the threshold (negative before Sigmoid)". Our reading, for a
    pair: -[1(y_c safe) log sigma(r_c)] - [1(y_r unsafe) log(1 - sigma(r_r))], applied here to every labelled
    response (a safe rejected one counts as safe, an unsafe chosen one as unsafe): the labels say what each
    response is, whichever side of the pair it is on.

    scores: (N,) raw scores; safe: (N,) 1 safe, 0 unsafe, -1 not labelled. Returns a scalar sum (0 when no
    response is labelled)."""
    known = safe >= 0
    if not bool(known.any()):
        return scores.sum() * 0.0
    x, y = scores.float()[known], safe[known].to(scores.device, torch.float32)
    return F.binary_cross_entropy_with_logits(x, y, reduction="sum")


def accuracy_by_rating(
    r_chosen: torch.Tensor | Sequence[float],
    r_rejected: torch.Tensor | Sequence[float],
    ratings: Sequence[str],
) -> dict[str, dict[str, float | int | None]]:
    """Accuracy of a reward model per rating bucket (the columns of Table 8) and overall (its "Avg").

    A pair counts as correct when r_chosen > r_rejected. Our choice: a tie counts as wrong, since the model
    has not preferred the chosen response (and a constant model must not score 100%).

    Returns ``{bucket: {"n": pairs, "correct": pairs ranked right, "accuracy": correct / n or None if n == 0}}``
    for every bucket of :data:`TABLE8_BUCKETS` (negligibly better and unsure merged, as the paper does) and
    "overall". The counts let a caller add up results over batches.
    """
    rc = torch.as_tensor(r_chosen, dtype=torch.float32).detach().cpu().reshape(-1)
    rr = torch.as_tensor(r_rejected, dtype=torch.float32).detach().cpu().reshape(-1)
    if rc.shape != rr.shape or len(ratings) != rc.numel():
        raise ValueError(f"got {rc.numel()} chosen scores, {rr.numel()} rejected scores and {len(ratings)} ratings")
    correct = (rc > rr).tolist()
    counts = {b: [0, 0] for b in (*TABLE8_BUCKETS, "overall")}  # bucket -> [n, correct]
    for i, (rating, ok) in enumerate(zip(ratings, correct)):
        for b in (_BUCKET_OF[_check_rating(rating, i)], "overall"):
            counts[b][0] += 1
            counts[b][1] += int(ok)
    return {b: {"n": n, "correct": c, "accuracy": c / n if n else None} for b, (n, c) in counts.items()}


def format_accuracy_table(results: Mapping[str, Mapping[str, Mapping[str, float | int | None]]]) -> str:
    """A markdown table in the layout of Table 8: one row per model, accuracy in percent per rating bucket + Avg.

    ``results`` maps a model name (e.g. "helpfulness RM (margin small)") to the output of
    :func:`accuracy_by_rating`. An empty bucket shows as "-".
    """
    columns = (*TABLE8_BUCKETS, "overall")
    header = ["Model"] + [_COLUMN_TITLES[c] for c in columns]
    rows = []
    for name, acc in results.items():
        cells = [str(name)]
        for c in columns:
            a = acc.get(c, {}).get("accuracy")
            cells.append("-" if a is None else f"{100 * a:.1f}")
        rows.append(cells)
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]

    def line(cells: list[str]) -> str:
        padded = [cells[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(cells[1:], widths[1:])]
        return "| " + " | ".join(padded) + " |"

    rule = "|" + "|".join(["-" * (widths[0] + 2)] + ["-" * (w + 1) + ":" for w in widths[1:]]) + "|"
    return "\n".join([line(header), rule, *(line(r) for r in rows)])
