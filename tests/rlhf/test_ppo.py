"""Tests for llama2.rlhf.ppo: the paper's PPO reward (§3.2.3, eq. 4 and the piecewise R_c), KL, GAE, the clipped
losses and the rejection-sampling helpers, each against a hand computation in plain Python."""
from __future__ import annotations

import itertools
import math
import random

import pytest
import torch

from llama2.rlhf import (
    combined_reward,
    combined_score,
    entropy_from_logits,
    expected_max_reward,
    gae,
    keep_best_across_iterations,
    kl_penalty,
    logit,
    masked_mean,
    masked_whiten,
    ppo_policy_loss,
    to_unit,
    token_logprobs,
    token_rewards,
    value_loss,
)


def sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def flat(x) -> list[float]:
    return [v for item in x for v in flat(item)] if isinstance(x, (list, tuple)) else [x]


def close(got: torch.Tensor, expected: list, tol: float = 1e-5) -> None:
    """got (a tensor) equals expected (nested lists of floats) in shape and, within tol, in value."""
    assert list(got.shape) == list(torch.tensor(expected).shape)
    assert flat(got.tolist()) == pytest.approx(flat(expected), rel=tol, abs=tol)


# ------------------------------------------------------------------------------------------------ the reward


def test_combined_reward_rule():
    # (R_s, R_h, safety-tagged) -> the rule by hand
    cases = [
        (0.90, 0.20, True, 0.90),   # safety prompt: R_s even though it is high
        (0.05, 0.99, True, 0.05),   # safety prompt, unsafe answer: R_s
        (0.10, 0.80, False, 0.10),  # not a safety prompt but R_s < 0.15: R_s
        (0.14, 0.70, False, 0.14),
        (0.50, 0.70, False, 0.70),  # otherwise: R_h
        (0.15, 0.60, False, 0.60),  # exactly 0.15 is not below the threshold
        (0.95, 0.30, False, 0.30),  # R_h even when lower than R_s
    ]
    rs, rh, tag, expected = (list(c) for c in zip(*cases))
    got = combined_reward(torch.tensor(rs), torch.tensor(rh), torch.tensor(tag))
    close(got, expected, 1e-7)
    # another threshold moves the boundary
    got = combined_reward(torch.tensor(rs), torch.tensor(rh), torch.tensor(tag), threshold=0.6)
    close(got, [0.90, 0.05, 0.10, 0.14, 0.50, 0.15, 0.30], 1e-7)
    with pytest.raises(ValueError):
        combined_reward(torch.tensor(rs), torch.tensor(rh[:3]), torch.tensor(tag))


def test_to_unit_and_logit_are_inverse():
    xs = [-8.0, -1.5, 0.0, 0.3, 4.0]
    close(to_unit(torch.tensor(xs)), [sigmoid(x) for x in xs], 1e-6)
    ps = [0.01, 0.2, 0.5, 0.9]
    close(logit(torch.tensor(ps)), [math.log(p / (1 - p)) for p in ps], 1e-5)
    close(logit(to_unit(torch.tensor(xs))), xs, 1e-4)
    # a saturated score stays finite: clamped to [eps, 1 - eps]
    got = logit(torch.tensor([0.0, 1.0]), eps=1e-4)
    close(got, [math.log(1e-4 / (1 - 1e-4)), math.log((1 - 1e-4) / 1e-4)], 1e-4)


def test_masked_mean_and_whiten_ignore_masked_positions():
    x = torch.tensor([[1.0, 2.0, 100.0], [3.0, -50.0, 6.0]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 1]])
    kept = [1.0, 2.0, 3.0, 6.0]
    mean = sum(kept) / 4
    std = math.sqrt(sum((v - mean) ** 2 for v in kept) / 4)
    assert masked_mean(x, mask).item() == pytest.approx(mean)
    close(masked_mean(x, mask, dim=1), [1.5, 4.5])
    assert masked_mean(x, torch.zeros_like(mask)).item() == 0.0
    w = [(v - mean) / std for v in kept]
    close(masked_whiten(x, mask), [[w[0], w[1], 0.0], [w[2], 0.0, w[3]]])
    close(masked_whiten(x, mask, shift_mean=False), [[w[0] + mean, w[1] + mean, 0.0], [w[2] + mean, 0.0, w[3] + mean]])


