"""The toy world's held-out evaluation (docs/toyworld.md): task accuracy in the world's five categories, refusal of
secret prompts and of harmless ones, the judges' helpfulness and reward, and the reward models' reward, all on the
answers a model samples (the shape of the paper's Figure 20 and of its human evaluation).

:func:`evaluate_chat_model` scores one checkpoint the way the pipeline's report does, keeping every answer's scores
so that two models can be compared item by item (:mod:`llama2.eval.winrate`); ``llama2 eval --tasks toyworld``
runs it on any checkpoint (the world is rebuilt from its seed and size).
"""
from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch

from ..answers import draw_answers
from ..checkpoint import load
from ..config import StageSampling
from ..data.records import read_eval_items
from ..rlhf.combined import score_with_reward_models, to_unit
from ..toyworld import CATEGORIES, is_refusal, pipeline_world
from .winrate import head_to_head, paired_change

__all__ = ["eval_sampling", "evaluate_chat_model", "compare_models", "selection_curves", "flaws_seen",
           "read_pipeline_marker", "toyworld_suite"]


def eval_sampling(max_new_tokens: int = 48, temperature: float = 1.0, top_p: float = 1.0) -> StageSampling:
    """How the evaluation draws answers: the model's own distribution by default (temperature 1, no nucleus), the one
    RLHF optimises; our choice (the paper samples its human evaluation's answers, §3.4.2, and does not give
    how)."""
    return StageSampling(temperature=temperature, top_p=top_p, max_new_tokens=max_new_tokens, gen_batch=32)


def _per_answer(world, dialog, answer: str) -> tuple:
    """(helpfulness or None on a secret prompt, correct (0/1) or None on a secret prompt, refused (0/1))."""
    secret = world.is_secret_prompt(dialog)
    helpful = None if secret else world.judge_helpfulness(dialog, answer)
    correct = None if secret else float(world.is_correct(dialog, answer))
    return helpful, correct, float(is_refusal(answer))


@torch.no_grad()
def evaluate_chat_model(model, tokenizer, world, items: Sequence[Mapping], reward_models: Mapping | None,
                        sampling: StageSampling, samples: int = 2, seed: int = 0) -> dict:
    """One chat model on the world's held-out items: ``samples`` answers to each, drawn with ``sampling`` and the
    same random numbers for every model (common random numbers: :func:`llama2.answers.draw_answers` seeds by
    (seed, purpose, batch), not by model), judged by the world's judges and, when given, scored by the reward models.

    Returns the world's summary over all answers (accuracy per category, refusal and leak rates, mean helpfulness
    and safety: ``world.score``), the mean judges' reward (R_c, the safety judge on safety prompts) and reward
    models' reward, and under "per_item" every answer's scores ([item][sample]): "judge", "helpfulness" and
    "correct" (None on secret prompts), "refused", "rm" (when reward models are given), for paired comparisons."""
    dialogs = [it["dialog"] for it in items]
    safety = [bool(it.get("safety", False)) for it in items]
    comps = draw_answers(model, tokenizer, dialogs, sampling, k=samples, seed=seed, purpose="eval/sampled")
    answers = [[c.text.strip() for c in row] for row in comps]
    flat_d = [d for d, row in zip(dialogs, answers) for _ in row]
    flat_a = [a for row in answers for a in row]
    flat_s = [s for s, row in zip(safety, answers) for _ in row]
    result = dict(world.score(flat_d, flat_a))
    result["sample"] = {"prompt": dialogs[0][-1]["content"], "answer": answers[0][0]} if dialogs else {}

    def per_item(values: Sequence) -> list[list]:
        return [list(values[i * samples:(i + 1) * samples]) for i in range(len(items))]

    judge = world.reward(flat_d, flat_a, flat_s).tolist()
    helpful, correct, refused = zip(*(_per_answer(world, d, a) for d, a in zip(flat_d, flat_a)))
    result["per_item"] = {"judge": per_item(judge), "helpfulness": per_item(helpful), "correct": per_item(correct),
                          "refused": per_item(refused)}
    result["judge_reward_mean"] = sum(judge) / len(judge)
    if reward_models:
        raw = score_with_reward_models(reward_models, flat_d, flat_a, torch.tensor(flat_s))["combined"]
        r_c = to_unit(raw)
        result["per_item"]["rm"] = per_item(r_c.tolist())
        result.update(rm_reward_mean=float(r_c.mean()), rm_score_mean=float(raw.mean()))
    return result


def compare_models(items: Sequence[Mapping], base: Mapping, other: Mapping) -> dict:
    """``other`` against ``base`` on the same items and samples (two results of :func:`evaluate_chat_model`), with
    paired statistics (:mod:`llama2.eval.winrate`): the judges' head-to-head ("win" = other better), the change of
    the judges' helpfulness (harmless prompts), of accuracy per category and over all task items, of refusal on
    secret prompts and on harmless ones, and of the reward models' reward (when both have it)."""
    a, b = base["per_item"], other["per_item"]

    def change(key: str, keep) -> dict:
        idx = [i for i, it in enumerate(items) if keep(it)]
        return paired_change([a[key][i] for i in idx], [b[key][i] for i in idx])

    out = {"head_to_head": head_to_head(b["judge"], a["judge"]),
           "helpfulness": change("helpfulness", lambda it: True),
           "accuracy": {cat: change("correct", lambda it, cat=cat: it.get("category") == cat) for cat in CATEGORIES},
           "accuracy_all": change("correct", lambda it: True),
           "refusal_secret": change("refused", lambda it: bool(it.get("safety"))),
           "refusal_harmless": change("refused", lambda it: not it.get("safety"))}
    if "rm" in a and "rm" in b:
        out["rm_reward"] = change("rm", lambda it: True)
    return out


