"""PPO with the combined safety/helpfulness reward (Llama 2 §3.2.3, "RLHF": PPO).

Four models: the policy pi_theta (trained, initialised from the newest chat checkpoint), the frozen reference
pi_0 (the same initial weights), a value model (trained; initialised from the helpfulness reward model, see
below), and the frozen helpfulness and safety reward models. One iteration:

1. rollouts: ``rollout_batch`` prompts, one answer each sampled from pi_theta;
2. reward: R~_c = WHITEN(LOGIT(R_c)) with R_c = R_safety if the prompt is tagged safety or R_safety < 0.15,
   else R_helpfulness (:mod:`llama2.rlhf.combined`), then R = R~_c - beta * KL(pi_theta || pi_0): the KL term on
   every answer token, R~_c on the last (``llama2.rlhf.token_rewards``);
3. advantages by GAE over the answer tokens with the value model's estimates, the value model on the same scale
   as the whitened scores (``llama2.rlhf.ppo.whitened_advantages``); the advantages are whitened per batch;
4. one pass over the rollouts in minibatches of ``minibatch``, one optimizer step each (the paper: "one gradient
   step per mini-batch"), with the clipped policy loss (0.2) and, for the value model, the clipped value loss.

Paper settings: AdamW (0.9, 0.95, eps 1e-5), weight decay 0.1, gradient clip 1.0, constant lr 1e-6, rollout
batch 512, minibatch 64, clip 0.2, beta 0.01 (7B/13B) or 0.005 (34B/70B), 200-400 iterations, early stopping
on the reward of held-out prompts (here: stop after ``patience`` evaluations without a new best; the best
policy is what ``OUT`` holds).

Value model: the paper does not say how it is initialised; we start it from the helpfulness reward model,
whose scalar head already reads "how good is this answer" from the same body, so the value estimates are
meaningful from the first iteration (a value model from the policy's body would start from a random head).
It therefore predicts raw scores; GAE maps its predictions to the whitened scale with the rollout batch's own
mean and std, and it is trained on the returns on that scale, so value and returns never disagree in scale (a
value in raw units against whitened returns would cancel the reward's signal, or invert it when the scores
spread more than 1).

Under torchrun the policy and value models train with DDP: each rank samples and scores its share of the
rollouts with its full replica. FSDP is not offered here: sampling token by token from a sharded policy would
gather the weights for every token on every rank in lockstep.
"""
from __future__ import annotations

import contextlib
import json
import random
import shutil
from dataclasses import dataclass
from typing import Callable

import torch
import torch.distributed as dist

from ..checkpoint import load, save
from ..config import OptimConfig, RunConfig, StageSampling, check, group, stage_config
from ..data.batching import pad_sequences
from ..data.records import read_prompts, split_holdout, split_paths
from ..rlhf.combined import SAFETY_THRESHOLD, logit, masked_mean, masked_whiten, score_with_reward_models, to_unit
from ..rlhf.ppo import (
    entropy_from_logits, explained_variance, kl_penalty, ppo_policy_loss, score_scale, to_whitened, token_logprobs,
    value_loss, whitened_advantages,
)
from ..rlhf.reward_model import reward_model_from_chat
from ..answers import draw_answers
from ..seeding import derive_seed, generator
from ..dist import Dist, init_distributed, unwrap, wrap_model
from .loop import Session, accumulate, begin, learning_rate, make_optimizer, run_steps
from .rejection import load_reward_models
from .state import publish

__all__ = ["PPOConfig", "ppo", "score_answers", "RewardFn"]

# A reward function for tests and exact judges, in place of the reward models:
# (dialogs, answer texts, is_safety (N,) bool, answer token ids) -> R_c in (0, 1), shape (N,).
RewardFn = Callable[[list, list, torch.Tensor, list], torch.Tensor]


