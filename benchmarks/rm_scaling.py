"""How a reward model's pick among K samples improves with fresh on-policy preference pairs, measured on the
validation prompts (never the evaluation's).

The question behind the pipeline's selection effect: which share of the oracle's best-of-K gain (the judges' own pick
among K answers) does a helpfulness reward model's pick capture, and how does that grow with the number of on-policy
pairs (the latest model's answers to fresh prompts, rated by the judges) beside the world's written pairs? This
script samples the SFT model of a finished pipeline run on new training prompts of its world (answers at T=0.7 and
T=1.0), has the judges rate pairs of a prompt's answers (skipping ties, as the pipeline's annotation does), trains a
helpfulness reward model (the pipeline's settings) on ``--world-pairs`` of the world's preference file plus the first
N fresh pairs for each N asked, and reports on the run's validation prompts (prompts_val.jsonl): K answers of the SFT
model each, the judges' score of the reward model's pick against the mean and the oracle's pick (the capture), and
per category how often the pick is correct.

    python benchmarks/rm_scaling.py --run runs/toy --out /tmp/rm_scaling --prompts 1500 --sizes 0,500,1500

Run it alone on the machine (two CPU-heavy processes slow each other several-fold).
"""
from __future__ import annotations

import argparse
import itertools
import json
import random
import time
from pathlib import Path

import torch

from llama2.answers import draw_answers
from llama2.checkpoint import load
from llama2.config import StageSampling, apply_overrides
from llama2.data.records import read_prompts
from llama2.eval.toyworld import read_pipeline_marker, selection_curves
from llama2.pipeline import size_settings
from llama2.rlhf.reward_model import RewardModel
from llama2.toyworld import pipeline_world
from llama2.toyworld.dialogs import prompt_records
from llama2.train.reward import RewardConfig, train_reward


def fresh_pairs(run: Path, world, n_prompts: int, per_prompt: int, path: Path) -> list[dict]:
    """Up to ``per_prompt`` non-tied rated pairs of 4 answers (2 at T=0.7, 2 at T=1.0) of the run's SFT model to each of
    ``n_prompts`` new training prompts (kept in ``path`` and read back on a rerun)."""
    if path.is_file():
        return [json.loads(line) for line in path.read_text().splitlines()]
    recs = prompt_records(random.Random("probe-prompts"), world._pools, n_prompts, world.mix)
    model, tok = load(run / "sft")
    answers = []
    for temperature in (0.7, 1.0):
        s = StageSampling(temperature=temperature, top_p=1.0, max_new_tokens=48, gen_batch=64)
        rows = draw_answers(model, tok, [r["dialog"] for r in recs], s, k=2, seed=1, purpose=f"probe{temperature}",
                            show=False)
        answers.append([[c.text.strip() for c in row] for row in rows])
    pairs = []
    for j, r in enumerate(recs):
        cands, found = answers[0][j] + answers[1][j], 0
        for x, y in itertools.combinations(range(len(cands)), 2):
            if found < per_prompt and cands[x] and cands[y] and (
                    p := world.annotate(r["dialog"], cands[x], cands[y], safety=r["safety"])):
                pairs.append(p)
                found += 1
    random.Random(0).shuffle(pairs)
    path.write_text("".join(json.dumps(p) + "\n" for p in pairs))
    return pairs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run", type=Path, default=Path("runs/toy"), help="a finished default pipeline run")
    ap.add_argument("--out", type=Path, default=Path("/tmp/rm_scaling"))
    ap.add_argument("--prompts", type=int, default=1500, help="new training prompts to sample")
    ap.add_argument("--per-prompt", type=int, default=2, help="rated pairs per prompt at most")
    ap.add_argument("--sizes", default="0,500,1500", help="fresh helpfulness pairs per reward model, comma-separated")
    ap.add_argument("--world-pairs", type=int, default=-1, help="pairs of the world's preference file (-1: all)")
    ap.add_argument("--k", type=int, default=4, help="answers per validation prompt to pick among")
    args = ap.parse_args()
    marker = args.run / "pipeline.json"
    if not marker.is_file() or not (args.run / "sft" / "DONE").is_file():
        raise SystemExit(f"{args.run}: not a pipeline run that has finished SFT")
    meta = read_pipeline_marker(marker)
    if meta.get("size") != "default":
        raise SystemExit(f"{args.run}: a {meta.get('size')} run; this script measures the default size's reward model")
    args.out.mkdir(parents=True, exist_ok=True)
    world = pipeline_world(meta["seed"], "default")  # the run's own world: its seed is in pipeline.json
    paths = json.loads((args.run / "world" / "DONE").read_text())
    pairs = fresh_pairs(args.run, world, args.prompts, args.per_prompt,
                        args.out / f"pairs_{args.prompts}x{args.per_prompt}.jsonl")
    helpful = [p for p in pairs if p["kind"] == "helpfulness"]
    differ = sum(world.is_correct(p["prompt"], p["chosen"]) != world.is_correct(p["prompt"], p["rejected"]) for p in helpful)
    print(f"{len(pairs)} fresh pairs, {len(helpful)} helpfulness, {differ} of them differ in correctness", flush=True)
    world_prefs = paths["preferences"]
    if args.world_pairs >= 0:
        lines = Path(world_prefs).read_text().splitlines()[: args.world_pairs]
        world_prefs = str(args.out / f"world_{args.world_pairs}.jsonl")
        Path(world_prefs).write_text("".join(x + "\n" for x in lines))
    val = [{"dialog": p.dialog, "safety": p.safety, "category": world.task_for(p.dialog).category}
           for p in read_prompts(paths["prompts_val"])]
    model, tok = load(args.run / "sft")
    sampling = StageSampling(temperature=1.0, top_p=1.0, max_new_tokens=48, gen_batch=32)
    r = size_settings("default")["reward"]
    for n in (int(x) for x in args.sizes.split(",")):
        sub = args.out / f"pairs_{n}.jsonl"
        sub.write_text("".join(json.dumps(p) + "\n" for p in helpful[:n]))
        d = args.out / f"rm_{n}"
        cfg = apply_overrides(RewardConfig(data=[world_prefs, str(sub)] if args.world_pairs != 0 or n == 0 else [str(sub)],
                                           val_data=paths["preferences_heldout"], kind="helpfulness", margin="small",
                                           init_from=str(args.run / "sft"), seq_len=256, epochs=r["epochs"],
                                           batch_pairs=r["batch_pairs"], micro_batch=r["micro_batch"],
                                           center=r.get("center", 0.0)),
                              [f"run.out={d}", f"optim.lr={r['lr']}", "run.tensorboard=false", "run.save_every=1000000000",
                               "run.overwrite=true"])
        t0 = time.time()
        train_reward(cfg)
        seconds = time.time() - t0
        rm = RewardModel.from_pretrained(d)
        torch.manual_seed(0)
        sel = selection_curves(model, tok, world, val, {"helpfulness": rm}, sampling, k=args.k, seed=0)
        print(f"{min(n, len(helpful))} fresh pairs ({seconds:.0f} s to train): capture of the oracle's best-of-{args.k} "
              f"gain {sel['capture']:.0%} (mean {sel['judge_mean']:.3f}, RM pick {sel['judge_of_rm_pick'][-1]:.3f}, "
              f"oracle {sel['judge_max'][-1]:.3f}) | pick correct / random / oracle: "
              + ", ".join(f"{c} {v['rm_pick']:.0%}/{v['random']:.0%}/{v['oracle_pick']:.0%}"
                          for c, v in sel["by_category"].items()), flush=True)


if __name__ == "__main__":
    main()
