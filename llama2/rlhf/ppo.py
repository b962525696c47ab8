"""PPO and rejection-sampling arithmetic: the combined safety/helpfulness reward, whitening, the KL penalty, GAE,
the clipped losses, and best-of-K bookkeeping.

Paper §3.2.3 ("Reinforcement Learning with Human Feedback (RLHF)"). Two algorithms are used:

* Rejection sampling: K outputs are sampled per prompt and the one with the highest reward is kept for the
  next round of fine-tuning (:func:`best_of`). Later iterations draw on "top-performing samples from all prior
  iterations" (:func:`keep_best_across_iterations`). Figure 7 plots the max reward among N samples against N
  (:func:`expected_max_reward`).

* PPO, optimising  arg max_pi E_{p~D, g~pi}[R(g | p)]  (eq. 3) with the reward

      R(g | p) = R~_c(g | p) - beta * D_KL(pi_theta(g | p) || pi_0(g | p))          (eq. 4)

  where R~_c = WHITEN(LOGIT(R_c)) and R_c is the piecewise combination of the two reward models

      R_c(g | p) = R_s(g | p)   if IS_SAFETY(p) or R_s(g | p) < 0.15
                   R_h(g | p)   otherwise

  ("we also find it important to whiten the final linear scores (shown here by reversing the sigmoid with the
  logit function) in order to increase stability"). beta is 0.01 for 7B/13B and 0.005 for 34B/70B
  (:data:`PAPER_KL_BETA`); the clip threshold is 0.2 ("Training Details").

Everything here is a pure function of tensors. Shapes: B rollouts (prompt + response each), T token positions,
V vocabulary. ``mask`` (B, T) is 1 on the *response* tokens whose log-probabilities, values and rewards count
(prompt tokens and padding are 0); bool or float masks are both accepted. Per-token quantities (log-probs,
values) at position t belong to the token at t, i.e. the caller has already shifted the model's logits by one
(:func:`token_logprobs`).
"""
from __future__ import annotations

import math
from collections.abc import Hashable, Mapping, Sequence
from typing import Any, Literal

import torch

__all__ = [
    "PAPER_KL_BETA",
    "SAFETY_THRESHOLD",
    "to_unit",
    "logit",
    "combined_reward",
    "whiten",
    "masked_mean",
    "masked_whiten",
    "ppo_score",
    "kl_penalty",
    "token_rewards",
    "gae",
    "ppo_policy_loss",
    "value_loss",
    "token_logprobs",
    "entropy_from_logits",
    "best_of",
    "keep_best_across_iterations",
    "expected_max_reward",
]

# The KL penalty beta of §3.2.3's Training Details: 0.01 for the 7B and 13B models, 0.005 for 34B and 70B.
PAPER_KL_BETA: dict[str, float] = {"7b": 0.01, "13b": 0.01, "34b": 0.005, "70b": 0.005}

# The R_s threshold of the piecewise R_c: below it a response is treated as unsafe whatever the prompt.
SAFETY_THRESHOLD = 0.15

KLKind = Literal["k1", "k3"]


# --------------------------------------------------------------------------------------------------------------
# The reward of eq. 4


def to_unit(scores: torch.Tensor) -> torch.Tensor:
    """Map reward-model scores to (0, 1) with a sigmoid.

    Our reward models output unbounded logits: they are trained with -log sigmoid(r_c - r_r - m)
    (:func:`llama2.rlhf.reward.ranking_loss`), so only score differences are pinned down, and sigmoid(r) is the
    model's probability that the response beats a zero-score one. The paper's 0.15 threshold on R_s only has a
    meaning on that (0, 1) scale, which is why R_c is defined there and R~_c of eq. 4 reverses the sigmoid with
    a logit afterwards.
    """
    return torch.sigmoid(scores.float())