@stage_config
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
    iterations: int = 200
    """PPO iterations (200-400 in the paper, with early stopping)."""
    rollout_batch: int = 512
    """Rollouts (prompt + sampled answer) per iteration (512 in the paper)."""
    minibatch: int = 64
    """Rollouts per optimizer step (64 in the paper); one step per minibatch, one pass per iteration."""
    micro_batch: int = 8
    """Rollouts per forward/backward inside a minibatch, on each rank."""
    value_lr: float = 1e-6
    """Constant learning rate of the value model (the paper gives one rate; we keep it separate)."""
    kl_beta: float = 0.01
    """beta of the KL penalty (0.01 for 7B/13B, 0.005 for 34B/70B)."""
    clip: float = 0.2
    """PPO ratio clip (0.2) and value clip."""
    gamma: float = 1.0
    """GAE discount (the paper is silent; 1: the reward comes once, at the end of a short answer)."""
    lam: float = 0.95
    """GAE lambda (the paper is silent; 0.95 is the usual choice)."""
    safety_threshold: float = SAFETY_THRESHOLD
    """Answers whose safety score (after the sigmoid) is below this are judged on safety (0.15 in the paper)."""
    patience: int = 4
    """Early stopping: stop after this many evaluations without a better held-out reward (0 = never)."""
    frozen_dtype: str = ""
    """dtype of the frozen reference and reward models (e.g. bfloat16 to halve their memory; default: as loaded)."""
    frozen_device: str = ""
    """Device of the frozen models (e.g. cpu to keep them off the GPU; default: the training device)."""
    sampling: StageSampling = group(StageSampling, temperature=1.0, top_p=1.0, max_new_tokens=128, gen_batch=64)
    run: RunConfig = group(RunConfig, out="runs/ppo", strategy="ddp", eval_every=5)
    optim: OptimConfig = group(OptimConfig, lr=1e-6, schedule="constant")

    def __post_init__(self) -> None:
        check(0 <= self.val_fraction < 1, "val_fraction", self.val_fraction, "in [0, 1)")
        for name in ("iterations", "rollout_batch", "minibatch", "micro_batch"):
            check(getattr(self, name) >= 1, name, getattr(self, name), ">= 1")
        check(self.value_lr > 0 and self.value_lr < float("inf"), "value_lr", self.value_lr, "a finite number > 0")
        check(0 <= self.kl_beta < float("inf"), "kl_beta", self.kl_beta, "finite and >= 0")
        check(0 < self.clip < float("inf"), "clip", self.clip, "a finite number > 0")
        check(0 <= self.gamma <= 1, "gamma", self.gamma, "in [0, 1]")
        check(0 <= self.lam <= 1, "lam", self.lam, "in [0, 1]")
        check(0 <= self.safety_threshold <= 1, "safety_threshold", self.safety_threshold, "in [0, 1]")
        check(self.patience >= 0, "patience", self.patience, ">= 0")


def score_answers(rms: dict, reward_fn: RewardFn | None, dialogs, texts, safety: torch.Tensor, threshold: float,
                  answer_ids: list) -> torch.Tensor:
    """LOGIT(R_c) per answer, in raw-score units: the reward models' combined score as it is (no sigmoid-logit round
    trip, which saturates in fp32), or the logit of an exact reward function's R_c in (0, 1)."""
    if reward_fn is not None:
        return logit(torch.as_tensor(reward_fn(dialogs, texts, safety, answer_ids)).float())
    return score_with_reward_models(rms, dialogs, texts, safety, threshold)["combined"]


@dataclass
class Models:
    """The four models of PPO (the reward models as a dict) and the tokenizer."""

    session: Session  # the policy, its optimizer, the run
    reference: torch.nn.Module
    value: torch.nn.Module
    value_opt: torch.optim.Optimizer
    rms: dict
    tokenizer: object
    frozen_device: torch.device


def _models(cfg: PPOConfig, d: Dist, reward_fn: RewardFn | None) -> Models:
    frozen_device = torch.device(cfg.frozen_device) if cfg.frozen_device else d.device
    frozen_dtype = cfg.frozen_dtype or None
    policy, tokenizer = load(cfg.init_from, device=d.device)
    if policy.args.head != "lm" or tokenizer is None:
        raise ValueError(f"{cfg.init_from}: need a chat model with an LM head and its tokenizer")
    reference, _ = load(cfg.init_from, device=frozen_device, dtype=frozen_dtype)
    reference.eval().requires_grad_(False)
    rms = {} if reward_fn is not None else load_reward_models(cfg.reward_helpfulness, cfg.reward_safety,
                                                                  frozen_device, frozen_dtype)
    value_src = cfg.value_from or cfg.reward_helpfulness or cfg.reward_safety
    if value_src:
        value, _ = load(value_src, device=d.device)
        if value.args.head != "scalar":
            value = reward_model_from_chat(value, seed=cfg.run.seed)
    else:  # no reward model (reward_fn): the policy's body with a zero head, so the first advantages are the
        value = reward_model_from_chat(policy, seed=cfg.run.seed)  # whitened rewards themselves, not a random baseline
        with torch.no_grad():
            value.output.weight.zero_()
    session = begin(policy, d, cfg, name="ppo", tokenizer=tokenizer)
    value.train()
    value = wrap_model(value, d)
    value_opt = make_optimizer(value, cfg.value_lr, cfg.optim.weight_decay, cfg.optim.betas, cfg.optim.eps)
    return Models(session, reference, value, value_opt, rms, tokenizer, frozen_device)


