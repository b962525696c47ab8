"""Pretraining (Llama 2 §2.2): next-token loss on windows of the token shards, on one process or many.

Read top to bottom: config, data, model, optimizer, the loop (accumulate micro-batches to the global batch,
clip, step, schedule), evaluation and checkpoints. Every ``save_every`` steps a checkpoint is written to
``out/checkpoints/step_NNNNNN`` (model in the native format + optimizer/step state), the newest ``keep_last``
are kept, and ``out`` itself is updated to hold the latest model, so ``Llama.from_pretrained(out)`` works.
``resume=true`` continues from the newest complete checkpoint and reproduces the uninterrupted run exactly:
the global batch of step ``s`` is drawn from a generator seeded by (seed, s), so the data position is the step.

Under ``torchrun --nproc_per_node N`` the same function trains with FSDP2 (or DDP): each rank reads its own
slice of every global batch, so N ranks see the same data as one process with the same ``batch_tokens``, and
checkpoints hold full, name-keyed states that resume on any number of ranks.
"""
from __future__ import annotations

import json
import math
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm import tqdm

from ..checkpoint import load
from ..data.prepare import TokenDataset, load_manifest
from ..model import ModelArgs, Transformer
from ..perf import flops_per_token, measure_matmul_flops, peak_memory_bytes
from ..tokenizer import Tokenizer
from .common import (
    autocast_for, clip_grad_norm, Dist, init_distributed, lr_at, MetricsLog, no_grad_sync, save_checkpoint,
    start_training, StopRequest,
)


@dataclass
class PretrainConfig:
    data: str = ""
    """Directory of token shards written by `llama2 prepare`."""
    out: str = "runs/pretrain"
    """Output directory: checkpoints/step_NNNNNN and, at its root, the latest model."""
    model: str = "toy-small"
    """Model preset (see ModelArgs.from_preset); vocab_size is taken from the data's tokenizer."""
    init_from: str = ""
    """Start from this checkpoint's weights instead of a random initialisation."""
    tokenizer: str = ""
    """Tokenizer to store with the checkpoints (default: the one named in the data's manifest)."""
    seq_len: int = 256
    """Tokens per training sequence (4096 in the paper)."""
    batch_tokens: int = 16384
    """Global batch in tokens per optimizer step (4M in the paper); a multiple of seq_len * micro_batch."""
    micro_batch: int = 16
    """Sequences per forward/backward; gradients are accumulated to reach batch_tokens."""
    max_steps: int = 200
    """Optimizer steps in total."""
    lr: float = 3e-4
    """Peak learning rate (3e-4 for 7B/13B, 1.5e-4 for 34B/70B)."""
    warmup_steps: int = 20
    """Linear warmup steps (2000 in the paper)."""
    min_lr_ratio: float = 0.1
    """The cosine schedule ends at this fraction of the peak (0.1 in the paper)."""
    weight_decay: float = 0.1
    """AdamW weight decay, on matrices only."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this (0 = off)."""
    eval_every: int = 50
    """Validation loss every this many steps (0 = only at the end)."""
    eval_batches: int = 8
    """Micro-batches of validation data per evaluation."""
    save_every: int = 100
    """Checkpoint every this many steps (and always at the end)."""
    keep_last: int = 2
    """How many step checkpoints to keep."""
    resume: bool = False
    """Continue from the newest checkpoint in out/checkpoints."""
    seed: int = 0
    """Seed of the initialisation and of the data order."""
    activation_checkpointing: bool = False
    """Recompute each block's activations in the backward pass (less memory, ~30% more compute)."""
    compile: bool = False
    """torch.compile each transformer block (faster steps after a compile of a minute or more)."""
    device: str = "cpu"
    """cpu or cuda; on CUDA the forward runs under bf16 autocast (under torchrun: one GPU per process)."""
    strategy: str = "fsdp"
    """Under torchrun with several processes: fsdp (FSDP2, fully_shard per block) or ddp; one process trains alone."""
    tensorboard: bool = True
    """Also write the metrics for TensorBoard to OUT/tb."""


