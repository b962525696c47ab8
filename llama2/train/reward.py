"""Reward modelling (Llama 2 §3.2.2): a scalar-head copy of the chat model trained on human preference pairs.

Read top to bottom: config, data (read, hold out a test set, mix, encode), model (the chat model with its LM head
replaced by a scalar head), optimizer, the loop (accumulate micro-batches to ``batch_pairs`` pairs, clip, step,
schedule), evaluation per rating bucket (Table 8) and checkpoints.

The objective is the binary ranking loss with a rating-dependent margin, eq. (2):
``-log sigmoid(r(x, y_c) - r(x, y_r) - m(rating))``, with m from Table 27 (``margin=small|large``, or ``none`` for
eq. (1)). Chosen and rejected sequences of a micro-batch are scored in one forward pass (chosen rows first, see
``collate_pairs``), each at its last real token (the EOS closing the response), never at padding.

Paper settings (§3.2.2, "Training Details"): one epoch ("training longer can lead to over-fitting"), maximum
learning rate 1e-5 (5e-6 for the 70B model), cosine schedule down to 10% of the maximum, warmup of 3% of the
steps with a minimum of 5, 512 pairs (1024 rows) per batch; AdamW and weight decay as in pretraining. Separate
helpfulness and safety reward models, each on its own data mix (``kind``, ``other_ratio``).

The data order is a stream of per-epoch permutations, each seeded by (seed, epoch): step ``s`` takes stream
positions ``[s * batch_pairs, (s + 1) * batch_pairs)``, so the data position is the step, ``resume=true``
reproduces the uninterrupted run exactly, every batch is full, and no pair is dropped at an epoch's end (the last
step of an epoch may take the first pairs of the next). Every ``save_every`` steps a checkpoint is written to
``out/checkpoints/step_NNNNNN`` (a native checkpoint with a scalar head + optimizer/step state), the newest
``keep_last`` are kept, and ``out`` itself holds the latest model, so ``RewardModel.from_pretrained(out)`` works;
``out/reward_config.json`` records the config, kind and margin, ``out/eval.json`` the latest test accuracy.

Under ``torchrun --nproc_per_node N`` the same function trains with FSDP2 (or DDP): each rank scores its own slice
of every batch, so N ranks train on the same data as one process with the same ``batch_pairs``.
"""
from __future__ import annotations

import functools
import json
import math
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import torch
import torch.distributed as dist
from tqdm import tqdm

from ..checkpoint import load
from ..data.dialogs import (
    KINDS, EncodedPair, Preference, collate_pairs, encode_preferences, mix_preferences, read_preferences,
    split_holdout,
)
from ..model import Transformer
from ..rlhf.reward import MARGINS, accuracy_by_rating, format_accuracy_table, margin_values, ranking_loss
from ..rlhf.reward_model import REWARD_CONFIG_FILE, RewardModel, reward_model_from_chat, score_batch
from ..tokenizer import Tokenizer
from .common import (
    autocast_for, clip_grad_norm, Dist, init_distributed, lr_at, MetricsLog, no_grad_sync, save_checkpoint,
    split_paths, start_training, StopRequest, unwrap,
)

__all__ = ["RewardConfig", "train_reward", "evaluate_reward", "batch_indices"]


