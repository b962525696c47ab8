"""The toy world's held-out evaluation (docs/toyworld.md): task accuracy in the world's five categories, refusal of
secret prompts and of harmless ones, and the reward of sampled answers under the reward models and under the
world's exact judges (the shape of the paper's Figure 20 and of its human evaluation).

:func:`evaluate_chat_model` scores one checkpoint the way the pipeline's report does; ``llama2 eval --tasks
toyworld`` runs it on any checkpoint (the world is rebuilt from its seed and size).
"""
from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch

from ..checkpoint import load
from ..config import StageSampling
from ..data.records import Prompt, read_eval_items, read_prompts
from ..rlhf.combined import score_with_reward_models, to_unit
from ..answers import answer_texts
from ..toyworld import pipeline_world

__all__ = ["evaluate_chat_model", "read_pipeline_marker", "toyworld_suite"]


@torch.no_grad()
def evaluate_chat_model(model, tokenizer, world, items: Sequence[Mapping], heldout: Sequence[Prompt],
                        reward_models: Mapping | None, max_new_tokens: int, seed: int = 0) -> dict:
    """One chat model on the world's held-out items (greedy answers: accuracy per category, refusal and leak rates)
    and on held-out prompts (one answer each at temperature 1: its reward under the reward models, R_c after the
    sigmoid, and under the exact judges)."""
    greedy = StageSampling(temperature=0.0, max_new_tokens=max_new_tokens, gen_batch=32)
    dialogs = [it["dialog"] for it in items]
    answers = answer_texts(model, tokenizer, dialogs, greedy, purpose="eval/greedy")
    result = dict(world.score(dialogs, answers))
    result["sample"] = {"prompt": dialogs[0][-1]["content"], "answer": answers[0]} if dialogs else {}
    # the judges' R_c of each greedy answer (safety judge on safety prompts): what win rates compare
    result["judge_scores"] = world.reward(dialogs, answers, [bool(it.get("safety", False)) for it in items]).tolist()
    if heldout:
        hd = [p.dialog for p in heldout]
        sampled = answer_texts(model, tokenizer, hd, StageSampling(temperature=1.0, top_p=1.0, max_new_tokens=max_new_tokens,
                                                                    gen_batch=32), seed=seed, purpose="eval/heldout")
        safety = torch.tensor([p.safety for p in heldout])
        if reward_models:
            raw = score_with_reward_models(reward_models, hd, sampled, safety)["combined"]
            r_c = to_unit(raw)
            result.update(rm_score=raw.tolist(), rm_reward=r_c.tolist(), rm_reward_mean=float(r_c.mean()),
                          rm_score_mean=float(raw.mean()))
        result["judge_reward_mean"] = float(world.reward(hd, sampled, safety).mean())
    return result


def read_pipeline_marker(path: Path) -> dict:
    """A pipeline output's pipeline.json (its seed, size, overrides), or ValueError naming the file."""
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not a pipeline marker ({e}); delete it or use another --out") from None
    if not isinstance(meta, dict):
        raise ValueError(f"{path}: not a pipeline marker (a JSON {type(meta).__name__}, not an object)")
    return meta


def find_pipeline_run(ckpt: str | Path) -> Path | None:
    """The `llama2 pipeline` output directory a checkpoint belongs to (the nearest parent with pipeline.json)."""
    p = Path(ckpt).resolve()
    for d in [p, *p.parents][:4]:
        if (d / "pipeline.json").is_file():
            return d
    return None


def toyworld_suite(ckpt: str | Path, *, seed: int | None = None, size: str | None = None,
                   world_dir: str | Path | None = None, limit: float | None = None, max_new_tokens: int = 48,
                   device: str = "cpu") -> dict:
    """``llama2 eval --tasks toyworld``: score a checkpoint on the held-out items of the toy world that
    `llama2 pipeline` builds for (seed, size), grouped by the world's five categories plus safety. When the
    checkpoint lies in a pipeline's output, its seed, size and written world files are used (so a pipeline's models
    are judged exactly as its report judges them); otherwise seed 0 and the default size. ``world_dir``: a written
    world (its eval.jsonl and prompts_heldout.jsonl) instead of rebuilding the files in memory."""
    run = find_pipeline_run(ckpt)
    if run is not None:
        meta = read_pipeline_marker(run / "pipeline.json")
        seed = meta.get("seed", 0) if seed is None else seed
        size = meta.get("size", "default") if size is None else size
        if world_dir is None and (run / "world" / "eval.jsonl").is_file():
            world_dir = run / "world"
    seed, size = (0 if seed is None else seed), (size or "default")
    world = pipeline_world(seed, size)
    if world_dir is not None:
        items = read_eval_items(Path(world_dir) / "eval.jsonl")
        heldout = list(read_prompts(Path(world_dir) / "prompts_heldout.jsonl"))
    else:
        data = world.data()
        items = list(data["eval"])
        heldout = [Prompt(dialog=p["dialog"], safety=bool(p.get("safety", False))) for p in data["prompts_heldout"]]
    if limit:  # a count, or a fraction of each list when below 1 (as lm-eval's --limit)
        items, heldout = (xs[: math.ceil(limit * len(xs)) if limit < 1 else int(limit)] for xs in (items, heldout))
    model, tokenizer = load(ckpt, device=device)
    return evaluate_chat_model(model, tokenizer, world, items, heldout, None, max_new_tokens, seed)


def lm_eval_suite(ckpt, *, num_fewshot=None, limit=None, batch_size=None, device="cpu", chat=False,
                  seed: int | None = None, size: str | None = None) -> dict:
    """``llama2 eval --tasks toyworld``: :func:`toyworld_suite` shaped like lm-eval's results (one "task" per
    category, metric ``acc``; safety as ``refusal_on_secret`` and ``refusal_on_harmless``), so it prints in the
    same table. The answers are in the chat format whatever ``chat`` says: the world's prompts are dialogs."""
    r = toyworld_suite(ckpt, seed=seed, size=size, limit=limit, device=device)
    results = {f"toyworld_{c}": {"alias": f"toyworld {c}", "acc,none": a} for c, a in r["accuracy"].items() if a is not None}
    results["toyworld_safety"] = {"alias": "toyworld safety", "refusal_on_secret,none": r["refusal_on_secret"],
                                  "refusal_on_harmless,none": r["refusal_on_harmless"], "leak_rate,none": r["leak_rate"]}
    results["toyworld"] = {"alias": "toyworld (mean of categories)", "acc,none": r["accuracy_mean"]}
    return {"results": results, "toyworld": r}
