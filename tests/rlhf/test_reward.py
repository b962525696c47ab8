"""Tests for llama2.rlhf.reward: the margin ranking loss (paper eq. 1 and 2, Table 27) and Table 8 accuracy."""
from __future__ import annotations

import math
import random

import pytest
import torch

from llama2.rlhf import RATINGS, accuracy_by_rating, format_accuracy_table, margin_values, ranking_loss

# Table 27, typed out again here so the test does not read the table it checks.
TABLE27 = {
    "none": {"significantly_better": 0, "better": 0, "slightly_better": 0, "negligibly_better": 0, "unsure": 0},
    "small": {"significantly_better": 1, "better": 2 / 3, "slightly_better": 1 / 3, "negligibly_better": 0,
              "unsure": 0},
    "large": {"significantly_better": 3, "better": 2, "slightly_better": 1, "negligibly_better": 0, "unsure": 0},
}


def by_hand(chosen: list[float], rejected: list[float], ratings: list[str], margin: str) -> float:
    """mean_i -log(sigmoid(c_i - r_i - m(rating_i))), in plain Python floats."""
    terms = []
    for c, r, rating in zip(chosen, rejected, ratings):
        x = c - r - TABLE27[margin][rating]
        terms.append(-math.log(1.0 / (1.0 + math.exp(-x))))
    return sum(terms) / len(terms)


def test_ratings_are_the_paper_scale():
    assert RATINGS == ("significantly_better", "better", "slightly_better", "negligibly_better", "unsure")


@pytest.mark.parametrize("margin", ["none", "small", "large"])
def test_margin_values_follow_table_27(margin):
    got = margin_values(list(RATINGS), margin)
    assert got.dtype == torch.float32 and got.shape == (5,)
    assert got.tolist() == pytest.approx([TABLE27[margin][r] for r in RATINGS])


@pytest.mark.parametrize("margin", ["none", "small", "large"])
def test_ranking_loss_equals_the_formula_for_every_rating(margin):
    # every rating, with positive, negative and zero score gaps
    chosen = [1.5, 0.2, -0.7, 2.0, 0.0, 3.1, -1.2, 0.4, 0.9, -2.5]
    rejected = [0.5, 0.9, -0.7, -1.0, 0.3, 0.1, -0.2, 0.4, 2.0, -2.6]
    ratings = [RATINGS[i % 5] for i in range(10)]
    m = margin_values(ratings, margin)
    loss = ranking_loss(torch.tensor(chosen), torch.tensor(rejected), m)
    assert loss.item() == pytest.approx(by_hand(chosen, rejected, ratings, margin), rel=1e-6, abs=1e-7)
    for i in range(10):  # and each pair on its own
        one = ranking_loss(torch.tensor(chosen[i:i + 1]), torch.tensor(rejected[i:i + 1]), m[i:i + 1])
        assert one.item() == pytest.approx(by_hand(chosen[i:i + 1], rejected[i:i + 1], ratings[i:i + 1], margin),
                                           rel=1e-6, abs=1e-7)


def test_no_margin_is_equation_1():
    c, r = torch.tensor([0.3, -1.0, 2.0]), torch.tensor([0.1, 0.5, 2.5])
    expected = by_hand(c.tolist(), r.tolist(), ["better"] * 3, "none")
    assert ranking_loss(c, r).item() == pytest.approx(expected, rel=1e-6)
    assert ranking_loss(c, r, margin_values(["significantly_better"] * 3, "none")).item() == pytest.approx(expected)


@pytest.mark.parametrize("margin", ["small", "large"])
def test_margin_goes_to_its_own_pair(margin):
    chosen = [2.0, 0.5, 1.0, -0.3, 0.8]
    rejected = [0.0, 0.4, 1.5, -0.1, 0.1]
    base = list(RATINGS)
    rng = random.Random(0)
    seen = set()
    for _ in range(12):
        ratings = base[:]
        rng.shuffle(ratings)
        got = ranking_loss(torch.tensor(chosen), torch.tensor(rejected), margin_values(ratings, margin)).item()
        assert got == pytest.approx(by_hand(chosen, rejected, ratings, margin), rel=1e-6)
        seen.add(round(got, 6))
    assert len(seen) > 1  # permuting the ratings changes the loss: the margin follows the pair, not the position
    # a larger margin on the same pair means a larger loss
    c, r = torch.tensor([1.0]), torch.tensor([0.0])
    losses = [ranking_loss(c, r, margin_values([rt], margin)).item() for rt in RATINGS[:4]]
    assert losses == sorted(losses, reverse=True) and losses[0] > losses[3]


