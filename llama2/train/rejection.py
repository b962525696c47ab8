"""Rejection sampling fine-tuning (Llama 2 §3.2.3, "Rejection Sampling").

For each prompt, sample K answers from the latest policy, score them with the reward model(s), keep the best,
and fine-tune on the kept set with the SFT loss. Over ``iterations`` rounds, each samples from the newest model
and keeps, per prompt, the best answer among this and every earlier round: the paper's fix after RLHF V3
regressed on capabilities ("we modified our strategy, incorporating top-performing samples from all prior
iterations"). The sampling temperature is an option with a per-iteration schedule, since the paper finds the
best temperature moves as the model changes (its Figure 8).

Scoring: the combined rule of the PPO stage (§3.2.3, :func:`llama2.rlhf.combined.combined_score`): a prompt
tagged safety, or an answer whose safety score is below 0.15 after the sigmoid, is judged by the safety reward
model, any other by the helpfulness one. Scores are stored after the sigmoid, in (0, 1). With one reward model
only, it judges every answer.

Fine-tuning: each iteration runs the SFT stage (:func:`llama2.train.sft.sft`) with this stage's ``finetune`` and
``optim`` groups on the kept set, written here as a dialogs file: the paper's rejection sampling *is* SFT on
selected samples. By default it fine-tunes the model that sampled (``finetune_from=latest``), as the paper's
versions build on the latest model: "we fine-tune our model on the new set of ranked samples", and from RLHF-V4 on
"we sequentially combined them, applying PPO on top of the resulted Rejection Sampling checkpoint before sampling
again" (§3.2.3). ``finetune_from=base`` restarts every iteration from ``init_from`` instead: our option (the paper
does not restart), which keeps one iteration's errors from compounding into the next. Sampling always uses the
newest model.

The scorer is the reward models, or any function of (dialogs, answers, is-safety) giving R_c in (0, 1) (the
world's judges, for the pipeline's oracle run: ``rejection(cfg, reward_fn=...)``).

Output: ``OUT/iter_N/`` holds samples.jsonl (every sample with its scores), kept.jsonl (the kept dialogs, the
SFT input), stats.json (reward statistics, best-of-K curve) and model/ (the checkpoint); ``OUT`` itself holds the
final model. An iteration whose model and stats exist is skipped, so a stopped run resumes where it stopped.
Under torchrun the prompts are sampled sharded by rank and the fine-tuning runs with FSDP/DDP.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import shutil
import time
from collections.abc import Callable
from dataclasses import field
from pathlib import Path

import torch
import torch.distributed as dist

from ..checkpoint import load
from ..config import BatchConfig, OptimConfig, RunConfig, StageSampling, check, group, stage_config, to_dict
from ..data.records import Prompt, read_prompts, split_paths
from ..rlhf.combined import SAFETY_THRESHOLD, score_with_reward_models, to_unit
from ..rlhf.rejection import expected_max_reward, keep_best_across_iterations
from ..rlhf.reward_model import RewardModel
from ..answers import draw_answers
from ..seeding import derive_seed
from ..dist import Dist, init_distributed
from .sft import SFTConfig, sft
from .state import RunLock, prepare_out, publish

__all__ = ["RejectionConfig", "rejection", "sample_and_score", "load_reward_models", "RewardFn"]


@stage_config
class RejectionConfig:
    prompts: str = ""
    """Prompts JSONL ({"dialog": [... ending with a user turn], "safety": bool}); several files comma-separated."""
    init_from: str = ""
    """The base model (e.g. SFT): the first iteration samples from it unless sample_from is given; finetune_from=base
    fine-tunes it every iteration."""
    sample_from: str = ""
    """The model the first iteration samples from (default: init_from), e.g. the latest model of an RLHF version;
    later iterations sample their predecessor's model. finetune_from=latest fine-tunes the model that sampled."""
    previous: str = ""
    """Kept sets of earlier runs (kept.jsonl, comma-separated): their answers compete with this run's samples for
    their prompts (the paper keeps "top-performing samples from all prior iterations"), re-scored by this run's
    reward models so that every score comes from one model."""
    reward_helpfulness: str = ""
    """Helpfulness reward model checkpoint (from `llama2 reward kind=helpfulness`)."""
    reward_safety: str = ""
    """Safety reward model checkpoint (optional; without it the helpfulness model judges every answer)."""
    iterations: int = 2
    """Rounds of sample -> keep best -> fine-tune, each sampling from the newest model."""
    k: int = 8
    """Samples per prompt (the paper explores up to 100 in its Figure 7; the gain flattens after ~10-20)."""
    temperatures: list[float] = field(default_factory=list)
    """Per-iteration temperatures (e.g. 1.0,1.2): the best temperature moves as the model changes (Figure 8);
    iterations without an entry use `temperature`."""
    finetune_from: str = "latest"
    """latest (the paper's reading): each iteration fine-tunes the model that sampled it; base (our option): every
    iteration fine-tunes init_from afresh on the kept set."""
    safety_threshold: float = SAFETY_THRESHOLD
    """Answers with a safety score (after the sigmoid) below this are judged on safety (the paper's 0.15)."""
    sampling: StageSampling = group(StageSampling, temperature=1.0, top_p=1.0, max_new_tokens=128, gen_batch=8)
    finetune: BatchConfig = group(BatchConfig, seq_len=512, batch_size=16, micro_batch=8, epochs=2.0)
    run: RunConfig = group(RunConfig, out="runs/rejection", save_every=10**9, keep_last=1)
    optim: OptimConfig = group(OptimConfig, lr=1e-5)

    def __post_init__(self) -> None:
        check(self.k >= 1, "k", self.k, ">= 1")
        check(self.iterations >= 1, "iterations", self.iterations, ">= 1")
        check(all(t >= 0 for t in self.temperatures), "temperatures", self.temperatures, "temperatures >= 0")
        check(0 <= self.safety_threshold <= 1, "safety_threshold", self.safety_threshold, "in [0, 1]")
        check(self.finetune_from in ("base", "latest"), "finetune_from", self.finetune_from, "base or latest")


