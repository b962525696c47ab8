"""PPO with the combined safety/helpfulness reward (Llama 2 §3.2.3, "RLHF": PPO).

Four models: the policy pi_theta (trained, initialised from the newest chat checkpoint), the frozen reference
pi_0 (the same initial weights), a value model (trained; initialised from the helpfulness reward model, see
below), and the frozen helpfulness and safety reward models. One iteration:

1. rollouts: ``rollout_batch`` prompts, one answer each sampled from pi_theta;
2. reward: R~_c = WHITEN(LOGIT(R_c)) with R_c = R_safety if the prompt is tagged safety or R_safety < 0.15,
   else R_helpfulness (scores through a sigmoid first, so the 0.15 threshold means what it does in the
   paper; our reward models output logits), then R = R~_c - beta * KL(pi_theta || pi_0): the KL term on every
   answer token, R~_c on the last (``llama2.rlhf.token_rewards``);
3. advantages by GAE over the answer tokens with the value model's estimates; whitened per batch;
4. one pass over the rollouts in minibatches of ``minibatch``, one optimizer step each (the paper: "one gradient
   step per mini-batch"), with the clipped policy loss (0.2) and, for the value model, the clipped value loss.

Paper settings: AdamW (0.9, 0.95, eps 1e-5), weight decay 0.1, gradient clip 1.0, constant lr 1e-6, rollout
batch 512, minibatch 64, clip 0.2, beta 0.01 (7B/13B) or 0.005 (34B/70B), 200-400 iterations, early stopping
on the reward of held-out prompts (here: stop after ``patience`` evaluations without a new best; the best
policy is what ``OUT`` holds).

Value model: the paper does not say how it is initialised; we start it from the helpfulness reward model,
whose scalar head already reads "how good is this answer" from the same body, so the value estimates are
meaningful from the first iteration (a value model from the policy's body would start from a random head).

Under torchrun the policy and value models train with DDP: each rank samples and scores its share of the
rollouts with its full replica. FSDP is not offered here: sampling token by token from a sharded policy would
gather the weights for every token on every rank in lockstep.
"""
from __future__ import annotations

import copy
import json
import random
import shutil
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist
from tqdm import tqdm

from ..chat import encode_dialog_prompt
from ..checkpoint import load, save
from ..data.dialogs import read_prompts, split_holdout
from ..generation import generate
from ..rlhf.ppo import (
    combined_reward, entropy_from_logits, gae, kl_penalty, logit, masked_mean, masked_whiten, ppo_policy_loss, to_unit,
    token_logprobs, token_rewards, value_loss, whiten,
)
from ..rlhf.reward_model import RewardModel, reward_model_from_chat
from .common import (
    MetricsLog, StopRequest, autocast_for, clip_grad_norm, init_distributed, make_optimizer, publish, unwrap, wrap_model, split_paths,
)

# A reward function for tests and exact judges, in place of the reward models:
# (dialogs, answer texts, is_safety (N,) bool, answer token ids) -> R_c in (0, 1), shape (N,).
RewardFn = Callable[[list, list, torch.Tensor, list], torch.Tensor]