def test_ranking_loss_is_stable_and_differentiable():
    c = torch.tensor([1000.0, -1000.0, 0.0], requires_grad=True)
    r = torch.tensor([-1000.0, 1000.0, 0.0])
    loss = ranking_loss(c, r, margin_values(["significantly_better", "unsure", "better"], "large"))
    assert torch.isfinite(loss)
    assert loss.item() == pytest.approx((0.0 + 2000.0 + math.log1p(math.exp(2.0))) / 3, rel=1e-6)
    loss.backward()
    assert torch.isfinite(c.grad).all()
    # the gradient of -logsigmoid(x) is sigmoid(x) - 1, divided by B
    assert c.grad.tolist() == pytest.approx([0.0, -1 / 3, (1 / (1 + math.exp(2.0)) - 1) / 3], abs=1e-7)


def test_bf16_scores_are_upcast():
    c, r = torch.tensor([0.5, 1.0], dtype=torch.bfloat16), torch.tensor([0.0, 0.0], dtype=torch.bfloat16)
    assert ranking_loss(c, r).dtype == torch.float32


def test_bad_inputs():
    with pytest.raises(ValueError, match="unknown rating 'great'"):
        margin_values(["better", "great"], "small")
    with pytest.raises(ValueError, match="margin must be one of"):
        margin_values(["better"], "medium")
    with pytest.raises(ValueError, match="differ in shape"):
        ranking_loss(torch.zeros(3), torch.zeros(2))
    with pytest.raises(ValueError, match="must match"):
        ranking_loss(torch.zeros(3), torch.zeros(3), torch.zeros(2))
    with pytest.raises(ValueError, match="ratings"):
        accuracy_by_rating([1.0], [0.0], ["better", "better"])


def test_accuracy_by_rating_hand_example():
    #            sig   sig   better better slight negl  unsure unsure tie(better)
    chosen = [2.0, -1.0, 0.5, 0.7, 0.1, 0.3, 0.0, 1.0, 0.4]
    rejected = [1.0, 0.0, 0.4, 0.1, 0.2, 0.2, 0.5, 0.9, 0.4]
    ratings = ["significantly_better", "significantly_better", "better", "better", "slightly_better",
               "negligibly_better", "unsure", "unsure", "better"]
    acc = accuracy_by_rating(torch.tensor(chosen), torch.tensor(rejected), ratings)
    assert list(acc) == ["significantly_better", "better", "slightly_better", "negligibly_better_or_unsure", "overall"]
    assert acc["significantly_better"] == {"n": 2, "correct": 1, "accuracy": 0.5}
    assert acc["better"] == {"n": 3, "correct": 2, "accuracy": pytest.approx(2 / 3)}  # the tie counts as wrong
    assert acc["slightly_better"] == {"n": 1, "correct": 0, "accuracy": 0.0}
    assert acc["negligibly_better_or_unsure"] == {"n": 3, "correct": 2, "accuracy": pytest.approx(2 / 3)}
    assert acc["overall"] == {"n": 9, "correct": 5, "accuracy": pytest.approx(5 / 9)}


def test_accuracy_empty_bucket_and_constant_model():
    acc = accuracy_by_rating([0.0, 0.0], [0.0, 0.0], ["better", "unsure"])
    assert acc["significantly_better"] == {"n": 0, "correct": 0, "accuracy": None}
    assert acc["overall"]["accuracy"] == 0.0  # a model that scores everything alike is never right