def load_reward_models(helpfulness: str, safety: str, device, dtype=None) -> dict[str, RewardModel]:
    """{"helpfulness": RewardModel, "safety": RewardModel}, each present when its path is given."""
    return {kind: RewardModel.from_pretrained(path, device=device, dtype=dtype)
            for kind, path in (("helpfulness", helpfulness), ("safety", safety)) if path}


RewardFn = Callable[[list, list, torch.Tensor], torch.Tensor]
"""(dialogs, answer texts, is_safety (N,) bool) -> R_c in (0, 1), shape (N,): a scorer in place of the reward models."""


def _scores(rms: dict, reward_fn: RewardFn | None, dialogs, texts, safety: torch.Tensor, threshold: float) -> dict:
    """{"combined", "helpfulness", "safety"} after the sigmoid (each (N,), the last two None without their model)."""
    if reward_fn is not None:
        return {"combined": torch.as_tensor(reward_fn(dialogs, texts, safety)).float(), "helpfulness": None,
                "safety": None}
    scores = score_with_reward_models(rms, dialogs, texts, safety, threshold)
    return {k: None if v is None else to_unit(v) for k, v in scores.items()}


def sample_and_score(policy, tokenizer, prompts, rms: dict, cfg: RejectionConfig, temperature: float, seed: int,
                     desc: str = "sampling", show: bool = True, reward_fn: RewardFn | None = None) -> list[dict]:
    """K answers per prompt from ``policy`` with their reward scores: one dict per prompt, {"id", "samples":
    [{"text", "score", "helpfulness", "safety"}, ...]} (scores after the sigmoid). ``prompts``: (id, Prompt) pairs."""
    sampling = dataclasses.replace(cfg.sampling, temperature=temperature)
    comps = draw_answers(policy, tokenizer, [p.dialog for _, p in prompts], sampling, k=cfg.k, seed=seed,
                           purpose="rejection/sample", desc=desc, show=show)
    texts = [c.text.strip() for row in comps for c in row]
    dialogs = [p.dialog for _, p in prompts for _ in range(cfg.k)]
    safety = torch.tensor([p.safety for _, p in prompts for _ in range(cfg.k)])
    unit = _scores(rms, reward_fn, dialogs, texts, safety, cfg.safety_threshold)
    out = []
    for j, (pid, _) in enumerate(prompts):
        out.append({"id": pid, "samples": [
            {"text": texts[r], "score": float(unit["combined"][r]),
             "helpfulness": None if unit["helpfulness"] is None else float(unit["helpfulness"][r]),
             "safety": None if unit["safety"] is None else float(unit["safety"][r])}
            for r in range(j * cfg.k, (j + 1) * cfg.k)]})
    return out


