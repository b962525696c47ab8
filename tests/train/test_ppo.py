"""The PPO stage end to end on a tiny model: one iteration raises the mean reward of a toy reward that prefers
some tokens, the KL to the reference starts at zero, and the best policy is saved as a loadable checkpoint."""
import json

import pytest
import torch

from llama2 import Llama
from llama2.checkpoint import save
from llama2.train.ppo import PPOConfig, ppo


@pytest.fixture
def setup(tmp_path, tiny_tokenizer, tiny_policy, write_prompts):
    write_prompts(tmp_path / "prompts.jsonl", ["Ada", "Bob", "the sea", "tea", "a boat", "the hill", "rain", "bread"],
                  safety=lambda i: i % 3 == 0)
    return tiny_tokenizer, tmp_path


def test_one_iteration_raises_the_reward_of_a_token_preference(setup):
    tok, tmp = setup
    low = tok.vocab_size // 2

    def reward_fn(dialogs, texts, safety, ids):  # the fraction of answer tokens in the lower half of the vocabulary
        return torch.tensor([sum(t < low for t in a) / max(1, len(a)) for a in ids])

    # one iteration = 256 rollouts from the current policy, then 32 minibatch steps. How far one iteration moves the
    # policy varies with the seed, so the test compares the third iteration's rollouts with the first's.
    cfg = PPOConfig(prompts=str(tmp / "prompts.jsonl"), val_fraction=0, init_from=str(tmp / "policy"), out=str(tmp / "ppo"),
                    iterations=3, rollout_batch=256, minibatch=8, micro_batch=8, lr=1e-3, value_lr=1e-3, kl_beta=0.01,
                    max_new_tokens=4, eval_every=100, patience=0, tensorboard=False)
    hist = ppo(cfg, reward_fn=reward_fn)["history"]
    print("ppo mean reward by iteration:", [round(h["reward"], 4) for h in hist])
    assert len(hist) == 3
    # the first rollouts come from pi_0 itself: the sampler's log-probs (PPO's pi_old, taken from the sampler in
    # fp32) agree with the reference model's forward pass at every answer token
    assert hist[0]["kl"] == pytest.approx(0.0, abs=1e-5)
    assert hist[2]["reward"] > hist[0]["reward"] + 0.04, [h["reward"] for h in hist]
    assert hist[2]["kl"] > 0  # it moved away from the reference, and the penalty sees it
    assert all(0 <= h["clip_fraction"] <= 1 and h["entropy"] > 0 for h in hist)
    assert Llama.from_pretrained(tmp / "ppo").model.args.head == "lm"


def test_early_stopping_keeps_the_best_policy(setup):
    tok, tmp = setup

    def reward_fn(dialogs, texts, safety, ids):  # a constant: the held-out reward never improves
        return torch.full((len(ids),), 0.5)

    cfg = PPOConfig(prompts=str(tmp / "prompts.jsonl"), val_fraction=0.25, init_from=str(tmp / "policy"), out=str(tmp / "es"),
                    iterations=10, rollout_batch=8, minibatch=8, micro_batch=8, max_new_tokens=2, eval_every=1, patience=2,
                    tensorboard=False)
    hist = ppo(cfg, reward_fn=reward_fn)["history"]
    assert len(hist) == 2 and "heldout_reward" in hist[-1]  # stopped after 2 evaluations without a better reward
    assert json.loads((tmp / "es" / "best.json").read_text())["iteration"] == 0  # the initial policy stayed best


def test_needs_a_reward(setup):
    _, tmp = setup
    with pytest.raises(ValueError, match="reward_helpfulness"):
        ppo(PPOConfig(prompts=str(tmp / "prompts.jsonl"), init_from=str(tmp / "policy"), out=str(tmp / "x")))
    with pytest.raises(ValueError, match="multiple"):
        ppo(PPOConfig(prompts=str(tmp / "prompts.jsonl"), init_from=str(tmp / "policy"), out=str(tmp / "x"),
                      rollout_batch=10, minibatch=4), reward_fn=lambda *a: None)