@dataclass
class RewardConfig:
    data: list[str] | str = ""
    """Preference JSONL file(s) (see llama2.data.dialogs): a path, comma-separated paths or a YAML list."""
    val_data: list[str] | str = ""
    """Test preferences; empty = hold out val_fraction of data instead."""
    val_fraction: float = 0.05
    """Fraction of data held out as the test set when val_data is empty (split before mixing; 0 = no test)."""
    init_from: str = ""
    """The chat (SFT) checkpoint the reward model starts from (required; §3.2.2 initialises from the chat model)."""
    tokenizer: str = ""
    """Tokenizer file (.model/.gguf), if not the one stored with init_from."""
    out: str = "runs/reward"
    """Output directory: checkpoints/step_NNNNNN and, at its root, the latest reward model, eval.json, reward_config.json."""
    kind: Literal["helpfulness", "safety"] = "helpfulness"
    """Which reward model: its own data is all used, the other kind mixed in (other_ratio)."""
    margin: Literal["none", "small", "large"] = "small"
    """Rating-dependent margin of eq. (2), Table 27 (none = eq. (1)). Small by default: in Table 28 both margins
    help on the clearly better pairs, the large one at a cost on the negligibly-better/unsure pairs."""
    other_ratio: float | None = None
    """Fraction of the mix drawn from the other kind; None = the paper's mix (0.5 for helpfulness, 0.1 for safety)."""
    skip_bad: bool = False
    """Skip malformed JSONL lines (counted in the log) instead of stopping at the first."""
    seq_len: int = 4096
    """Most tokens per sequence (prompt + response + EOS); longer ones are cut or skipped (overflow)."""
    overflow: Literal["truncate", "skip"] = "truncate"
    """Too-long pairs: truncate (drop earliest prompt exchanges, then the start of the prompt) or skip; counted."""
    padding: Literal["right", "left"] = "right"
    """Pad side of a micro-batch; scores are read at the last real token, so both give the same model (right is faster)."""
    epochs: float = 1.0
    """Passes over the training mix (1 in the paper: longer over-fits); fractions allowed."""
    max_steps: int = 0
    """Optimizer steps in total; 0 = as many as `epochs` takes, ceil(epochs * pairs / batch_pairs)."""
    batch_pairs: int = 512
    """Preference pairs per optimizer step (512 in the paper); a multiple of micro_batch * ranks."""
    micro_batch: int = 8
    """Pairs per forward/backward (2x as many sequences); gradients are accumulated to reach batch_pairs."""
    lr: float = 1e-5
    """Peak learning rate (1e-5 in the paper; 5e-6 for the 70B reward model)."""
    min_lr_ratio: float = 0.1
    """The cosine schedule ends at this fraction of the peak (0.1 in the paper)."""
    warmup_ratio: float = 0.03
    """Linear warmup over this fraction of the steps (3% in the paper) ..."""
    min_warmup_steps: int = 5
    """... but at least this many steps (5 in the paper)."""
    weight_decay: float = 0.1
    """AdamW weight decay, on matrices only."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this (0 = off)."""
    eval_every: int = 50
    """Test accuracy every this many steps (0 = only at the end)."""
    save_every: int = 100
    """Checkpoint every this many steps (and always at the end)."""
    keep_last: int = 2
    """How many step checkpoints to keep."""
    resume: bool = False
    """Continue from the newest checkpoint in out/checkpoints."""
    seed: int = 0
    """Seed of the head's initialisation, the held-out split, the mix and the data order."""
    activation_checkpointing: bool = False
    """Recompute each block's activations in the backward pass (less memory, ~30% more compute)."""
    device: str = "cpu"
    """cpu or cuda; on CUDA the forward runs under bf16 autocast (under torchrun: one GPU per process)."""
    strategy: str = "fsdp"
    """Under torchrun with several processes: fsdp (FSDP2, fully_shard per block) or ddp; one process trains alone."""
    tensorboard: bool = True
    """Also write the metrics for TensorBoard to OUT/tb."""


