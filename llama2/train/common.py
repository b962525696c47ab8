"""What every training stage shares: the paper's optimizer and schedule, and resumable checkpoints.

Optimizer and schedule are those of Llama 2 §2.2: AdamW (beta1 0.9, beta2 0.95, eps 1e-5), weight decay 0.1,
gradient clipping 1.0, linear warmup then cosine decay of the learning rate down to 10% of its peak.
"""
from __future__ import annotations

import math
import os
import shutil
from pathlib import Path

import torch

__all__ = ["make_optimizer", "lr_at", "save_training_state", "load_training_state", "latest_checkpoint", "publish"]


def make_optimizer(model: torch.nn.Module, lr: float, weight_decay: float = 0.1, betas=(0.9, 0.95), eps: float = 1e-5):
    """AdamW with weight decay on matrices only (embeddings and projections); norms' gains and biases are not
    decayed (the paper does not say; decaying a gain towards 0 has no regularising meaning, so common practice)."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.dim() >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, foreach=True)


def lr_at(step: int, peak: float, warmup: int, total: int, min_ratio: float = 0.1) -> float:
    """Learning rate at optimizer step ``step`` (0-based): linear warmup over ``warmup`` steps to ``peak``,
    then cosine decay reaching ``min_ratio * peak`` at ``total`` (Llama 2 §2.2: 2000 warmup steps, final
    learning rate 10% of the peak)."""
    if warmup > 0 and step < warmup:
        return peak * (step + 1) / warmup
    if total <= warmup:
        return peak
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return peak * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def _rng_state() -> dict:
    # Batches are drawn from per-step seeded generators, so the global torch RNG is all that is left to keep.
    return {"torch": torch.get_rng_state()}


def save_training_state(directory: Path, optimizer: torch.optim.Optimizer, step: int, extra: dict | None = None) -> None:
    """Optimizer, step and RNG states beside a model checkpoint, as plain tensors and numbers only (so it loads
    with ``torch.load(weights_only=True)``). Written to a temporary file then renamed."""
    state = {"optimizer": optimizer.state_dict(), "step": step, "rng": _rng_state(), "extra": extra or {}}
    tmp = directory / "trainer_state.pt.tmp"
    torch.save(state, tmp)
    os.replace(tmp, directory / "trainer_state.pt")


def load_training_state(directory: Path, optimizer: torch.optim.Optimizer) -> dict:
    state = torch.load(directory / "trainer_state.pt", map_location="cpu", weights_only=True)
    optimizer.load_state_dict(state["optimizer"])
    torch.set_rng_state(state["rng"]["torch"])
    return state


def latest_checkpoint(out: Path) -> Path | None:
    """The newest complete step directory under ``out/checkpoints`` (one holding trainer_state.pt)."""
    root = out / "checkpoints"
    if not root.is_dir():
        return None
    steps = sorted(p for p in root.glob("step_*") if (p / "trainer_state.pt").is_file() and (p / "llama2.json").is_file())
    return steps[-1] if steps else None


def prune_checkpoints(out: Path, keep: int) -> None:
    steps = sorted(p for p in (out / "checkpoints").glob("step_*") if p.is_dir())
    for p in steps[:-keep] if keep > 0 else []:
        shutil.rmtree(p, ignore_errors=True)


def publish(step_dir: Path, out: Path) -> None:
    """Make ``out`` itself a loadable checkpoint: copy the model files of ``step_dir`` to ``out`` (each file
    written beside its target and renamed, so ``out`` always holds a whole model)."""
    for f in step_dir.iterdir():
        if f.is_file() and f.name != "trainer_state.pt":
            tmp = out / (f.name + ".tmp")
            shutil.copyfile(f, tmp)
            os.replace(tmp, out / f.name)
