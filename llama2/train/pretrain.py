"""Pretraining (Llama 2 §2.2), single process: next-token loss on windows of the token shards.

Read top to bottom: config, data, model, optimizer, the loop (accumulate micro-batches to the global batch,
clip, step, schedule), evaluation and checkpoints. Every ``save_every`` steps a checkpoint is written to
``out/checkpoints/step_NNNNNN`` (model in the native format + optimizer/step state), the newest ``keep_last``
are kept, and ``out`` itself is updated to hold the latest model, so ``Llama.from_pretrained(out)`` works.
``resume=true`` continues from the newest complete checkpoint and reproduces the uninterrupted run exactly:
batch ``s`` is drawn from a generator seeded by (seed, s), so the data position is the step itself.
"""
from __future__ import annotations

import json
import math
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from ..checkpoint import load, save
from ..data.prepare import TokenDataset, load_manifest
from ..model import ModelArgs, Transformer
from ..tokenizer import Tokenizer
from .common import latest_checkpoint, load_training_state, lr_at, make_optimizer, prune_checkpoints, publish, save_training_state


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
    device: str = "cpu"
    """cpu or cuda; on CUDA the forward runs under bf16 autocast."""


def sample_batch(ds: TokenDataset, seq_len: int, n: int, seed: int, step: int, micro: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` random windows of seq_len + 1 tokens, a function of (seed, step, micro) only."""
    # hash() of a tuple of ints is stable across processes (PYTHONHASHSEED only salts str/bytes)
    g = torch.Generator().manual_seed(hash((seed, step, micro)) & 0x7FFFFFFF)
    starts = torch.randint(0, len(ds) - seq_len - 1, (n,), generator=g).tolist()
    rows = torch.stack([torch.from_numpy(ds.read(s, seq_len + 1)) for s in starts])
    return rows[:, :-1], rows[:, 1:]


@torch.no_grad()
def evaluate(model, ds: TokenDataset, cfg: PretrainConfig, device) -> float:
    model.eval()
    losses = []  # the same validation windows every time (step 0), so evaluations are comparable
    for i in range(cfg.eval_batches):
        x, y = sample_batch(ds, cfg.seq_len, cfg.micro_batch, cfg.seed + 1, 0, i)
        losses.append(F.cross_entropy(model(x.to(device)).flatten(0, 1), y.to(device).flatten()).item())
    model.train()
    return sum(losses) / len(losses)


def pretrain(cfg: PretrainConfig) -> dict:
    out = Path(cfg.out)
    data = Path(cfg.data)
    if not cfg.data or not (data / "manifest.json").is_file():
        raise ValueError(f"data={cfg.data!r}: not a directory prepared by `llama2 prepare` (no manifest.json)")
    per_step = cfg.seq_len * cfg.micro_batch
    if cfg.batch_tokens % per_step:
        raise ValueError(f"batch_tokens {cfg.batch_tokens} is not a multiple of seq_len*micro_batch = {per_step}")
    accum = cfg.batch_tokens // per_step
    manifest = load_manifest(data)
    train_ds, val_ds = TokenDataset(data, "train"), TokenDataset(data, "val")
    if len(train_ds) <= cfg.seq_len + 1:
        raise ValueError(f"{data}: {len(train_ds)} training tokens, fewer than one sequence of {cfg.seq_len}")
    tok_path = Path(cfg.tokenizer or manifest["tokenizer"]["path"])
    tokenizer = Tokenizer.from_file(tok_path) if tok_path.is_file() else None
    device = torch.device(cfg.device)

    # -- model -----------------------------------------------------------------------------------------------
    if cfg.init_from:
        model, tok2 = load(cfg.init_from, device=device)
        tokenizer = tokenizer or tok2
    else:
        args = ModelArgs.from_preset(cfg.model, vocab_size=manifest["vocab_size"], max_seq_len=max(cfg.seq_len, 256))
        model = Transformer(args).init_weights(seed=cfg.seed).to(device)
    if model.args.vocab_size < manifest["vocab_size"]:
        raise ValueError(f"model vocab {model.args.vocab_size} < data vocab {manifest['vocab_size']}")
    model.gradient_checkpointing = cfg.activation_checkpointing
    model.train()
    opt = make_optimizer(model, cfg.lr, cfg.weight_decay)

    start_step = 0
    if cfg.resume and (ckpt := latest_checkpoint(out)) is not None:
        weights, _ = load(ckpt, device=device)
        model.load_state_dict(weights.state_dict())
        start_step = load_training_state(ckpt, opt)["step"]
        print(f"resumed from {ckpt} at step {start_step}", file=sys.stderr)
    out.mkdir(parents=True, exist_ok=True)
    (out / "pretrain_config.json").write_text(json.dumps(asdict(cfg), indent=2))
    log = open(out / "metrics.jsonl", "a", encoding="utf-8")

    # -- the loop ------------------------------------------------------------------------------------------
    history = []
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else torch.autocast("cpu", enabled=False)
    completed = start_step  # optimizer steps applied to the weights so far
    try:
        from tqdm import tqdm

        bar = tqdm(total=cfg.max_steps, initial=start_step, desc="pretrain", disable=not sys.stderr.isatty())
        for step in range(start_step, cfg.max_steps):
            t0 = time.perf_counter()
            lr = lr_at(step, cfg.lr, cfg.warmup_steps, cfg.max_steps, cfg.min_lr_ratio)
            for g in opt.param_groups:
                g["lr"] = lr
            total = 0.0
            for micro in range(accum):
                x, y = sample_batch(train_ds, cfg.seq_len, cfg.micro_batch, cfg.seed, step, micro)
                with autocast:
                    loss = F.cross_entropy(model(x.to(device)).flatten(0, 1), y.to(device).flatten()) / accum
                loss.backward()
                total += loss.item()
            gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip if cfg.grad_clip > 0 else float("inf"))
            opt.step()
            opt.zero_grad(set_to_none=True)
            completed = step + 1
            dt = time.perf_counter() - t0
            rec = {"step": step + 1, "loss": total, "lr": lr, "grad_norm": float(gnorm), "tokens_per_s": cfg.batch_tokens / dt}
            done = step + 1 == cfg.max_steps
            if len(val_ds) > cfg.seq_len + 1 and ((cfg.eval_every and (step + 1) % cfg.eval_every == 0) or done):
                rec["val_loss"] = evaluate(model, val_ds, cfg, device)
                rec["val_ppl"] = math.exp(min(rec["val_loss"], 50))
            history.append(rec)
            log.write(json.dumps(rec) + "\n")
            log.flush()
            bar.set_postfix(loss=f"{total:.3f}", tok_s=f"{rec['tokens_per_s']:.0f}")
            bar.update(1)
            if (step + 1) % cfg.save_every == 0 or done:
                _checkpoint(model, tokenizer, opt, out, step + 1, cfg.keep_last)
        bar.close()
    except KeyboardInterrupt:
        # Gradients of a half-accumulated step are dropped; the weights are exactly `completed` steps in.
        print(f"\ninterrupted: saving step {completed}", file=sys.stderr)
        opt.zero_grad(set_to_none=True)
        _checkpoint(model, tokenizer, opt, out, completed, cfg.keep_last)
        raise
    finally:
        log.close()
    return {"history": history, "out": str(out)}


def _checkpoint(model, tokenizer, opt, out: Path, step: int, keep_last: int) -> None:
    step_dir = out / "checkpoints" / f"step_{step:06d}"
    save(model, step_dir, format="native", tokenizer=tokenizer, overwrite=True)
    save_training_state(step_dir, opt, step)
    publish(step_dir, out)
    prune_checkpoints(out, keep_last)
