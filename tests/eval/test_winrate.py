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