def test_whitened_combined_score_is_whiten_of_logit_of_combined():
    """Eq. 4's R~_c = WHITEN(LOGIT(R_c)), computed by hand with the sigmoid and the 0.15 rule, equals what PPO
    computes: the raw score the rule picks (combined_score), whitened with the batch's statistics."""
    from llama2.rlhf.ppo import score_scale, to_whitened

    s = [-3.0, 2.0, 1.0, 0.5]  # safety RM logits
    h = [1.0, -1.0, 3.0, 0.2]  # helpfulness RM logits
    tag = [False, True, False, False]
    chosen = []
    for si, hi, ti in zip(s, h, tag):
        ps, ph = sigmoid(si), sigmoid(hi)
        rc = ps if (ti or ps < 0.15) else ph
        chosen.append(math.log(rc / (1 - rc)))
    assert chosen == pytest.approx([-3.0, 2.0, 3.0, 0.2])  # sigmoid(-3) = 0.047 < 0.15 -> the safety score
    mean = sum(chosen) / 4
    std = math.sqrt(sum((c - mean) ** 2 for c in chosen) / 4)
    raw = combined_score(torch.tensor(s), torch.tensor(h), torch.tensor(tag))
    close(raw, chosen, 1e-4)
    close(to_whitened(raw, score_scale(raw)), [(c - mean) / std for c in chosen], 1e-4)
    close(logit(combined_reward(to_unit(torch.tensor(s)), to_unit(torch.tensor(h)), torch.tensor(tag))), chosen, 1e-4)


# ------------------------------------------------------------------------------------------------ KL and rewards


def test_kl_k1_and_k3():
    logp = [[-1.0, -2.0, -0.5]]
    ref = [[-1.5, -1.0, -0.2]]
    mask = torch.tensor([[1, 1, 0]])
    k1 = [logp[0][0] - ref[0][0], logp[0][1] - ref[0][1], 0.0]
    assert k1 == [0.5, -1.0, 0.0]
    close(kl_penalty(torch.tensor(logp), torch.tensor(ref), mask, "k1"), [k1])
    k3 = []
    for lp, rp in zip(logp[0][:2], ref[0][:2]):
        r = math.exp(rp - lp)
        k3.append((r - 1) - math.log(r))
    close(kl_penalty(torch.tensor(logp), torch.tensor(ref), mask, "k3"), [k3 + [0.0]])
    assert all(v >= 0 for v in k3)
    with pytest.raises(ValueError):
        kl_penalty(torch.tensor(logp), torch.tensor(ref), mask, "k2")


def test_token_rewards_layout():
    # row 0: prompt token, 3 response tokens, 1 pad; row 1: 2 prompt tokens, 3 response tokens
    mask = [[0, 1, 1, 1, 0], [0, 0, 1, 1, 1]]
    logp = [[-9.0, -1.0, -2.0, -0.5, -9.0], [-9.0, -9.0, -0.3, -1.2, -0.7]]
    ref = [[-1.0, -1.5, -1.0, -0.5, -1.0], [-2.0, -2.0, -0.1, -1.0, -1.7]]
    score = [2.0, -0.5]
    beta = 0.1
    expected = []
    for b in range(2):
        row = [-beta * (logp[b][t] - ref[b][t]) if mask[b][t] else 0.0 for t in range(5)]
        last = max(t for t in range(5) if mask[b][t])
        row[last] += score[b]
        expected.append(row)
    assert expected[0][3] == pytest.approx(2.0) and expected[1][4] == pytest.approx(-0.5 - 0.1)
    got = token_rewards(torch.tensor(score), torch.tensor(logp), torch.tensor(ref), torch.tensor(mask), beta)
    close(got, expected, 1e-6)
    # with k1 the rewards of a response sum to eq. 4: score - beta * log(pi / pi_0) of the sequence
    for b in range(2):
        seq_kl = sum(logp[b][t] - ref[b][t] for t in range(5) if mask[b][t])
        assert got[b].sum().item() == pytest.approx(score[b] - beta * seq_kl, rel=1e-6)
    # k3 only changes the per-token term
    got3 = token_rewards(torch.tensor(score), torch.tensor(logp), torch.tensor(ref), torch.tensor(mask), beta, "k3")
    lr = ref[0][1] - logp[0][1]
    assert got3[0, 1].item() == pytest.approx(-beta * (math.exp(lr) - 1 - lr), rel=1e-6)
    assert got3[0, 3].item() == pytest.approx(2.0, rel=1e-6)  # logp == ref there: only the score
    # a row with no response tokens gets nothing
    empty = token_rewards(torch.tensor([5.0]), torch.zeros(1, 3), torch.zeros(1, 3), torch.zeros(1, 3), beta)
    close(empty, [[0.0, 0.0, 0.0]])