def test_first_iteration_advantages_follow_a_widely_spread_reward_model(setup, tiny_policy):
    """The value model starts as the helpfulness RM (raw scores) while the returns are whitened: the stage keeps them
    on one scale, so even with scores spread ~3 (where raw values against whitened returns invert the signal) the
    advantages of the very first iteration rise with the reward. (A random RM read at every prefix makes noisy
    values, so the margin here is small; tests/rlhf/test_ppo.py checks the arithmetic itself on a controlled batch.)"""
    from llama2.rlhf.reward_model import reward_model_from_chat

    tok, tmp = setup
    rm = reward_model_from_chat(Llama.from_pretrained(tiny_policy).model, seed=1)
    with torch.no_grad():
        rm.output.weight.mul_(40.0)  # a reward model whose scores spread widely (std about 3)
    save(rm, tmp / "rm", tokenizer=tok)
    cfg = PPOConfig(prompts=str(tmp / "prompts.jsonl"), val_fraction=0, init_from=str(tiny_policy), out=str(tmp / "rmppo"),
                    reward_helpfulness=str(tmp / "rm"), iterations=1, rollout_batch=64, minibatch=16, micro_batch=8,
                    lr=1e-4, value_lr=1e-4, max_new_tokens=6, eval_every=100, patience=0, tensorboard=False)
    first = ppo(cfg)["history"][0]
    print({k: round(v, 3) for k, v in first.items() if isinstance(v, float)})
    assert first["score_std"] > 1.5
    assert first["adv_reward_corr"] > 0.2


def test_rows_cut_to_their_length_give_the_full_batch_values():
    """_by_length runs a causal model on chunks of rows of similar length, each cut to its longest row: on every
    answer position it gives what the model gives on the whole right-padded batch (the compute saving of PPO's
    log-prob, reference and value passes must not change a number the losses read)."""
    from llama2.model import ModelArgs, Transformer
    from llama2.train.ppo import Rollouts, _by_length, row_lengths

    model = Transformer(ModelArgs.from_preset("toy-tiny", vocab_size=97)).init_weights(seed=3).eval()
    g = torch.Generator().manual_seed(0)
    lengths = [5, 17, 9, 30, 12, 30, 3, 21]
    L = max(lengths)
    tokens = torch.zeros(len(lengths), L, dtype=torch.long)
    mask = torch.zeros(len(lengths), L - 1)
    for i, n in enumerate(lengths):
        tokens[i, :n] = torch.randint(1, 97, (n,), generator=g)
        mask[i, n // 2 - 1 : n - 1] = 1  # the second half of each row is its answer
    ro = Rollouts(tokens, mask, torch.zeros(len(lengths)))
    assert row_lengths(mask).tolist() == lengths
    with torch.no_grad():
        full = torch.log_softmax(model(tokens)[:, :-1], -1).gather(-1, tokens[:, 1:, None])[..., 0]
        cut = _by_length(ro, 3, lambda t, mk: torch.log_softmax(model(t)[:, :-1], -1).gather(-1, t[:, 1:, None])[..., 0])
    m = mask.bool()
    torch.testing.assert_close(cut[m], full[m], atol=1e-5, rtol=1e-5)
    assert cut.shape == full.shape
    assert (cut[lengths.index(3), 9 - 1 :] == 0).all()  # its chunk (lengths 3, 5, 9) was cut at 9 tokens


def test_answer_only_log_probs_and_entropy_equal_the_full_logits():
    """_logprobs runs the LM head at the answer positions only: the log-probs there (and their gradient) and the
    mean entropy are those of the full logits, and every other position is 0."""
    from llama2.model import ModelArgs, Transformer
    from llama2.rlhf.ppo import entropy_from_logits
    from llama2.train.ppo import _logprobs

    model = Transformer(ModelArgs.from_preset("toy-tiny", vocab_size=97)).init_weights(seed=4)
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(1, 97, (3, 12), generator=g)
    mask = torch.zeros(3, 11)
    mask[0, 4:9], mask[1, 2:11], mask[2, 7:8] = 1, 1, 1
    lp, ent = _logprobs(model, tokens, mask, torch.autocast("cpu", enabled=False), entropy=True)
    logits = model(tokens)[:, :-1]
    full = torch.log_softmax(logits, -1).gather(-1, tokens[:, 1:, None])[..., 0]
    torch.testing.assert_close(lp[mask.bool()], full[mask.bool()], atol=1e-5, rtol=1e-5)
    assert (lp[~mask.bool()] == 0).all()
    torch.testing.assert_close(ent, entropy_from_logits(logits.detach(), mask), atol=1e-5, rtol=1e-5)
    g_sel = torch.autograd.grad(lp.sum(), model.output.weight)[0]
    g_full = torch.autograd.grad((full * mask).sum(), model.output.weight)[0]
    torch.testing.assert_close(g_sel, g_full, atol=1e-5, rtol=1e-4)


def test_resume_is_refused_with_a_clear_error(setup):
    """PPO keeps its best policy in OUT, not a training state: resume=true would silently start over, so it is
    refused before any work."""
    tok, tmp = setup
    cfg = PPOConfig(prompts=str(tmp / "prompts.jsonl"), init_from=str(tmp / "policy"), out=str(tmp / "ppo"),
                    reward_helpfulness=str(tmp / "policy"), resume=True)
    with pytest.raises(ValueError, match="does not resume"):
        ppo(cfg)
    assert not (tmp / "ppo").exists()
