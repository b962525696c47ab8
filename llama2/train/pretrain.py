"""Pretraining (Llama 2 §2.2): next-token loss on windows of the token shards, on one process or many.

What is this stage's own: the config, the data (windows of the token shards), the model (a preset, or a
checkpoint), and how a batch becomes a loss (mean next-token cross-entropy). The step loop, schedule,
checkpoints and resume are :mod:`llama2.train.loop`'s. Every ``save_every`` steps a checkpoint is written to
``out/checkpoints/step_NNNNNN``, and ``out`` itself holds the latest model, so ``Llama.from_pretrained(out)``
works. ``resume=true`` reproduces the uninterrupted run exactly: the global batch of step ``s`` is drawn from a
generator seeded by (seed, s), so the data position is the step.

Under ``torchrun --nproc_per_node N`` the same function trains with FSDP2 (or DDP): each rank reads its own
slice of every global batch, so N ranks see the same data as one process with the same ``batch_tokens``, and
checkpoints hold full, name-keyed states that resume on any number of ranks.
"""
from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.distributed as dist

from ..checkpoint import load
from ..config import OptimConfig, RunConfig, check, group, stage_config
from ..data.prepare import TokenDataset, load_manifest
from ..model import PRESETS, ModelArgs, Transformer
from ..perf import flops_per_token, measure_matmul_flops, peak_memory_bytes
from ..seeding import generator
from ..tokenizer import Tokenizer
from ..dist import Dist, init_distributed
from .loop import StepBatch, begin, fit

__all__ = ["PretrainConfig", "pretrain", "batch_starts", "read_windows"]


@stage_config
class PretrainConfig:
    data: str = ""
    """Directory of token shards written by `llama2 prepare`."""
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
    eval_batches: int = 8
    """Micro-batches of validation data per evaluation."""
    run: RunConfig = group(RunConfig, out="runs/pretrain", eval_every=50, save_every=100)
    optim: OptimConfig = group(OptimConfig, lr=3e-4, warmup_steps=20)

    def __post_init__(self) -> None:
        check(self.model in PRESETS, "model", self.model, f"a preset: {', '.join(PRESETS)}")
        for name in ("seq_len", "batch_tokens", "micro_batch", "max_steps", "eval_batches"):
            check(getattr(self, name) >= 1, name, getattr(self, name), ">= 1")


def batch_starts(n_tokens: int, seq_len: int, n_seq: int, seed: int, step: int) -> torch.Tensor:
    """Start offsets of the ``n_seq`` windows of the global batch of ``step``: a function of (seed, step) only, so
    the data position is the step itself (exact resume) and the global batch is the same whatever the number of
    ranks or the micro-batch size (each rank reads its own slice of it)."""
    return torch.randint(0, n_tokens - seq_len - 1, (n_seq,), generator=generator(seed, "pretrain/batch", step))


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
    starts = batch_starts(len(ds), cfg.seq_len, n, cfg.run.seed, -1).tolist()
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
    d = init_distributed(cfg.run.strategy, cfg.run.device)
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

    # -- model: built whole on every rank, then sharded (FSDP) or replicated (DDP) by begin() ------------------------
    if cfg.init_from:
        model, tok2 = load(cfg.init_from, device=d.device)
        tokenizer = tokenizer or tok2
    else:
        args = ModelArgs.from_preset(cfg.model, vocab_size=manifest["vocab_size"], max_seq_len=max(cfg.seq_len, 256))
        model = Transformer(args).init_weights(seed=cfg.run.seed).to(d.device)
    args = model.args
    if args.vocab_size < manifest["vocab_size"]:
        raise ValueError(f"model vocab {args.vocab_size} < data vocab {manifest['vocab_size']}")
    s = begin(model, d, cfg, name="pretrain", tokenizer=tokenizer)

    # -- how a batch becomes a loss ------------------------------------------------------------------------------
    def batch(step: int) -> StepBatch:
        starts = batch_starts(len(train_ds), cfg.seq_len, n_seq, cfg.run.seed, step).tolist()
        mine = starts[d.rank * accum * cfg.micro_batch : (d.rank + 1) * accum * cfg.micro_batch]
        micros = [mine[i * cfg.micro_batch : (i + 1) * cfg.micro_batch] for i in range(accum)]
        return StepBatch(micros, units=cfg.batch_tokens)

    def loss(starts: list[int]):
        x, y = read_windows(train_ds, starts, cfg.seq_len)
        return s.model(x.to(d.device), targets=y.to(d.device)) * y.numel(), {}  # mean loss * tokens = summed loss

    # Model FLOPs utilisation: achieved model FLOP/s over the measured matmul FLOP/s of this device (in the compute
    # dtype), times the number of ranks; the paper's hardware would use its datasheet peak instead.
    compute_dtype = torch.bfloat16 if d.device.type == "cuda" else torch.float32
    flops_tok = flops_per_token(args, cfg.seq_len)
    peak = measure_matmul_flops(d.device, compute_dtype) * d.world

    def on_record(rec: dict) -> None:
        rec["mfu"] = flops_tok * rec["tokens_per_s"] / peak
        rec["peak_mem_gib"] = peak_memory_bytes(d.device) / 2**30

    def evaluate_val(step: int) -> dict:
        if len(val_ds) <= cfg.seq_len + 1:
            return {}
        val = evaluate(s.model, val_ds, cfg, d, s.autocast)
        return {"val_loss": val, "val_ppl": math.exp(min(val, 50))}

    result = fit(s, cfg.max_steps, batch, loss, desc="pretrain", evaluate=evaluate_val,
                 throughput={"tokens_per_s": cfg.batch_tokens}, on_record=on_record)
    return {**result, "out": str(s.out)}