@dataclass
class PPOConfig:
    prompts: str = ""
    """Prompts JSONL ({"dialog": [... ending with a user turn], "safety": bool}); several files comma-separated."""
    val_prompts: str = ""
    """Held-out prompts for early stopping (default: hold out val_fraction of prompts)."""
    val_fraction: float = 0.1
    """Fraction of the prompts held out when val_prompts is not given."""
    init_from: str = ""
    """The policy to start from (the newest chat checkpoint, e.g. the last rejection-sampling model)."""
    reward_helpfulness: str = ""
    """Helpfulness reward model checkpoint."""
    reward_safety: str = ""
    """Safety reward model checkpoint (optional: without it the helpfulness score is R_c)."""
    value_from: str = ""
    """Value model initialisation (default: the helpfulness reward model)."""
    out: str = "runs/ppo"
    """Output directory: the best policy at its root, value/ the value model, metrics.jsonl."""
    iterations: int = 200
    """PPO iterations (200-400 in the paper, with early stopping)."""
    rollout_batch: int = 512
    """Rollouts (prompt + sampled answer) per iteration (512 in the paper)."""
    minibatch: int = 64
    """Rollouts per optimizer step (64 in the paper); one step per minibatch, one pass per iteration."""
    micro_batch: int = 8
    """Rollouts per forward/backward inside a minibatch, on each rank."""
    lr: float = 1e-6
    """Constant learning rate of the policy (1e-6 in the paper)."""
    value_lr: float = 1e-6
    """Constant learning rate of the value model (the paper gives one rate; we keep it separate)."""
    weight_decay: float = 0.1
    """AdamW weight decay on matrices."""
    grad_clip: float = 1.0
    """Gradient norm clip for both models."""
    kl_beta: float = 0.01
    """beta of the KL penalty (0.01 for 7B/13B, 0.005 for 34B/70B)."""
    clip: float = 0.2
    """PPO ratio clip (0.2) and value clip."""
    gamma: float = 1.0
    """GAE discount (the paper is silent; 1: the reward comes once, at the end of a short answer)."""
    lam: float = 0.95
    """GAE lambda (the paper is silent; 0.95 is the usual choice)."""
    safety_threshold: float = 0.15
    """Answers whose safety score (after the sigmoid) is below this are judged on safety (0.15 in the paper)."""
    temperature: float = 1.0
    """Sampling temperature of the rollouts (1: the policy's own distribution)."""
    max_new_tokens: int = 128
    """Longest answer sampled."""
    eval_every: int = 5
    """Held-out reward every this many iterations (and at the end)."""
    patience: int = 4
    """Early stopping: stop after this many evaluations without a better held-out reward (0 = never)."""
    frozen_dtype: str = ""
    """dtype of the frozen reference and reward models (e.g. bfloat16 to halve their memory; default: as loaded)."""
    frozen_device: str = ""
    """Device of the frozen models (e.g. cpu to keep them off the GPU; default: the training device)."""
    seed: int = 0
    """Seed of the prompt order and of the sampling."""
    device: str = "cpu"
    """cpu or cuda (bf16 autocast)."""
    strategy: str = "ddp"
    """Under torchrun with several processes: ddp (see the module docstring for why not fsdp)."""
    tensorboard: bool = True
    """Also write the metrics for TensorBoard to OUT/tb."""


def _rollout_tensors(prompt_ids: list[list[int]], answers: list[list[int]], device) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded prompt + answer sequences (B, L) and the mask (B, L - 1) of the positions whose *target*
    (the next token) is an answer token: position t holds log p(token t+1)."""
    L = max(len(p) + len(a) for p, a in zip(prompt_ids, answers))
    tokens = torch.zeros(len(answers), L, dtype=torch.long)
    mask = torch.zeros(len(answers), L - 1)
    for i, (p, a) in enumerate(zip(prompt_ids, answers)):
        tokens[i, : len(p) + len(a)] = torch.tensor(p + a)
        mask[i, len(p) - 1 : len(p) - 1 + len(a)] = 1.0
    return tokens.to(device), mask.to(device)


def _logprobs(model, tokens, mask, autocast, entropy: bool = False):
    """Log-probabilities (B, L-1) of each next token, and (for monitoring, when asked) the mean entropy."""
    with autocast:
        logits = model(tokens)  # (B, L, V)
    lp = token_logprobs(logits[:, :-1], tokens[:, 1:])  # (B, L-1)
    return lp, (entropy_from_logits(logits[:, :-1].detach(), mask) if entropy else None)


def _values(model, tokens, autocast):
    with autocast:
        return model(tokens)[:, :-1].float()  # (B, L-1): the value of the state before each target token


def score_answers(rms: dict, reward_fn: RewardFn | None, dialogs, texts, safety: torch.Tensor, threshold: float,
                  answer_ids: list) -> torch.Tensor:
    """R_c in (0, 1) per answer: the exact reward function if one is given, else the reward models' combined rule."""
    if reward_fn is not None:
        return torch.as_tensor(reward_fn(dialogs, texts, safety, answer_ids)).float()
    r_h = to_unit(rms["helpfulness"].score(dialogs, texts)) if "helpfulness" in rms else None
    r_s = to_unit(rms["safety"].score(dialogs, texts)) if "safety" in rms else None
    if r_h is not None and r_s is not None:
        return combined_reward(r_s, r_h, safety, threshold)
    return r_h if r_h is not None else r_s


