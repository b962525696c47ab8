"""Supervised fine-tuning (Llama 2 §3.1): next-token loss on the answers of chat-formatted dialogs only.

Read top to bottom: config, data (read, encode in the chat format with a loss mask, pack), model, optimizer,
the loop, evaluation and checkpoints. The paper's settings (§3.1, "Fine-Tuning Details"): cosine schedule from
2e-5, weight decay 0.1, batch 64 sequences of 4096 tokens, 2 epochs; "we zero-out the loss on tokens from the
user prompt, and as a result, we backpropagate only on answer tokens". Every assistant answer of a multi-turn
dialog carries loss (with its EOS); system and user tokens never do.

Packing: the paper concatenates prompts and answers with a separator; here dialogs are packed best-fit into rows
of ``seq_len`` positions and attention is masked so it never crosses a dialog boundary, with rotary positions
restarting per dialog (``llama2.data.dialogs.pack_sft``): a packed dialog trains exactly as if it were alone.

Data order: the rows of each epoch are permuted by a generator seeded by (seed, epoch) and read as one endless
stream; step ``s`` takes rows ``[s * batch_size, (s + 1) * batch_size)`` of it, so every step has the same
number of rows (on every rank), the data position is the step itself, and a resumed run repeats the
uninterrupted one exactly.
"""
from __future__ import annotations

import dataclasses
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
from ..data.dialogs import IGNORE_INDEX, SFTExample, collate, encode_sft_examples, pack_sft, read_dialogs, split_holdout
from ..model import ModelArgs, Transformer
from ..tokenizer import Tokenizer
from .common import (
    autocast_for, clip_grad_norm, Dist, init_distributed, lr_at, MetricsLog, no_grad_sync, save_checkpoint,
    split_paths, start_training, StopRequest,
)


@dataclass
class SFTConfig:
    data: str = ""
    """Dialogs JSONL ({"dialog": [{"role", "content"}, ...]} ending with an assistant turn); several files comma-separated."""
    val_data: str = ""
    """Held-out dialogs JSONL (default: hold out val_fraction of data)."""
    val_fraction: float = 0.02
    """Fraction of the dialogs held out for validation when val_data is not given (0 = none)."""
    init_from: str = ""
    """The pretrained checkpoint to fine-tune (empty: a random `model` preset, for tests and toys)."""
    model: str = "toy-tiny"
    """Preset when init_from is empty (then `tokenizer` is required)."""
    tokenizer: str = ""
    """Tokenizer .model/.gguf (default: the checkpoint's)."""
    out: str = "runs/sft"
    """Output directory: checkpoints/step_NNNNNN and, at its root, the latest model."""
    seq_len: int = 4096
    """Positions per packed row (4096 in the paper)."""
    loss_on: str = "all"
    """Which answers carry loss: all (every assistant turn, the paper's SFT) or last (only the final answer, as
    Ghost Attention trains: earlier turns were sampled under a different system message)."""
    overflow: str = "truncate"
    """A dialog longer than seq_len: truncate (drop the earliest exchanges, then the start of the prompt; never an
    answer token of what is kept) or skip. Both are counted and reported."""
    batch_size: int = 64
    """Packed rows per optimizer step (64 in the paper)."""
    micro_batch: int = 4
    """Rows per forward/backward on each rank; gradients are accumulated to batch_size."""
    epochs: float = 2.0
    """Passes over the training rows (2 in the paper)."""
    lr: float = 2e-5
    """Peak learning rate (2e-5 in the paper)."""
    warmup_steps: int = 0
    """Linear warmup steps (the paper gives none for SFT)."""
    min_lr_ratio: float = 0.1
    """The cosine ends at this fraction of the peak (the paper does not say for SFT; 10% as in pretraining)."""
    weight_decay: float = 0.1
    """AdamW weight decay on matrices."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this (0 = off)."""
    eval_every: int = 0
    """Validation loss every this many steps (0 = only at the end)."""
    save_every: int = 500
    """Checkpoint every this many steps (and always at the end)."""
    keep_last: int = 2
    """How many step checkpoints to keep."""
    resume: bool = False
    """Continue from the newest checkpoint in out/checkpoints."""
    seed: int = 0
    """Seed of the data order (and of the initialisation without init_from)."""
    activation_checkpointing: bool = False
    """Recompute each block's activations in the backward pass."""
    device: str = "cpu"
    """cpu or cuda (bf16 autocast); under torchrun one GPU per process."""
    strategy: str = "fsdp"
    """Under torchrun with several processes: fsdp or ddp."""
    tensorboard: bool = True
    """Also write the metrics for TensorBoard to OUT/tb."""


