"""Rejection sampling fine-tuning (Llama 2 §3.2.3, "Rejection Sampling").

For each prompt, sample K answers from the latest policy, score them with the reward model(s), keep the best,
and fine-tune on the kept set with the SFT loss. Over ``iterations`` rounds, each samples from the newest model
and keeps, per prompt, the best answer among this and every earlier round: the paper's fix after RLHF V3
regressed on capabilities ("we modified our strategy, incorporating top-performing samples from all prior
iterations"). The sampling temperature is an option with a per-iteration schedule, since the paper finds the
best temperature moves as the model changes (its Figure 8).

Scoring: the combined rule of the PPO stage (§3.2.3): a prompt tagged safety, or an answer whose safety score
is below 0.15, is judged by the safety reward model, any other by the helpfulness one; both scores pass
through a sigmoid first so the threshold has its meaning (``llama2.rlhf.combined_reward``). With one reward
model only, it judges every answer.

Fine-tuning: each iteration fine-tunes the newest policy on the kept set by running the SFT stage
(``llama2.train.sft``) on a dialogs file written here. This is the one place where a stage calls another: the
paper's rejection sampling *is* SFT on selected samples, and a second copy of that loop would only drift.

Output: ``OUT/iter_N/`` holds samples.jsonl (every sample with its scores), kept.jsonl (the kept dialogs, the
SFT input), stats.json (reward statistics, best-of-K curve) and model/ (the checkpoint); ``OUT`` itself holds the
final model. An iteration whose model and stats exist is skipped, so a stopped run resumes where it stopped.
Under torchrun the prompts are sampled sharded by rank and the fine-tuning runs with FSDP/DDP.
"""
from __future__ import annotations

import json
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm import tqdm

from ..chat import encode_dialog_prompt
from ..checkpoint import load
from ..data.dialogs import read_prompts
from ..generation import generate
from ..rlhf.ppo import combined_reward, expected_max_reward, keep_best_across_iterations, to_unit
from ..rlhf.reward_model import RewardModel
from .common import init_distributed, publish, split_paths
from .sft import SFTConfig, sft


@dataclass
class RejectionConfig:
    prompts: str = ""
    """Prompts JSONL ({"dialog": [... ending with a user turn], "safety": bool}); several files comma-separated."""
    init_from: str = ""
    """The policy to start from (an SFT/chat checkpoint)."""
    reward_helpfulness: str = ""
    """Helpfulness reward model checkpoint (from `llama2 reward kind=helpfulness`)."""
    reward_safety: str = ""
    """Safety reward model checkpoint (optional; without it the helpfulness model judges every answer)."""
    out: str = "runs/rejection"
    """Output directory: iter_N/{samples,kept}.jsonl, stats.json, model/; OUT itself holds the final model."""
    iterations: int = 2
    """Rounds of sample -> keep best -> fine-tune, each sampling from the newest model."""
    k: int = 8
    """Samples per prompt (the paper explores up to 100 in its Figure 7; the gain flattens after ~10-20)."""
    temperature: float = 1.0
    """Sampling temperature of every iteration without an entry in temperatures."""
    temperatures: list[float] = field(default_factory=list)
    """Per-iteration temperatures (e.g. 1.0,1.2): the best temperature moves as the model changes (Figure 8)."""
    top_p: float = 1.0
    """Nucleus sampling during rejection sampling (1 = off: the diversity is the point)."""
    max_new_tokens: int = 128
    """Longest answer sampled."""
    gen_batch: int = 8
    """Prompts per generation call (each expanded to k rows)."""
    safety_threshold: float = 0.15
    """Answers with a safety score (after the sigmoid) below this are judged on safety (the paper's 0.15)."""
    seq_len: int = 512
    """Fine-tuning row length."""
    batch_size: int = 16
    """Fine-tuning rows per step."""
    micro_batch: int = 8
    """Fine-tuning rows per forward on each rank."""
    epochs: float = 2.0
    """Fine-tuning epochs over the kept set, per iteration."""
    lr: float = 1e-5
    """Fine-tuning peak learning rate (cosine to 10%)."""
    warmup_steps: int = 0
    """Fine-tuning warmup steps."""
    seed: int = 0
    """Seed of the sampling and of the fine-tuning data order."""
    device: str = "cpu"
    """cpu or cuda."""
    strategy: str = "fsdp"
    """Fine-tuning under torchrun with several processes: fsdp or ddp."""
    tensorboard: bool = True
    """Write the fine-tuning metrics for TensorBoard too."""


