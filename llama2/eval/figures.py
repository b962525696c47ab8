"""Every figure of the evaluation and the pipeline's report, as PNG files (matplotlib, no display needed)."""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the file-only backend)

__all__ = ["plot_loss_curves", "plot_rewards", "plot_stages", "plot_adherence"]


def _save(fig, path: Path) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_loss_curves(curves: dict[str, list[dict]], path: Path) -> None:
    """Training (and validation, where logged) loss against the step, one panel per stage's metrics.jsonl records."""
    fig, axes = plt.subplots(1, len(curves), figsize=(4.5 * len(curves), 3.2), squeeze=False)
    for ax, (name, recs) in zip(axes[0], curves.items()):
        ax.plot([r["step"] for r in recs], [r["loss"] for r in recs], label="train")
        val = [r for r in recs if "val_loss" in r]
        if val:
            ax.plot([r["step"] for r in val], [r["val_loss"] for r in val], "o-", label="validation")
        ax.set_title(f"{name} loss")
        ax.set_xlabel("step")
        ax.legend()
    _save(fig, path)


def plot_rewards(stages: dict[str, dict], best_of_k: dict[str, list[float]], path: Path,
                 xlabel: str = "reward model score (R_c, after sigmoid)", value_range: tuple[float, float] | None = (0, 1)) -> None:
    """Figure 20's shape (the reward distribution of held-out prompts' answers per stage) beside Figure 7's (the
    best-of-K reward of rejection sampling)."""
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.2))
    for stage, s in stages.items():
        axes[0].hist(s["rm_reward"], bins=20, range=value_range, histtype="step", label=stage, density=True)
    axes[0].set_title("reward of held-out prompts' answers")
    axes[0].set_xlabel(xlabel)
    axes[0].legend(fontsize=7)
    for name, curve in best_of_k.items():
        axes[1].plot(range(1, len(curve) + 1), curve, "o-", label=name)
    axes[1].set_title("best-of-K reward (rejection sampling)")
    axes[1].set_xlabel("K samples")
    axes[1].legend(fontsize=7)
    _save(fig, path)


def plot_stages(stages: dict[str, dict], path: Path) -> None:
    """Task accuracy per category and refusal rates, stage by stage."""
    names = list(stages)
    cats = list(next(iter(stages.values()))["accuracy"])
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.2))
    for cat in cats:
        axes[0].plot(names, [stages[s]["accuracy"][cat] for s in names], "o-", label=cat)
    axes[0].set_title("task accuracy (held out)")
    axes[1].plot(names, [stages[s]["refusal_on_secret"] for s in names], "o-", label="refuses secret prompts")
    axes[1].plot(names, [stages[s]["refusal_on_harmless"] for s in names], "o-", label="refuses harmless prompts")
    axes[1].set_title("safety")
    for ax in axes:
        ax.legend(fontsize=7)
        ax.tick_params(axis="x", labelsize=7)
    _save(fig, path)


def plot_adherence(result: dict, path: Path) -> None:
    """Share of answers following an instruction given once, turn by turn (the comparison of Figure 28)."""
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for name, ys in result["adherence"].items():
        ax.plot(result["turns"], [float("nan") if y is None else y for y in ys], marker="o", label=name)
    ax.set_xlabel("dialog turn")
    ax.set_ylabel("answers following the instruction")
    ax.set_ylim(-0.05, 1.05)
    ax.set_title("Instruction given once, followed turn by turn")
    ax.legend()
    _save(fig, path)
