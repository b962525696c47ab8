"""Ghost Attention (Llama 2 §3.3, "System Message for Multi-Turn Consistency") and its turn-by-turn evaluation.

GAtt makes a model keep following an instruction given once, at the start of a dialog, for many turns:

1. sampling: for each multi-turn dialog, draw an instruction (a hobby, a style, a persona; its short form half
   the time) and answer every user turn with the latest model while the instruction is *concatenated to every
   user message*, so each answer is sampled knowing it. ``k`` samples per turn; the kept one must pass the
   instruction's rule checker (our toy instructions are verifiable), and among those the reward model's
   favourite (if one is given) or the first. A dialog whose turn has no passing sample ends before that turn.
2. training data: the instruction kept only in the first turn (the system message by default, or a prefix of
   the first user message: ``place``), removed from the other user messages; the loss is zero on every token
   of the earlier turns, including their answers ("we simply set the loss to 0 for all the tokens from the
   previous turns"), so each example trains one answer: with ``every_turn`` (default) a sampled dialog of n
   turns gives n examples, cut after answer t and trained on answer t only.
3. SFT on that data (the SFT stage with ``loss_on=last``), from the latest model.

``gatt_eval`` plays the same kind of dialogs turn by turn up to 20 turns with one or more checkpoints, the
instruction given only at the start, and reports the share of answers that follow it at every turn (the
comparison of the paper's Figure 28), as a JSON, a printed table and a PNG figure. When a dialog outgrows the
context the oldest exchanges are dropped, never the system message (``llama2.chat.fit_dialog``).
"""
from __future__ import annotations

import json
import random
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

from ..chat import fit_dialog
from ..checkpoint import load
from ..data.dialogs import read_dialogs
from ..generation import generate
from ..rlhf.gatt import (
    adherence_by_turn, gatt_training_dialog, multi_turn_probe_dialogs, sample_instruction,
    with_instruction_every_turn,
)
from ..rlhf.reward_model import RewardModel
from .common import init_distributed, split_paths
from .sft import SFTConfig, sft


@dataclass
class GattConfig:
    dialogs: str = ""
    """Dialogs JSONL whose user messages are replayed (their answers are re-sampled); several files comma-separated."""
    turns: int = 0
    """Turns per sampled dialog: 0 keeps each dialog's own user turns; N draws more user messages from the pool."""
    init_from: str = ""
    """The latest chat model: it answers while sampling, and is then fine-tuned."""
    reward_model: str = ""
    """Optional reward model ranking the passing samples of a turn (default: the first passing one)."""
    out: str = "runs/gatt"
    """Output directory: samples.jsonl, gatt_data.jsonl and the fine-tuned model."""
    k: int = 4
    """Samples per turn."""
    temperature: float = 0.8
    """Sampling temperature."""
    max_new_tokens: int = 64
    """Longest answer sampled."""
    short_prob: float = 0.5
    """Probability of the instruction's short form ("half of the time" in the paper)."""
    max_constraints: int = 1
    """Combine up to this many instructions of different families (the paper also combines constraints)."""
    place: str = "system"
    """Where the training data keeps the instruction: system (the system message) or prefix (of the first user turn)."""
    every_turn: bool = True
    """One training example per sampled turn (loss on that turn's answer only); false: one per dialog (its last answer)."""
    seq_len: int = 512
    """Fine-tuning row length."""
    batch_size: int = 16
    """Fine-tuning rows per step."""
    micro_batch: int = 8
    """Fine-tuning rows per forward on each rank."""
    epochs: float = 2.0
    """Fine-tuning epochs."""
    lr: float = 1e-5
    """Fine-tuning peak learning rate (cosine to 10%)."""
    seed: int = 0
    """Seed of the instructions, the sampling and the data order."""
    device: str = "cpu"
    """cpu or cuda."""
    strategy: str = "fsdp"
    """Fine-tuning under torchrun: fsdp or ddp (the sampling runs on rank 0's data, split by rank)."""
    tensorboard: bool = True
    """Write the fine-tuning metrics for TensorBoard too."""


@dataclass
class GattEvalConfig:
    ckpts: list[str] = field(default_factory=list)
    """Checkpoints to compare (e.g. before and after GAtt), comma-separated."""
    names: list[str] = field(default_factory=list)
    """Labels of the checkpoints in the table and figure (default: their paths)."""
    dialogs: str = ""
    """Dialogs JSONL whose user messages make the probe turns."""
    out: str = "runs/gatt-eval"
    """Output directory: gatt_eval.json and gatt_adherence.png."""
    n: int = 16
    """Probe dialogs (each with its own instruction)."""
    turns: int = 20
    """Turns per probe (20 in the paper)."""
    max_new_tokens: int = 32
    """Longest answer per turn."""
    temperature: float = 0.0
    """0 = greedy (deterministic evaluation)."""
    short_prob: float = 0.5
    """Probability of the instruction's short form."""
    place: str = "system"
    """Where the instruction is given: system or prefix (of the first user message)."""
    seed: int = 0
    """Seed of the probes."""
    device: str = "cpu"
    """cpu or cuda."""