def sample_and_score(policy, tokenizer, prompts, rms: dict, cfg: RejectionConfig, temperature: float, seed: int,
                     desc: str = "sampling", show: bool = True) -> list[dict]:
    """K answers per prompt from ``policy`` with their reward scores: one dict per prompt, {"id", "samples":
    [{"text", "score", "helpfulness", "safety"}, ...]}. ``prompts``: (id, Prompt) pairs."""
    out = []
    bar = tqdm(total=len(prompts) * cfg.k, desc=desc, unit="sample", disable=not (show and sys.stderr.isatty()))
    for b in range(0, len(prompts), cfg.gen_batch):
        chunk = prompts[b : b + cfg.gen_batch]
        ids = [encode_dialog_prompt(tokenizer, p.dialog) for _, p in chunk]
        budget = policy.args.max_seq_len - max(len(i) for i in ids)
        if budget <= 0:
            raise ValueError(f"prompt {chunk[0][1].source}: longer than the policy's context {policy.args.max_seq_len}")
        rows = [i for i in ids for _ in range(cfg.k)]  # (prompt 0 x k, prompt 1 x k, ...)
        comps = generate(policy, rows, tokenizer=tokenizer, temperature=temperature, top_p=cfg.top_p,
                         max_new_tokens=min(cfg.max_new_tokens, budget), seed=hash((seed, b)) & 0x7FFFFFFF)
        texts = [c.text.strip() for c in comps]
        dialogs = [p.dialog for _, p in chunk for _ in range(cfg.k)]
        safety = torch.tensor([p.safety for _, p in chunk for _ in range(cfg.k)])
        r_h = to_unit(rms["helpfulness"].score(dialogs, texts)) if "helpfulness" in rms else None
        r_s = to_unit(rms["safety"].score(dialogs, texts)) if "safety" in rms else None
        if r_h is not None and r_s is not None:
            score = combined_reward(r_s, r_h, safety, cfg.safety_threshold)
        else:
            score = r_h if r_h is not None else r_s
        for j, (pid, _) in enumerate(chunk):
            rows_j = range(j * cfg.k, (j + 1) * cfg.k)
            out.append({"id": pid, "samples": [
                {"text": texts[r], "score": float(score[r]),
                 "helpfulness": None if r_h is None else float(r_h[r]), "safety": None if r_s is None else float(r_s[r])}
                for r in rows_j]})
        bar.update(len(chunk) * cfg.k)
    bar.close()
    return out