def batch_indices(n: int, batch_pairs: int, seed: int, step: int) -> list[int]:
    """Indices into the ``n`` training pairs of the batch of ``step``: positions ``[step * batch_pairs, (step + 1) *
    batch_pairs)`` of the stream perm(seed, 0) + perm(seed, 1) + ..., where perm(seed, e) is a permutation of
    range(n) seeded by (seed, e). A function of (n, batch_pairs, seed, step) only: exact resume on any number of
    ranks."""
    return [_epoch_permutation(n, seed, p // n)[p % n] for p in range(step * batch_pairs, (step + 1) * batch_pairs)]


@functools.lru_cache(maxsize=2)  # a step needs at most two epochs' orders; each is drawn once, not once a step
def _epoch_permutation(n: int, seed: int, epoch: int) -> tuple[int, ...]:
    # hash() of a tuple of ints is stable across processes (PYTHONHASHSEED only salts str/bytes)
    g = torch.Generator().manual_seed(hash((seed, epoch)) & 0x7FFFFFFF)
    return tuple(torch.randperm(n, generator=g).tolist())


@torch.no_grad()
def _score_pairs(model, pairs: Sequence[EncodedPair], micro_batch: int, padding: str, d: Dist, autocast
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """(r_chosen, r_rejected), each (len(pairs),) on the CPU, split across ranks. Every rank runs the same number
    of forwards (FSDP gathers weights collectively); a rank short of pairs scores a stand-in and drops it."""
    was_training = model.training
    model.eval()
    n = len(pairs)
    per_rank = -(-n // d.world)
    mine = list(range(d.rank * per_rank, min(n, (d.rank + 1) * per_rank)))
    rc, rr = torch.zeros(n), torch.zeros(n)
    for i in range(0, per_rank, micro_batch):
        idx = mine[i : i + micro_batch]
        batch = collate_pairs([pairs[j] for j in idx] or [pairs[0]], side=padding)
        with autocast:
            r = score_batch(model, batch, d.device).float().cpu()  # (2b,)
        c, rj = r.chunk(2)
        if idx:
            rc[idx], rr[idx] = c, rj
    if d.world > 1:  # each rank filled its own slice; the others are zero
        both = torch.stack([rc, rr]).to(d.device)
        dist.all_reduce(both)
        rc, rr = both.cpu().unbind(0)
    model.train(was_training)
    return rc, rr


def evaluate_reward(
    model_or_path: Transformer | RewardModel | str | Path,
    prefs: Sequence[Preference | EncodedPair],
    tokenizer: Tokenizer | None = None,
    seq_len: int | None = None,
    batch_size: int = 16,
    overflow: Literal["truncate", "skip"] = "truncate",
    padding: Literal["right", "left"] = "right",
    device: torch.device | str | None = None,
) -> dict:
    """Accuracy of a reward model on preference pairs, per rating bucket and overall (``accuracy_by_rating``:
    the columns of Table 8; feed a dict of these to ``format_accuracy_table``).

    ``model_or_path``: a scalar-head Transformer (then ``tokenizer`` is needed for Preference records), a
    :class:`RewardModel`, or a checkpoint directory. ``prefs``: Preference records (encoded here like training
    data, with ``seq_len`` defaulting to the model's window; pairs that do not fit are left out and reported on
    stderr) or already encoded pairs. One process; ``batch_size`` pairs per forward.
    """
    if isinstance(model_or_path, (str, Path)):
        model_or_path = RewardModel.from_pretrained(model_or_path, device=device or "cpu")
    if isinstance(model_or_path, RewardModel):
        model, tokenizer = model_or_path.model, tokenizer or model_or_path.tokenizer
        seq_len = seq_len or model_or_path.seq_len
    else:
        model = model_or_path
    if unwrap(model).args.head != "scalar":
        raise ValueError("evaluate_reward needs a reward model (scalar head); this model has an LM head")
    seq_len = seq_len or unwrap(model).args.max_seq_len
    to_encode = [p for p in prefs if isinstance(p, Preference)]
    pairs = [p for p in prefs if isinstance(p, EncodedPair)]
    if to_encode:
        if tokenizer is None:
            raise ValueError("evaluate_reward: Preference records need a tokenizer to encode them")
        encoded, stats = encode_preferences(tokenizer, to_encode, seq_len, overflow)
        if stats.kept < stats.total:
            print(f"evaluate_reward: {stats}", file=sys.stderr)
        pairs += encoded
    if not pairs:
        raise ValueError("evaluate_reward: no preference pairs to evaluate")
    dev = next(unwrap(model).parameters()).device
    rc, rr = _score_pairs(model, pairs, batch_size, padding, Dist(device=dev), autocast_for(dev))
    return accuracy_by_rating(rc, rr, [p.rating for p in pairs])


def _check(cfg: RewardConfig, world: int) -> None:
    """Settings errors, raised before any data or weights are read."""
    if not cfg.init_from:
        raise ValueError("init_from is required: the chat (SFT) checkpoint the reward model starts from (§3.2.2)")
    if not split_paths(cfg.data):
        raise ValueError("data is required: one or more preference JSONL files")
    if cfg.margin not in MARGINS:
        raise ValueError(f"margin={cfg.margin!r}: expected one of {', '.join(MARGINS)}")
    if cfg.kind not in KINDS:
        raise ValueError(f"kind={cfg.kind!r}: expected one of {', '.join(KINDS)}")
    if cfg.padding not in ("right", "left"):
        raise ValueError(f"padding={cfg.padding!r}: expected right or left")
    if cfg.overflow not in ("truncate", "skip"):
        raise ValueError(f"overflow={cfg.overflow!r}: expected truncate or skip")
    if not 0 <= cfg.val_fraction < 1:
        raise ValueError(f"val_fraction={cfg.val_fraction}: expected a fraction in [0, 1)")
    if cfg.micro_batch < 1 or cfg.batch_pairs % (cfg.micro_batch * world):
        raise ValueError(f"batch_pairs {cfg.batch_pairs} is not a multiple of micro_batch * ranks = "
                         f"{cfg.micro_batch} * {world}")
    if cfg.epochs <= 0 and cfg.max_steps <= 0:
        raise ValueError("epochs must be > 0 (or max_steps set)")


def train_reward(cfg: RewardConfig) -> dict:
    d = init_distributed(cfg.strategy, cfg.device)
    _check(cfg, d.world)
    out = Path(cfg.out)
    say = (lambda *a: print(*a, file=sys.stderr)) if d.main else (lambda *a: None)

    # -- model: the chat model with a scalar head, built whole on every rank, then sharded or replicated ----------
    chat, tokenizer = load(cfg.init_from, device=d.device)
    if cfg.tokenizer:
        tokenizer = Tokenizer.from_file(cfg.tokenizer)
    if tokenizer is None:
        raise ValueError(f"{cfg.init_from}: no tokenizer stored with the checkpoint; pass tokenizer=PATH")
    if chat.args.head == "scalar":  # continuing from a reward model: keep its head
        say(f"init_from {cfg.init_from} already has a scalar head; training it further")
        model = chat
    else:
        model = reward_model_from_chat(chat, seed=cfg.seed)
    del chat
    args = model.args
    if cfg.seq_len > args.max_seq_len:
        raise ValueError(f"seq_len {cfg.seq_len} exceeds the model's max_seq_len {args.max_seq_len}")

    # -- data: hold out the test set first (no test pair leaks into the mix), then mix, then encode ---------------
    prefs = read_preferences(split_paths(cfg.data), skip_bad=cfg.skip_bad)
    if cfg.val_data:
        train_prefs, test_prefs = list(prefs), list(read_preferences(split_paths(cfg.val_data), skip_bad=cfg.skip_bad))
    else:
        train_prefs, test_prefs = split_holdout(prefs, cfg.val_fraction, seed=cfg.seed)
    if not any(p.kind == cfg.kind for p in train_prefs):
        raise ValueError(f"no {cfg.kind} preferences in the training data ({len(train_prefs)} records of other kinds)")
    mix = mix_preferences(train_prefs, cfg.kind, cfg.other_ratio, seed=cfg.seed)
    pairs, stats = encode_preferences(tokenizer, mix, cfg.seq_len, cfg.overflow)
    # the test set of each kind, as the paper reports each RM on Meta Helpfulness and Meta Safety test sets
    tests = {k: encode_preferences(tokenizer, [p for p in test_prefs if p.kind == k], cfg.seq_len, cfg.overflow) for k in KINDS}
    tests = {k: v for k, v in tests.items() if v[0]}
    n_own = sum(p.kind == cfg.kind for p in mix)
    skipped = f", {len(prefs.skipped)} bad lines skipped" if prefs.skipped else ""
    say(f"reward ({cfg.kind}, margin {cfg.margin}): {len(prefs)} preferences read{skipped}, "
        f"{len(train_prefs)} for training, {len(test_prefs)} for testing")
    say(f"  mix: {len(mix)} ({n_own} {cfg.kind}, {len(mix) - n_own} other); encoded: {stats}")
    for k, (tp, ts) in tests.items():
        say(f"  test {k}: {ts}")
    if not pairs:
        raise ValueError(f"no training pair fits seq_len {cfg.seq_len} ({stats})")
    n = len(pairs)
    total_steps = cfg.max_steps if cfg.max_steps > 0 else math.ceil(cfg.epochs * n / cfg.batch_pairs)
    warmup = max(cfg.min_warmup_steps, round(cfg.warmup_ratio * total_steps))
    per_rank = cfg.batch_pairs // d.world
    accum = per_rank // cfg.micro_batch  # micro-batches per rank per optimizer step

    model, opt, start_step, state = start_training(model, d, out, resume=cfg.resume, lr=cfg.lr, weight_decay=cfg.weight_decay,
                                                   activation_checkpointing=cfg.activation_checkpointing)
    if state is not None and state["extra"].get("n_pairs", n) != n:
        say(f"warning: the checkpoint was trained on {state['extra']['n_pairs']} pairs, this data has {n}: "
            "the resumed run does not continue the same data order")
    if d.main:
        out.mkdir(parents=True, exist_ok=True)
        meta = {"kind": cfg.kind, "margin": cfg.margin, "init_from": cfg.init_from, "train_pairs": n,
                "steps": total_steps, "warmup_steps": warmup, "config": asdict(cfg)}
        (out / REWARD_CONFIG_FILE).write_text(json.dumps(meta, indent=2))
    d.barrier()
    log = MetricsLog(out, enabled=d.main, tensorboard=cfg.tensorboard)
    say(f"  {n} pairs, {total_steps} steps of {cfg.batch_pairs} pairs ({cfg.epochs:g} epoch(s)), warmup {warmup}")

    def evaluate(step: int) -> dict:
        """Accuracy per rating bucket on each kind's test set; eval.json and the printed table (Table 8 layout)."""
        by_kind = {}
        for k, (tp, _) in tests.items():
            rc, rr = _score_pairs(model, tp, cfg.micro_batch, cfg.padding, d, autocast)
            by_kind[k] = accuracy_by_rating(rc, rr, [p.rating for p in tp])
        result = {"step": step, "kind": cfg.kind, "margin": cfg.margin, "accuracy": by_kind.get(cfg.kind),
                  "by_kind": by_kind, "test_pairs": {k: len(tp) for k, (tp, _) in tests.items()}}
        if d.main:
            (out / "eval.json").write_text(json.dumps(result, indent=2))
        return result

    # -- the loop ------------------------------------------------------------------------------------------
    history, last_eval = [], None
    autocast = autocast_for(d.device)
    bar = tqdm(total=total_steps, initial=start_step, desc=f"reward/{cfg.kind}", disable=not (d.main and sys.stderr.isatty()))
    with StopRequest() as stop:
        try:
            for step in range(start_step, total_steps):
                t0 = time.perf_counter()
                lr = lr_at(step, cfg.lr, warmup, total_steps, cfg.min_lr_ratio)
                for g in opt.param_groups:
                    g["lr"] = lr
                mine = batch_indices(n, cfg.batch_pairs, cfg.seed, step)[d.rank * per_rank : (d.rank + 1) * per_rank]
                total_loss, correct, gap = 0.0, 0, 0.0
                for micro in range(accum):
                    batch = collate_pairs([pairs[i] for i in mine[micro * cfg.micro_batch : (micro + 1) * cfg.micro_batch]],
                                          side=cfg.padding)
                    with no_grad_sync(model, d, active=micro < accum - 1), autocast:
                        r_chosen, r_rejected = score_batch(model, batch, d.device).chunk(2)  # (b,) each: one forward
                        m = margin_values(batch["ratings"], cfg.margin, device=d.device)
                        # every micro-batch has the same number of pairs, so the mean of the means is the mean
                        loss = ranking_loss(r_chosen, r_rejected, m) / accum
                        loss.backward()
                    total_loss += loss.item()
                    correct += int((r_chosen > r_rejected).sum())
                    gap += float((r_chosen - r_rejected).detach().sum())
                gnorm = clip_grad_norm(model, cfg.grad_clip)
                opt.step()
                opt.zero_grad(set_to_none=True)
                dt = time.perf_counter() - t0
                rec = {"step": step + 1, "epoch": (step + 1) * cfg.batch_pairs / n, "loss": d.all_mean(total_loss),
                       "accuracy": d.all_mean(correct / per_rank), "margin": d.all_mean(gap / per_rank), "lr": lr,
                       "grad_norm": gnorm, "pairs_per_s": cfg.batch_pairs / dt}
                done = step + 1 == total_steps
                if tests and ((cfg.eval_every and (step + 1) % cfg.eval_every == 0) or done):
                    last_eval = evaluate(step + 1)
                    for k, acc in last_eval["by_kind"].items():
                        rec[f"test_accuracy_{k}"] = acc["overall"]["accuracy"]
                history.append(rec)
                log.log(rec)
                bar.set_postfix(loss=f"{rec['loss']:.3f}", acc=f"{rec['accuracy']:.2f}")
                bar.update(1)
                stopping = stop.requested(d)
                if (step + 1) % cfg.save_every == 0 or done or stopping:
                    save_checkpoint(model, args, tokenizer, opt, out, step + 1, cfg.keep_last, d, extra={"n_pairs": n})
                if stopping:
                    say(f"stopped: saved step {step + 1} in {out} (resume=true continues)")
                    break
        finally:
            bar.close()
            log.close()
    if last_eval is not None and d.main and not stop.flag:
        name = f"{cfg.kind} RM (margin {cfg.margin})"
        print(format_accuracy_table({f"{name} on {k} test": acc for k, acc in last_eval["by_kind"].items()}))
    return {"history": history, "eval": last_eval, "out": str(out), "stopped": stop.flag, "steps": total_steps,
            "model": unwrap(model),  # the trained Transformer (still sharded under FSDP: load OUT for a whole copy)
            "encode": {"train": asdict(stats), **{f"test_{k}": asdict(ts) for k, (_, ts) in tests.items()}}}
