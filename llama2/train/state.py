"""Checkpoint state of a training run: the model (native format) plus the optimizer, step and RNG, written so that a
kill at any moment leaves the previous checkpoint the newest complete one, and resumable on any number of ranks.

Layout: ``OUT/checkpoints/step_NNNNNN/`` holds the model files and ``trainer_state.pt`` (the last file written: a
step directory without it is incomplete); ``OUT`` itself holds a copy of the newest model, so
``Llama.from_pretrained(OUT)`` works during and after training.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions, get_model_state_dict, get_optimizer_state_dict, set_optimizer_state_dict,
)

from ..checkpoint import save
from ..model import Transformer
from .dist import Dist

__all__ = [
    "save_training_state", "load_training_state", "latest_checkpoint", "prune_checkpoints", "publish", "full_state",
    "load_full_optimizer_state", "state_to_model", "save_checkpoint",
]


def _rng_state() -> dict:
    # Batches are drawn from per-step seeded generators, so the global torch RNG is all that is left to keep.
    return {"torch": torch.get_rng_state()}


def save_training_state(directory: Path, optimizer_state: dict, step: int, extra: dict | None = None) -> None:
    """Optimizer (name-keyed, from ``full_state``), step and RNG states beside a model checkpoint, as plain
    tensors and numbers only (so it loads with ``torch.load(weights_only=True)``). Written to a temporary file
    then renamed, so a kill mid-write leaves no trainer_state.pt and the directory does not count as complete."""
    state = {"optimizer": optimizer_state, "step": step, "rng": _rng_state(), "extra": extra or {}}
    tmp = directory / "trainer_state.pt.tmp"
    torch.save(state, tmp)
    os.replace(tmp, directory / "trainer_state.pt")


def load_training_state(directory: Path) -> dict:
    """The state ``save_training_state`` wrote (restores the torch RNG; the optimizer state is returned for
    ``load_full_optimizer_state``)."""
    state = torch.load(directory / "trainer_state.pt", map_location="cpu", weights_only=True)
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



def full_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer | None = None) -> tuple[dict, dict | None]:
    """The whole model state dict (and the optimizer's, keyed by parameter name) gathered on CPU, the same for
    one process, DDP and FSDP. Keys are parameter names rather than positions, so a checkpoint written by N
    ranks resumes on M. Collective under FSDP: every rank must call it; only rank 0's copy is complete."""
    opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
    msd = get_model_state_dict(model, options=opts)
    osd = get_optimizer_state_dict(model, optimizer, options=opts) if optimizer is not None else None
    return msd, osd


def load_full_optimizer_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer, osd: dict) -> None:
    """Load a name-keyed full optimizer state (from ``full_state``) into this run's (possibly sharded) optimizer."""
    set_optimizer_state_dict(model, optimizer, osd, options=StateDictOptions(full_state_dict=True))


def state_to_model(args, state: dict) -> torch.nn.Module:
    """A plain Transformer holding ``state`` (no copy: tensors are assigned), for saving with checkpoint.save."""
    with torch.device("meta"):
        m = Transformer(args)
    m.load_state_dict(state, assign=True)
    m.reset_rope()
    return m



def save_checkpoint(model, args, tokenizer, optimizer, out: Path, step: int, keep_last: int, d: Dist,
                    extra: dict | None = None) -> Path:
    """Gather the full model and optimizer states (collective: every rank calls this), then rank 0 writes
    ``out/checkpoints/step_NNNNNN`` atomically (the directory counts as complete only once trainer_state.pt lands,
    so a kill mid-save leaves the previous checkpoint the newest), updates ``out`` to hold this model, and prunes
    to the newest ``keep_last``. ``extra`` (plain numbers/strings/tensors) is stored in trainer_state.pt."""
    msd, osd = full_state(model, optimizer)
    step_dir = out / "checkpoints" / f"step_{step:06d}"
    if d.main:
        save(state_to_model(args, msd), step_dir, format="native", tokenizer=tokenizer, overwrite=True)
        save_training_state(step_dir, osd, step, extra)
        publish(step_dir, out)
        prune_checkpoints(out, keep_last)
    d.barrier()
    return step_dir