def step_rows(n_rows: int, batch_size: int, seed: int, step: int) -> list[int]:
    """Indices of the rows of optimizer step ``step`` in the endless stream of per-epoch permutations."""
    perms: dict[int, list[int]] = {}
    out = []
    for pos in range(step * batch_size, (step + 1) * batch_size):
        epoch, i = divmod(pos, n_rows)
        if epoch not in perms:
            g = torch.Generator().manual_seed(hash((seed, epoch)) & 0x7FFFFFFF)
            perms[epoch] = torch.randperm(n_rows, generator=g).tolist()
        out.append(perms[epoch][i])
    return out


def last_answer_only(ex: SFTExample) -> SFTExample:
    """The example with loss on its final answer (the last run of loss tokens) only."""
    mask = list(ex.loss_mask)
    end = len(mask)
    while end and not mask[end - 1]:
        end -= 1
    start = end
    while start and mask[start - 1]:
        start -= 1
    return dataclasses.replace(ex, loss_mask=[0] * start + mask[start:end] + [0] * (len(mask) - end))


def _forward_sum(model, rows, d: Dist, autocast) -> tuple[torch.Tensor, int]:
    """Summed answer-token loss of some packed rows, and how many answer tokens they hold."""
    b = collate(rows)
    count = int((b["targets"] != IGNORE_INDEX).sum())
    with autocast:
        mean = model(b["tokens"].to(d.device), mask=b["mask"].to(d.device), position_ids=b["position_ids"].to(d.device),
                     targets=b["targets"].to(d.device))
    return mean * count, count


