"""Checkpoint state of a training run: the model (native format) plus the optimizer, step and RNG, written so that a
kill at any moment leaves the previous checkpoint the newest complete one, and resumable on any number of ranks.

Layout: ``OUT/checkpoints/step_NNNNNN/`` holds the model files, ``trainer_state.pt`` and ``manifest.json`` (the
last file written: the size and CRC-32 of every other file; a step directory without it is incomplete, one whose
files do not match it is corrupt, and resume skips both, saying so); ``OUT`` itself holds a copy of the newest
model, so ``Llama.from_pretrained(OUT)`` works during and after training. Every file is fsynced before it is
renamed into place and its directory after, so a power cut cannot leave a renamed but empty file.

One run per output directory: a run holds ``OUT/.lock`` (an advisory ``flock``, released by the kernel when the
process ends however it ends, so it is never stale) for its whole life; a second run on the same ``OUT`` refuses
and names the holder. A run started on an ``OUT`` that already holds a run refuses unless it resumes it
(``resume=true``) or starts over (``overwrite=true``, which removes only the files a run writes).
"""
from __future__ import annotations

import errno
import fcntl
import json
import os
import shutil
import socket
import time
import zlib
from pathlib import Path

import torch
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions, get_model_state_dict, get_optimizer_state_dict, set_optimizer_state_dict,
)

from ..checkpoint import fsync_dir, fsync_file, save
from ..model import Transformer
from ..dist import Dist

__all__ = [
    "save_training_state", "load_training_state", "latest_checkpoint", "prune_checkpoints", "publish", "full_state",
    "load_full_optimizer_state", "state_to_model", "save_checkpoint", "RunLock", "RunLocked", "prepare_out",
    "verify_checkpoint",
]

MANIFEST = "manifest.json"
LOCK = ".lock"


def _crc32(path: Path) -> int:
    crc = 0
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            crc = zlib.crc32(chunk, crc)
    return crc


def _write_manifest(directory: Path) -> None:
    files = {f.name: {"bytes": f.stat().st_size, "crc32": _crc32(f)} for f in sorted(directory.iterdir())
             if f.is_file() and f.name != MANIFEST}
    tmp = directory / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps({"files": files}, indent=1))
    fsync_file(tmp)
    os.replace(tmp, directory / MANIFEST)
    fsync_dir(directory)


def verify_checkpoint(directory: Path) -> str | None:
    """None if the step directory is complete and every file matches its manifest, else what is wrong."""
    manifest = directory / MANIFEST
    if not manifest.is_file():
        # written before manifests existed: trainer_state.pt, the last file of a save, marks it complete
        return None if (directory / "trainer_state.pt").is_file() and (directory / "llama2.json").is_file() else "incomplete"
    try:
        files = json.loads(manifest.read_text())["files"]
    except (json.JSONDecodeError, KeyError, OSError) as e:
        return f"unreadable manifest ({e})"
    for name, want in files.items():
        f = directory / name
        if not f.is_file():
            return f"{name} is missing"
        if f.stat().st_size != want["bytes"]:
            return f"{name} has {f.stat().st_size} bytes, the manifest says {want['bytes']}"
        if _crc32(f) != want["crc32"]:
            return f"{name} does not match its checksum"
    return None


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
    fsync_file(tmp)
    os.replace(tmp, directory / "trainer_state.pt")


def load_training_state(directory: Path) -> dict:
    """The state ``save_training_state`` wrote (restores the torch RNG; the optimizer state is returned for
    ``load_full_optimizer_state``)."""
    state = torch.load(directory / "trainer_state.pt", map_location="cpu", weights_only=True)
    torch.set_rng_state(state["rng"]["torch"])
    return state



def latest_checkpoint(out: Path, say=None) -> Path | None:
    """The newest step directory under ``out/checkpoints`` that verifies (:func:`verify_checkpoint`); newer ones
    that do not are skipped, each reported through ``say``."""
    root = out / "checkpoints"
    if not root.is_dir():
        return None
    for p in sorted((p for p in root.glob("step_*") if p.is_dir()), reverse=True):
        problem = verify_checkpoint(p)
        if problem is None:
            return p
        if say is not None:
            say(f"resume: skipping {p.name} ({problem})")
    return None


def prune_checkpoints(out: Path, keep: int) -> None:
    steps = sorted(p for p in (out / "checkpoints").glob("step_*") if p.is_dir())
    for p in steps[:-keep] if keep > 0 else []:
        shutil.rmtree(p, ignore_errors=True)


