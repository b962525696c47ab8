"""Every figure of the evaluation and the pipeline's report, as PNG files (matplotlib, no display needed)."""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the file-only backend)

__all__ = ["plot_loss_curves", "plot_rewards", "plot_stages", "plot_adherence", "plot_winrates", "plot_ppo"]


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


def plot_rewards(stages: dict[str, dict], selection: dict | None, best_of_k: dict[str, list[float]], path: Path) -> None:
    """Figure 20's shape (the distribution of the evaluation answers' reward per stage: the reward models', or the
    judges' where there are none) beside Figure 7's (best of K: the reward models' max and median reward among K
    answers, and what the judges give the reward models' pick and their own; or rejection sampling's curves)."""
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.2))
    key = "rm" if all("rm" in s.get("per_item", {}) for s in stages.values()) else "judge"
    for stage, s in stages.items():
        values = [x for item in s.get("per_item", {}).get(key, []) for x in item]
        axes[0].hist(values, bins=20, range=(0, 1), histtype="step", label=stage, density=True)
    axes[0].set_title("reward of the evaluation answers")
    axes[0].set_xlabel("R_c (after the sigmoid)" + (", reward models" if key == "rm" else ", the judges"))
    axes[0].legend(fontsize=7)
    if selection:
        for name, label in (("rm_max", "RM reward, max"), ("rm_median", "RM reward, median"),
                            ("judge_of_rm_pick", "judges, RM pick"), ("judge_max", "judges, best (oracle)")):
            axes[1].plot(selection["n"], selection[name], "o-", label=label)
        axes[1].set_title("best of K (SFT answers, held-out items)")
    else:
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


def plot_winrates(winrate: dict[str, dict], path: Path) -> None:
    """Win / tie / loss bars against SFT with the win rate's 95% interval (the layout of the paper's Figure 12)."""
    names = list(winrate)
    fig, ax = plt.subplots(figsize=(7, 0.5 + 0.45 * len(names)))
    left = [0.0] * len(names)
    for part, colour in (("win", "tab:green"), ("tie", "lightgrey"), ("loss", "tab:red")):
        widths = [winrate[n][part] / winrate[n].get("answers", winrate[n]["n"]) for n in names]
        ax.barh(names, widths, left=left, color=colour, label=part)
        left = [a + b for a, b in zip(left, widths)]
    for i, n in enumerate(names):
        r = winrate[n]
        ax.errorbar(r["rate"], i, xerr=[[r["rate"] - r["low95"]], [r["high95"] - r["rate"]]], fmt="o", color="black",
                    capsize=3)
    ax.axvline(0.5, color="black", lw=0.8, ls=":")
    ax.set_xlim(0, 1)
    ax.set_xlabel("share of the answers to held-out items (dot: win rate with its 95% interval)")
    ax.set_title("judged against the SFT model")
    ax.legend(fontsize=7, loc="lower right")
    _save(fig, path)


def plot_ppo(records: list[dict], path: Path) -> None:
    """PPO per iteration: reward, KL to the reference, clip fraction, entropy, value explained variance, and the
    correlation of the advantages with the reward."""
    keys = [k for k in ("reward", "kl", "clip_fraction", "entropy", "explained_variance", "adv_reward_corr")
            if any(k in r for r in records)]
    fig, axes = plt.subplots(1, len(keys), figsize=(2.6 * len(keys), 2.6), squeeze=False)
    for ax, k in zip(axes[0], keys):
        pts = [(r["step"], r[k]) for r in records if k in r]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", ms=3)
        held = [(r["step"], r["heldout_reward"]) for r in records if k == "reward" and "heldout_reward" in r]
        if held:
            ax.plot([p[0] for p in held], [p[1] for p in held], "s--", ms=3, label="held out")
            ax.legend(fontsize=6)
        ax.set_title(k.replace("_", " "), fontsize=8)
        ax.set_xlabel("iteration", fontsize=7)
        ax.tick_params(labelsize=6)
    _save(fig, path)
