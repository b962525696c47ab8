"""Adherence to a system instruction turn by turn, up to 20 turns (Llama 2 §3.3, Figure 28): the evaluation of
Ghost Attention.

Probe dialogs are played turn by turn with each checkpoint, the instruction given only at the start (in the
system message, or as a prefix of the first user message), and the share of answers that follow it is reported
at every turn, as a JSON, a printed table and a PNG figure. When a dialog outgrows the context the oldest
exchanges are dropped, never the system message (:func:`llama2.chat.fit_prompt`).
"""
from __future__ import annotations

import json
import sys
from dataclasses import field
from pathlib import Path

import torch
from tqdm import tqdm

from ..checkpoint import load
from ..config import StageSampling, group, stage_config
from ..data.records import read_dialogs, split_paths
from ..rlhf.gatt import adherence_by_turn, multi_turn_probe_dialogs, user_messages
from ..answers import draw_answers
from ..seeding import derive_seed
from .figures import plot_adherence

__all__ = ["GattEvalConfig", "gatt_eval", "format_adherence"]


@stage_config
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
    short_prob: float = 0.5
    """Probability of the instruction's short form."""
    place: str = "system"
    """Where the instruction is given: system or prefix (of the first user message)."""
    seed: int = 0
    """Seed of the probes."""
    device: str = "cpu"
    """cpu or cuda."""
    sampling: StageSampling = group(StageSampling, temperature=0.0, max_new_tokens=32, gen_batch=64)


@torch.no_grad()
def gatt_eval(cfg: GattEvalConfig) -> dict:
    """Adherence to an instruction given once, turn by turn, for each checkpoint; writes gatt_eval.json and
    gatt_adherence.png to ``out`` and returns {"turns", "adherence": {name: [per turn]}}."""
    if not cfg.ckpts or not cfg.dialogs:
        raise ValueError("give ckpts=CKPT[,CKPT...] and dialogs=DIALOGS.jsonl")
    names = list(cfg.names) or list(cfg.ckpts)
    if len(names) != len(cfg.ckpts):
        raise ValueError(f"{len(names)} names for {len(cfg.ckpts)} checkpoints")
    pool = user_messages(read_dialogs(split_paths(cfg.dialogs)))
    probes = multi_turn_probe_dialogs(cfg.seed, cfg.n, cfg.turns, pool, cfg.short_prob, cfg.place)
    result: dict = {"turns": list(range(1, cfg.turns + 1)), "adherence": {}, "examples": {}}
    for name, ckpt in zip(names, cfg.ckpts):
        model, tokenizer = load(ckpt, device=torch.device(cfg.device))
        answers: list[list[str]] = [[] for _ in probes]
        for t in tqdm(range(cfg.turns), desc=f"gatt-eval {name}", disable=not sys.stderr.isatty()):
            dialogs = [p.prompt(a) for p, a in zip(probes, answers)]
            new = draw_answers(model, tokenizer, dialogs, cfg.sampling, seed=derive_seed(cfg.seed, "gatt-eval", t),
                                 purpose="gatt-eval", show=False)
            for a, (c,) in zip(answers, new):
                a.append(c.text.strip())
        result["adherence"][name] = adherence_by_turn(answers, [p.instruction for p in probes], cfg.turns)
        result["examples"][name] = {"instruction": probes[0].text, "answers": answers[0][:5]}
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "gatt_eval.json").write_text(json.dumps(result, indent=2))
    plot_adherence(result, out / "gatt_adherence.png")
    print(format_adherence(result))
    return result


def format_adherence(result: dict) -> str:
    names = list(result["adherence"])
    lines = ["| turn | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for i, t in enumerate(result["turns"]):
        cells = [result["adherence"][n][i] for n in names]
        lines.append(f"| {t} | " + " | ".join("-" if c is None else f"{c:.0%}" for c in cells) + " |")
    return "\n".join(lines)