def ppo(cfg: PPOConfig, reward_fn: RewardFn | None = None) -> dict:
    """Train; ``reward_fn`` replaces the reward models (tests, exact toy judges)."""
    d = init_distributed("ddp" if cfg.strategy == "fsdp" else cfg.strategy, cfg.device)
    out = Path(cfg.out)
    if not cfg.prompts or not cfg.init_from:
        raise ValueError("give prompts=PROMPTS.jsonl and init_from=CHECKPOINT")
    if reward_fn is None and not (cfg.reward_helpfulness or cfg.reward_safety):
        raise ValueError("give reward_helpfulness=RM (and optionally reward_safety=RM)")
    if cfg.rollout_batch % cfg.minibatch or cfg.minibatch % (cfg.micro_batch * d.world):
        raise ValueError(f"rollout_batch {cfg.rollout_batch} must be a multiple of minibatch {cfg.minibatch}, itself a "
                         f"multiple of micro_batch * ranks = {cfg.micro_batch} * {d.world}")
    prompts = list(read_prompts(split_paths(cfg.prompts)))
    if cfg.val_prompts:
        train_prompts, val_prompts = prompts, list(read_prompts(split_paths(cfg.val_prompts)))
    else:
        train_prompts, val_prompts = split_holdout(prompts, cfg.val_fraction, cfg.seed) if cfg.val_fraction > 0 else (prompts, [])

    # -- models ------------------------------------------------------------------------------------------------
    frozen_device = torch.device(cfg.frozen_device) if cfg.frozen_device else d.device
    frozen_dtype = cfg.frozen_dtype or None
    policy, tokenizer = load(cfg.init_from, device=d.device)
    if policy.args.head != "lm" or tokenizer is None:
        raise ValueError(f"{cfg.init_from}: need a chat model with an LM head and its tokenizer")
    reference, _ = load(cfg.init_from, device=frozen_device, dtype=frozen_dtype)
    reference.eval().requires_grad_(False)
    rms = {}
    for kind, path in (("helpfulness", cfg.reward_helpfulness), ("safety", cfg.reward_safety)):
        if path:
            rms[kind] = RewardModel.from_pretrained(path, device=frozen_device, dtype=frozen_dtype)
    value_src = cfg.value_from or cfg.reward_helpfulness or cfg.reward_safety
    if value_src:
        value, _ = load(value_src, device=d.device)
        if value.args.head != "scalar":
            value = reward_model_from_chat(value, seed=cfg.seed)
    else:  # no reward model (reward_fn): the policy's body with a zero head, so the first advantages are the
        value = reward_model_from_chat(policy, seed=cfg.seed)  # whitened rewards themselves, not a random baseline
        with torch.no_grad():
            value.output.weight.zero_()
    policy.train(), value.train()
    policy, value = wrap_model(policy, d), wrap_model(value, d)
    # constant learning rate (the paper's 1e-6), so the optimizer's own lr is never touched afterwards
    opt_pi = make_optimizer(policy, cfg.lr, cfg.weight_decay)
    opt_v = make_optimizer(value, cfg.value_lr, cfg.weight_decay)
    if d.main:
        out.mkdir(parents=True, exist_ok=True)
        (out / "ppo_config.json").write_text(json.dumps(asdict(cfg), indent=2))
    log = MetricsLog(out, enabled=d.main, tensorboard=cfg.tensorboard)
    autocast = autocast_for(d.device)
    per_rank = cfg.rollout_batch // d.world
    mb_rank = cfg.minibatch // d.world

    def rollouts(batch, seed: int, temperature: float):
        """Sample one answer per prompt with the current policy; returns ids, texts and R_c."""
        prompt_ids = [encode_dialog_prompt(tokenizer, p.dialog) for p in batch]
        pol = unwrap(policy)
        pol.eval()
        budget = pol.args.max_seq_len - max(len(p) for p in prompt_ids)
        comps = generate(pol, prompt_ids, tokenizer=tokenizer, temperature=temperature, top_p=1.0,
                         max_new_tokens=min(cfg.max_new_tokens, budget), seed=seed)
        pol.train()
        answers = [c.tokens or [tokenizer.eos_id] for c in comps]  # an empty answer still ends with EOS
        texts = [c.text.strip() for c in comps]
        safety = torch.tensor([p.safety for p in batch])
        r_c = score_answers(rms, reward_fn, [p.dialog for p in batch], texts, safety, cfg.safety_threshold,
                            [c.tokens for c in comps])
        return prompt_ids, answers, texts, r_c

    def heldout_reward(it: int) -> float:
        """Mean R_c of one sampled answer per held-out prompt (each rank its share)."""
        if not val_prompts:
            return float("nan")
        mine = val_prompts[d.rank :: d.world]
        total = torch.zeros(2, dtype=torch.float64)
        for b in range(0, len(mine), cfg.micro_batch * 4):
            *_, r_c = rollouts(mine[b : b + cfg.micro_batch * 4], seed=hash((cfg.seed, "val", b)) & 0x7FFFFFFF,
                               temperature=cfg.temperature)
            total += torch.tensor([float(r_c.sum()), len(r_c)], dtype=torch.float64)
        if d.world > 1:
            total = total.to(d.device)
            dist.all_reduce(total)
        return float(total[0] / total[1])

    def save_best(it: int, score: float) -> None:
        if d.main:  # written aside, then copied file by file over OUT's model (OUT always holds a whole model)
            save(unwrap(policy), out / "best.tmp", format="native", tokenizer=tokenizer, overwrite=True)
            publish(out / "best.tmp", out)
            shutil.rmtree(out / "best.tmp")
            save(unwrap(value), out / "value", format="native", tokenizer=tokenizer, overwrite=True)
            (out / "best.json").write_text(json.dumps({"iteration": it, "heldout_reward": score}))
        d.barrier()

    # -- the loop ------------------------------------------------------------------------------------------------
    history, best, since_best = [], heldout_reward(0), 0
    save_best(0, best)
    if d.main:
        print(f"ppo: {len(train_prompts)} prompts ({len(val_prompts)} held out); held-out reward at start {best:.4f}",
              file=sys.stderr)
    rng = random.Random(cfg.seed)
    bar = tqdm(total=cfg.iterations, desc="ppo", disable=not (d.main and sys.stderr.isatty()))
    with StopRequest() as stop:
        try:
            for it in range(1, cfg.iterations + 1):
                t0 = time.perf_counter()
                batch = [train_prompts[rng.randrange(len(train_prompts))] for _ in range(cfg.rollout_batch)]
                mine = batch[d.rank * per_rank : (d.rank + 1) * per_rank]
                # 1. rollouts and their rewards
                prompt_ids, answers, texts, r_c = rollouts(mine, seed=hash((cfg.seed, it, d.rank)) & 0x7FFFFFFF,
                                                           temperature=cfg.temperature)
                tokens, mask = _rollout_tensors(prompt_ids, answers, d.device)
                scores = logit(r_c).to(d.device)  # (B,)
                if d.world > 1:  # whiten over the whole rollout batch, not a rank's share
                    parts = [torch.empty_like(scores) for _ in range(d.world)]
                    dist.all_gather(parts, scores)
                    every = torch.cat(parts)
                    scores = (scores - every.mean()) / (every.std(unbiased=False) + 1e-8)
                else:
                    scores = whiten(scores)
                with torch.no_grad():
                    old_lp, _ = _logprobs(policy, tokens, mask, autocast)
                    ref_lp, _ = _logprobs(reference, tokens.to(frozen_device), mask.to(frozen_device), autocast)
                    ref_lp = ref_lp.to(d.device)
                    old_v = _values(value, tokens, autocast)
                    rewards = token_rewards(scores, old_lp, ref_lp, mask, cfg.kl_beta)  # (B, L-1)
                    adv, returns = gae(rewards, old_v, mask, cfg.gamma, cfg.lam)
                    adv = masked_whiten(adv, mask)
                    kl = (kl_penalty(old_lp, ref_lp, mask).sum(1)).mean()  # per answer
                # 2. one pass in minibatches, one optimizer step per minibatch
                stats = {"policy_loss": 0.0, "value_loss": 0.0, "clip_fraction": 0.0, "entropy": 0.0}
                order = torch.randperm(per_rank, generator=torch.Generator().manual_seed(hash((cfg.seed, it)) & 0x7FFFFFFF))
                n_mb = per_rank // mb_rank
                for m in range(n_mb):
                    idx_mb = order[m * mb_rank : (m + 1) * mb_rank]
                    n_micro = mb_rank // cfg.micro_batch
                    for j in range(n_micro):
                        idx = idx_mb[j * cfg.micro_batch : (j + 1) * cfg.micro_batch]
                        lp, ent = _logprobs(policy, tokens[idx], mask[idx], autocast, entropy=True)
                        pl, s = ppo_policy_loss(lp, old_lp[idx], adv[idx], mask[idx], cfg.clip)
                        (pl / n_micro).backward()
                        v = _values(value, tokens[idx], autocast)
                        vl = value_loss(v, old_v[idx], returns[idx], mask[idx], cfg.clip)
                        (vl / n_micro).backward()
                        w = 1.0 / (n_micro * n_mb)
                        stats["policy_loss"] += float(pl.detach()) * w
                        stats["value_loss"] += float(vl.detach()) * w
                        stats["clip_fraction"] += float(s["clip_fraction"]) * w
                        stats["entropy"] += float(ent) * w
                    for model, opt in ((policy, opt_pi), (value, opt_v)):
                        clip_grad_norm(model, cfg.grad_clip)
                        opt.step()
                        opt.zero_grad(set_to_none=True)
                rec = {"iteration": it, "step": it, "reward": d.all_mean(float(r_c.mean())), "kl": d.all_mean(float(kl)),
                       "answer_tokens": d.all_mean(float(mask.sum(1).mean())),
                       **{k: d.all_mean(v) for k, v in stats.items()}, "seconds": time.perf_counter() - t0}
                stopping = stop.requested(d)
                if it % cfg.eval_every == 0 or it == cfg.iterations or stopping:
                    rec["heldout_reward"] = heldout_reward(it)
                    if rec["heldout_reward"] > best:
                        best, since_best = rec["heldout_reward"], 0
                        save_best(it, best)
                    else:
                        since_best += 1
                history.append(rec)
                log.log(rec)
                bar.set_postfix(reward=f"{rec['reward']:.3f}", kl=f"{rec['kl']:.3f}")
                bar.update(1)
                if cfg.patience and since_best >= cfg.patience:
                    if d.main:
                        print(f"ppo: early stop at iteration {it}: no better held-out reward in {cfg.patience} evaluations "
                              f"(best {best:.4f})", file=sys.stderr)
                    break
                if stopping:
                    break
        finally:
            bar.close()
            log.close()
    return {"history": history, "out": str(out), "best_heldout_reward": best, "stopped": stop.flag}