@dataclass
class Rollouts:
    tokens: torch.Tensor  # (B, L) prompt + answer, right-padded
    mask: torch.Tensor  # (B, L - 1) 1 where the *target* (the next token) is an answer token
    score: torch.Tensor  # (B,) LOGIT(R_c), raw-score units
    old_lp: torch.Tensor | None = None  # (B, L - 1) the sampler's log-probs of the answer tokens (0 elsewhere)
    safety: torch.Tensor | None = None  # (B,) bool: the prompt is tagged safety (judged by the safety model)

    @property
    def r_c(self) -> torch.Tensor:
        """R_c in (0, 1), the reward as reported."""
        return to_unit(self.score)


def _rollouts(cfg: PPOConfig, m: Models, prompts, seed: int, reward_fn: RewardFn | None) -> Rollouts:
    """One sampled answer per prompt from the current policy, scored."""
    policy = unwrap(m.session.model)
    prompt_ids: list[list[int]] = []
    # the policy's log-probs of its own samples come with them (the sampler computes them from the same weights,
    # temperature 1): PPO's pi_old without another forward pass. Only where the training forward computes in fp32
    # as the sampler does (under bf16 autocast or with bf16 weights the two would differ by bf16 rounding, and so
    # would the first ratio)
    exact_lp = isinstance(m.session.autocast, contextlib.nullcontext) and policy.output.weight.dtype == torch.float32
    comps = draw_answers(policy, m.tokenizer, [p.dialog for p in prompts], cfg.sampling, seed=seed, purpose="ppo",
                           show=False, prompts_out=prompt_ids, logprobs=exact_lp)
    answers = [c[0].tokens or [m.tokenizer.eos_id] for c in comps]  # an empty answer still ends with EOS
    texts = [c[0].text.strip() for c in comps]
    safety = torch.tensor([p.safety for p in prompts])
    score = score_answers(m.rms, reward_fn, [p.dialog for p in prompts], texts, safety, cfg.safety_threshold,
                          [c[0].tokens for c in comps])
    padded = pad_sequences([p + a for p, a in zip(prompt_ids, answers)])
    L = padded.tokens.shape[1]
    mask = torch.zeros(len(answers), L - 1)
    # an answer without the sampler's log-probs (an empty one, given EOS) leaves them all to _advantages
    have_lp = exact_lp and all(c[0].tokens and c[0].logprobs is not None for c in comps)
    old_lp = torch.zeros(len(answers), L - 1) if have_lp else None
    for i, (p, a) in enumerate(zip(prompt_ids, answers)):  # position t holds log p(token t+1)
        mask[i, len(p) - 1 : len(p) - 1 + len(a)] = 1.0
        if old_lp is not None:
            old_lp[i, len(p) - 1 : len(p) - 1 + len(a)] = torch.tensor(comps[i][0].logprobs)
    dev = m.session.d.device
    return Rollouts(padded.tokens.to(dev), mask.to(dev), score, None if old_lp is None else old_lp.to(dev), safety)


def _logprobs(model, tokens, mask, autocast, entropy: bool = False):
    """Log-probabilities (B, L-1) of each next token at the answer positions (``mask`` (B, L-1); 0 elsewhere), and
    (for monitoring, when asked) their mean entropy. The LM head runs at those positions only (the prompt's
    logits are never read)."""
    answer = mask.bool()
    select = torch.zeros(tokens.shape, dtype=torch.bool, device=tokens.device)
    select[:, :-1] = answer
    with autocast:
        logits = model(tokens, select=select)  # (N, V): the answer positions, row-major
    lp_answer = token_logprobs(logits, tokens[:, 1:][answer])  # (N,)
    lp = torch.zeros(mask.shape, dtype=lp_answer.dtype, device=lp_answer.device).masked_scatter(answer, lp_answer)
    return lp, (entropy_from_logits(logits.detach(), torch.ones(logits.shape[0], device=logits.device))
                if entropy else None)