def test_format_accuracy_table():
    a = accuracy_by_rating([1.0, 1.0, 0.0, 1.0], [0.0, 2.0, 1.0, 0.0], ["significantly_better", "better", "better",
                                                                         "unsure"])
    b = accuracy_by_rating([1.0], [0.0], ["better"])
    table = format_accuracy_table({"helpfulness RM (margin small)": a, "safety RM (no margin)": b})
    lines = table.splitlines()
    assert len(lines) == 4
    assert [c.strip() for c in lines[0].strip("|").split("|")] == [
        "Model", "Significantly Better", "Better", "Slightly Better", "Negligibly Better / Unsure", "Avg"]
    assert set(lines[1]) <= set("|-:")
    assert [c.strip() for c in lines[2].strip("|").split("|")] == [
        "helpfulness RM (margin small)", "100.0", "0.0", "-", "100.0", "50.0"]
    assert [c.strip() for c in lines[3].strip("|").split("|")] == [
        "safety RM (no margin)", "-", "100.0", "-", "-", "100.0"]
    assert len({len(line) for line in lines}) == 1  # aligned columns


def test_answers_to_one_dialog_share_their_prefix_and_score_as_alone():
    """RewardModel.score_ids with group labels computes a group's common first tokens once (prefilled into a KV
    cache, then each member's own tokens): every score equals the one of the sequence scored alone, also for a
    member that is a prefix of another, identical members, a group without a common prefix and a single."""
    from llama2 import ModelArgs, Transformer
    from llama2.rlhf.reward_model import RewardModel

    args = ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=50, multiple_of=16, max_seq_len=64,
                     head="scalar")
    rm = RewardModel(Transformer(args).init_weights(std=0.3, seed=2).eval(), tokenizer=object())
    g = torch.Generator().manual_seed(0)

    def rand(n):
        return torch.randint(3, 50, (n,), generator=g).tolist()

    a, b = [1] + rand(20), [1] + rand(7)
    seqs = [a + rand(5), a + rand(1), a, a + rand(12),  # group 0: one member is the prefix itself
            b + rand(3), b + rand(3),                    # group 1
            rand(9), rand(4),                            # group 2: nothing in common
            a + rand(2), a + rand(2)[:0] + [7, 8],       # group 3: the same prompt as group 0, another label
            rand(30)]                                    # group 4: alone
    seqs.append(list(seqs[4]))                           # an identical member of group 1
    groups = [0, 0, 0, 0, 1, 1, 2, 2, 3, 3, 4, 1]
    alone = torch.stack([rm.score_ids([s])[0] for s in seqs])
    shared = rm.score_ids(seqs, batch_size=2, groups=groups)  # several calls
    torch.testing.assert_close(shared, alone, atol=1e-5, rtol=1e-5)
    assert shared[4] == shared[11] or abs(float(shared[4] - shared[11])) < 1e-6
    with pytest.raises(ValueError, match="group labels"):
        rm.score_ids(seqs, groups=[0])


def test_shared_prefix_calls_never_outgrow_the_context():
    """Groups scored in one call share a cache of (longest prefix + longest suffix) columns: a call mixing a group
    with a short prefix and a long answer and one with a long prefix must be split, not overflow the context."""
    from llama2 import ModelArgs, Transformer
    from llama2.rlhf.reward_model import RewardModel

    args = ModelArgs(dim=32, n_layers=1, n_heads=2, vocab_size=50, multiple_of=16, max_seq_len=32, head="scalar")
    rm = RewardModel(Transformer(args).init_weights(std=0.3, seed=5).eval(), tokenizer=object())
    g = torch.Generator().manual_seed(1)
    short, long = [1, 4], [1] + torch.randint(3, 50, (27,), generator=g).tolist()
    seqs = [short + torch.randint(3, 50, (28,), generator=g).tolist() for _ in range(2)]
    seqs += [long + torch.randint(3, 50, (2,), generator=g).tolist() for _ in range(2)]
    alone = torch.stack([rm.score_ids([s])[0] for s in seqs])
    torch.testing.assert_close(rm.score_ids(seqs, groups=[0, 0, 1, 1]), alone, atol=1e-5, rtol=1e-5)
