"""Supervised fine-tuning (Llama 2 §3.1): next-token loss on the answers of chat-formatted dialogs only.

What is this stage's own: the config, the data (read, encode in the chat format with a loss mask, pack), and
how a batch of packed rows becomes a loss. The paper's settings (§3.1, "Fine-Tuning Details"): cosine schedule
from 2e-5, weight decay 0.1, batch 64 sequences of 4096 tokens, 2 epochs; "we zero-out the loss on tokens from
the user prompt, and as a result, we backpropagate only on answer tokens". Every assistant answer of a
multi-turn dialog carries loss (with its EOS); system and user tokens never do.

Packing: the paper concatenates prompts and answers with a separator; here dialogs are packed best-fit into rows
of ``seq_len`` positions and attention is masked so it never crosses a dialog boundary, with rotary positions
restarting per dialog (``llama2.data.sft.pack_sft``): a packed dialog trains exactly as if it were alone.

Data order: the rows of each epoch are permuted by a generator seeded by (seed, epoch) and read as one endless
stream; step ``s`` takes rows ``[s * batch_size, (s + 1) * batch_size)`` of it, so every step has the same
number of rows (on every rank), the data position is the step itself, and a resumed run repeats the
uninterrupted one exactly.
"""
from __future__ import annotations

import math
from dataclasses import asdict

import torch
import torch.distributed as dist

from ..checkpoint import load
from ..config import BatchConfig, OptimConfig, RunConfig, check, group, stage_config
from ..data.records import read_dialogs, split_holdout, split_paths
from ..data.sft import IGNORE_INDEX, collate, encode_sft_examples, last_answer_only, pack_sft
from ..model import PRESETS, ModelArgs, Transformer
from ..seeding import epoch_stream
from ..tokenizer import Tokenizer
from ..dist import Dist, init_distributed
from .loop import StepBatch, begin, fit

__all__ = ["SFTConfig", "sft", "step_rows", "last_answer_only"]


@stage_config
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
    loss_on: str = "all"
    """Which answers carry loss: all (every assistant turn, the paper's SFT) or last (only the final answer, as
    Ghost Attention trains: earlier turns were sampled under a different system message)."""
    overflow: str = "truncate"
    """A dialog longer than seq_len: truncate (drop the earliest exchanges, then the start of the prompt; never an
    answer token of what is kept) or skip. Both are counted and reported."""
    batch: BatchConfig = group(BatchConfig)
    run: RunConfig = group(RunConfig, out="runs/sft")
    optim: OptimConfig = group(OptimConfig, lr=2e-5)

    def __post_init__(self) -> None:
        check(self.model in PRESETS, "model", self.model, f"a preset: {', '.join(PRESETS)}")
        check(0 <= self.val_fraction < 1, "val_fraction", self.val_fraction, "in [0, 1)")
        check(self.loss_on in ("all", "last"), "loss_on", self.loss_on, "all or last")
        check(self.overflow in ("truncate", "skip"), "overflow", self.overflow, "truncate or skip")


def step_rows(n_rows: int, batch_size: int, seed: int, step: int) -> list[int]:
    """Indices of the rows of optimizer step ``step`` in the endless stream of per-epoch permutations."""
    return epoch_stream(n_rows, batch_size, seed, step, "sft/rows")


def _forward_sum(model, rows, d: Dist) -> tuple[torch.Tensor, int]:
    """Summed answer-token loss of some packed rows, and how many answer tokens they hold."""
    b = collate(rows)
    count = int((b["targets"] != IGNORE_INDEX).sum())
    mean = model(b["tokens"].to(d.device), mask=b["mask"].to(d.device), position_ids=b["position_ids"].to(d.device),
                 targets=b["targets"].to(d.device))
    return mean * count, count


