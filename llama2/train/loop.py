"""The one training loop: optimizer, schedule, accumulation, run control. Every stage brings only its own part:
how a batch becomes a loss.

A stage calls :func:`begin` with its model and config (this resumes the newest checkpoint's weights, sets
activation checkpointing and torch.compile, wraps the model for FSDP/DDP, builds the paper's AdamW, restores the
optimizer state and opens the metrics log), then :func:`fit` with two functions of its own:

* ``batch(step) -> StepBatch``: this rank's micro-batches of optimizer step ``step`` and ``units``, the global
  number of things the loss averages over (tokens, answer tokens, pairs), known before any forward pass;
* ``loss(micro) -> (loss_sum, metric_sums)``: the summed loss of one micro-batch (a tensor with a graph) and
  sums of any metrics to report (each averaged over ``units`` by the loop).

:func:`fit` runs the steps: learning rate from the schedule, gradient accumulation over the micro-batches with
one gradient synchronisation per step, clipping, the optimizer step, metrics to ``metrics.jsonl`` and
TensorBoard, a progress bar, evaluation every ``eval_every`` steps, checkpoints every ``save_every`` steps (the
newest ``keep_last`` kept), and Ctrl-C / SIGTERM: finish the step, save, stop (a second Ctrl-C aborts at once).
A stage whose loop is not "accumulate, then one optimizer step" (PPO: rollouts, then several steps of two
models) uses :func:`run_steps`, the run control alone, and :func:`accumulate` for each of its optimizer steps.

Optimizer and schedule are those of Llama 2 §2.2: AdamW (beta1 0.9, beta2 0.95, eps 1e-5), weight decay 0.1,
gradient clipping 1.0, linear warmup then cosine decay of the learning rate down to 10% of its peak.
"""
from __future__ import annotations

import json
import math
import signal
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm

from ..checkpoint import load
from ..config import OptimConfig, RunConfig, to_dict
from ..dist import Dist, autocast_for, clip_grad_norm, no_grad_sync, unwrap, wrap_model
from .state import (
    RunLock, latest_checkpoint, load_full_optimizer_state, load_training_state, prepare_out, save_checkpoint,
)

__all__ = [
    "make_optimizer", "lr_at", "learning_rate", "StopRequest", "MetricsLog", "NonFiniteError", "Session", "StepBatch",
    "begin", "accumulate", "fit", "run_steps",
]


def make_optimizer(model: torch.nn.Module, lr: float, weight_decay: float = 0.1, betas=(0.9, 0.95), eps: float = 1e-5):
    """AdamW with weight decay on matrices only (embeddings and projections); norms' gains and biases are not
    decayed (the paper does not say; decaying a gain towards 0 has no regularising meaning, so common practice)."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.dim() >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, betas=tuple(betas), eps=eps, foreach=True)


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


def learning_rate(optim: OptimConfig, step: int, total: int, warmup: int | None = None) -> float:
    """The rate of ``optim``'s schedule at ``step``: constant, or warmup (``warmup`` or optim.warmup_steps) then cosine."""
    if optim.schedule == "constant":
        return optim.lr
    return lr_at(step, optim.lr, optim.warmup_steps if warmup is None else warmup, total, optim.min_lr_ratio)


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

    def requested(self, d: Dist) -> bool:
        if d.world == 1:
            return self.flag
        t = torch.tensor([float(self.flag)], device=d.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item())


class MetricsLog:
    """One record per step to ``out/metrics.jsonl`` (flushed each line, so a crash loses nothing written) and, with
    ``tensorboard``, to ``out/tb`` (``tensorboard --logdir OUT/tb``). Only rank 0 writes. Opened at ``start_step``,
    it first drops the records of later steps (a resumed run redoes them; no step is logged twice)."""

    def __init__(self, out: Path, enabled: bool = True, tensorboard: bool = True, prefix: str = "",
                 start_step: int = 0) -> None:
        self.prefix = prefix
        self.file = None
        self.tb = None
        if not enabled:
            return
        path = out / "metrics.jsonl"
        kept = []
        if path.is_file():
            for line in path.read_text(encoding="utf-8").splitlines():
                try:
                    if json.loads(line).get("step", 0) <= start_step:
                        kept.append(line)
                except json.JSONDecodeError:  # a line cut by a kill mid-write
                    continue
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text("".join(k + "\n" for k in kept), encoding="utf-8")
        tmp.replace(path)
        self.file = open(path, "a", encoding="utf-8")
        if tensorboard:
            self.tb = SummaryWriter(str(out / "tb"), purge_step=start_step or None)

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
            self.file = None
        if self.tb is not None:
            self.tb.close()
            self.tb = None


