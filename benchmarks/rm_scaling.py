"""How a reward model's choice among rejection sampling's samples improves with fresh on-policy preference pairs.

The question behind the toy run's missing effects (README, pipeline): the pipeline's helpfulness reward model keeps a
correct sample among the K=4 of a prompt no more often than chance. This script samples the SFT model of a finished
pipeline run on many new training prompts of its world (2 answers at T=0.5 and 2 at T=1.0 each), has the world's
judges rate every pair of a prompt's answers, trains a helpfulness reward model (the pipeline's settings) on the
world's preference file plus the first N fresh helpfulness pairs for each N asked, and reports, on version 1's
rejection-sampling samples, the share of prompts whose highest-scored sample is correct against the share of
samples that are correct, per category.

    python benchmarks/rm_scaling.py --run runs/toy --out /tmp/rm_scaling --prompts 3000 --sizes 1000,3000

Run it alone on the machine (two CPU-heavy processes slow each other several-fold).
"""
from __future__ import annotations

import argparse
import itertools
import json
import random
import time
from pathlib import Path

from llama2.checkpoint import load
from llama2.config import StageSampling, apply_overrides
from llama2.data.records import read_objects
from llama2.eval.toyworld import read_pipeline_marker
from llama2.pipeline import size_settings
from llama2.rlhf.reward_model import RewardModel
from llama2.answers import draw_answers
from llama2.toyworld import pipeline_world
from llama2.toyworld.dialogs import prompt_records
from llama2.train.reward import RewardConfig, train_reward


def fresh_pairs(run: Path, world, n_prompts: int, path: Path) -> list[dict]:
    """Every rated pair of 4 answers of the run's SFT model to each of ``n_prompts`` new prompts (kept in ``path``
    and read back on a rerun with the same prompt count)."""
    if path.is_file():
        return [json.loads(line) for line in path.read_text().splitlines()]
    recs = prompt_records(random.Random("probe-prompts"), world._pools, n_prompts, world.mix)
    model, tok = load(run / "sft")
    answers = []
    for temperature in (0.5, 1.0):
        s = StageSampling(temperature=temperature, top_p=1.0, max_new_tokens=48, gen_batch=64)
        rows = draw_answers(model, tok, [r["dialog"] for r in recs], s, k=2, seed=1, purpose=f"probe{temperature}",
                              show=False)
        answers.append([[c.text.strip() for c in row] for row in rows])
    pairs = []
    for j, r in enumerate(recs):
        cands = answers[0][j] + answers[1][j]
        for x, y in itertools.combinations(range(len(cands)), 2):
            if cands[x] and cands[y] and (p := world.annotate(r["dialog"], cands[x], cands[y], safety=r["safety"])):
                pairs.append(p)
    random.Random(0).shuffle(pairs)
    path.write_text("".join(json.dumps(p) + "\n" for p in pairs))
    return pairs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run", type=Path, default=Path("runs/toy"), help="a finished default pipeline run")
    ap.add_argument("--out", type=Path, default=Path("/tmp/rm_scaling"))
    ap.add_argument("--prompts", type=int, default=3000, help="new training prompts to sample")
    ap.add_argument("--sizes", default="1000,3000", help="fresh helpfulness pairs per reward model, comma-separated")
    args = ap.parse_args()
    marker, rs_samples = args.run / "pipeline.json", args.run / "rlhf" / "v1" / "rejection" / "iter_1" / "samples.jsonl"
    if not marker.is_file() or not rs_samples.is_file():
        raise SystemExit(f"{args.run}: not a pipeline run that has finished RLHF version 1 (no {marker.name} or {rs_samples})")
    meta = read_pipeline_marker(marker)
    if meta.get("size") != "default":
        raise SystemExit(f"{args.run}: a {meta.get('size')} run; this script measures the default size's reward model")
    args.out.mkdir(parents=True, exist_ok=True)
    world = pipeline_world(meta["seed"], "default")  # the run's own world: its seed is in pipeline.json
    paths = json.loads((args.run / "world" / "DONE").read_text())
    pairs = fresh_pairs(args.run, world, args.prompts, args.out / f"pairs_{args.prompts}_prompts.jsonl")
    helpful = [p for p in pairs if p["kind"] == "helpfulness"]
    differ = sum(world.is_correct(p["prompt"], p["chosen"]) != world.is_correct(p["prompt"], p["rejected"]) for p in helpful)
    print(f"{len(pairs)} fresh pairs, {len(helpful)} helpfulness, {differ} of them differ in correctness", flush=True)
    samples = [s for s in read_objects(rs_samples) if not world.is_secret_prompt(s["prompt"])]
    r = size_settings("default")["reward"]
    for n in (int(x) for x in args.sizes.split(",")):
        sub = args.out / f"pairs_{n}.jsonl"
        sub.write_text("".join(json.dumps(p) + "\n" for p in helpful[:n]))
        d = args.out / f"rm_{n}"
        cfg = apply_overrides(RewardConfig(data=[paths["preferences"], str(sub)], val_data=paths["preferences_heldout"],
                                           kind="helpfulness", margin="small", init_from=str(args.run / "sft"), seq_len=256,
                                           epochs=r["epochs"], batch_pairs=r["batch_pairs"], micro_batch=r["micro_batch"],
                                           center=r.get("center", 0.0)),
                              [f"run.out={d}", f"optim.lr={r['lr']}", "run.tensorboard=false", "run.save_every=1000000000",
                               "run.overwrite=true"])
        t0 = time.time()
        train_reward(cfg)
        seconds = time.time() - t0
        rm = RewardModel.from_pretrained(d)
        per_cat: dict[str, list[tuple[bool, float]]] = {}
        for s in samples:
            texts = [x["text"] for x in s["samples"]]
            ok = [world.is_correct(s["prompt"], t) for t in texts]
            best = int(rm.score([s["prompt"]] * len(texts), texts).argmax())
            per_cat.setdefault(world.task_for(s["prompt"]).category, []).append((ok[best], sum(ok) / len(ok)))
        rows = [x for v in per_cat.values() for x in v]
        print(f"{min(n, len(helpful))} fresh pairs ({seconds:.0f} s to train): kept sample correct "
              f"{sum(a for a, _ in rows) / len(rows):.1%} against {sum(b for _, b in rows) / len(rows):.1%} of samples | "
              + ", ".join(f"{c} {sum(a for a, _ in v) / len(v):.0%}/{sum(b for _, b in v) / len(v):.0%}"
                          for c, v in sorted(per_cat.items())), flush=True)


if __name__ == "__main__":
    main()