@torch.no_grad()
def evaluate(model, rows, cfg: SFTConfig, d: Dist, autocast) -> float:
    """Mean loss per answer token over the validation rows, split across ranks; every rank runs the same number of
    forwards (FSDP gathers weights collectively), padding its share with a row whose loss is ignored."""
    model.eval()
    per_rank = -(-len(rows) // d.world)
    mine = list(rows[d.rank * per_rank : (d.rank + 1) * per_rank])
    total = torch.zeros(2, dtype=torch.float64)
    for i in range(0, per_rank, cfg.micro_batch):
        chunk = mine[i : i + cfg.micro_batch]
        if chunk:
            s, n = _forward_sum(model, chunk, d, autocast)
            total += torch.tensor([float(s), n], dtype=torch.float64)
        else:
            _forward_sum(model, rows[:1], d, autocast)  # keeps the collective calls in step; result unused
    if d.world > 1:
        total = total.to(d.device)
        dist.all_reduce(total)
    model.train()
    return float(total[0] / max(total[1], 1))


def sft(cfg: SFTConfig) -> dict:
    d = init_distributed(cfg.strategy, cfg.device)
    out = Path(cfg.out)
    if not cfg.data:
        raise ValueError("data=...: give the dialogs JSONL to fine-tune on")
    if cfg.loss_on not in ("all", "last"):
        raise ValueError(f"loss_on={cfg.loss_on!r}: expected all or last")
    if cfg.batch_size % (cfg.micro_batch * d.world):
        raise ValueError(f"batch_size {cfg.batch_size} is not a multiple of micro_batch * ranks = {cfg.micro_batch} * {d.world}")
    accum = cfg.batch_size // (cfg.micro_batch * d.world)

    # -- model and tokenizer -------------------------------------------------------------------------------------
    if cfg.init_from:
        model, tokenizer = load(cfg.init_from, device=d.device)
        if cfg.tokenizer:
            tokenizer = Tokenizer.from_file(cfg.tokenizer)
        if tokenizer is None:
            raise ValueError(f"{cfg.init_from}: holds no tokenizer; give tokenizer=...")
        if model.args.head != "lm":
            raise ValueError(f"{cfg.init_from}: has a {model.args.head} head; SFT needs a language model")
    else:
        if not cfg.tokenizer:
            raise ValueError("give init_from=CHECKPOINT (or, to start from scratch, model=PRESET and tokenizer=FILE)")
        tokenizer = Tokenizer.from_file(cfg.tokenizer)
        args = ModelArgs.from_preset(cfg.model, vocab_size=tokenizer.vocab_size, max_seq_len=max(cfg.seq_len, 256))
        model = Transformer(args).init_weights(seed=cfg.seed).to(d.device)
    args = model.args
    if cfg.seq_len > args.max_seq_len:
        raise ValueError(f"seq_len {cfg.seq_len} exceeds the model's context of {args.max_seq_len}")

    # -- data: dialogs -> (ids, answer mask) -> packed rows -------------------------------------------------------
    dialogs = read_dialogs(split_paths(cfg.data))
    if cfg.val_data:
        train_dialogs, val_dialogs = list(dialogs), list(read_dialogs(split_paths(cfg.val_data)))
    else:
        train_dialogs, val_dialogs = split_holdout(dialogs, cfg.val_fraction, cfg.seed) if cfg.val_fraction > 0 else (list(dialogs), [])
    train_ex, stats = encode_sft_examples(tokenizer, train_dialogs, cfg.seq_len, cfg.overflow)
    val_ex, _ = encode_sft_examples(tokenizer, val_dialogs, cfg.seq_len, cfg.overflow)
    if cfg.loss_on == "last":
        train_ex, val_ex = [last_answer_only(e) for e in train_ex], [last_answer_only(e) for e in val_ex]
    if not train_ex:
        raise ValueError(f"{cfg.data}: no dialog fits seq_len {cfg.seq_len} ({stats})")
    rows = pack_sft(train_ex, cfg.seq_len)
    val_rows = pack_sft(val_ex, cfg.seq_len) if val_ex else []
    steps_per_epoch = len(rows) / cfg.batch_size
    max_steps = max(1, math.ceil(cfg.epochs * steps_per_epoch))
    if d.main:
        answer_tokens = sum(int(sum(e.loss_mask)) for e in train_ex)
        print(f"sft: {len(train_ex)} dialogs ({stats}) -> {len(rows)} rows of {cfg.seq_len}, {answer_tokens:,} answer tokens; "
              f"{len(val_ex)} validation dialogs; {max_steps} steps of {cfg.batch_size} rows", file=sys.stderr)

    # -- resume, wrap, optimizer ---------------------------------------------------------------------------------
    model, opt, start_step, _ = start_training(model, d, out, resume=cfg.resume, lr=cfg.lr, weight_decay=cfg.weight_decay,
                                               activation_checkpointing=cfg.activation_checkpointing)
    if d.main:
        out.mkdir(parents=True, exist_ok=True)
        (out / "sft_config.json").write_text(json.dumps(asdict(cfg), indent=2))
    d.barrier()
    log = MetricsLog(out, enabled=d.main, tensorboard=cfg.tensorboard)

    # -- the loop ------------------------------------------------------------------------------------------------
    history = []
    autocast = autocast_for(d.device)
    bar = tqdm(total=max_steps, initial=start_step, desc="sft", disable=not (d.main and sys.stderr.isatty()))
    with StopRequest() as stop:
        try:
            for step in range(start_step, max_steps):
                t0 = time.perf_counter()
                lr = lr_at(step, cfg.lr, cfg.warmup_steps, max_steps, cfg.min_lr_ratio)
                for g in opt.param_groups:
                    g["lr"] = lr
                batch = [rows[i] for i in step_rows(len(rows), cfg.batch_size, cfg.seed, step)]
                # the loss is a mean over every answer token of the global batch, whichever rank holds it
                n_global = sum(int((r.targets != IGNORE_INDEX).sum()) for r in batch)
                mine = batch[d.rank * accum * cfg.micro_batch : (d.rank + 1) * accum * cfg.micro_batch]
                total = 0.0
                for micro in range(accum):
                    with no_grad_sync(model, d, active=micro < accum - 1):
                        s, _ = _forward_sum(model, mine[micro * cfg.micro_batch : (micro + 1) * cfg.micro_batch], d, autocast)
                        # gradients are averaged over ranks, so each rank's share of the sum is scaled up by world
                        (s * d.world / max(n_global, 1)).backward()
                    total += float(s.detach()) / max(n_global, 1)
                gnorm = clip_grad_norm(model, cfg.grad_clip)
                opt.step()
                opt.zero_grad(set_to_none=True)
                dt = time.perf_counter() - t0
                rec = {"step": step + 1, "epoch": (step + 1) / steps_per_epoch, "loss": d.all_mean(total) * d.world, "lr": lr,
                       "grad_norm": gnorm, "answer_tokens": n_global, "tokens_per_s": cfg.batch_size * cfg.seq_len / dt}
                done = step + 1 == max_steps
                if val_rows and ((cfg.eval_every and (step + 1) % cfg.eval_every == 0) or done):
                    rec["val_loss"] = evaluate(model, val_rows, cfg, d, autocast)
                history.append(rec)
                log.log(rec)
                bar.set_postfix(loss=f"{rec['loss']:.3f}", epoch=f"{rec['epoch']:.2f}")
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
    return {"history": history, "out": str(out), "stopped": stop.flag, "encode": asdict(stats), "steps": max_steps}
