"""Wall time of the rejection-sampling and PPO stages with whichever `llama2` Python imports: this tree, or an older
checkout put first on PYTHONPATH. Run it twice in a row on one machine to compare the stages before and after a
change (issue 13 compares the tree before the generation engine with today's):

    .venv/bin/llama2 pipeline --out runs/toy                      # a finished default run: checkpoints and prompts
    git worktree add /tmp/before-engine db3ef54                   # the last commit before the engine
    PYTHONPATH=/tmp/before-engine .venv/bin/python benchmarks/bench_stage_times.py --run runs/toy
    .venv/bin/python benchmarks/bench_stage_times.py --run runs/toy

One rejection-sampling run first warms the process up (untimed in the comparison). Both runs use the default
pipeline's settings (PPO as in configs/pipeline/default.yaml, early stopping off; one rejection-sampling
version of 100 prompts, K=4, T=0.5) and only config fields that both trees know, on the run's SFT model and last
version's reward models.
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", required=True, help="a finished default `llama2 pipeline` output directory")
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)

    import llama2
    from llama2.train.ppo import PPOConfig, ppo
    from llama2.train.rejection import RejectionConfig, rejection

    run = Path(a.run)
    last = max((p for p in (run / "rlhf").glob("v*") if p.name[1:].isdigit()), key=lambda p: int(p.name[1:]))
    rms = dict(reward_helpfulness=str(last / "reward" / "helpfulness-small"),
               reward_safety=str(last / "reward" / "safety-small"))
    ppo_kw = dict(iterations=12, rollout_batch=64, minibatch=16, micro_batch=8, lr=1e-5, value_lr=1e-4,
                  max_new_tokens=48, eval_every=4, patience=0)
    rs_kw = dict(k=4, max_new_tokens=48, epochs=1, batch_size=16, micro_batch=8, lr=1e-4, iterations=1,
                 temperatures=[0.5], seq_len=256)
    figures = {}
    with tempfile.TemporaryDirectory() as tmp:
        # once untimed: the pipeline runs these stages in a process that has already imported, loaded and sampled
        # (the first load and generate of a process cost ~1 s of one-time set-up, in either tree)
        for name in ("warm-up", "rejection"):
            t = time.perf_counter()
            rejection(RejectionConfig(prompts=str(run / "rlhf" / "v1" / "prompts.jsonl"), init_from=str(run / "sft"),
                                      out=f"{tmp}/{name}", tensorboard=False, **rms, **rs_kw))
            figures[name] = time.perf_counter() - t
        t = time.perf_counter()
        ppo(PPOConfig(prompts=str(run / "world" / "prompts.jsonl"), val_prompts=str(run / "world" / "prompts_heldout.jsonl"),
                      init_from=str(run / "sft"), out=f"{tmp}/ppo", tensorboard=False, **rms, **ppo_kw))
        figures["ppo"] = time.perf_counter() - t
    print(f"llama2 from {Path(llama2.__file__).parent}; threads {a.threads}, load average {os.getloadavg()[0]:.2f}")
    print(json.dumps({k: round(v, 1) for k, v in figures.items()}))


if __name__ == "__main__":
    main()
