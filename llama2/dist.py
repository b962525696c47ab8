"""Where a training process sits: one process, or one rank of many under torchrun with DDP or FSDP2.

gloo on CPU (so two processes on a laptop train exactly like two GPUs), nccl on CUDA with one GPU per process.
Multi-node is torchrun's business: the same code runs under ``torchrun --nnodes N --rdzv-endpoint HOST:PORT``.
"""
from __future__ import annotations

import contextlib
import os
import sys
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch.distributed.fsdp import fully_shard
from torch.nn.parallel import DistributedDataParallel as DDP

from .config import STRATEGIES

__all__ = [
    "Dist", "STRATEGIES", "init_distributed", "wrap_model", "unwrap", "no_grad_sync", "clip_grad_norm", "autocast_for",
]


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
        return self.all_sum(value) / self.world

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()



    def all_sum(self, value: float) -> float:
        """The sum of a number over all ranks (the number itself with one process)."""
        return self.all_sums([value])[0]

    def all_sums(self, values: list[float]) -> list[float]:
        """The sums of several numbers over all ranks, in one collective."""
        if self.world == 1:
            return list(values)
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return t.tolist()

    def say(self, *msg: object) -> None:
        """Print to stderr on rank 0 only (under torchrun, rank 0 speaks for all)."""
        if self.main:
            print(*msg, file=sys.stderr, flush=True)




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
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={device}: no CUDA GPU is available here (use device=cpu)")
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
        for block in model.layers:
            fully_shard(block)
        fully_shard(model)
        return model
    if d.strategy == "ddp":
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



def autocast_for(device: torch.device, dtype: str = "auto"):
    """The compute-dtype context of the forward passes: ``auto`` is bf16 autocast on CUDA (weights and optimizer
    stay fp32) and nothing on CPU, where fp32 is the default (CPUs differ: without bf16 units bf16 is slower, while
    on some with AVX512-BF16 it is much faster (benchmarks/RESULTS.md), so ``dtype=bfloat16`` is a choice to
    measure on the machine at hand); ``bfloat16`` or ``float16`` autocast on any device; ``float32`` nothing."""
    if dtype == "auto":
        dtype = "bfloat16" if device.type == "cuda" else "float32"
    if dtype == "float32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=getattr(torch, dtype))