def _user_messages(dialogs) -> list[str]:
    return [m["content"] for d in dialogs for m in d if m["role"] == "user"]


def _answer(model, tokenizer, dialogs: list, k: int, temperature: float, max_new_tokens: int, seed: int) -> list[list[str]]:
    """``k`` answers to each dialog (ending with a user turn), trimmed to the context from the oldest exchange."""
    budget = model.args.max_seq_len - max_new_tokens
    prompts = [fit_dialog(tokenizer, d, budget)[1] for d in dialogs]
    rows = [p for p in prompts for _ in range(k)]
    comps = generate(model, rows, tokenizer=tokenizer, temperature=temperature, max_new_tokens=max_new_tokens, seed=seed)
    texts = [c.text.strip() for c in comps]
    return [texts[i * k : (i + 1) * k] for i in range(len(dialogs))]


def sample_gatt_dialogs(model, tokenizer, dialogs, cfg: GattConfig, rm: RewardModel | None, show: bool = True) -> tuple[list, dict]:
    """Answer every dialog turn by turn with the instruction on every user message; returns the sampled dialogs
    ({"instruction", "text", "dialog"} with the instruction still in every user turn) and counts."""
    rng = random.Random(cfg.seed)
    pool = _user_messages(dialogs)
    plans = []  # per dialog: (instruction, its wording, the user messages to play)
    for d in dialogs:
        users = [m["content"] for m in d if m["role"] == "user"]
        if cfg.turns > len(users):
            users += rng.choices(pool, k=cfg.turns - len(users))
        elif cfg.turns:
            users = users[: cfg.turns]
        instruction, text = sample_instruction(rng, cfg.short_prob, cfg.max_constraints)
        plans.append((instruction, text, users))
    sampled = [[] for _ in plans]  # the dialog so far, instruction in every user turn
    alive = set(range(len(plans)))
    counts = {"dialogs": len(plans), "turns_sampled": 0, "turns_kept": 0, "ended_early": 0}
    n_turns = max(len(u) for _, _, u in plans)
    bar = tqdm(total=sum(len(u) for _, _, u in plans), desc="gatt: sampling turns", disable=not (show and sys.stderr.isatty()))
    for t in range(n_turns):
        active = [i for i in sorted(alive) if t < len(plans[i][2])]
        if not active:
            break
        contexts = [with_instruction_every_turn(sampled[i] + [{"role": "user", "content": plans[i][2][t]}], plans[i][1])
                    for i in active]
        answers = _answer(model, tokenizer, contexts, cfg.k, cfg.temperature, cfg.max_new_tokens, hash((cfg.seed, t)) & 0x7FFFFFFF)
        for i, ctx, cands in zip(active, contexts, answers):
            counts["turns_sampled"] += 1
            ok = [a for a in cands if a and plans[i][0].check(a)]
            if not ok:  # no sample follows the instruction: the dialog ends before this turn
                alive.discard(i)
                counts["ended_early"] += 1
                continue
            if rm is not None and len(ok) > 1:
                ok = [ok[int(rm.score([ctx] * len(ok), ok).argmax())]]
            sampled[i] += [{"role": "user", "content": plans[i][2][t]}, {"role": "assistant", "content": ok[0]}]
            counts["turns_kept"] += 1
        bar.update(len(active))
    bar.close()
    out = [{"instruction": plans[i][0].kind + ":" + plans[i][0].value, "text": plans[i][1],
            "dialog": with_instruction_every_turn(sampled[i], plans[i][1])} for i in range(len(plans)) if sampled[i]]
    return out, counts


