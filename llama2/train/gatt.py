"""Ghost Attention (Llama 2 §3.3, "System Message for Multi-Turn Consistency"): the training stage.

GAtt makes a model keep following an instruction given once, at the start of a dialog, for many turns:

1. sampling: for each multi-turn dialog, draw an instruction (a hobby, a style, a persona) and answer every user
   turn with the latest model while the instruction, in full, is *concatenated to every user message*, so each
   answer is sampled knowing it. ``k`` samples per turn; the kept one must pass the
   instruction's rule checker (our toy instructions are verifiable), and among those the reward model's
   favourite (if one is given) or the first. A turn with no passing sample is tried again with another user
   message from the pool (``retries`` times); a dialog ends before a turn that still has none.
2. training data: the instruction kept only in the first turn (the system message by default, or a prefix of
   the first user message: ``place``), in its short form half the time, removed from the other user messages; the loss is zero on every token
   of the earlier turns, including their answers ("we simply set the loss to 0 for all the tokens from the
   previous turns"), so each answer is trained with the dialog before it as context. With ``every_turn`` and
   ``pack`` (the defaults) a dialog's turns are packed into as few windows as fit, each led by the instruction and
   trained on all its answers: under causal attention that is the same (context, answer) pairs as n examples cut
   after each answer t, in O(n) tokens instead of O(n^2).
3. SFT on that data (the SFT stage; ``loss_on=all`` for packed windows, else ``last``), from the latest model.

The turn-by-turn evaluation of adherence (the paper's Figure 28) is :mod:`llama2.eval.gatt`.
"""
from __future__ import annotations

import dataclasses
import json
import random
import sys
from pathlib import Path

from tqdm import tqdm

from ..checkpoint import load
from ..config import BatchConfig, OptimConfig, RunConfig, StageSampling, check, group, stage_config, to_dict
from ..data.records import read_dialogs, split_paths
from ..rlhf.gatt import gatt_training_dialog, gatt_windows, sample_instruction, user_messages, with_instruction_every_turn
from ..rlhf.reward_model import RewardModel
from ..answers import draw_answers
from ..seeding import derive_seed
from ..dist import init_distributed
from .sft import SFTConfig, sft
from .state import RunLock, prepare_out

__all__ = ["GattConfig", "gatt", "sample_gatt_dialogs"]


@stage_config
class GattConfig:
    dialogs: str = ""
    """Dialogs JSONL whose user messages are replayed (their answers are re-sampled); several files comma-separated."""
    turns: int = 0
    """Turns per sampled dialog: 0 keeps each dialog's own user turns; N draws more user messages from the pool."""
    init_from: str = ""
    """The latest chat model: it answers while sampling, and is then fine-tuned."""
    reward_model: str = ""
    """Optional reward model ranking the passing samples of a turn (default: the first passing one)."""
    k: int = 4
    """Samples per turn."""
    short_prob: float = 0.5
    """Probability of the instruction's short form ("half of the time" in the paper)."""
    max_constraints: int = 1
    """Combine up to this many instructions of different families (the paper also combines constraints)."""
    place: str = "system"
    """Where the training data keeps the instruction: system (the system message) or prefix (of the first user turn)."""
    retries: int = 3
    """When none of a turn's ``k`` samples follows the instruction, try the turn again this many times, each with
    another user message drawn from the pool and ``k`` fresh samples, before the dialog ends there (0: it ends at
    once). Without retries a hard instruction's dialogs end after a turn or two, so the later turns of the
    training data hold only the easy instructions and the model keeps only those."""
    every_turn: bool = True
    """Train every sampled answer (loss on that answer, the earlier turns as context); false: only each dialog's
    last answer (the paper's literal reading)."""
    pack: bool = True
    """With ``every_turn``: pack a dialog's turns into as few training dialogs as fit the window, each with the
    instruction in its first turn and loss on all its answers (:func:`llama2.rlhf.gatt.gatt_windows`): the same
    (context, answer) pairs as one example per turn wherever a dialog fits the window, in O(turns) tokens instead of
    O(turns^2). False: one example per turn, cut after its answer and trained on it alone."""
    replay: str = ""
    """Dialogs JSONL (e.g. the SFT data) mixed into the fine-tuning data, as many dialogs as GAtt answers trained: without
    them the model learns to decorate every answer, asked or not, and forgets tasks the GAtt answers get wrong."""
    sampling: StageSampling = group(StageSampling, temperature=0.8, max_new_tokens=64, gen_batch=32)
    finetune: BatchConfig = group(BatchConfig, seq_len=512, batch_size=16, micro_batch=8, epochs=2.0)
    run: RunConfig = group(RunConfig, out="runs/gatt", save_every=10**9, keep_last=1)
    optim: OptimConfig = group(OptimConfig, lr=1e-5)

    def __post_init__(self) -> None:
        check(self.turns >= 0, "turns", self.turns, ">= 0")
        check(self.k >= 1, "k", self.k, ">= 1")
        check(self.retries >= 0, "retries", self.retries, ">= 0")
        check(0 <= self.short_prob <= 1, "short_prob", self.short_prob, "in [0, 1]")
        check(self.max_constraints >= 1, "max_constraints", self.max_constraints, ">= 1")
        check(self.place in ("system", "prefix"), "place", self.place, "system or prefix")