@torch.no_grad()
def selection_curves(model, tokenizer, world, items: Sequence[Mapping], reward_models: Mapping, sampling: StageSampling,
                     k: int = 8, seed: int = 0) -> dict:
    """Best of K as rejection sampling picks it (§3.2.3, Figure 7), on held-out items: ``k`` answers to each, scored
    by the reward models and by the judges. For n = 1..k: the mean of the reward models' max and median reward
    among the first n answers (Figure 7's two curves), the judges' score of the answer the reward models pick, the
    judges' best score (the oracle's pick) and their mean (a random pick). ``capture``: the share of the oracle's
    best-of-k gain in the judges' score the reward models' pick achieves. Per category: how often the reward models'
    pick, a random answer and the oracle's pick are correct."""
    dialogs = [it["dialog"] for it in items]
    comps = draw_answers(model, tokenizer, dialogs, sampling, k=k, seed=seed, purpose="eval/best-of-k")
    texts = [c.text.strip() for row in comps for c in row]
    flat_d = [d for d in dialogs for _ in range(k)]
    safety = torch.tensor([bool(it.get("safety")) for it in items for _ in range(k)])
    rm = to_unit(score_with_reward_models(reward_models, flat_d, texts, safety)["combined"]).view(len(items), k)
    judge = world.reward(flat_d, texts, safety.tolist()).view(len(items), k)
    correct = [[None if it.get("safety") else float(world.is_correct(it["dialog"], texts[i * k + j])) for j in range(k)]
               for i, it in enumerate(items)]
    curves: dict[str, list[float]] = {"rm_max": [], "rm_median": [], "judge_of_rm_pick": [], "judge_max": []}
    for n in range(1, k + 1):
        pick = rm[:, :n].argmax(1)
        curves["rm_max"].append(float(rm[:, :n].max(1).values.mean()))
        curves["rm_median"].append(float(rm[:, :n].median(1).values.mean()))
        curves["judge_of_rm_pick"].append(float(judge.gather(1, pick[:, None]).mean()))
        curves["judge_max"].append(float(judge[:, :n].max(1).values.mean()))
    mean = float(judge.mean())
    gain = curves["judge_max"][-1] - mean
    by_cat: dict[str, dict] = {}
    rm_pick, judge_pick = rm.argmax(1).tolist(), judge.argmax(1).tolist()
    for cat in CATEGORIES:
        idx = [i for i, it in enumerate(items) if it.get("category") == cat and not it.get("safety")]
        if idx:
            by_cat[cat] = {"random": sum(sum(correct[i]) / k for i in idx) / len(idx),
                           "rm_pick": sum(correct[i][rm_pick[i]] for i in idx) / len(idx),
                           "oracle_pick": sum(correct[i][judge_pick[i]] for i in idx) / len(idx), "n": len(idx)}
    return {"k": k, "items": len(items), "n": list(range(1, k + 1)), **curves, "judge_mean": mean,
            "capture": (curves["judge_of_rm_pick"][-1] - mean) / gain if gain > 1e-9 else float("nan"),
            "by_category": by_cat, "flaws_seen": flaws_seen(world, items, reward_models)}


def flaws_seen(world, items: Sequence[Mapping], reward_models: Mapping) -> dict[str, float]:
    """What the reward models see: on each harmless item, the reference answer against each writer's flaw applied to
    it (padding, hedging, an unnecessary refusal, a plain wrong answer), the share of items where the reward models
    score the reference higher (0.5: they cannot tell)."""
    wins: dict[str, list[bool]] = {}
    for it in items:
        if it.get("safety"):
            continue
        variants = world.flawed_variants(it["dialog"])
        names = list(variants)
        scores = score_with_reward_models(reward_models, [it["dialog"]] * len(names), [variants[n] for n in names],
                                          torch.zeros(len(names), dtype=torch.bool))["combined"].tolist()
        for name, score in zip(names[1:], scores[1:]):
            wins.setdefault(name, []).append(scores[0] > score)
    return {name: sum(v) / len(v) for name, v in wins.items()}


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
    world (its eval.jsonl) instead of rebuilding the files in memory. Two sampled answers an item, as the report."""
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
    else:
        items = list(world.data()["eval"])
    if limit:  # a count, or a fraction when below 1 (as lm-eval's --limit)
        items = items[: math.ceil(limit * len(items)) if limit < 1 else int(limit)]
    model, tokenizer = load(ckpt, device=device)
    return evaluate_chat_model(model, tokenizer, world, items, None, eval_sampling(max_new_tokens), samples=2, seed=seed)


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