def logit(p: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """log(p / (1 - p)), the inverse of the sigmoid: eq. 4's LOGIT, "reversing the sigmoid".

    p is clamped to [eps, 1 - eps] first, so a score that saturated to exactly 0 or 1 in fp32 (|logit| above
    about 17) gives a finite |logit| <= log((1 - eps) / eps) (13.8 for the default) instead of inf.
    """
    p = p.float().clamp(eps, 1.0 - eps)
    return torch.log(p) - torch.log1p(-p)


def combined_reward(
    r_safety: torch.Tensor,
    r_helpfulness: torch.Tensor,
    is_safety_prompt: torch.Tensor,
    threshold: float = SAFETY_THRESHOLD,
) -> torch.Tensor:
    """The piecewise R_c of §3.2.3 (under eq. 4): R_s if the prompt is tagged safety or R_s < threshold, else R_h.

    r_safety, r_helpfulness: (B,) scores already in (0, 1) (see :func:`to_unit`); is_safety_prompt: (B,) bool,
    the prompt's tag from the data (prompts that might elicit unsafe responses). Returns (B,).
    The safety model thus overrides helpfulness both on every safety prompt and on any response it judges
    unsafe (R_s < 0.15, chosen in the paper for a precision of 0.89 and recall of 0.55 on the Meta Safety test
    set).
    """
    if r_safety.shape != r_helpfulness.shape or r_safety.shape != is_safety_prompt.shape:
        raise ValueError(f"r_safety {tuple(r_safety.shape)}, r_helpfulness {tuple(r_helpfulness.shape)} and "
                         f"is_safety_prompt {tuple(is_safety_prompt.shape)} must have one shape")
    use_safety = is_safety_prompt.bool() | (r_safety < threshold)  # (B,)
    return torch.where(use_safety, r_safety, r_helpfulness)


def whiten(x: torch.Tensor, shift_mean: bool = True, eps: float = 1e-8) -> torch.Tensor:
    """(x - mean(x)) / sqrt(var(x) + eps) over all elements: eq. 4's WHITEN.

    The paper does not say over what the statistics are taken; we take them over the tensor given, i.e. the
    scores of one rollout batch (512 rollouts an iteration in the paper), as PPO implementations do. The
    variance is the population one (divide by n), so the result has mean 0 and standard deviation exactly 1
    (up to eps). With ``shift_mean=False`` the mean is added back: only the scale is normalised. A tensor
    of one element, or of equal elements, has zero variance and whitens to 0 (its mean when not shifting).
    """
    x = x.float()
    mean = x.mean()
    var = (x - mean).pow(2).mean()
    out = (x - mean) * torch.rsqrt(var + eps)
    return out if shift_mean else out + mean


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean of x over the positions where mask is 1 (over ``dim``, or over everything when dim is None).

    An all-zero mask gives 0 rather than nan (the sum of nothing over a count clamped to 1).
    """
    mask = mask.to(x.dtype)
    if dim is None:
        return (x * mask).sum() / mask.sum().clamp_min(1.0)
    return (x * mask).sum(dim) / mask.sum(dim).clamp_min(1.0)


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, eps: float = 1e-8) -> torch.Tensor:
    """:func:`whiten` with mean and (population) variance taken over the masked positions only.

    Used on the advantages, whose padding must not enter the statistics. Masked-out positions come back 0.
    """
    x = x.float()
    m = mask.to(x.dtype)
    mean = masked_mean(x, m)
    var = masked_mean((x - mean).pow(2), m)
    out = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return out * m


def ppo_score(
    safety_scores: torch.Tensor,
    helpfulness_scores: torch.Tensor,
    is_safety_prompt: torch.Tensor,
    threshold: float = SAFETY_THRESHOLD,
    whiten_scores: bool = True,
) -> torch.Tensor:
    """R~_c = WHITEN(LOGIT(R_c)) of eq. 4, from the two reward models' raw (logit) scores, each (B,). Returns (B,).

    Written literally: sigmoid to (0, 1), combine with the 0.15 rule, logit back, whiten over the batch. The
    sigmoid/logit round trip is the identity on the chosen raw score except that :func:`logit` clamps it to
    about +-13.8. ``whiten_scores=False`` skips the whitening (an ablation; the paper found it stabilising).
    """
    r_c = combined_reward(to_unit(safety_scores), to_unit(helpfulness_scores), is_safety_prompt, threshold)  # (B,)
    score = logit(r_c)  # (B,)
    return whiten(score) if whiten_scores else score


def kl_penalty(
    logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor,
    mask: torch.Tensor,
    kind: KLKind = "k1",
) -> torch.Tensor:
    """Per-token estimate of D_KL(pi_theta || pi_0) from the sampled tokens, (B, T), zero where mask is 0.

    The response tokens are sampled from pi_theta, so with log r = log pi_0(x) - log pi_theta(x) (Schulman,
    "Approximating KL Divergence", 2020):

    * ``"k1"``: -log r = log pi_theta - log pi_0. Unbiased, can be negative per token; its sum over a
      response is exactly the log-likelihood ratio of the sequence, the usual InstructGPT penalty and our
      default.
    * ``"k3"``: (r - 1) - log r. Unbiased, never negative, lower variance when the policies are close.
    """
    if logprobs.shape != ref_logprobs.shape or logprobs.shape != mask.shape:
        raise ValueError(f"logprobs {tuple(logprobs.shape)}, ref_logprobs {tuple(ref_logprobs.shape)} and mask "
                         f"{tuple(mask.shape)} must have one shape")
    log_ratio = ref_logprobs.float() - logprobs.float()  # (B, T) log r
    if kind == "k1":
        kl = -log_ratio
    elif kind == "k3":
        kl = torch.expm1(log_ratio) - log_ratio
    else:
        raise ValueError(f"kind must be 'k1' or 'k3', got {kind!r}")
    return kl * mask.to(kl.dtype)


def _last_index(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Index of the last 1 in each row of a (B, T) mask, and whether the row has any. Both (B,)."""
    m = mask.bool()
    positions = torch.arange(m.shape[1], device=m.device).expand_as(m)  # (B, T)
    last = torch.where(m, positions, torch.zeros_like(positions)).amax(dim=1)  # (B,)
    return last, m.any(dim=1)


def token_rewards(
    score: torch.Tensor,
    logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor,
    mask: torch.Tensor,
    beta: float,
    kl_kind: KLKind = "k1",
) -> torch.Tensor:
    """Eq. 4 spread over tokens: -beta * KL at every response token, plus the sequence score at the last one.

    score: (B,) R~_c per rollout (see :func:`ppo_score`); logprobs, ref_logprobs: (B, T) log-probabilities of
    the sampled tokens under pi_theta (at sampling time) and the frozen pi_0; mask: (B, T) response tokens, may
    be preceded by the prompt and followed by padding. Returns (B, T), zero off the mask.

    The paper gives R only per sequence; putting the KL term on each token and the score on the final token is
    the standard layout of Ziegler et al. (2019) and InstructGPT, and with k1 the rewards of a response sum to
    exactly eq. 4. A row without response tokens gets all zeros (its score has nowhere to go).
    """
    if score.shape != logprobs.shape[:1]:
        raise ValueError(f"score {tuple(score.shape)} must be (B,) for logprobs {tuple(logprobs.shape)}")
    rewards = -beta * kl_penalty(logprobs, ref_logprobs, mask, kl_kind)  # (B, T)
    last, has_any = _last_index(mask)  # (B,), (B,)
    at_end = torch.where(has_any, score.float(), torch.zeros_like(score, dtype=rewards.dtype))  # (B,)
    return rewards.scatter_add(1, last[:, None], at_end[:, None])


# --------------------------------------------------------------------------------------------------------------
# Advantages and the PPO losses


def gae(
    rewards: torch.Tensor,
    values: torch.Tensor,
    mask: torch.Tensor,
    gamma: float = 1.0,
    lam: float = 0.95,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation (Schulman et al., 2016) over the response tokens. Returns (advantages,
    returns), both (B, T) and zero off the mask.

    rewards, values: (B, T) per token (see :func:`token_rewards`; values from the value head at each response
    token). With V' the value of the next *response* token (0 after the last one: the episode ends there),

        delta_t = r_t + gamma * V' - V_t,      A_t = delta_t + gamma * lam * A'      returns_t = A_t + V_t

    Positions where mask is 0 (prompt, padding, or any gap) are skipped, not treated as steps. The paper gives
    no gamma or lambda; we default to gamma = 1 (the episode is one short response and its score arrives only
    at the end, so discounting would just shrink it for early tokens) and lam = 0.95, the common choice in RLHF
    code (InstructGPT-style setups, TRL), trading a little bias for lower variance.

    The loop runs over T (a backward recurrence) with (B,)-sized tensor ops at each step.
    """
    if rewards.shape != values.shape or rewards.shape != mask.shape:
        raise ValueError(f"rewards {tuple(rewards.shape)}, values {tuple(values.shape)} and mask "
                         f"{tuple(mask.shape)} must have one shape")
    rewards, values = rewards.float(), values.float().detach()
    m = mask.bool()
    B, T = rewards.shape
    advantages = torch.zeros_like(rewards)  # (B, T)
    next_value = torch.zeros(B, dtype=rewards.dtype, device=rewards.device)  # (B,) V' (0 past the end)
    next_adv = torch.zeros_like(next_value)  # (B,) A'
    for t in reversed(range(T)):
        delta = rewards[:, t] + gamma * next_value - values[:, t]  # (B,)
        adv = delta + gamma * lam * next_adv  # (B,)
        on = m[:, t]
        advantages[:, t] = torch.where(on, adv, torch.zeros_like(adv))
        next_value = torch.where(on, values[:, t], next_value)
        next_adv = torch.where(on, adv, next_adv)
    returns = (advantages + values) * m.to(values.dtype)  # (B, T)
    return advantages, returns


def ppo_policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip: float = 0.2,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The clipped surrogate of PPO (Schulman et al., 2017), negated to a loss, mean over the masked tokens.

    logprobs: (B, T) under the policy being trained (with grad); old_logprobs, advantages: (B, T) from the
    rollout (no grad). With ratio = exp(logprobs - old_logprobs):

        loss = mean_masked max(-A * ratio, -A * clip(ratio, 1 - clip, 1 + clip))

    clip 0.2 is the paper's ("Training Details"). Once the ratio has left [1 - clip, 1 + clip] in the direction
    the advantage pushes it, the clipped term is the larger one and the token gives no gradient.

    Stats (detached scalars): ``clip_fraction``, the share of masked tokens where the clipped term is strictly
    the larger (so the token is cut off); ``approx_kl``, the k3 estimate of KL(pi_old || pi_theta), mean over
    the masked tokens, a check that one update did not move the policy far.
    """
    if not (logprobs.shape == old_logprobs.shape == advantages.shape == mask.shape):
        raise ValueError(f"logprobs {tuple(logprobs.shape)}, old_logprobs {tuple(old_logprobs.shape)}, advantages "
                         f"{tuple(advantages.shape)} and mask {tuple(mask.shape)} must have one shape")
    old_logprobs, advantages = old_logprobs.detach().float(), advantages.detach().float()
    log_ratio = logprobs.float() - old_logprobs  # (B, T)
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio  # (B, T)
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip, 1.0 + clip)  # (B, T)
    loss = masked_mean(torch.maximum(unclipped, clipped), mask)
    with torch.no_grad():
        stats = {
            "clip_fraction": masked_mean((clipped > unclipped).float(), mask),
            "approx_kl": masked_mean(torch.expm1(log_ratio) - log_ratio, mask),
        }
    return loss, stats


def value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    clip: float = 0.2,
) -> torch.Tensor:
    """Clipped value loss: 0.5 * mean_masked max((V - R)^2, (V_clipped - R)^2), V_clipped = V_old + clip(V - V_old,
    -clip, clip).

    values: (B, T) from the value head being trained (with grad); old_values, returns: (B, T) from the rollout
    (see :func:`gae`). The paper names one clip threshold, 0.2, for PPO; it says nothing of the value function,
    so we clip it with the same 0.2 as PPO implementations do (OpenAI baselines, TRL): the value head cannot
    move further than that from its rollout estimate in one update.
    """
    if not (values.shape == old_values.shape == returns.shape == mask.shape):
        raise ValueError(f"values {tuple(values.shape)}, old_values {tuple(old_values.shape)}, returns "
                         f"{tuple(returns.shape)} and mask {tuple(mask.shape)} must have one shape")
    values = values.float()
    old_values, returns = old_values.detach().float(), returns.detach().float()
    clipped = old_values + torch.clamp(values - old_values, -clip, clip)  # (B, T)
    loss = torch.maximum((values - returns).pow(2), (clipped - returns).pow(2))  # (B, T)
    return 0.5 * masked_mean(loss, mask)


