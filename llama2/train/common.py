"""What every training stage shares: the paper's optimizer and schedule, and resumable checkpoints.

Optimizer and schedule are those of Llama 2 §2.2: AdamW (beta1 0.9, beta2 0.95, eps 1e-5), weight decay 0.1,
gradient clipping 1.0, linear warmup then cosine decay of the learning rate down to 10% of its peak.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import signal
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist

__all__ = [
    "make_optimizer", "lr_at", "save_training_state", "load_training_state", "latest_checkpoint", "prune_checkpoints",
    "publish", "StopRequest", "Dist", "init_distributed", "wrap_model", "unwrap", "no_grad_sync", "clip_grad_norm",
    "full_state", "load_full_optimizer_state", "state_to_model", "MetricsLog",
    "autocast_for", "save_checkpoint", "split_paths", "start_training",
]


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


class StopRequest:
    """Ctrl-C (SIGINT) or SIGTERM (what torchrun sends its workers when it is interrupted) asks the loop to stop
    at the end of the current optimizer step, where every rank saves together; a second Ctrl-C aborts at once.
    ``requested()`` agrees across ranks, so no rank waits in a collective the others never enter."""

    def __init__(self) -> None:
        self.flag = False
        self._old: dict = {}

    def _handler(self, signum, frame) -> None:
        if self.flag:
            raise KeyboardInterrupt
        self.flag = True
        print("\nstopping after this step and saving (Ctrl-C again to abort without saving)", file=sys.stderr)

    def __enter__(self) -> "StopRequest":
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._old[sig] = signal.signal(sig, self._handler)
        return self

    def __exit__(self, *exc) -> None:
        for sig, h in self._old.items():
            signal.signal(sig, h)

    def requested(self, d: "Dist") -> bool:
        if d.world == 1:
            return self.flag
        t = torch.tensor([float(self.flag)], device=d.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item())


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


# -- distributed: one process, DDP or FSDP2 under torchrun ---------------------------------------------------------
@dataclass
class Dist:
    """Where this process sits: ``rank`` of ``world`` processes, its ``device`` and the wrapping strategy in force
    ("single" when there is one process, whatever was asked for)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    strategy: str = "single"

    @property
    def main(self) -> bool:
        return self.rank == 0

    def all_mean(self, value: float) -> float:
        """The mean of a number over all ranks (the number itself with one process)."""
        if self.world == 1:
            return value
        t = torch.tensor([value], dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return float(t) / self.world

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()


STRATEGIES = ("fsdp", "ddp", "single")


def init_distributed(strategy: str, device: str) -> Dist:
    """Join the process group torchrun set up (WORLD_SIZE/RANK/LOCAL_RANK in the environment), or run alone.

    gloo on CPU (so two processes on a laptop train exactly like two GPUs), nccl on CUDA with one GPU per process
    (``cuda`` becomes ``cuda:LOCAL_RANK``). Multi-node is torchrun's business: the same code runs under
    ``torchrun --nnodes N --rdzv-endpoint HOST:PORT``."""
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy={strategy!r}: expected one of {', '.join(STRATEGIES)}")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    dev = torch.device(device)
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", local_rank)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if world == 1:
        return Dist(device=dev)
    if strategy == "single":
        raise ValueError(f"strategy=single but torchrun started {world} processes; use strategy=fsdp or ddp")
    if not dist.is_initialized():
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
    return Dist(rank, world, local_rank, dev, strategy)


def wrap_model(model: torch.nn.Module, d: Dist) -> torch.nn.Module:
    """FSDP2: ``fully_shard`` on every TransformerBlock, then on the root (embeddings, final norm, head), so each
    block's full weights exist only while it runs; parameters, gradients and AdamW states are sharded across ranks.
    DDP: a full replica per rank, gradients all-reduced. On CUDA, FSDP keeps fp32 master weights and the forward
    runs under bf16 autocast (set by the stage), like the single-GPU path."""
    if d.strategy == "fsdp":
        from torch.distributed.fsdp import fully_shard

        for block in model.layers:
            fully_shard(block)
        fully_shard(model)
        return model
    if d.strategy == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP

        return DDP(model, device_ids=[d.device.index] if d.device.type == "cuda" else None)
    return model


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The Transformer inside a DDP wrapper (FSDP2 shards in place and needs none)."""
    return model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model


@contextlib.contextmanager
def no_grad_sync(model: torch.nn.Module, d: Dist, active: bool):
    """Skip the gradient all-reduce / reduce-scatter while accumulating micro-batches (``active``); the last
    micro-batch of a step synchronises the summed gradients once."""
    if not active or d.world == 1:
        yield
    elif d.strategy == "ddp":
        with model.no_sync():
            yield
    else:
        model.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            model.set_requires_gradient_sync(True)


def clip_grad_norm(model: torch.nn.Module, max_norm: float) -> float:
    """Clip the global gradient norm (over all ranks' shards under FSDP) and return the norm before clipping."""
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm if max_norm > 0 else float("inf"))
    if hasattr(norm, "full_tensor"):  # a DTensor under FSDP2
        norm = norm.full_tensor()
    return float(norm)


def full_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer | None = None) -> tuple[dict, dict | None]:
    """The whole model state dict (and the optimizer's, keyed by parameter name) gathered on CPU, the same for
    one process, DDP and FSDP. Keys are parameter names rather than positions, so a checkpoint written by N
    ranks resumes on M. Collective under FSDP: every rank must call it; only rank 0's copy is complete."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_optimizer_state_dict

    opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
    msd = get_model_state_dict(model, options=opts)
    osd = get_optimizer_state_dict(model, optimizer, options=opts) if optimizer is not None else None
    return msd, osd


def load_full_optimizer_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer, osd: dict) -> None:
    """Load a name-keyed full optimizer state (from ``full_state``) into this run's (possibly sharded) optimizer."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    set_optimizer_state_dict(model, optimizer, osd, options=StateDictOptions(full_state_dict=True))