class NonFiniteError(FloatingPointError):
    """The loss or the gradient norm of a step is not finite: training stops before the optimizer step, so the last
    checkpoint (and OUT's model) stay the last good ones."""


@dataclass
class Session:
    """One stage's training state, made by :func:`begin`: what the loop needs and the stage's functions use."""

    model: torch.nn.Module  # wrapped for FSDP/DDP when several ranks run (``unwrap(model)`` is the Transformer)
    optimizer: torch.optim.Optimizer
    d: Dist
    out: Path
    run: RunConfig
    optim: OptimConfig
    tokenizer: Any
    start_step: int = 0
    state: dict | None = None  # the resumed checkpoint's trainer state (its "extra" holds what the stage stored)
    log: MetricsLog | None = None
    autocast: Any = None
    lock: RunLock | None = None

    def close(self) -> None:
        """Close the metrics log and release the output directory."""
        if self.log is not None:
            self.log.close()
        if self.lock is not None:
            self.lock.release()

    @property
    def args(self):
        return unwrap(self.model).args


@dataclass
class StepBatch:
    """This rank's micro-batches of one optimizer step, the global count the loss averages over, and numbers to
    record as they are (e.g. how many answer tokens the step trained on)."""

    micros: Sequence[Any]
    units: float
    info: dict = field(default_factory=dict)


def begin(model: torch.nn.Module, d: Dist, cfg: Any, *, name: str, tokenizer: Any) -> Session:
    """What every trained stage does before its loop: load the newest checkpoint's weights when resuming (into the
    whole model, before sharding, so a checkpoint from any number of ranks loads), set activation checkpointing
    and torch.compile (per block, as FSDP wraps them), wrap for FSDP/DDP, build the paper's AdamW, restore the
    optimizer state, write ``OUT/{name}_config.json`` and open the metrics log. ``cfg`` has ``run`` and ``optim``."""
    lock = RunLock(Path(cfg.run.out), what=name).acquire() if d.main else None  # held until the loop ends (or the process does)
    try:
        return _begin(model, d, cfg, name, tokenizer, lock)
    except BaseException:
        if lock is not None:
            lock.release()
        raise


def _begin(model: torch.nn.Module, d: Dist, cfg: Any, name: str, tokenizer: Any, lock: RunLock | None) -> Session:
    run, optim, out = cfg.run, cfg.optim, Path(cfg.run.out)
    if d.main:
        prepare_out(out, resume=run.resume, overwrite=run.overwrite, say=d.say)
    d.barrier()
    ckpt = latest_checkpoint(out, say=d.say) if run.resume else None
    if ckpt is not None:
        weights, _ = load(ckpt, device=d.device)
        model.load_state_dict(weights.state_dict())
        del weights
    model.gradient_checkpointing = run.activation_checkpointing
    if run.compile or (run.compile is None and d.device.type == "cuda"):
        torch._dynamo.config.suppress_errors = True  # a block that fails to compile runs eagerly (with a warning)
        for block in model.layers:
            block.compile()
    model.train()
    model = wrap_model(model, d)
    opt = make_optimizer(model, optim.lr, optim.weight_decay, optim.betas, optim.eps)
    state = None
    if ckpt is not None:
        state = load_training_state(ckpt)
        load_full_optimizer_state(model, opt, state["optimizer"])
        d.say(f"resumed from {ckpt} at step {state['step']} ({d.world} rank(s))")
    start = state["step"] if state else 0
    if d.main:
        out.mkdir(parents=True, exist_ok=True)
        (out / f"{name}_config.json").write_text(json.dumps(to_dict(cfg), indent=2))
    d.barrier()
    log = MetricsLog(out, enabled=d.main, tensorboard=run.tensorboard, start_step=start)
    return Session(model, opt, d, out, run, optim, tokenizer, start, state, log, autocast_for(d.device, run.dtype), lock)