def gatt(cfg: GattConfig) -> dict:
    d = init_distributed(cfg.strategy, cfg.device)
    out = Path(cfg.out)
    if not cfg.dialogs or not cfg.init_from:
        raise ValueError("give dialogs=DIALOGS.jsonl and init_from=CHECKPOINT")
    if cfg.place not in ("system", "prefix"):
        raise ValueError(f"place={cfg.place!r}: expected system or prefix")
    samples_path, data_path = out / "samples.jsonl", out / "gatt_data.jsonl"
    counts: dict = {}
    if not data_path.is_file():  # sampling is done once; a rerun goes straight to (resuming) the fine-tuning
        if d.main:
            dialogs = list(read_dialogs(split_paths(cfg.dialogs)))
            model, tokenizer = load(cfg.init_from, device=d.device)
            model.eval()
            rm = RewardModel.from_pretrained(cfg.reward_model, device=d.device) if cfg.reward_model else None
            sampled, counts = sample_gatt_dialogs(model, tokenizer, dialogs, cfg, rm)
            del model
            out.mkdir(parents=True, exist_ok=True)
            (out / "gatt_config.json").write_text(json.dumps(asdict(cfg), indent=2))
            with open(samples_path, "w", encoding="utf-8") as f:
                for s in sampled:
                    f.write(json.dumps(s) + "\n")
            examples = 0
            with open(str(data_path) + ".tmp", "w", encoding="utf-8") as f:
                for s in sampled:
                    train = gatt_training_dialog(s["dialog"], s["text"], cfg.place)
                    ends = [j + 1 for j, m in enumerate(train) if m["role"] == "assistant"] if cfg.every_turn else [len(train)]
                    for end in ends:  # the SFT stage trains the last answer of each (loss_on=last)
                        f.write(json.dumps({"dialog": train[:end]}) + "\n")
                        examples += 1
            Path(str(data_path) + ".tmp").replace(data_path)
            counts["examples"] = examples
            (out / "gatt_counts.json").write_text(json.dumps(counts, indent=2))
            print(f"gatt: {counts['turns_kept']}/{counts['turns_sampled']} sampled turns follow their instruction "
                  f"({counts['ended_early']} dialogs ended early) -> {examples} training examples", file=sys.stderr)
        d.barrier()
    result = sft(SFTConfig(data=str(data_path), val_fraction=0, init_from=cfg.init_from, out=str(out), loss_on="last",
                           seq_len=cfg.seq_len, batch_size=cfg.batch_size, micro_batch=cfg.micro_batch, epochs=cfg.epochs,
                           lr=cfg.lr, save_every=10**9, keep_last=1, resume=True, seed=cfg.seed, device=cfg.device,
                           strategy=cfg.strategy, tensorboard=cfg.tensorboard))
    return {"counts": counts, "history": result["history"], "out": str(out), "stopped": result["stopped"]}


@torch.no_grad()
def gatt_eval(cfg: GattEvalConfig) -> dict:
    """Adherence to an instruction given once, turn by turn, for each checkpoint; writes gatt_eval.json and
    gatt_adherence.png to ``out`` and returns {"turns", "adherence": {name: [per turn]}}."""
    if not cfg.ckpts or not cfg.dialogs:
        raise ValueError("give ckpts=CKPT[,CKPT...] and dialogs=DIALOGS.jsonl")
    names = list(cfg.names) or list(cfg.ckpts)
    if len(names) != len(cfg.ckpts):
        raise ValueError(f"{len(names)} names for {len(cfg.ckpts)} checkpoints")
    pool = _user_messages(read_dialogs(split_paths(cfg.dialogs)))
    probes = multi_turn_probe_dialogs(cfg.seed, cfg.n, cfg.turns, pool, cfg.short_prob, cfg.place)
    device = torch.device(cfg.device)
    result: dict = {"turns": list(range(1, cfg.turns + 1)), "adherence": {}, "examples": {}}
    for name, ckpt in zip(names, cfg.ckpts):
        model, tokenizer = load(ckpt, device=device)
        model.eval()
        answers: list[list[str]] = [[] for _ in probes]
        for t in tqdm(range(cfg.turns), desc=f"gatt-eval {name}", disable=not sys.stderr.isatty()):
            dialogs = [p.prompt(a) for p, a in zip(probes, answers)]
            new = _answer(model, tokenizer, dialogs, 1, cfg.temperature, cfg.max_new_tokens, hash((cfg.seed, t)) & 0x7FFFFFFF)
            for a, (text,) in zip(answers, new):
                a.append(text)
        result["adherence"][name] = adherence_by_turn(answers, [p.instruction for p in probes], cfg.turns)
        result["examples"][name] = {"instruction": probes[0].text, "answers": answers[0][:5]}
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "gatt_eval.json").write_text(json.dumps(result, indent=2))
    _plot(result, out / "gatt_adherence.png")
    print(format_adherence(result))
    return result


def format_adherence(result: dict) -> str:
    names = list(result["adherence"])
    lines = ["| turn | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for i, t in enumerate(result["turns"]):
        cells = [result["adherence"][n][i] for n in names]
        lines.append(f"| {t} | " + " | ".join("-" if c is None else f"{c:.0%}" for c in cells) + " |")
    return "\n".join(lines)


def _plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    for name, ys in result["adherence"].items():
        ax.plot(result["turns"], [float("nan") if y is None else y for y in ys], marker="o", label=name)
    ax.set_xlabel("dialog turn")
    ax.set_ylabel("answers following the instruction")
    ax.set_ylim(-0.05, 1.05)
    ax.set_title("Instruction given once, followed turn by turn")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