def _plans(dialogs, cfg: GattConfig) -> list:
    """Per dialog: (instruction, the wording the training data keeps, the user messages to play). Sampling always
    uses the instruction's full wording (``instruction.long``)."""
    rng = random.Random(cfg.run.seed)
    pool = user_messages(dialogs)
    plans = []
    for d in dialogs:
        users = [m["content"] for m in d if m["role"] == "user"]
        if cfg.turns > len(users):
            users += rng.choices(pool, k=cfg.turns - len(users))
        elif cfg.turns:
            users = users[: cfg.turns]
        instruction, text = sample_instruction(rng, cfg.short_prob, cfg.max_constraints)
        plans.append((instruction, text, users))
    return plans


def sample_gatt_dialogs(model, tokenizer, dialogs, cfg: GattConfig, rm: RewardModel | None, show: bool = True) -> tuple[list, dict]:
    """Answer every dialog turn by turn with the instruction on every user message; returns the sampled dialogs
    ({"instruction", "text", "dialog"} with the instruction still in every user turn) and counts."""
    plans = _plans(dialogs, cfg)
    sampled = [[] for _ in plans]  # the dialog so far, instruction in every user turn
    alive = set(range(len(plans)))
    counts = {"dialogs": len(plans), "turns_sampled": 0, "turns_kept": 0, "ended_early": 0, "retried": 0}
    pool = user_messages(dialogs)
    n_turns = max(len(u) for _, _, u in plans)
    bar = tqdm(total=sum(len(u) for _, _, u in plans), desc="gatt: sampling turns", disable=not (show and sys.stderr.isatty()))
    for t in range(n_turns):
        pending = [i for i in sorted(alive) if t < len(plans[i][2])]
        for attempt in range(cfg.retries + 1):
            if not pending:
                break
            if attempt:  # another user message for each dialog whose turn failed (the plan's list is updated in place)
                for i in pending:
                    plans[i][2][t] = random.Random(derive_seed(cfg.run.seed, "gatt/retry", i, t, attempt)).choice(pool)
                counts["retried"] += len(pending)
            contexts = [with_instruction_every_turn(sampled[i] + [{"role": "user", "content": plans[i][2][t]}],
                                                    plans[i][0].long) for i in pending]
            seed = derive_seed(cfg.run.seed, "gatt/turn", t) if not attempt else derive_seed(cfg.run.seed, "gatt/turn", t, attempt)
            comps = draw_answers(model, tokenizer, contexts, cfg.sampling, k=cfg.k, seed=seed, purpose="gatt", show=False)
            failed = []
            for i, ctx, row in zip(pending, contexts, comps):
                counts["turns_sampled"] += 1
                ok = [a for a in (c.text.strip() for c in row) if a and plans[i][0].check(a)]
                if not ok:
                    failed.append(i)
                    continue
                if rm is not None and len(ok) > 1:
                    ok = [ok[int(rm.score([ctx] * len(ok), ok).argmax())]]
                sampled[i] += [{"role": "user", "content": plans[i][2][t]}, {"role": "assistant", "content": ok[0]}]
                counts["turns_kept"] += 1
            pending = failed
        for i in pending:  # no sample follows the instruction, after every retry: the dialog ends before this turn
            alive.discard(i)
            counts["ended_early"] += 1
        bar.update(sum(t < len(plans[i][2]) for i in range(len(plans))))
    bar.close()
    out = [{"instruction": plans[i][0].kind + ":" + plans[i][0].value, "text": plans[i][1], "sampled_with": plans[i][0].long,
            "dialog": with_instruction_every_turn(sampled[i], plans[i][0].long)} for i in range(len(plans)) if sampled[i]]
    return out, counts


def _packed(cfg: GattConfig) -> bool:
    return cfg.every_turn and cfg.pack