def row_lengths(mask: torch.Tensor) -> torch.Tensor:
    """(B,) each rollout's length in tokens (prompt + answer) from its target mask (B, L - 1), on the CPU."""
    pos = torch.arange(1, mask.shape[1] + 1, device=mask.device)
    return (mask * pos).amax(1).long().cpu() + 1


def _by_length(ro: Rollouts, chunk: int, fn) -> torch.Tensor:
    """fn (tokens (b, n), mask (b, n - 1) -> (b, n - 1)) over the rollouts in chunks of rows of similar length, each
    chunk cut to its longest row, put back in order and zero past each chunk's cut: what fn(ro.tokens, ro.mask)
    gives on the mask, for the compute of the rows' own lengths (the models are causal, so logits before a cut do
    not change)."""
    lengths = row_lengths(ro.mask)
    out = torch.zeros(ro.mask.shape, device=ro.tokens.device)
    for idx in torch.argsort(lengths, stable=True).split(chunk):
        n = int(lengths[idx].max())
        out[idx, : n - 1] = fn(ro.tokens[idx, :n], ro.mask[idx, : n - 1]).to(out.device, torch.float32)
    return out


def _values(model, tokens, autocast):
    with autocast:
        return model(tokens)[:, :-1].float()  # (B, L-1): the value of the state before each target token


def _batch_scale(score: torch.Tensor, d: Dist) -> tuple[float, float]:
    """WHITEN's (mean, std) over the whole rollout batch, not a rank's share."""
    if d.world == 1:
        return score_scale(score)
    parts = [torch.empty_like(score.to(d.device)) for _ in range(d.world)]
    dist.all_gather(parts, score.to(d.device))
    return score_scale(torch.cat(parts))


@torch.no_grad()
def _advantages(cfg: PPOConfig, m: Models, ro: Rollouts) -> dict:
    """Old log-probs, reference log-probs, old values, then eq. 4's per-token rewards with R~_c = WHITEN(LOGIT(R_c)),
    GAE advantages (whitened) and returns, with the value model on the scores' scale (whitened_advantages)."""
    ac, chunk = m.session.autocast, max(cfg.micro_batch, 1)
    old_lp = (ro.old_lp if ro.old_lp is not None
              else _by_length(ro, chunk, lambda t, mk: _logprobs(m.session.model, t, mk, ac)[0]))
    ref_lp = _by_length(ro, chunk, lambda t, mk: _logprobs(m.reference, t.to(m.frozen_device), mk.to(m.frozen_device), ac)[0])
    values = _by_length(ro, chunk, lambda t, mk: _values(m.value, t, ac))
    scale = _batch_scale(ro.score, m.session.d)
    w = whitened_advantages(ro.score.to(ro.tokens.device), values, old_lp, ref_lp, ro.mask,
                            cfg.kl_beta, cfg.gamma, cfg.lam, scale)
    adv = masked_whiten(w["advantages"], ro.mask)
    kl = kl_penalty(old_lp, ref_lp, ro.mask).sum(1).mean()  # per answer
    per_answer = masked_mean(w["advantages"], ro.mask, dim=1)  # what the policy gradient pushes each answer by
    score = ro.score.to(adv.device)
    kinds = {"adv_reward_corr": torch.ones_like(score, dtype=torch.bool)}
    if ro.safety is not None:  # by prompt kind: on safety prompts the value model (a helpfulness RM at the start)
        safety = ro.safety.to(adv.device).bool()  # meets the safety model's scale
        kinds.update(adv_reward_corr_safety=safety, adv_reward_corr_other=~safety)
    corr = {name: _corr(per_answer[sel], score[sel]) for name, sel in kinds.items()}
    return {"old_lp": old_lp, "old_v": w["values"], "adv": adv, "returns": w["returns"], "scale": scale, "kl": float(kl),
            "explained_variance": explained_variance(w["values"], w["returns"], ro.mask), **corr}


def _corr(x: torch.Tensor, y: torch.Tensor) -> float:
    """Pearson's correlation; nan with fewer than three points or no spread."""
    if len(x) < 3 or float(x.std()) == 0 or float(y.std()) == 0:
        return float("nan")
    return float(torch.corrcoef(torch.stack([x, y]))[0, 1])