def rejection(cfg: RejectionConfig) -> dict:
    d = init_distributed(cfg.strategy, cfg.device)
    out = Path(cfg.out)
    if not cfg.prompts or not cfg.init_from:
        raise ValueError("give prompts=PROMPTS.jsonl and init_from=CHECKPOINT")
    if not (cfg.reward_helpfulness or cfg.reward_safety):
        raise ValueError("give reward_helpfulness=RM (and optionally reward_safety=RM)")
    if cfg.k < 1 or cfg.iterations < 1:
        raise ValueError(f"k and iterations must be >= 1 (got k={cfg.k}, iterations={cfg.iterations})")
    prompts = list(enumerate(read_prompts(split_paths(cfg.prompts))))
    rms = {}
    for kind, path in (("helpfulness", cfg.reward_helpfulness), ("safety", cfg.reward_safety)):
        if path:
            rms[kind] = RewardModel.from_pretrained(path, device=d.device)
    if d.main:
        out.mkdir(parents=True, exist_ok=True)
        (out / "rejection_config.json").write_text(json.dumps(asdict(cfg), indent=2))

    policy_path = cfg.init_from
    best: dict[int, tuple[float, str]] = {}  # prompt id -> (score, answer): the best of all iterations so far
    history = []
    for it in range(1, cfg.iterations + 1):
        it_dir = out / f"iter_{it}"
        temperature = cfg.temperatures[it - 1] if it - 1 < len(cfg.temperatures) else cfg.temperature
        if (it_dir / "stats.json").is_file() and (it_dir / "model" / "llama2.json").is_file():
            stats = json.loads((it_dir / "stats.json").read_text())  # done in an earlier run: reload, skip
            for line in (it_dir / "kept.jsonl").read_text().splitlines():
                rec = json.loads(line)
                best[rec["id"]] = (rec["score"], rec["dialog"][-1]["content"])
            history.append(stats)
            policy_path = str(it_dir / "model")
            if d.main:
                print(f"rejection: iteration {it} already done ({it_dir}), skipped", file=sys.stderr)
            continue

        # -- sample K answers per prompt from the newest policy, this rank's share of the prompts ------------------
        t0 = time.perf_counter()
        policy, tokenizer = load(policy_path, device=d.device)
        policy.eval()
        mine = prompts[d.rank :: d.world]
        results = sample_and_score(policy, tokenizer, mine, rms, cfg, temperature, seed=hash((cfg.seed, it)),
                                   desc=f"iteration {it}: sampling", show=d.main)
        del policy
        if d.world > 1:
            gathered = [None] * d.world
            dist.all_gather_object(gathered, results)
            results = [r for part in gathered for r in part]
        results.sort(key=lambda r: r["id"])
        dt = time.perf_counter() - t0

        # -- keep the best per prompt across this and all earlier iterations ---------------------------------------
        scores = torch.tensor([[s["score"] for s in r["samples"]] for r in results])  # (N, K)
        # an empty answer is no training example: it competes for nothing (a prompt may then keep an older answer, or none)
        new = {r["id"]: [(s["score"], s["text"]) for s in r["samples"] if s["text"]] for r in results}
        best = keep_best_across_iterations(best, {k: v for k, v in new.items() if v})
        from_this = sum(1 for k, v in new.items() if v and best[k][0] == max(sc for sc, _ in v))
        stats = {
            "iteration": it, "temperature": temperature, "prompts": len(results), "k": cfg.k,
            "mean_reward": float(scores.mean()), "median_reward": float(scores.median()),
            "mean_best_of_k": float(scores.max(dim=1).values.mean()),
            "mean_kept_reward": sum(sc for sc, _ in best.values()) / max(1, len(best)), "kept": len(best),
            "kept_from_this_iteration": from_this,
            "best_of_k_curve": expected_max_reward(scores).tolist(),  # mean max reward among k samples, k = 1..K
            "samples_per_s": scores.numel() / dt,
        }
        if d.main:
            it_dir.mkdir(parents=True, exist_ok=True)
            with open(it_dir / "samples.jsonl", "w", encoding="utf-8") as f:
                for r in results:
                    f.write(json.dumps({"id": r["id"], "prompt": prompts[r["id"]][1].dialog, "samples": r["samples"]}) + "\n")
            with open(it_dir / "kept.jsonl", "w", encoding="utf-8") as f:
                for pid, (score, text) in sorted(best.items()):
                    dialog = prompts[pid][1].dialog + [{"role": "assistant", "content": text}]
                    f.write(json.dumps({"id": pid, "score": score, "dialog": dialog}) + "\n")
            print(f"rejection: iteration {it} (T={temperature}): mean reward {stats['mean_reward']:.3f}, best-of-{cfg.k} "
                  f"{stats['mean_best_of_k']:.3f}, kept {stats['mean_kept_reward']:.3f} "
                  f"({from_this}/{len(best)} kept from this iteration), {stats['samples_per_s']:.1f} samples/s", file=sys.stderr)
        d.barrier()

        # -- fine-tune the newest policy on the kept set with the SFT loss ----------------------------------------------
        r = sft(SFTConfig(data=str(it_dir / "kept.jsonl"), val_fraction=0, init_from=policy_path, out=str(it_dir / "model"),
                      seq_len=cfg.seq_len, batch_size=cfg.batch_size, micro_batch=cfg.micro_batch, epochs=cfg.epochs,
                      lr=cfg.lr, warmup_steps=cfg.warmup_steps, save_every=10**9, keep_last=1, seed=cfg.seed + it,
                      device=cfg.device, strategy=cfg.strategy, tensorboard=cfg.tensorboard))
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