def batch_starts(n_tokens: int, seq_len: int, n_seq: int, seed: int, step: int) -> torch.Tensor:
    """Start offsets of the ``n_seq`` windows of the global batch of ``step``: a function of (seed, step) only, so
    the data position is the step itself (exact resume) and the global batch is the same whatever the number of
    ranks or the micro-batch size (each rank reads its own slice of it)."""
    # hash() of a tuple of ints is stable across processes (PYTHONHASHSEED only salts str/bytes)
    g = torch.Generator().manual_seed(hash((seed, step)) & 0x7FFFFFFF)
    return torch.randint(0, n_tokens - seq_len - 1, (n_seq,), generator=g)


def read_windows(ds: TokenDataset, starts: list[int], seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs and next-token targets, (n, seq_len) each, from windows of seq_len + 1 tokens."""
    rows = torch.stack([torch.from_numpy(ds.read(s, seq_len + 1)) for s in starts])
    return rows[:, :-1], rows[:, 1:]


@torch.no_grad()
def evaluate(model, ds: TokenDataset, cfg: PretrainConfig, d: Dist, autocast) -> float:
    """Mean next-token loss on fixed validation windows (the same at every evaluation, so they compare), split
    across ranks. Every rank runs the same number of forwards (FSDP gathers weights collectively); the rows a
    rank has beyond the real ones are all-ignored and weigh nothing."""
    model.eval()
    n = cfg.eval_batches * cfg.micro_batch
    starts = batch_starts(len(ds), cfg.seq_len, n, cfg.seed + 1, 0).tolist()
    per_rank = -(-n // d.world)
    mine = starts[d.rank * per_rank : (d.rank + 1) * per_rank]
    total = torch.zeros(2, dtype=torch.float64)
    for i in range(0, per_rank, cfg.micro_batch):
        chunk = mine[i : i + cfg.micro_batch]
        x, y = read_windows(ds, chunk or starts[:1], cfg.seq_len)
        if not chunk:
            y = torch.full_like(y, -100)
        with autocast:
            loss = model(x.to(d.device), targets=y.to(d.device))
        count = int((y != -100).sum())
        total += torch.tensor([float(loss) * count, count], dtype=torch.float64)
    if d.world > 1:
        total = total.to(d.device)
        dist.all_reduce(total)
    model.train()
    return float(total[0] / total[1])


def pretrain(cfg: PretrainConfig) -> dict:
    d = init_distributed(cfg.strategy, cfg.device)
    out = Path(cfg.out)
    data = Path(cfg.data)
    if not cfg.data or not (data / "manifest.json").is_file():
        raise ValueError(f"data={cfg.data!r}: not a directory prepared by `llama2 prepare` (no manifest.json)")
    per_micro = cfg.seq_len * cfg.micro_batch * d.world
    if cfg.batch_tokens % per_micro:
        raise ValueError(f"batch_tokens {cfg.batch_tokens} is not a multiple of seq_len * micro_batch * ranks = "
                         f"{cfg.seq_len} * {cfg.micro_batch} * {d.world} = {per_micro}")
    accum = cfg.batch_tokens // per_micro  # micro-batches per rank per optimizer step
    n_seq = cfg.batch_tokens // cfg.seq_len  # sequences in the global batch
    manifest = load_manifest(data)
    train_ds, val_ds = TokenDataset(data, "train"), TokenDataset(data, "val")
    if len(train_ds) <= cfg.seq_len + 1:
        raise ValueError(f"{data}: {len(train_ds)} training tokens, fewer than one sequence of {cfg.seq_len}")
    tok_path = Path(cfg.tokenizer or manifest["tokenizer"]["path"])
    tokenizer = Tokenizer.from_file(tok_path) if tok_path.is_file() else None

    # -- model: built whole on every rank, then sharded (FSDP) or replicated (DDP) ------------------------------
    if cfg.init_from:
        model, tok2 = load(cfg.init_from, device=d.device)
        tokenizer = tokenizer or tok2
    else:
        args = ModelArgs.from_preset(cfg.model, vocab_size=manifest["vocab_size"], max_seq_len=max(cfg.seq_len, 256))
        model = Transformer(args).init_weights(seed=cfg.seed).to(d.device)
    args = model.args
    if args.vocab_size < manifest["vocab_size"]:
        raise ValueError(f"model vocab {args.vocab_size} < data vocab {manifest['vocab_size']}")
    model, opt, start_step, _ = start_training(model, d, out, resume=cfg.resume, lr=cfg.lr, weight_decay=cfg.weight_decay,
                                               activation_checkpointing=cfg.activation_checkpointing, compile=cfg.compile)
    if d.main:
        out.mkdir(parents=True, exist_ok=True)
        (out / "pretrain_config.json").write_text(json.dumps(asdict(cfg), indent=2))
    d.barrier()
    log = MetricsLog(out, enabled=d.main, tensorboard=cfg.tensorboard)

    # Model FLOPs utilisation: achieved model FLOP/s over the measured matmul FLOP/s of this device (in the compute
    # dtype), times the number of ranks; the paper's hardware would use its datasheet peak instead.
    compute_dtype = torch.bfloat16 if d.device.type == "cuda" else torch.float32
    flops_tok = flops_per_token(args, cfg.seq_len)
    peak = measure_matmul_flops(d.device, compute_dtype) * d.world

    # -- the loop ------------------------------------------------------------------------------------------
    history = []
    autocast = autocast_for(d.device)
    bar = tqdm(total=cfg.max_steps, initial=start_step, desc="pretrain", disable=not (d.main and sys.stderr.isatty()))
    with StopRequest() as stop:
        try:
            for step in range(start_step, cfg.max_steps):
                t0 = time.perf_counter()
                lr = lr_at(step, cfg.lr, cfg.warmup_steps, cfg.max_steps, cfg.min_lr_ratio)
                for g in opt.param_groups:
                    g["lr"] = lr
                starts = batch_starts(len(train_ds), cfg.seq_len, n_seq, cfg.seed, step).tolist()
                mine = starts[d.rank * accum * cfg.micro_batch : (d.rank + 1) * accum * cfg.micro_batch]
                total = 0.0
                for micro in range(accum):
                    x, y = read_windows(train_ds, mine[micro * cfg.micro_batch : (micro + 1) * cfg.micro_batch], cfg.seq_len)
                    with no_grad_sync(model, d, active=micro < accum - 1), autocast:
                        # every micro-batch has the same number of tokens, so the mean of the means is the mean
                        loss = model(x.to(d.device), targets=y.to(d.device)) / accum
                        loss.backward()
                    total += loss.item()
                gnorm = clip_grad_norm(model, cfg.grad_clip)
                opt.step()
                opt.zero_grad(set_to_none=True)
                dt = time.perf_counter() - t0
                tok_s = cfg.batch_tokens / dt
                rec = {"step": step + 1, "loss": d.all_mean(total), "lr": lr, "grad_norm": gnorm, "tokens_per_s": tok_s,
                       "mfu": flops_tok * tok_s / peak, "peak_mem_gib": peak_memory_bytes(d.device) / 2**30}
                done = step + 1 == cfg.max_steps
                if len(val_ds) > cfg.seq_len + 1 and ((cfg.eval_every and (step + 1) % cfg.eval_every == 0) or done):
                    rec["val_loss"] = evaluate(model, val_ds, cfg, d, autocast)
                    rec["val_ppl"] = math.exp(min(rec["val_loss"], 50))
                history.append(rec)
                log.log(rec)
                bar.set_postfix(loss=f"{rec['loss']:.3f}", tok_s=f"{tok_s:.0f}", mfu=f"{rec['mfu']:.1%}")
                bar.update(1)
                stopping = stop.requested(d)
                if (step + 1) % cfg.save_every == 0 or done or stopping:
                    save_checkpoint(model, args, tokenizer, opt, out, step + 1, cfg.keep_last, d)
                if stopping:
                    if d.main:
                        print(f"stopped: saved step {step + 1} in {out} (resume=true continues)", file=sys.stderr)
                    break
        finally:
            bar.close()
            log.close()
    return {"history": history, "out": str(out), "stopped": stop.flag}