def publish(step_dir: Path, out: Path) -> None:
    """Make ``out`` itself a loadable checkpoint: copy the model files of ``step_dir`` to ``out`` (each file
    written beside its target, synced and renamed, so ``out`` always holds a whole model; on a failure, such as
    a full disk, the copy is removed and ``out`` keeps the model it had)."""
    for f in step_dir.iterdir():
        if f.is_file() and f.name not in ("trainer_state.pt", MANIFEST):
            tmp = out / (f.name + ".tmp")
            try:
                shutil.copyfile(f, tmp)
                fsync_file(tmp)
                os.replace(tmp, out / f.name)
            except BaseException:
                tmp.unlink(missing_ok=True)
                raise
    fsync_dir(out)



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
        _write_manifest(step_dir)  # last: the directory counts as complete from here on
        publish(step_dir, out)
        prune_checkpoints(out, keep_last)
    d.barrier()
    return step_dir


# -- one run per output directory ----------------------------------------------------------------------------------
class RunLocked(RuntimeError):
    """Another live process holds the output directory."""


class RunLock:
    """An exclusive advisory lock on ``out/.lock`` for a run's life. The kernel drops it when the holder exits,
    however it exits (even by SIGKILL), so a lock left by a dead run is never in the way; ``.lock`` names the
    holder (pid, host, start time) for the message of a run that finds it held."""

    def __init__(self, out: Path, what: str = "run") -> None:
        self.path = Path(out) / LOCK
        self.what = what
        self.fd: int | None = None

    def acquire(self) -> "RunLock":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                os.close(fd)
                raise
            holder = os.pread(fd, 4096, 0).decode("utf-8", "replace").strip() or "another process"
            os.close(fd)
            raise RunLocked(f"{self.path.parent} is in use by {holder}; wait for it to finish, or choose another out=") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{self.what} pid {os.getpid()} on {socket.gethostname()} since "
                      f"{time.strftime('%Y-%m-%d %H:%M:%S')}\n".encode(), 0)
        self.fd = fd
        return self

    def release(self) -> None:
        if self.fd is not None:
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


# What a training run writes in OUT (beside its model's files): the only files overwrite=true removes.
_RUN_FILES = ("metrics.jsonl", "best.json", "eval.json", "reward_config.json")
_RUN_DIRS = ("checkpoints", "tb", "value", "best.tmp")
_MODEL_FILES = ("llama2.json", "tokenizer.model", "model.safetensors", "model.safetensors.index.json")


def _holds_a_run(out: Path, own: tuple[str, ...] = ()) -> list[str]:
    marks = [n for n in _RUN_DIRS[:1] + _RUN_FILES[:1] if (out / n).exists()]
    marks += [p.name for pattern in ("*_config.json", *own) for p in sorted(out.glob(pattern))]
    return marks


def _remove_debris(out: Path) -> list[str]:
    """Leftovers of an interrupted write: half-written step directories and files being copied into place."""
    found = [p for p in (out / "checkpoints").glob(".step_*.tmp-*")] if (out / "checkpoints").is_dir() else []
    found += [p for p in out.glob("*.tmp")] + [p for p in out.glob(".*.tmp-*")]
    for p in found:
        shutil.rmtree(p) if p.is_dir() else p.unlink(missing_ok=True)
    return [p.name for p in found]


def prepare_out(out: Path, *, resume: bool, overwrite: bool, say=None, own: tuple[str, ...] = ()) -> None:
    """Check and tidy a run's output directory before any work (the caller holds its :class:`RunLock`): remove the
    debris of an interrupted write; refuse to start a new run over an existing one unless ``resume`` (continue it)
    or ``overwrite`` (remove only what a run writes: checkpoints, metrics, TensorBoard events, its configs and its
    model files, and ``own``: the names or glob patterns of what this stage writes besides, such as rejection
    sampling's iteration directories; anything else stays)."""
    out = Path(out)
    debris = _remove_debris(out) if out.is_dir() else []
    if debris and say is not None:
        say(f"removed leftovers of an interrupted write in {out}: {', '.join(sorted(debris)[:6])}")
    marks = _holds_a_run(out, own) if out.is_dir() else []
    if not marks or resume:
        return
    if not overwrite:
        raise FileExistsError(f"{out} already holds a run ({', '.join(marks)}); pass resume=true to continue it, "
                              "overwrite=true to start it over, or choose another out=")
    for name in _RUN_FILES + _MODEL_FILES:
        (out / name).unlink(missing_ok=True)
    for p in out.glob("*_config.json"):
        p.unlink()
    for p in out.glob("model-*-of-*.safetensors"):
        p.unlink()
    for name in _RUN_DIRS:
        shutil.rmtree(out / name, ignore_errors=True)
    for p in [p for pattern in own for p in out.glob(pattern)]:
        shutil.rmtree(p) if p.is_dir() else p.unlink(missing_ok=True)
    if say is not None:
        say(f"overwrite=true: removed the earlier run's files from {out}")