def _check_same_data_layout(cfg: GattConfig, config_path: Path, data_path: Path) -> None:
    """A resumed run reuses the training data it wrote; its layout (``every_turn``, ``pack``) decides the loss mask,
    so a resume that asks for another layout is refused rather than trained with the wrong mask."""
    if not (data_path.is_file() and config_path.is_file()):
        return
    before = json.loads(config_path.read_text())
    was_every = before.get("every_turn", True)
    was_pack = bool(before.get("pack", False)) and was_every  # runs written before `pack` existed did not pack
    if (was_every, was_pack) != (cfg.every_turn, _packed(cfg)):
        raise ValueError(f"{data_path} was written with every_turn={was_every}, pack={was_pack}; resume with those, or "
                         "start over (overwrite=true) to write the data anew")


def _write_training_data(sampled: list, cfg: GattConfig, data_path: Path, tokenizer) -> int:
    """The GAtt training dialogs: packed windows trained on every answer (``pack``), or one per trained answer (SFT
    with loss_on=last trains the last answer of each); and as many replayed dialogs (``replay``) as GAtt answers
    trained. Returns the number of GAtt answers trained."""
    rows, examples = [], 0
    for s in sampled:
        if _packed(cfg):
            windows = gatt_windows(tokenizer, s["dialog"], s["sampled_with"], cfg.finetune.seq_len, cfg.place, keep=s["text"])
            rows += windows
            examples += sum(m["role"] == "assistant" for w in windows for m in w)
            continue
        train = gatt_training_dialog(s["dialog"], s["sampled_with"], cfg.place, keep=s["text"])
        ends = [j + 1 for j, m in enumerate(train) if m["role"] == "assistant"] if cfg.every_turn else [len(train)]
        rows += [train[:end] for end in ends]
        examples += len(ends)
    if cfg.replay:
        pool = list(read_dialogs(split_paths(cfg.replay)))
        rows += random.Random(derive_seed(cfg.run.seed, "gatt/replay")).sample(pool, min(len(pool), examples))
    tmp = Path(str(data_path) + ".tmp")
    tmp.write_text("".join(json.dumps({"dialog": d}) + "\n" for d in rows), encoding="utf-8")
    tmp.replace(data_path)
    return examples


def gatt(cfg: GattConfig) -> dict:
    d = init_distributed(cfg.run.strategy, cfg.run.device)
    out = Path(cfg.run.out)
    if not cfg.dialogs or not cfg.init_from:
        raise ValueError("give dialogs=DIALOGS.jsonl and init_from=CHECKPOINT")
    samples_path, data_path = out / "samples.jsonl", out / "gatt_data.jsonl"
    if d.main:  # the sampled data is reused only when resuming; overwrite removes it too
        with RunLock(out, "gatt"):
            prepare_out(out, resume=cfg.run.resume, overwrite=cfg.run.overwrite, say=d.say,
                        own=(samples_path.name, data_path.name, "gatt_counts.json"))
    d.barrier()
    counts: dict = {}
    _check_same_data_layout(cfg, out / "gatt_config.json", data_path)
    if not data_path.is_file():  # sampling is done once; a rerun goes straight to (resuming) the fine-tuning
        if d.main:
            counts = _sample_and_write(cfg, d, out, samples_path, data_path)
        d.barrier()
    result = sft(SFTConfig(data=str(data_path), val_fraction=0, init_from=cfg.init_from,
                           loss_on="all" if _packed(cfg) else "last",
                           batch=cfg.finetune, optim=cfg.optim, run=dataclasses.replace(cfg.run, resume=True)))
    return {"counts": counts, "history": result["history"], "out": str(out), "stopped": result["stopped"]}


def _sample_and_write(cfg: GattConfig, d, out: Path, samples_path: Path, data_path: Path) -> dict:
    """Sample the GAtt dialogs and write them and the training data (rank 0; the fine-tuning then locks OUT itself).
    Returns the counts."""
    with RunLock(out, "gatt sampling"):
        dialogs = list(read_dialogs(split_paths(cfg.dialogs)))
        model, tokenizer = load(cfg.init_from, device=d.device)
        rm = RewardModel.from_pretrained(cfg.reward_model, device=d.device) if cfg.reward_model else None
        sampled, counts = sample_gatt_dialogs(model, tokenizer, dialogs, cfg, rm)
        del model
        out.mkdir(parents=True, exist_ok=True)
        (out / "gatt_config.json").write_text(json.dumps(to_dict(cfg), indent=2))
        with open(samples_path, "w", encoding="utf-8") as f:
            for s in sampled:
                f.write(json.dumps(s) + "\n")
        counts["examples"] = _write_training_data(sampled, cfg, data_path, tokenizer)
        (out / "gatt_counts.json").write_text(json.dumps(counts, indent=2))
        d.say(f"gatt: {counts['turns_kept']}/{counts['turns_sampled']} sampled turns follow their instruction "
              f"({counts['ended_early']} dialogs ended early) -> {counts['examples']} answers to train on")
    return counts