# ------------------------------------------------------------------------------------------------ GAE


def gae_3_tokens(r: list[float], v: list[float], g: float, lam: float) -> tuple[list[float], list[float]]:
    """GAE written out for a 3-token episode whose value after the last token is 0."""
    d2 = r[2] - v[2]
    d1 = r[1] + g * v[2] - v[1]
    d0 = r[0] + g * v[1] - v[0]
    a2 = d2
    a1 = d1 + g * lam * a2
    a0 = d0 + g * lam * a1
    adv = [a0, a1, a2]
    return adv, [a + vi for a, vi in zip(adv, v)]


def test_gae_hand_example_with_padding_and_prompt():
    g, lam = 0.9, 0.8
    r = [0.1, -0.2, 1.5]
    v = [0.3, 0.5, -0.4]
    adv, ret = gae_3_tokens(r, v, g, lam)
    # row 0: response then right padding (garbage there must not leak in); row 1: prompt, then the response
    rewards = torch.tensor([r + [100.0, 100.0], [100.0, 100.0] + r])
    values = torch.tensor([v + [7.0, 7.0], [7.0, 7.0] + v])
    mask = torch.tensor([[1, 1, 1, 0, 0], [0, 0, 1, 1, 1]])
    a, R = gae(rewards, values, mask, gamma=g, lam=lam)
    close(a, [adv + [0.0, 0.0], [0.0, 0.0] + adv], 1e-6)
    close(R, [ret + [0.0, 0.0], [0.0, 0.0] + ret], 1e-6)


def test_gae_gamma_lambda_one_is_monte_carlo():
    r = [0.0, 0.5, -1.0, 2.0]
    v = [0.2, 0.1, 0.3, -0.6]
    mask = torch.ones(1, 4)
    a, R = gae(torch.tensor([r]), torch.tensor([v]), mask, gamma=1.0, lam=1.0)
    future = [sum(r[t:]) for t in range(4)]
    close(R, [future], 1e-6)
    close(a, [[f - vi for f, vi in zip(future, v)]], 1e-6)
    # lam = 0: the one-step TD error
    a0, _ = gae(torch.tensor([r]), torch.tensor([v]), mask, gamma=1.0, lam=0.0)
    close(a0, [[r[t] + (v[t + 1] if t < 3 else 0.0) - v[t] for t in range(4)]], 1e-6)


# ------------------------------------------------------------------------------------------------ the PPO losses