def state_to_model(args, state: dict) -> torch.nn.Module:
    """A plain Transformer holding ``state`` (no copy: tensors are assigned), for saving with checkpoint.save."""
    from ..model import Transformer

    with torch.device("meta"):
        m = Transformer(args)
    m.load_state_dict(state, assign=True)
    m.reset_rope()
    return m


class MetricsLog:
    """One record per step to ``out/metrics.jsonl`` (appended, flushed each line, so a crash loses nothing
    written) and, with ``tensorboard``, to ``out/tb`` (``tensorboard --logdir OUT/tb``). Only rank 0 writes."""

    def __init__(self, out: Path, enabled: bool = True, tensorboard: bool = True, prefix: str = "") -> None:
        self.prefix = prefix
        self.file = open(out / "metrics.jsonl", "a", encoding="utf-8") if enabled else None
        self.tb = None
        if enabled and tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:  # tensorboard is a dependency; a trimmed install still trains
                print("warning: tensorboard is not installed; metrics go to metrics.jsonl only", file=sys.stderr)
            else:
                self.tb = SummaryWriter(str(out / "tb"))

    def log(self, rec: dict) -> None:
        if self.file is None:
            return
        self.file.write(json.dumps(rec) + "\n")
        self.file.flush()
        if self.tb is not None:
            for k, v in rec.items():
                if k != "step" and isinstance(v, (int, float)):
                    self.tb.add_scalar(self.prefix + k, v, rec["step"])

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
        if self.tb is not None:
            self.tb.close()


def autocast_for(device: torch.device):
    """bf16 autocast on CUDA (weights and optimizer stay fp32); nothing on CPU, where fp32 is the fast path."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def save_checkpoint(model, args, tokenizer, optimizer, out: Path, step: int, keep_last: int, d: Dist,
                    extra: dict | None = None) -> Path:
    """Gather the full model and optimizer states (collective: every rank calls this), then rank 0 writes
    ``out/checkpoints/step_NNNNNN`` atomically (the directory counts as complete only once trainer_state.pt lands,
    so a kill mid-save leaves the previous checkpoint the newest), updates ``out`` to hold this model, and prunes
    to the newest ``keep_last``. ``extra`` (plain numbers/strings/tensors) is stored in trainer_state.pt."""
    from ..checkpoint import save

    msd, osd = full_state(model, optimizer)
    step_dir = out / "checkpoints" / f"step_{step:06d}"
    if d.main:
        save(state_to_model(args, msd), step_dir, format="native", tokenizer=tokenizer, overwrite=True)
        save_training_state(step_dir, osd, step, extra)
        publish(step_dir, out)
        prune_checkpoints(out, keep_last)
    d.barrier()
    return step_dir


def split_paths(spec: "str | list[str] | tuple[str, ...]") -> list[str]:
    """Input files given as one path, comma-separated paths, or a list (from YAML)."""
    items = spec if isinstance(spec, (list, tuple)) else [spec]
    return [p.strip() for item in items for p in str(item).split(",") if p.strip()]


def start_training(model: torch.nn.Module, d: Dist, out: Path, *, resume: bool, lr: float, weight_decay: float,
                   activation_checkpointing: bool = False, compile: bool = False):
    """What every trained stage does before its loop: load the newest checkpoint's weights when resuming (into the
    whole model, before sharding, so a checkpoint from any number of ranks loads), set activation checkpointing
    and torch.compile (per block, as FSDP wraps them), wrap for FSDP/DDP, build the paper's AdamW, and restore the
    optimizer state. Returns (model, optimizer, start_step, trainer state or None)."""
    from ..checkpoint import load

    ckpt = latest_checkpoint(out) if resume else None
    if ckpt is not None:
        weights, _ = load(ckpt, device=d.device)
        model.load_state_dict(weights.state_dict())
        del weights
    model.gradient_checkpointing = activation_checkpointing
    if compile:
        for block in model.layers:
            block.compile()
    model.train()
    model = wrap_model(model, d)
    opt = make_optimizer(model, lr, weight_decay)
    state = None
    if ckpt is not None:
        state = load_training_state(ckpt)
        load_full_optimizer_state(model, opt, state["optimizer"])
        if d.main:
            print(f"resumed from {ckpt} at step {state['step']} ({d.world} rank(s))", file=sys.stderr)
    return model, opt, (state["step"] if state else 0), state