@torch.no_grad()
def evaluate(model, rows, micro_batch: int, d: Dist, autocast) -> float:
    """Mean loss per answer token over the validation rows, split across ranks; every rank runs the same number of
    forwards (FSDP gathers weights collectively), padding its share with a row whose loss is ignored."""
    model.eval()
    per_rank = -(-len(rows) // d.world)
    mine = list(rows[d.rank * per_rank : (d.rank + 1) * per_rank])
    total = torch.zeros(2, dtype=torch.float64)
    for i in range(0, per_rank, micro_batch):
        chunk = mine[i : i + micro_batch]
        with autocast:
            if chunk:
                s, n = _forward_sum(model, chunk, d)
                total += torch.tensor([float(s), n], dtype=torch.float64)
            else:
                _forward_sum(model, rows[:1], d)  # keeps the collective calls in step; result unused
    if d.world > 1:
        total = total.to(d.device)
        dist.all_reduce(total)
    model.train()
    return float(total[0] / max(total[1], 1))


def _model_and_tokenizer(cfg: SFTConfig, d: Dist):
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
        args = ModelArgs.from_preset(cfg.model, vocab_size=tokenizer.vocab_size, max_seq_len=max(cfg.batch.seq_len, 256))
        model = Transformer(args).init_weights(seed=cfg.run.seed).to(d.device)
    if cfg.batch.seq_len > model.args.max_seq_len:
        raise ValueError(f"seq_len {cfg.batch.seq_len} exceeds the model's context of {model.args.max_seq_len}")
    return model, tokenizer


def sft(cfg: SFTConfig) -> dict:
    d = init_distributed(cfg.run.strategy, cfg.run.device)
    b = cfg.batch
    if not cfg.data:
        raise ValueError("data=...: give the dialogs JSONL to fine-tune on")
    if b.batch_size % (b.micro_batch * d.world):
        raise ValueError(f"batch_size {b.batch_size} is not a multiple of micro_batch * ranks = {b.micro_batch} * {d.world}")
    accum = b.batch_size // (b.micro_batch * d.world)
    model, tokenizer = _model_and_tokenizer(cfg, d)

    # -- data: dialogs -> (ids, answer mask) -> packed rows -------------------------------------------------------
    dialogs = read_dialogs(split_paths(cfg.data))
    if cfg.val_data:
        train_dialogs, val_dialogs = list(dialogs), list(read_dialogs(split_paths(cfg.val_data)))
    else:
        train_dialogs, val_dialogs = split_holdout(dialogs, cfg.val_fraction, cfg.run.seed) if cfg.val_fraction > 0 else (list(dialogs), [])
    train_ex, stats = encode_sft_examples(tokenizer, train_dialogs, b.seq_len, cfg.overflow)
    val_ex, _ = encode_sft_examples(tokenizer, val_dialogs, b.seq_len, cfg.overflow)
    if cfg.loss_on == "last":
        train_ex, val_ex = [last_answer_only(e) for e in train_ex], [last_answer_only(e) for e in val_ex]
    if not train_ex:
        raise ValueError(f"{cfg.data}: no dialog fits seq_len {b.seq_len} ({stats})")
    rows = pack_sft(train_ex, b.seq_len)
    val_rows = pack_sft(val_ex, b.seq_len) if val_ex else []
    steps_per_epoch = len(rows) / b.batch_size
    max_steps = max(1, math.ceil(b.epochs * steps_per_epoch))
    answer_tokens = sum(int(sum(e.loss_mask)) for e in train_ex)
    d.say(f"sft: {len(train_ex)} dialogs ({stats}) -> {len(rows)} rows of {b.seq_len}, {answer_tokens:,} answer tokens; "
          f"{len(val_ex)} validation dialogs; {max_steps} steps of {b.batch_size} rows")
    s = begin(model, d, cfg, name="sft", tokenizer=tokenizer)

    # -- how a batch becomes a loss: a mean over every answer token of the global batch, whichever rank holds it --
    def batch(step: int) -> StepBatch:
        rows_of_step = [rows[i] for i in step_rows(len(rows), b.batch_size, cfg.run.seed, step)]
        n_global = sum(r.n_targets for r in rows_of_step)
        mine = rows_of_step[d.rank * accum * b.micro_batch : (d.rank + 1) * accum * b.micro_batch]
        micros = [mine[i * b.micro_batch : (i + 1) * b.micro_batch] for i in range(accum)]
        return StepBatch(micros, units=max(n_global, 1),
                         info={"epoch": (step + 1) / steps_per_epoch, "answer_tokens": n_global})

    def loss(micro):
        return _forward_sum(s.model, micro, d)[0], {}

    def evaluate_val(step: int) -> dict:
        return {"val_loss": evaluate(s.model, val_rows, b.micro_batch, d, s.autocast)} if val_rows else {}

    result = fit(s, max_steps, batch, loss, desc="sft", evaluate=evaluate_val,
                 throughput={"tokens_per_s": b.batch_size * b.seq_len})
    return {**result, "out": str(s.out), "encode": asdict(stats), "steps": max_steps}
