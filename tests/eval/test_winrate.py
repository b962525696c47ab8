"""Win rates: the outcome of each prompt from the judges' scores, and the rate with its 95% interval."""
import math

import pytest

from llama2.eval.winrate import compare_answers, win_rate


def test_outcomes_and_rate_with_its_interval():
    out = compare_answers([0.9, 0.5, 0.2, 0.7], [0.1, 0.5, 0.8, 0.7])
    assert out == [1.0, 0.5, 0.0, 0.5]
    r = win_rate(out * 25)  # 100 prompts
    assert (r["win"], r["tie"], r["loss"], r["n"]) == (25, 50, 25, 100)
    assert r["rate"] == pytest.approx(0.5)
    sd = math.sqrt(sum((x - 0.5) ** 2 for x in out * 25) / 99)  # sample sd of the outcomes
    assert r["low95"] == pytest.approx(0.5 - 1.96 * sd / 10) and r["high95"] == pytest.approx(0.5 + 1.96 * sd / 10)


def test_a_clear_winner_has_its_interval_above_half():
    r = win_rate([1.0] * 70 + [0.5] * 20 + [0.0] * 10)
    assert r["rate"] == pytest.approx(0.8) and r["low95"] > 0.5
    with pytest.raises(ValueError):
        win_rate([])


def test_head_to_head_counts_answers_and_takes_its_interval_from_the_items():
    from llama2.eval.winrate import head_to_head

    a = [[0.9, 0.2], [0.5, 0.5], [0.1, 0.1]]  # model A, 3 items x 2 samples
    b = [[0.1, 0.8], [0.5, 0.4], [0.2, 0.3]]
    r = head_to_head(a, b)  # A against B: item outcomes (1 + 0) / 2, (0.5 + 1) / 2, (0 + 0) / 2
    assert (r["win"], r["tie"], r["loss"], r["answers"], r["n"]) == (2, 1, 3, 6, 3)
    per_item = [0.5, 0.75, 0.0]
    mean = sum(per_item) / 3
    sd = math.sqrt(sum((x - mean) ** 2 for x in per_item) / 2)
    assert r["rate"] == pytest.approx(mean) and r["low95"] == pytest.approx(mean - 1.96 * sd / math.sqrt(3))
    swapped = head_to_head(b, a)
    assert swapped["win"] == r["loss"] and swapped["rate"] == pytest.approx(1 - r["rate"])
    with pytest.raises(ValueError, match="same items"):
        head_to_head(a, b[:2])


def test_paired_change_averages_samples_per_item_and_skips_what_the_measure_does_not_cover():
    from llama2.eval.winrate import paired_change

    before = [[0.0, 1.0], [1.0, 1.0], [None, None], [0.0, 0.0]]
    after = [[1.0, 1.0], [1.0, 1.0], [None, None], [0.0, 1.0]]
    c = paired_change(before, after)  # per-item differences 0.5, 0.0, 0.5 (the third item has no values)
    assert c["n"] == 3 and c["before"] == pytest.approx(0.5) and c["after"] == pytest.approx(5 / 6)
    d = [0.5, 0.0, 0.5]
    sd = math.sqrt(sum((x - 1 / 3) ** 2 for x in d) / 2)
    assert c["change"] == pytest.approx(1 / 3) and c["se"] == pytest.approx(sd / math.sqrt(3))
    # the paired error is far smaller than the two models' own spreads when the items' difficulty is shared
    hard_easy = [[0.0, 0.0]] * 50 + [[1.0, 1.0]] * 50
    better = [[0.0, 1.0]] * 50 + [[1.0, 1.0]] * 50
    c = paired_change(hard_easy, better)
    assert c["change"] == pytest.approx(0.25) and c["se"] < 0.03
    assert paired_change([[None]], [[None]])["n"] == 0