def test_ppo_policy_loss_clipping():
    clip = 0.2
    # token: ratio, advantage, in mask
    toks = [
        (1.5, 1.0, 1),   # above 1 + clip, positive advantage: clipped, no gradient
        (0.5, -1.0, 1),  # below 1 - clip, negative advantage: clipped, no gradient
        (1.5, -1.0, 1),  # above 1 + clip but negative advantage: unclipped term wins, gradient flows
        (1.0, 2.0, 1),   # inside the range
        (3.0, 5.0, 0),   # masked
    ]
    old = [-1.0, -2.0, -0.7, -0.3, -1.1]
    new = [o + math.log(t[0]) for o, t in zip(old, toks)]
    adv = [t[1] for t in toks]
    mask = [t[2] for t in toks]
    n = sum(mask)
    terms, grads, clipped, kl = [], [], 0, []
    for (ratio, a, m) in toks:
        if not m:
            grads.append(0.0)
            continue
        unc = -a * ratio
        clp = -a * min(max(ratio, 1 - clip), 1 + clip)
        terms.append(max(unc, clp))
        clipped += clp > unc
        grads.append(0.0 if clp > unc else -a * ratio / n)  # d(-A * exp(logp - old)) / d logp
        kl.append((ratio - 1) - math.log(ratio))
    logp = torch.tensor([new], requires_grad=True)
    loss, stats = ppo_policy_loss(logp, torch.tensor([old]), torch.tensor([adv]), torch.tensor([mask]), clip)
    assert loss.item() == pytest.approx(sum(terms) / n, rel=1e-6)
    loss.backward()
    close(logp.grad, [grads], 1e-6)
    assert logp.grad[0, 0].item() == 0.0 and logp.grad[0, 1].item() == 0.0 and logp.grad[0, 2].item() != 0.0
    assert clipped == 2 and stats["clip_fraction"].item() == pytest.approx(2 / 4)
    assert stats["approx_kl"].item() == pytest.approx(sum(kl) / n, rel=1e-5)
    assert not stats["clip_fraction"].requires_grad


def test_value_loss_clipping():
    clip = 0.2
    values = [1.0, 1.0, 0.0, 5.0]
    old = [0.5, 0.5, 0.0, 0.0]
    returns = [2.0, 0.0, 0.1, 0.0]
    mask = [1, 1, 1, 0]
    n = 3
    terms, grads = [], []
    for v, o, R, m in zip(values, old, returns, mask):
        vc = o + min(max(v - o, -clip), clip)
        unc, clp = (v - R) ** 2, (vc - R) ** 2
        if m:
            terms.append(max(unc, clp))
        # d/dv of 0.5 * (v - R)^2 / n, unless the clipped term (constant in v once clipped) is the larger one
        flows = m and (vc == v or unc > clp)
        grads.append((v - R) / n if flows else 0.0)
    # token 0: v moved 0.5 > clip from old, and the clipped error (1.3^2) is larger: clipped, no gradient
    assert terms[0] == pytest.approx(1.69) and grads[0] == 0.0
    # token 1: the unclipped error (1.0) is larger: it counts, with gradient
    assert terms[1] == pytest.approx(1.0) and grads[1] == pytest.approx(1 / 3)
    v_t = torch.tensor([values], requires_grad=True)
    loss = value_loss(v_t, torch.tensor([old]), torch.tensor([returns]), torch.tensor([mask]), clip)
    assert loss.item() == pytest.approx(0.5 * sum(terms) / n, rel=1e-6)
    loss.backward()
    close(v_t.grad, [grads], 1e-6)


def test_token_logprobs_and_entropy():
    logits = [[[1.0, 2.0, 0.5], [0.0, 0.0, 0.0]], [[3.0, -1.0, 0.0], [9.0, 9.0, 9.0]]]
    targets = [[1, 2], [0, 1]]

    def logsoftmax(row):
        z = math.log(sum(math.exp(x) for x in row))
        return [x - z for x in row]

    lps = [[logsoftmax(logits[b][t])[targets[b][t]] for t in range(2)] for b in range(2)]
    close(token_logprobs(torch.tensor(logits), torch.tensor(targets)), lps, 1e-6)
    mask = [[1, 1], [1, 0]]
    ents = [-sum(math.exp(l) * l for l in logsoftmax(logits[b][t])) for b in range(2) for t in range(2) if mask[b][t]]
    assert ents[1] == pytest.approx(math.log(3))  # uniform
    got = entropy_from_logits(torch.tensor(logits), torch.tensor(mask))
    assert got.item() == pytest.approx(sum(ents) / 3, rel=1e-6)


# ------------------------------------------------------------------------------------------------ rejection sampling


