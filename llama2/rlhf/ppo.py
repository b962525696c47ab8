"""PPO arithmetic (Llama 2 §3.2.3, "RLHF": PPO): the per-token KL penalty, GAE, the clipped policy and value
losses, and the log-probabilities and entropy they are computed from.

PPO optimises  arg max_pi E_{p~D, g~pi}[R(g | p)]  (eq. 3) with the reward of eq. 4 (:mod:`llama2.rlhf.combined`)

    R(g | p) = R~_c(g | p) - beta * D_KL(pi_theta(g | p) || pi_0(g | p))

beta is 0.01 for 7B/13B and 0.005 for 34B/70B (``PPOConfig.kl_beta``); the clip threshold is 0.2 ("Training
Details").

Everything here is a pure function of tensors. Shapes: B rollouts (prompt + response each), T token positions,
V vocabulary. ``mask`` (B, T) is 1 on the *response* tokens whose log-probabilities, values and rewards count
(prompt tokens and padding are 0); bool or float masks are both accepted. Per-token quantities (log-probs,
values) at position t belong to the token at t, i.e. the caller has already shifted the model's logits by one
(:func:`token_logprobs`).
"""
from __future__ import annotations

from typing import Literal

import torch

from .combined import masked_mean

__all__ = [
    "kl_penalty", "token_rewards", "gae", "score_scale", "to_whitened", "whitened_advantages",
    "ppo_policy_loss", "value_loss", "token_logprobs", "entropy_from_logits", "explained_variance",
]

KLKind = Literal["k1", "k3"]


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

    score: (B,) R~_c per rollout (see :mod:`llama2.rlhf.combined`); logprobs, ref_logprobs: (B, T) log-probabilities of
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


def score_scale(scores: torch.Tensor, eps: float = 1e-8) -> tuple[float, float]:
    """(mean, std) of a rollout batch's raw scores: the statistics WHITEN uses (population std, plus eps)."""
    s = scores.float()
    return float(s.mean()), float(s.std(unbiased=False)) + eps


def to_whitened(x: torch.Tensor, scale: tuple[float, float]) -> torch.Tensor:
    """Raw-score units -> whitened units with the batch's (mean, std): (x - mean) / std."""
    return (x.float() - scale[0]) / scale[1]


def whitened_advantages(
    scores: torch.Tensor,
    values: torch.Tensor,
    logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor,
    mask: torch.Tensor,
    beta: float,
    gamma: float = 1.0,
    lam: float = 0.95,
    scale: tuple[float, float] | None = None,
) -> dict[str, torch.Tensor]:
    """GAE advantages and returns for eq. 4 with R~_c = WHITEN(score), the value model kept on the same scale.

    scores: (B,) raw scores (LOGIT(R_c): a reward model's output as it is); values: (B, T) the value model's
    predictions, in raw-score units (a value model initialised from a reward model predicts raw scores);
    ``scale``: the batch's (mean, std) (:func:`score_scale`; over all ranks under DDP).

    The whitened score and the values must be on one scale, or the advantage is mostly the scale mismatch: with
    V ~ raw score r and whitened returns, A ~ (1/std - 1) * r + const, so the reward's signal cancels at std = 1
    and is inverted above it. Here the values are mapped to whitened units with the very statistics that whiten
    the score, V_w = (V - mean) / std, so the value model keeps predicting raw scores (and is trained on returns
    mapped back the same way, see the PPO stage) while GAE sees one scale. Returns {"advantages", "returns"
    (whitened units), "values" (V_w), "scores" (the whitened scores)}.
    """
    scale = scale or score_scale(scores)
    white = to_whitened(scores, scale)  # (B,)
    v = to_whitened(values, scale) * mask.to(torch.float32)  # (B, T)
    rewards = token_rewards(white, logprobs, ref_logprobs, mask, beta)  # (B, T)
    adv, returns = gae(rewards, v, mask, gamma, lam)
    return {"advantages": adv, "returns": returns, "values": v, "scores": white}


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


def explained_variance(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor) -> float:
    """1 - Var(returns - values) / Var(returns) over the masked positions: how much of the returns the value
    model predicts (1 perfect, 0 no better than their mean, negative worse). A monitor of the value model."""
    m = mask.to(torch.float32)
    r, v = returns.float(), values.float()
    var_r = masked_mean((r - masked_mean(r, m)).pow(2), m)
    err = r - v
    var_e = masked_mean((err - masked_mean(err, m)).pow(2), m)
    return float(1.0 - var_e / var_r) if float(var_r) > 0 else float("nan")