def _iteration_stats(it: int, temperature: float, cfg: RejectionConfig, results: list[dict], best: dict,
                     from_this: int, seconds: float) -> dict:
    scores = torch.tensor([[s["score"] for s in r["samples"]] for r in results])  # (N, K)
    return {
        "iteration": it, "temperature": temperature, "prompts": len(results), "k": cfg.k,
        "mean_reward": float(scores.mean()), "median_reward": float(scores.median()),
        "mean_best_of_k": float(scores.max(dim=1).values.mean()),
        "mean_kept_reward": sum(sc for sc, _ in best.values()) / max(1, len(best)), "kept": len(best),
        "kept_from_this_iteration": from_this,
        "best_of_k_curve": expected_max_reward(scores).tolist(),  # mean max reward among k samples, k = 1..K
        "samples_per_s": scores.numel() / seconds,
    }


def _previous_answers(cfg: RejectionConfig, prompts: list, rms: dict,
                      reward_fn: RewardFn | None = None) -> dict[int, tuple[float, str]]:
    """The kept answers of earlier runs, re-scored with this run's reward models: {prompt id: (score, answer)}.
    A prompt not among this run's prompts is appended to ``prompts`` (it is kept, not sampled again)."""
    if not cfg.previous:
        return {}
    index = {json.dumps(p.dialog, sort_keys=True): i for i, p in prompts}
    found: list[tuple[int, str]] = []
    for path in split_paths(cfg.previous):
        for line in Path(path).read_text(encoding="utf-8").splitlines():
            rec = json.loads(line)
            dialog, answer = rec["dialog"][:-1], rec["dialog"][-1]["content"]
            key = json.dumps(dialog, sort_keys=True)
            if key not in index:
                index[key] = len(prompts)
                prompts.append((len(prompts), Prompt(dialog=dialog, safety=bool(rec.get("safety", False)),
                                                     source=f"{path}:{rec['id']}")))
            found.append((index[key], answer))
    if not found:
        return {}
    dialogs = [prompts[i][1].dialog for i, _ in found]
    safety = torch.tensor([prompts[i][1].safety for i, _ in found])
    score = _scores(rms, reward_fn, dialogs, [a for _, a in found], safety, cfg.safety_threshold)["combined"]
    return keep_best_across_iterations({}, {i: [(float(sc), a)] for (i, a), sc in zip(found, score)})


def _write_iteration(it_dir: Path, prompts: list, results: list[dict], best: dict) -> None:
    it_dir.mkdir(parents=True, exist_ok=True)
    with open(it_dir / "samples.jsonl", "w", encoding="utf-8") as f:
        for r in results:
            f.write(json.dumps({"id": r["id"], "prompt": prompts[r["id"]][1].dialog, "samples": r["samples"]}) + "\n")
    with open(it_dir / "kept.jsonl", "w", encoding="utf-8") as f:
        for pid, (score, text) in sorted(best.items()):
            dialog = prompts[pid][1].dialog + [{"role": "assistant", "content": text}]
            f.write(json.dumps({"id": pid, "score": score, "safety": prompts[pid][1].safety, "dialog": dialog}) + "\n")


def _sample_iteration(cfg: RejectionConfig, d: Dist, prompts: list, n_sampled: int, rms: dict, policy_path: str,
                      it: int, temperature: float, best: dict, reward_fn: RewardFn | None) -> tuple[dict, dict]:
    """Sample K answers for each of the first ``n_sampled`` prompts from the newest policy (this rank's share), keep
    the best per prompt across this and all earlier iterations; returns (stats, best)."""
    t0 = time.perf_counter()
    policy, tokenizer = load(policy_path, device=d.device)
    results = sample_and_score(policy, tokenizer, prompts[:n_sampled][d.rank :: d.world], rms, cfg, temperature,
                               seed=derive_seed(cfg.run.seed, "rejection", it, d.rank), desc=f"iteration {it}: sampling",
                               show=d.main, reward_fn=reward_fn)
    del policy
    if d.world > 1:
        gathered = [None] * d.world
        dist.all_gather_object(gathered, results)
        results = [r for part in gathered for r in part]
    results.sort(key=lambda r: r["id"])
    # an empty answer is no training example: it competes for nothing (a prompt may then keep an older answer, or none)
    new = {r["id"]: [(s["score"], s["text"]) for s in r["samples"] if s["text"]] for r in results}
    best = keep_best_across_iterations(best, {k: v for k, v in new.items() if v})
    from_this = sum(1 for k, v in new.items() if v and best[k][0] == max(sc for sc, _ in v))
    stats = _iteration_stats(it, temperature, cfg, results, best, from_this, time.perf_counter() - t0)
    if d.main:
        _write_iteration(Path(cfg.run.out) / f"iter_{it}", prompts, results, best)
        d.say(f"rejection: iteration {it} (T={temperature}): mean reward {stats['mean_reward']:.3f}, best-of-{cfg.k} "
              f"{stats['mean_best_of_k']:.3f}, kept {stats['mean_kept_reward']:.3f} ({from_this}/{len(best)} kept "
              f"from this iteration), {stats['samples_per_s']:.1f} samples/s")
    d.barrier()
    return stats, best