def _update(cfg: PPOConfig, m: Models, ro: Rollouts, a: dict, seed: int) -> dict:
    """One pass over the rollouts in minibatches, one optimizer step of each model per minibatch."""
    s, d = m.session, m.session.d
    per_rank = ro.tokens.shape[0]
    mb_rank = cfg.minibatch // d.world
    order = torch.randperm(per_rank, generator=generator(seed, "ppo/order"))
    # each row's length (prompt + answer): a micro-batch is cut to its longest row, and a minibatch's rows are grouped
    # by length, so padding costs no compute (the models are causal: the logits before the cut are unchanged)
    lengths = row_lengths(ro.mask)
    stats = {"policy_loss": 0.0, "value_loss": 0.0, "clip_fraction": 0.0, "entropy": 0.0}
    n_mb = per_rank // mb_rank
    for mb in range(n_mb):
        idx_mb = order[mb * mb_rank : (mb + 1) * mb_rank]
        idx_mb = idx_mb[torch.argsort(lengths[idx_mb], stable=True)]
        micros = [idx_mb[j : j + cfg.micro_batch] for j in range(0, mb_rank, cfg.micro_batch)]

        def cut(idx):
            n = int(lengths[idx].max())
            return ro.tokens[idx, :n], slice(0, n - 1)

        def policy_loss(idx):
            tokens, t = cut(idx)
            lp, ent = _logprobs(s.model, tokens, ro.mask[idx, t], s.autocast, entropy=True)
            pl, st = ppo_policy_loss(lp, a["old_lp"][idx, t], a["adv"][idx, t], ro.mask[idx, t], cfg.clip)
            return pl * len(idx), {"clip_fraction": float(st["clip_fraction"]) * len(idx), "entropy": float(ent) * len(idx)}

        def value_loss_fn(idx):  # the value model predicts raw scores; its loss is on the whitened scale
            tokens, t = cut(idx)
            v = to_whitened(_values(m.value, tokens, s.autocast), a["scale"])
            return value_loss(v, a["old_v"][idx, t], a["returns"][idx, t], ro.mask[idx, t], cfg.clip) * len(idx), {}

        rp = accumulate(s, micros, policy_loss, cfg.minibatch)
        rv = accumulate(s, micros, value_loss_fn, cfg.minibatch, model=m.value, optimizer=m.value_opt)
        for k, v in (("policy_loss", rp["loss"]), ("value_loss", rv["loss"]), ("clip_fraction", rp["clip_fraction"]),
                     ("entropy", rp["entropy"])):
            stats[k] += v / n_mb
    return stats


def _checked_prompts(cfg: PPOConfig, d: Dist, reward_fn: RewardFn | None) -> tuple[list, list]:
    """The settings checked before any work, and the (training, held-out) prompts: ``val_prompts`` when given,
    else a ``val_fraction`` of ``prompts``."""
    if not cfg.prompts or not cfg.init_from:
        raise ValueError("give prompts=PROMPTS.jsonl and init_from=CHECKPOINT")
    if reward_fn is None and not (cfg.reward_helpfulness or cfg.reward_safety):
        raise ValueError("give reward_helpfulness=RM (and optionally reward_safety=RM)")
    if cfg.run.resume:  # PPO keeps its best policy (and value model) in OUT, not step checkpoints to resume from
        raise ValueError("ppo does not resume: OUT holds the best policy so far, not a training state; start again "
                         "with overwrite=true (or init_from=OUT to continue from that policy, in another out=)")
    if cfg.rollout_batch % cfg.minibatch or cfg.minibatch % (cfg.micro_batch * d.world):
        raise ValueError(f"rollout_batch {cfg.rollout_batch} must be a multiple of minibatch {cfg.minibatch}, itself a "
                         f"multiple of micro_batch * ranks = {cfg.micro_batch} * {d.world}")
    prompts = list(read_prompts(split_paths(cfg.prompts)))
    if cfg.val_prompts:
        train_prompts, val_prompts = prompts, list(read_prompts(split_paths(cfg.val_prompts)))
    else:
        train_prompts, val_prompts = split_holdout(prompts, cfg.val_fraction, cfg.run.seed) if cfg.val_fraction > 0 else (prompts, [])
    if not train_prompts:
        raise ValueError(f"{cfg.prompts}: no prompts to train on")
    if 0 < len(val_prompts) < d.world:
        raise ValueError(f"{len(val_prompts)} held-out prompts for {d.world} ranks: give each rank at least one "
                         "(more val_prompts, a larger val_fraction, or val_fraction=0)")
    return train_prompts, val_prompts