def token_logprobs(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log p(targets) under logits: (B, T, V) logits and (B, T) token ids -> (B, T), in fp32.

    The caller aligns them: logits at position t predict the token at t + 1, so pass ``logits[:, :-1]`` and
    ``tokens[:, 1:]``.
    """
    return torch.log_softmax(logits.float(), dim=-1).gather(-1, targets[..., None]).squeeze(-1)


def entropy_from_logits(logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean entropy -sum_v p_v log p_v of the next-token distributions over the masked positions, in fp32.

    logits: (B, T, V); mask: (B, T). A scalar, for monitoring: a collapsing entropy warns that the policy is
    over-optimising the reward model.
    """
    logp = torch.log_softmax(logits.float(), dim=-1)  # (B, T, V)
    entropy = -(logp.exp() * logp).sum(-1)  # (B, T)
    return masked_mean(entropy, mask)


# --------------------------------------------------------------------------------------------------------------
# Rejection sampling


def best_of(scores: torch.Tensor) -> torch.Tensor:
    """Index of the highest-reward sample per prompt: (N_prompts, K) scores -> (N_prompts,) indices.

    Rejection sampling keeps, for each prompt, the one of its K samples that the reward model scores highest.
    On ties the first sample wins (torch.argmax's rule).
    """
    if scores.dim() != 2:
        raise ValueError(f"scores must be (N_prompts, K), got {tuple(scores.shape)}")
    return scores.argmax(dim=1)


def keep_best_across_iterations(
    previous: Mapping[Hashable, tuple[float, Any]],
    new: Mapping[Hashable, Sequence[tuple[float, Any]]],
) -> dict[Hashable, tuple[float, Any]]:
    """The best (score, sample) per prompt over all rejection-sampling iterations so far.

    The paper's fix for the regressions of training each iteration only on the previous one's samples: "we
    modified our strategy, incorporating top-performing samples from all prior iterations, such as those used
    in RLHF-V1 and RLHF-V2" (§3.2.3). ``previous`` maps a prompt id to the best (score, sample) kept so far;
    ``new`` maps a prompt id to this iteration's scored samples. Returns a new dict over the union of prompt
    ids; neither input is changed. Ties keep the earlier sample (previous, then the first in ``new``), so a
    re-run does not churn the data.

    Scores must come from one reward model to be comparable across iterations: if the reward model changed
    between iterations, re-score ``previous`` with the new one before calling.
    """
    best: dict[Hashable, tuple[float, Any]] = {k: (float(s), x) for k, (s, x) in previous.items()}
    for prompt_id, candidates in new.items():
        for score, sample in candidates:
            s = float(score)
            if prompt_id not in best or s > float(best[prompt_id][0]):
                best[prompt_id] = (s, sample)
    return best


def expected_max_reward(scores: torch.Tensor) -> torch.Tensor:
    """Figure 7's "max reward among N samples" curve: (N_prompts, K) scores -> (K,), entry k-1 for N = k.

    For each prompt, the expected maximum over k samples drawn without replacement from its K samples, averaged
    over prompts. Rather than use the first k samples only (noisy), this is the unbiased estimate over all
    C(K, k) subsets, from the order statistics: with the scores sorted s_(1) <= ... <= s_(K), s_(i) is the max
    of exactly C(i - 1, k - 1) of the subsets of size k, so

        E[max of k] = sum_{i=k}^{K} C(i - 1, k - 1) / C(K, k) * s_(i).

    The weights are exact Python integer ratios rounded once to float64, so large K is fine.
    """
    if scores.dim() != 2 or scores.shape[1] == 0:
        raise ValueError(f"scores must be (N_prompts, K) with K >= 1, got {tuple(scores.shape)}")
    K = scores.shape[1]
    s = scores.double().sort(dim=1).values  # (N, K) ascending: s_(1) .. s_(K)
    weights = torch.tensor(
        [[math.comb(i - 1, k - 1) / math.comb(K, k) for i in range(1, K + 1)] for k in range(1, K + 1)],
        dtype=torch.float64, device=scores.device,
    )  # (K, K): row k-1 holds the weight of s_(i) in E[max of k]; zero for i < k
    return (s @ weights.T).mean(dim=0).to(scores.dtype if scores.is_floating_point() else torch.float32)  # (K,)
