"""Wall time of the stages that sample (rejection sampling, PPO), with the static-cache engine against the eager
reference loop, on the same checkpoints, prompts and settings: the engine's effect on the recipe (issue 13).

Needs a finished default pipeline run (its SFT model, world files and last version's reward models):

    .venv/bin/llama2 pipeline --out runs/toy
    .venv/bin/python benchmarks/bench_stages.py --run runs/toy

Each stage runs once per path into a temporary directory (rejection sampling: one version's settings; PPO: the
pipeline's settings, early stopping off); the table gives the seconds and the ratio. Greedy decoding is identical
on both paths; sampled draws differ (see llama2.generate), so the stages' numbers differ slightly too.
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import torch

from llama2.pipeline import size_settings
from llama2.train.ppo import PPOConfig, ppo
from llama2.train.rejection import RejectionConfig, rejection


def _time(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", required=True, help="a finished `llama2 pipeline` output directory (default size)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", default=None, help="write the figures here")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    run, s = Path(a.run), size_settings("default")
    v = s["versions"]
    rms = dict(reward_helpfulness=str(run / "rlhf" / f"v{v}" / "reward" / "helpfulness-small"),
               reward_safety=str(run / "rlhf" / f"v{v}" / "reward" / "safety-small"))
    rs = {k: x for k, x in s["rejection"].items() if k != "temperatures"}
    figures = {}
    with tempfile.TemporaryDirectory() as tmp:
        for engine in ("eager", "static"):
            figures[f"rejection ({engine})"] = _time(lambda: rejection(RejectionConfig(
                prompts=str(run / "rlhf" / "v1" / "prompts.jsonl"), init_from=str(run / "sft"), out=f"{tmp}/rs-{engine}",
                iterations=1, temperatures=[s["rejection"]["temperatures"][0]], seq_len=s["seq_len"], tensorboard=False,
                engine=engine, **rms, **rs)))
            figures[f"ppo ({engine})"] = _time(lambda: ppo(PPOConfig(
                prompts=str(run / "world" / "prompts.jsonl"), val_prompts=str(run / "world" / "prompts_heldout.jsonl"),
                init_from=str(run / "sft"), out=f"{tmp}/ppo-{engine}", tensorboard=False, engine=engine,
                **rms, **{**s["ppo"], "patience": 0})))
    print(f"threads {a.threads}, load average {os.getloadavg()[0]:.2f}")
    print("| stage | eager loop (s) | static engine (s) | speed-up |\n|---|---|---|---|")
    for stage in ("rejection", "ppo"):
        e, st = figures[f"{stage} (eager)"], figures[f"{stage} (static)"]
        print(f"| {stage} | {e:.1f} | {st:.1f} | {e / st:.2f}x |")
    if a.json:
        Path(a.json).write_text(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