def rejection(cfg: RejectionConfig, reward_fn: RewardFn | None = None) -> dict:
    """Run the iterations; ``reward_fn`` scores in place of the reward models (the exact judges of an oracle run)."""
    d = init_distributed(cfg.run.strategy, cfg.run.device)
    out = Path(cfg.run.out)
    if not cfg.prompts or not cfg.init_from:
        raise ValueError("give prompts=PROMPTS.jsonl and init_from=CHECKPOINT")
    if reward_fn is None and not (cfg.reward_helpfulness or cfg.reward_safety):
        raise ValueError("give reward_helpfulness=RM (and optionally reward_safety=RM)")
    prompts = list(enumerate(read_prompts(split_paths(cfg.prompts))))
    if not prompts:
        raise ValueError(f"{cfg.prompts}: no prompts")
    with RunLock(out, "rejection") if d.main else contextlib.nullcontext():
        if d.main:  # a finished iteration is reused only when resuming; overwrite removes the iterations too
            prepare_out(out, resume=cfg.run.resume, overwrite=cfg.run.overwrite, say=d.say, own=("iter_*",))
        d.barrier()
        return _rejection(cfg, d, out, prompts, reward_fn)


def _rejection(cfg: RejectionConfig, d: Dist, out: Path, prompts: list, reward_fn: RewardFn | None) -> dict:
    n_sampled = len(prompts)  # earlier runs' prompts are appended after these: kept, not sampled
    rms = {} if reward_fn is not None else load_reward_models(cfg.reward_helpfulness, cfg.reward_safety, d.device)
    if d.main:
        out.mkdir(parents=True, exist_ok=True)
        (out / "rejection_config.json").write_text(json.dumps(to_dict(cfg), indent=2))

    policy_path = cfg.sample_from or cfg.init_from
    best = _previous_answers(cfg, prompts, rms, reward_fn)  # prompt id -> (score, answer): the best so far
    history = []
    for it in range(1, cfg.iterations + 1):
        it_dir = out / f"iter_{it}"
        temperature = cfg.temperatures[it - 1] if it - 1 < len(cfg.temperatures) else cfg.sampling.temperature
        if (it_dir / "stats.json").is_file() and (it_dir / "model" / "llama2.json").is_file():
            stats = json.loads((it_dir / "stats.json").read_text())  # done in an earlier run: reload, skip
            for line in (it_dir / "kept.jsonl").read_text().splitlines():
                rec = json.loads(line)
                best[rec["id"]] = (rec["score"], rec["dialog"][-1]["content"])
            history.append(stats)
            policy_path = str(it_dir / "model")
            d.say(f"rejection: iteration {it} already done ({it_dir}), skipped")
            continue
        stats, best = _sample_iteration(cfg, d, prompts, n_sampled, rms, policy_path, it, temperature, best, reward_fn)
        # -- fine-tune on the kept set with the SFT loss, from the base model (or the newest) -------------------------
        start = cfg.init_from if cfg.finetune_from == "base" else policy_path
        r = sft(SFTConfig(data=str(it_dir / "kept.jsonl"), val_fraction=0, init_from=start, batch=cfg.finetune,
                          optim=cfg.optim, run=dataclasses.replace(cfg.run, out=str(it_dir / "model"), seed=cfg.run.seed + it,
                                                                   resume=True)))  # an interrupted iteration resumes
        if r["stopped"]:  # Ctrl-C / SIGTERM: no stats, so a rerun redoes this iteration
            return {"history": history, "out": str(out), "stopped": True}
        if d.main:  # stats last: an iteration counts as done only once its model and stats are both written
            shutil.rmtree(it_dir / "model" / "checkpoints", ignore_errors=True)  # the model dir itself is the result
            (it_dir / "stats.json").write_text(json.dumps(stats, indent=2))
        d.barrier()
        history.append(stats)
        policy_path = str(it_dir / "model")

    if d.main:
        publish(Path(policy_path), out)
    d.barrier()
    return {"history": history, "out": str(out), "stopped": False}
