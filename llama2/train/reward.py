"""Reward modelling (Llama 2 §3.2.2): a scalar-head copy of the chat model trained on human preference pairs.

What is this stage's own: the config, the data (read, hold out a test set, mix, encode), the model (the chat
model with its LM head replaced by a scalar head) and how a batch of pairs becomes a loss; the step loop,
schedule, checkpoints and resume are :mod:`llama2.train.loop`'s, the accuracy per rating bucket (Table 8)
:func:`llama2.rlhf.reward_model.evaluate_reward`'s.

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

import json
import math
from dataclasses import asdict
from typing import Literal

from ..checkpoint import load
from ..config import OptimConfig, RunConfig, check, group, stage_config, to_dict
from ..data.preferences import collate_pairs, encode_preferences, mix_preferences
from ..data.records import KINDS, read_preferences, split_holdout, split_paths
from ..rlhf.reward import (
    MARGINS, accuracy_by_rating, centring_loss, format_accuracy_table, margin_values, ranking_loss, safety_auxiliary_loss,
)
from ..rlhf.reward_model import REWARD_CONFIG_FILE, reward_model_from_chat, score_batch, score_pairs
from ..seeding import epoch_stream
from ..tokenizer import Tokenizer
from ..dist import Dist, init_distributed, unwrap
from .loop import StepBatch, begin, fit

__all__ = ["RewardConfig", "train_reward", "batch_indices"]


@stage_config
class RewardConfig:
    data: list[str] | str = ""
    """Preference JSONL file(s) (see llama2.data.records): a path, comma-separated paths or a YAML list."""
    val_data: list[str] | str = ""
    """Test preferences; empty = hold out val_fraction of data instead."""
    val_fraction: float = 0.05
    """Fraction of data held out as the test set when val_data is empty (split before mixing; 0 = no test)."""
    init_from: str = ""
    """The chat (SFT) checkpoint the reward model starts from (required; §3.2.2 initialises from the chat model)."""
    tokenizer: str = ""
    """Tokenizer file (.model/.gguf), if not the one stored with init_from."""
    kind: Literal["helpfulness", "safety"] = "helpfulness"
    """Which reward model: its own data is all used, the other kind mixed in (other_ratio)."""
    margin: Literal["none", "small", "large"] = "small"
    """Rating-dependent margin of eq. (2), Table 27 (none = eq. (1)). Small by default: in Table 28 both margins
    help on the clearly better pairs, the large one at a cost on the negligibly-better/unsure pairs."""
    safety_aux: float | None = None
    """Weight of the safety auxiliary loss on responses labelled safe/unsafe (appendix A.3.4: a raw score below 0
    then means unsafe, which the PPO stage's 0.15 rule needs); None = 1 for the safety RM, 0 for helpfulness."""
    center: float = 0.0
    """Weight of a centring term (r_c + r_r)^2 that keeps the scores near 0 (:func:`llama2.rlhf.reward.centring_loss`;
    not in the paper): the ranking loss leaves the offset free, and a drifting offset crowds sigmoid(score) at 0 or 1.
    Applies to helpfulness reward models only; the safety one is anchored by ``safety_aux``."""
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
    warmup_ratio: float = 0.03
    """Linear warmup over this fraction of the steps (3% in the paper; optim.warmup_steps > 0 sets the steps instead) ..."""
    min_warmup_steps: int = 5
    """... but at least this many steps (5 in the paper)."""
    run: RunConfig = group(RunConfig, out="runs/reward", eval_every=50, save_every=100)
    optim: OptimConfig = group(OptimConfig, lr=1e-5)

    def __post_init__(self) -> None:
        check(self.margin in MARGINS, "margin", self.margin, f"one of {', '.join(MARGINS)}")
        check(self.kind in KINDS, "kind", self.kind, f"one of {', '.join(KINDS)}")
        check(0 <= self.val_fraction < 1, "val_fraction", self.val_fraction, "in [0, 1)")
        check(self.seq_len >= 3, "seq_len", self.seq_len, ">= 3")
        check(self.batch_pairs >= 1, "batch_pairs", self.batch_pairs, ">= 1")
        check(self.micro_batch >= 1, "micro_batch", self.micro_batch, ">= 1")
        check(self.max_steps >= 0, "max_steps", self.max_steps, ">= 0")
        check(self.max_steps > 0 or (math.isfinite(self.epochs) and self.epochs > 0), "epochs", self.epochs,
              "> 0 (or max_steps set)")
        check(self.safety_aux is None or 0 <= self.safety_aux < float("inf"), "safety_aux", self.safety_aux,
              "finite and >= 0")
        check(0 <= self.center < float("inf"), "center", self.center, "finite and >= 0")
        check(0 <= self.warmup_ratio <= 1, "warmup_ratio", self.warmup_ratio, "in [0, 1]")
        check(self.min_warmup_steps >= 0, "min_warmup_steps", self.min_warmup_steps, ">= 0")


def batch_indices(n: int, batch_pairs: int, seed: int, step: int) -> list[int]:
    """Indices into the ``n`` training pairs of the batch of ``step`` (the stream of per-epoch permutations of
    :func:`llama2.seeding.epoch_stream`): exact resume on any number of ranks."""
    return epoch_stream(n, batch_pairs, seed, step, "reward/pairs")


def _reward_model(cfg: RewardConfig, d: Dist):
    """The chat model with a scalar head (or a reward model trained further), and its tokenizer."""
    chat, tokenizer = load(cfg.init_from, device=d.device)
    if cfg.tokenizer:
        tokenizer = Tokenizer.from_file(cfg.tokenizer)
    if tokenizer is None:
        raise ValueError(f"{cfg.init_from}: no tokenizer stored with the checkpoint; pass tokenizer=PATH")
    if chat.args.head == "scalar":  # continuing from a reward model: keep its head
        d.say(f"init_from {cfg.init_from} already has a scalar head; training it further")
        model = chat
    else:
        model = reward_model_from_chat(chat, seed=cfg.run.seed)
    if cfg.seq_len > model.args.max_seq_len:
        raise ValueError(f"seq_len {cfg.seq_len} exceeds the model's max_seq_len {model.args.max_seq_len}")
    return model, tokenizer


def _data(cfg: RewardConfig, tokenizer, d: Dist):
    """Hold out the test set first (no test pair leaks into the mix), then mix, then encode. Returns the training
    pairs and {kind: (test pairs, stats)}."""
    prefs = read_preferences(split_paths(cfg.data), skip_bad=cfg.skip_bad)
    if cfg.val_data:
        train_prefs, test_prefs = list(prefs), list(read_preferences(split_paths(cfg.val_data), skip_bad=cfg.skip_bad))
    else:
        train_prefs, test_prefs = split_holdout(prefs, cfg.val_fraction, seed=cfg.run.seed)
    if not any(p.kind == cfg.kind for p in train_prefs):
        raise ValueError(f"no {cfg.kind} preferences in the training data ({len(train_prefs)} records of other kinds)")
    mix = mix_preferences(train_prefs, cfg.kind, cfg.other_ratio, seed=cfg.run.seed)
    pairs, stats = encode_preferences(tokenizer, mix, cfg.seq_len, cfg.overflow)
    # the test set of each kind, as the paper reports each RM on Meta Helpfulness and Meta Safety test sets
    tests = {k: encode_preferences(tokenizer, [p for p in test_prefs if p.kind == k], cfg.seq_len, cfg.overflow) for k in KINDS}
    tests = {k: v for k, v in tests.items() if v[0]}
    n_own = sum(p.kind == cfg.kind for p in mix)
    skipped = f", {len(prefs.skipped)} bad lines skipped" if prefs.skipped else ""
    d.say(f"reward ({cfg.kind}, margin {cfg.margin}): {len(prefs)} preferences read{skipped}, "
          f"{len(train_prefs)} for training, {len(test_prefs)} for testing")
    d.say(f"  mix: {len(mix)} ({n_own} {cfg.kind}, {len(mix) - n_own} other); encoded: {stats}")
    for k, (_, ts) in tests.items():
        d.say(f"  test {k}: {ts}")
    if not pairs:
        raise ValueError(f"no training pair fits seq_len {cfg.seq_len} ({stats})")
    return pairs, stats, tests


def train_reward(cfg: RewardConfig) -> dict:
    d = init_distributed(cfg.run.strategy, cfg.run.device)
    if not cfg.init_from:
        raise ValueError("init_from is required: the chat (SFT) checkpoint the reward model starts from (§3.2.2)")
    if not split_paths(cfg.data):
        raise ValueError("data is required: one or more preference JSONL files")
    if cfg.batch_pairs % (cfg.micro_batch * d.world):
        raise ValueError(f"batch_pairs {cfg.batch_pairs} is not a multiple of micro_batch * ranks = "
                         f"{cfg.micro_batch} * {d.world}")
    model, tokenizer = _reward_model(cfg, d)
    pairs, stats, tests = _data(cfg, tokenizer, d)
    n = len(pairs)
    total_steps = cfg.max_steps if cfg.max_steps > 0 else math.ceil(cfg.epochs * n / cfg.batch_pairs)
    warmup = cfg.optim.warmup_steps or max(cfg.min_warmup_steps, round(cfg.warmup_ratio * total_steps))
    per_rank = cfg.batch_pairs // d.world
    accum = per_rank // cfg.micro_batch  # micro-batches per rank per optimizer step

    s = begin(model, d, cfg, name="reward", tokenizer=tokenizer)
    if s.state is not None and s.state["extra"].get("n_pairs", n) != n:
        d.say(f"warning: the checkpoint was trained on {s.state['extra']['n_pairs']} pairs, this data has {n}: "
              "the resumed run does not continue the same data order")
    if d.main:
        meta = {"kind": cfg.kind, "margin": cfg.margin, "init_from": cfg.init_from, "train_pairs": n,
                "steps": total_steps, "warmup_steps": warmup, "config": to_dict(cfg)}
        (s.out / REWARD_CONFIG_FILE).write_text(json.dumps(meta, indent=2))
    d.say(f"  {n} pairs, {total_steps} steps of {cfg.batch_pairs} pairs ({cfg.epochs:g} epoch(s)), warmup {warmup}")

    # -- how a batch of pairs becomes a loss: eq. (2), chosen and rejected scored in one forward pass ------------
    def batch(step: int) -> StepBatch:
        mine = batch_indices(n, cfg.batch_pairs, cfg.run.seed, step)[d.rank * per_rank : (d.rank + 1) * per_rank]
        micros = [[pairs[i] for i in mine[m * cfg.micro_batch : (m + 1) * cfg.micro_batch]] for m in range(accum)]
        return StepBatch(micros, units=cfg.batch_pairs, info={"epoch": (step + 1) * cfg.batch_pairs / n})

    aux_weight = (1.0 if cfg.kind == "safety" else 0.0) if cfg.safety_aux is None else cfg.safety_aux
    center_weight = cfg.center if cfg.kind == "helpfulness" else 0.0

    def loss(micro):
        b = collate_pairs(micro, side=cfg.padding)
        scores = score_batch(s.model, b, d.device)  # (2b,): chosen rows first
        r_chosen, r_rejected = scores.chunk(2)  # (b,) each
        m = margin_values(b["ratings"], cfg.margin, device=d.device)
        total = ranking_loss(r_chosen, r_rejected, m) * len(micro)
        metrics = {"accuracy": float((r_chosen > r_rejected).sum()), "margin": float((r_chosen - r_rejected).detach().sum())}
        if center_weight:
            c = centring_loss(r_chosen, r_rejected)
            total = total + center_weight * c * len(micro)
            metrics["center_loss"] = float(c.detach())
        if aux_weight:
            aux = safety_auxiliary_loss(scores, b["safe"])
            total = total + aux_weight * aux
            metrics["aux_loss"] = float(aux.detach())
        return total, metrics

    last_eval: dict = {}

    def evaluate(step: int) -> dict:
        """Accuracy per rating bucket on each kind's test set; eval.json and, at the end, the Table 8 layout."""
        if not tests:
            return {}
        by_kind = {}
        for k, (tp, _) in tests.items():
            rc, rr = score_pairs(s.model, tp, cfg.micro_batch, cfg.padding, d, s.autocast)
            by_kind[k] = accuracy_by_rating(rc, rr, [p.rating for p in tp])
        last_eval.update({"step": step, "kind": cfg.kind, "margin": cfg.margin, "accuracy": by_kind.get(cfg.kind),
                          "by_kind": by_kind, "test_pairs": {k: len(tp) for k, (tp, _) in tests.items()}})
        if d.main:
            (s.out / "eval.json").write_text(json.dumps(last_eval, indent=2))
        return {f"test_accuracy_{k}": acc["overall"]["accuracy"] for k, acc in by_kind.items()}

    result = fit(s, total_steps, batch, loss, desc=f"reward/{cfg.kind}", warmup=warmup, evaluate=evaluate,
                 throughput={"pairs_per_s": cfg.batch_pairs}, extra={"n_pairs": n})
    if last_eval and d.main and not result["stopped"]:
        name = f"{cfg.kind} RM (margin {cfg.margin})"
        print(format_accuracy_table({f"{name} on {k} test": acc for k, acc in last_eval["by_kind"].items()}))
    return {**result, "eval": last_eval or None, "out": str(s.out), "steps": total_steps,
            "model": unwrap(s.model),  # the trained Transformer (still sharded under FSDP: load OUT for a whole copy)
            "encode": {"train": asdict(stats), **{f"test_{k}": asdict(ts) for k, (_, ts) in tests.items()}}}