def test_keep_best_across_iterations():
    previous = {"a": (0.8, "a-v1"), "b": (0.2, "b-v1"), "d": (0.4, "d-v1")}
    new = {
        "a": [(0.5, "a-v2"), (0.7, "a-v2'")],     # worse than before: keep the earlier iteration's sample
        "b": [(0.9, "b-v2"), (0.9, "b-v2'")],     # better: the first of the tied best
        "c": [(0.1, "c-v2")],                     # new prompt
        "d": [(0.4, "d-v2")],                     # tie with the earlier sample: keep it
    }
    prev_copy, new_copy = dict(previous), {k: list(v) for k, v in new.items()}
    got = keep_best_across_iterations(previous, new)
    assert got == {"a": (0.8, "a-v1"), "b": (0.9, "b-v2"), "c": (0.1, "c-v2"), "d": (0.4, "d-v1")}
    assert previous == prev_copy and new == new_copy
    # a third iteration keeps building on the result; tensor scores are fine
    got = keep_best_across_iterations(got, {"c": [(torch.tensor(0.6), "c-v3")], "a": [(torch.tensor(0.85), "a-v3")]})
    assert got["c"] == (pytest.approx(0.6), "c-v3") and got["a"] == (pytest.approx(0.85), "a-v3")
    assert got["b"] == (0.9, "b-v2")


def brute_force_expected_max(rows: list[list[float]]) -> list[float]:
    K = len(rows[0])
    out = []
    for k in range(1, K + 1):
        per_prompt = []
        for row in rows:
            maxes = [max(sub) for sub in itertools.combinations(row, k)]
            per_prompt.append(sum(maxes) / len(maxes))
        out.append(sum(per_prompt) / len(per_prompt))
    return out


def test_expected_max_reward_vs_brute_force():
    rng = random.Random(0)
    rows = [[round(rng.gauss(0, 1), 3) for _ in range(6)] for _ in range(4)]
    rows.append([0.5, 0.5, 0.1, 0.5, -0.2, 0.1])  # ties
    got = expected_max_reward(torch.tensor(rows))
    expected = brute_force_expected_max(rows)
    assert got.shape == (6,)
    close(got, expected, 1e-6)
    assert got[0].item() == pytest.approx(sum(sum(r) / 6 for r in rows) / 5, rel=1e-6)  # k = 1: the mean
    assert got[-1].item() == pytest.approx(sum(max(r) for r in rows) / 5, rel=1e-6)  # k = K: the max
    assert all(a <= b + 1e-7 for a, b in zip(got.tolist(), got.tolist()[1:]))  # non-decreasing in k


# -- the value model and the returns on one scale ----------------------------------------------------------------
@pytest.mark.parametrize("spread", [3.0, 0.3])
def test_advantages_follow_the_reward_whatever_its_spread(spread):
    from llama2.rlhf.ppo import whitened_advantages

    g = torch.Generator().manual_seed(0)
    B, T = 256, 6
    raw = 2.0 + spread * torch.randn(B, generator=g)  # reward-model scores: offset 2, spread `spread`
    mask = torch.ones(B, T)
    mask[:, 0] = 0  # a prompt position, then five positions whose next token is an answer token
    # a value model initialised from the RM: before the answer (position 1 sees the prompt only) it predicts the
    # prompt's mean score; once it has read the start of a short answer it predicts that answer's score
    known = torch.tensor([0.0, 0.0, 1.0, 1.0, 1.0, 1.0])[None, :]
    values = 2.0 + (raw[:, None] - 2.0) * known + 0.1 * torch.randn(B, T, generator=g)
    lp = torch.zeros(B, T)
    out = whitened_advantages(raw, values, lp, lp, mask, beta=0.01, lam=0.95)
    per_answer = masked_mean(out["advantages"], mask, dim=1)  # what the policy gradient pushes each answer by
    corr = torch.corrcoef(torch.stack([per_answer, raw]))[0, 1]
    assert corr > 0.5, corr
    # the bug this replaces: raw-unit values against whitened returns invert the signal once the spread exceeds 1
    white = (raw - raw.mean()) / raw.std(unbiased=False)
    old_adv, _ = gae(token_rewards(white, lp, lp, mask, 0.01), values * mask, mask, 1.0, 0.95)
    old_corr = torch.corrcoef(torch.stack([masked_mean(old_adv, mask, dim=1), raw]))[0, 1]
    assert (old_corr < 0) == (spread > 1), old_corr