def accumulate(s: Session, micros: Sequence[Any], loss_fn: Callable[[Any], tuple[torch.Tensor, dict]], units: float,
               model: torch.nn.Module | None = None, optimizer: torch.optim.Optimizer | None = None) -> dict:
    """One optimizer step: forward/backward every micro-batch (gradients synchronised across ranks on the last one
    only), each scaled so that the gradient is that of the mean over ``units``; clip; step. Returns the mean loss
    and metrics over ``units`` (all ranks) and the gradient norm before clipping. ``model``/``optimizer`` default to
    the session's (PPO passes its value model too)."""
    model = model or s.model
    optimizer = optimizer or s.optimizer
    d = s.d
    sums: dict[str, float] = {"loss": 0.0}
    for i, micro in enumerate(micros):
        with no_grad_sync(model, d, active=i < len(micros) - 1), s.autocast:
            loss_sum, metrics = loss_fn(micro)
            # ranks' gradients are averaged by DDP/FSDP, so each rank's share of the sum is scaled up by world
            (loss_sum * (d.world / units)).backward()
        sums["loss"] += float(loss_sum.detach())
        for k, v in metrics.items():
            sums[k] = sums.get(k, 0.0) + float(v)
    rec = {k: v / units for k, v in zip(sums, d.all_sums(list(sums.values())))}
    rec["grad_norm"] = clip_grad_norm(model, s.optim.grad_clip)
    if not (math.isfinite(rec["loss"]) and math.isfinite(rec["grad_norm"])):
        optimizer.zero_grad(set_to_none=True)
        raise NonFiniteError(f"loss {rec['loss']} / gradient norm {rec['grad_norm']}: not finite; stopped before the "
                             f"optimizer step (the last checkpoint in {s.out} is intact; lower the learning rate?)")
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return rec


def run_steps(s: Session, total_steps: int, step_fn: Callable[[int], dict], *, desc: str,
              evaluate: Callable[[int], dict] | None = None, save: Callable[[int], Any] | None = None,
              eval_on_stop: bool = False, should_stop: Callable[[dict], bool] | None = None,
              postfix: Sequence[str] = ("loss",)) -> dict:
    """Run control: steps ``s.start_step .. total_steps - 1`` of ``step_fn(step) -> record``, each record logged
    (with ``step``: the number of steps done) and shown on a progress bar; ``evaluate(steps_done)`` merged into the
    record every ``eval_every`` steps and at the end; ``save(steps_done)`` every ``save_every`` steps, at the end and
    when stopped; ``should_stop(record)`` ends the run early (PPO's early stopping). Returns {"history", "stopped"}."""
    d, run = s.d, s.run
    history: list[dict] = []
    bar = tqdm(total=total_steps, initial=s.start_step, desc=desc, disable=not (d.main and sys.stderr.isatty()))
    with StopRequest() as stop:
        try:
            for step in range(s.start_step, total_steps):
                done = step + 1
                t0 = time.perf_counter()
                rec = {"step": done, **step_fn(step)}
                rec.setdefault("seconds", time.perf_counter() - t0)
                stopping = stop.requested(d)
                last = done == total_steps
                if evaluate is not None and ((run.eval_every and done % run.eval_every == 0) or last
                                             or (stopping and eval_on_stop)):
                    rec.update(evaluate(done))
                history.append(rec)
                if s.log is not None:
                    s.log.log(rec)
                bar.set_postfix({k: f"{rec[k]:.3f}" for k in postfix if isinstance(rec.get(k), float)})
                bar.update(1)
                if save is not None and (done % run.save_every == 0 or last or stopping):
                    save(done)
                if stopping:
                    d.say(f"stopped: saved step {done} in {s.out} (resume=true continues)" if save is not None
                          else f"stopped at step {done}: {s.out} holds what this stage keeps (it does not resume)")
                    break
                if should_stop is not None and should_stop(rec):
                    break
        finally:
            bar.close()
            s.close()
    return {"history": history, "stopped": stop.flag}


def fit(s: Session, total_steps: int, batch: Callable[[int], StepBatch],
        loss: Callable[[Any], tuple[torch.Tensor, dict]], *, desc: str, warmup: int | None = None,
        evaluate: Callable[[int], dict] | None = None, throughput: dict[str, float] | None = None,
        on_record: Callable[[dict], None] | None = None, extra: dict | None = None) -> dict:
    """Train ``total_steps`` optimizer steps of ``batch``/``loss`` (see the module docstring). ``throughput``
    {name: units per step} records name = units / seconds of each step (e.g. tokens_per_s); ``on_record(rec)`` may
    add derived numbers (MFU); ``extra`` is stored in every checkpoint's trainer state."""

    def step_fn(step: int) -> dict:
        t0 = time.perf_counter()
        lr = learning_rate(s.optim, step, total_steps, warmup)
        for g in s.optimizer.param_groups:
            g["lr"] = lr
        b = batch(step)
        rec = accumulate(s, b.micros, loss, b.units)
        rec = {"loss": rec.pop("loss"), "lr": lr, **rec, **b.info}
        dt = time.perf_counter() - t0
        for name, amount in (throughput or {}).items():
            rec[name] = amount / dt
        if on_record is not None:
            on_record(rec)
        return rec

    def save(step: int) -> None:
        save_checkpoint(s.model, s.args, s.tokenizer, s.optimizer, s.out, step, s.run.keep_last, s.d, extra)

    return run_steps(s, total_steps, step_fn, desc=desc, evaluate=evaluate, save=save)