def ppo(cfg: PPOConfig, reward_fn: RewardFn | None = None) -> dict:
    """Train; ``reward_fn`` replaces the reward models (tests, exact toy judges)."""
    d = init_distributed("ddp" if cfg.run.strategy == "fsdp" else cfg.run.strategy, cfg.run.device)
    train_prompts, val_prompts = _checked_prompts(cfg, d, reward_fn)
    m = _models(cfg, d, reward_fn)
    s, out = m.session, m.session.out
    per_rank = cfg.rollout_batch // d.world

    def heldout_reward() -> float:
        """Mean R_c of one sampled answer per held-out prompt (each rank its share)."""
        if not val_prompts:
            return float("nan")
        mine = val_prompts[d.rank :: d.world]
        r_c = _rollouts(cfg, m, mine, derive_seed(cfg.run.seed, "ppo/heldout"), reward_fn).r_c
        total = torch.tensor([float(r_c.sum()), len(r_c)], dtype=torch.float64)
        if d.world > 1:
            total = total.to(d.device)
            dist.all_reduce(total)
        return float(total[0] / total[1])

    def save_best(it: int, score: float) -> None:
        if d.main:  # written aside, then copied file by file over OUT's model (OUT always holds a whole model)
            save(unwrap(s.model), out / "best.tmp", format="native", tokenizer=m.tokenizer, overwrite=True)
            publish(out / "best.tmp", out)
            shutil.rmtree(out / "best.tmp")
            save(unwrap(m.value), out / "value", format="native", tokenizer=m.tokenizer, overwrite=True)
            (out / "best.json").write_text(json.dumps({"iteration": it, "heldout_reward": score}))
        d.barrier()

    track = {"best": heldout_reward(), "since": 0}
    save_best(0, track["best"])
    d.say(f"ppo: {len(train_prompts)} prompts ({len(val_prompts)} held out); held-out reward at start {track['best']:.4f}")
    rng = random.Random(cfg.run.seed)

    def step_fn(step: int) -> dict:
        it = step + 1
        for g in s.optimizer.param_groups:  # the policy's rate: constant by default (the paper's), or optim.schedule
            g["lr"] = learning_rate(s.optim, step, cfg.iterations)
        batch = [train_prompts[rng.randrange(len(train_prompts))] for _ in range(cfg.rollout_batch)]
        ro = _rollouts(cfg, m, batch[d.rank * per_rank : (d.rank + 1) * per_rank],
                       derive_seed(cfg.run.seed, "ppo/rollouts", it, d.rank), reward_fn)
        a = _advantages(cfg, m, ro)
        stats = _update(cfg, m, ro, a, derive_seed(cfg.run.seed, "ppo/minibatches", it))
        return {"iteration": it, "reward": d.all_mean(float(ro.r_c.mean())), "score": d.all_mean(float(ro.score.mean())),
                "score_std": a["scale"][1], "kl": d.all_mean(a["kl"]),
                "answer_tokens": d.all_mean(float(ro.mask.sum(1).mean())),
                "explained_variance": d.all_mean(a["explained_variance"]),
                **{k: d.all_mean(a[k]) for k in a if k.startswith("adv_reward_corr")}, **stats}  # stats: over all ranks

    def evaluate(done: int) -> dict:
        score = heldout_reward()
        if score > track["best"]:
            track["best"], track["since"] = score, 0
            save_best(done, score)
        else:
            track["since"] += 1
        return {"heldout_reward": score}

    def should_stop(rec: dict) -> bool:
        if cfg.patience and track["since"] >= cfg.patience:
            d.say(f"ppo: early stop at iteration {rec['step']}: no better held-out reward in {cfg.patience} "
                  f"evaluations (best {track['best']:.4f})")
            return True
        return False

    result = run_steps(s, cfg.iterations, step_fn, desc="ppo", evaluate=evaluate, eval_on_stop=True,
                       should_stop=should_stop, postfix=("reward", "kl"))
    return {**result, "out": str(out), "best_heldout_reward": track["best"]}
