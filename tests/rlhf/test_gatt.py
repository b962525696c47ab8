"""Tests for llama2.rlhf.gatt: Ghost Attention's instructions, dialogs, loss mask and adherence (paper §3.3)."""
from __future__ import annotations

import random

import pytest

from llama2.chat import encode_dialog, format_dialog, turns
from llama2.data import SFTExample, last_answer_only, pack_sft
from llama2.rlhf.gatt import (
    INSTRUCTION_SEPARATOR,
    INSTRUCTIONS,
    Instruction,
    Probe,
    adherence_by_turn,
    combine_instructions,
    gatt_training_dialog,
    gatt_windows,
    instruction_families,
    multi_turn_probe_dialogs,
    sample_instruction,
    with_instruction_every_turn,
)



@pytest.fixture(scope="module")
def tok(llama_tokenizer):
    return llama_tokenizer


def ins(value: str) -> Instruction:
    return next(i for i in INSTRUCTIONS if i.value == value)


# ------------------------------------------------------------------------------------------------ instructions

# (value, compliant answer, non-compliant answers)
CASES = [
    ("tennis", "I played Tennis today.", ["I played chess.", "Tennisball is not a word here."]),
    ("chess", "Chess aside, 2 + 2 = 4.", ["2 + 2 = 4."]),
    ("gardening", "4, as in gardening.", ["4."]),
    ("painting", "painting: yes", ["paint"]),
    ("capitals", "THE ANSWER IS 4.", ["The answer is 4.", "4", ""]),
    ("lowercase", "the answer is 4.", ["The answer is 4.", "42"]),
    ("exclaim", "It is 4!  ", ["It is 4.", "!It is 4"]),
    ("pirate", "Arr! It is 4.", ["It is 4. Arr!", "Arrow is the answer."]),
    ("robot", "  BEEP. It is 4.", ["It is 4.", "Beeping."]),
    ("owl", "Hoot. Four.", ["Four. Hoot."]),
]


def test_families_and_forms():
    assert instruction_families() == ["hobby", "language", "persona"]
    assert {i.value for i in INSTRUCTIONS} == {c[0] for c in CASES}
    for i in INSTRUCTIONS:
        assert i.long != i.short and len(i.short) < len(i.long)
        assert i.text(short=True) == i.short and i.text() == i.long
    assert ins("pirate").short == "Figure: pirate"
    assert ins("tennis").short == "Hobby: tennis"
    assert ins("tennis").long == "You love tennis. Mention tennis in every answer."


@pytest.mark.parametrize("value,good,bads", CASES)
def test_checkers(value, good, bads):
    i = ins(value)
    assert i.check(good) and i(good)
    for bad in bads:
        assert not i.check(bad), (value, bad)


def test_combined_instruction():
    both = combine_instructions([ins("pirate"), ins("capitals")])
    assert both.kind == "persona+language" and both.short == "Figure: pirate; Style: capitals"
    assert both("ARR! IT IS 4.")
    assert not both("Arr! It is 4.") and not both("IT IS 4.")
    with pytest.raises(ValueError):
        combine_instructions([ins("capitals"), ins("lowercase")])


def test_sampling_ratio_and_determinism():
    rng = random.Random(0)
    draws = [sample_instruction(rng) for _ in range(1000)]
    short = sum(text == i.short for i, text in draws) / len(draws)
    assert 0.45 < short < 0.55
    assert all(text in (i.short, i.long) for i, text in draws)
    kinds = [i.kind for i, _ in draws]
    for fam in instruction_families():  # families drawn uniformly
        assert 0.28 < kinds.count(fam) / 1000 < 0.39
    rng2 = random.Random(0)
    assert [(i.value, t) for i, t in (sample_instruction(rng2) for _ in range(1000))] == [
        (i.value, t) for i, t in draws
    ]
    assert sample_instruction(7) == sample_instruction(random.Random(7))
    assert all(text == i.long for i, text in (sample_instruction(rng, short_prob=0.0) for _ in range(50)))
    multi = [sample_instruction(rng, max_constraints=3)[0] for _ in range(200)]
    assert {len(i.kind.split("+")) for i in multi} == {1, 2, 3}


# ------------------------------------------------------------------------------------------------ dialogs

DIALOG = turns("What is 2 + 2?", "ARR! FOUR.", "Reverse abc.", "ARR! CBA.", "Count to 3.", "ARR! 1 2 3, MATEY.")
TEXT = "Figure: pirate; Style: capitals"


def test_with_instruction_every_turn():
    out = with_instruction_every_turn(DIALOG, TEXT)
    assert DIALOG[0]["content"] == "What is 2 + 2?"  # input untouched
    assert [m["role"] for m in out] == [m["role"] for m in DIALOG]
    for m, orig in zip(out, DIALOG):
        if m["role"] == "user":
            assert m["content"] == TEXT + INSTRUCTION_SEPARATOR + orig["content"]
        else:
            assert m["content"] == orig["content"] and TEXT not in m["content"]
    with_sys = with_instruction_every_turn([{"role": "system", "content": "Be brief."}, *DIALOG[:1]], TEXT)
    assert with_sys[0] == {"role": "system", "content": "Be brief."}
    assert with_sys[1]["content"].startswith(TEXT)


@pytest.mark.parametrize("place", ["system", "prefix"])
def test_gatt_training_dialog(place):
    sampled = with_instruction_every_turn(DIALOG, TEXT)
    out = gatt_training_dialog(sampled, TEXT, place=place)
    holders = [k for k, m in enumerate(out) if TEXT in m["content"]]
    if place == "system":
        assert out[0] == {"role": "system", "content": TEXT} and holders == [0]
        body = out[1:]
    else:
        assert out[0]["content"] == TEXT + INSTRUCTION_SEPARATOR + DIALOG[0]["content"] and holders == [0]
        body = [{"role": "user", "content": DIALOG[0]["content"]}, *out[1:]]
    assert body == DIALOG  # later user messages stripped, answers untouched
    assert gatt_training_dialog(DIALOG, TEXT, place=place) == out  # a plain dialog works as well
    # the chat format sees the instruction once, in the first [INST] block
    assert sum(TEXT in piece for piece in format_dialog(out)) == 1


def test_gatt_training_dialog_merges_existing_system():
    d = [{"role": "system", "content": "Be brief."}, *with_instruction_every_turn(DIALOG, TEXT)]
    out = gatt_training_dialog(d, TEXT)
    assert out[0] == {"role": "system", "content": "Be brief.\n" + TEXT}
    assert out[1:] == DIALOG
    with pytest.raises(ValueError):
        gatt_training_dialog(DIALOG, TEXT, place="suffix")  # type: ignore[arg-type]


def _last_answer_example(tok, dialog) -> SFTExample:
    """A GAtt training dialog as the SFT stage trains it with ``loss_on=last`` (the unpacked layout)."""
    enc = encode_dialog(tok, dialog)
    return last_answer_only(SFTExample(enc.ids, enc.loss_mask))


def _per_turn_examples(tok, sampled, text) -> list[SFTExample]:
    """The paper's reading of GAtt's data, one example per turn t: the training dialog cut after answer t, trained
    on answer t only (the reference the packed windows are checked against)."""
    train = gatt_training_dialog(sampled, text)
    ends = [i + 1 for i, m in enumerate(train) if m["role"] == "assistant"]
    return [_last_answer_example(tok, train[:end]) for end in ends]


@pytest.mark.parametrize("place", ["system", "prefix"])
def test_loss_mask_covers_last_answer_only(tok, place):
    """§3.3: "we simply set the loss to 0 for all the tokens from the previous turns, including assistant messages"."""
    train = gatt_training_dialog(with_instruction_every_turn(DIALOG, TEXT), TEXT, place=place)
    ex = _last_answer_example(tok, train)
    full = encode_dialog(tok, train)
    assert ex.ids == full.ids and len(ex.loss_mask) == len(ex.ids)
    on = [t for t, m in zip(ex.ids, ex.loss_mask) if m]
    assert on[-1] == tok.eos_id and ex.ids[-1] == tok.eos_id
    assert tok.decode(on[:-1]).strip() == DIALOG[-1]["content"]
    # every other position the SFT mask would train on (earlier answers and their EOS) gets 0 here
    first_on = ex.loss_mask.index(1)
    assert all(m == 0 for m in ex.loss_mask[:first_on]) and all(ex.loss_mask[first_on:])
    assert sum(full.loss_mask[:first_on]) > 0
    assert ex.ids[:first_on].count(tok.eos_id) == 2  # the two earlier exchanges are all masked
    earlier = tok.decode([t for t, m in zip(ex.ids, full.loss_mask) if m][: -len(on)])
    assert "FOUR" in earlier and "CBA" in earlier
    # a single-turn dialog: the loss is the plain SFT mask
    one = gatt_training_dialog(DIALOG[:2], TEXT, place=place)
    assert _last_answer_example(tok, one).loss_mask == encode_dialog(tok, one).loss_mask
    # the per-turn examples train each answer once, with the dialog before it as context
    per_turn = _per_turn_examples(tok, with_instruction_every_turn(DIALOG, TEXT), TEXT)
    for ex, answer in zip(per_turn, ["ARR! FOUR.", "ARR! CBA.", "ARR! 1 2 3, MATEY."]):
        on = [t for t, m in zip(ex.ids, ex.loss_mask) if m]
        assert tok.decode(on[:-1]).strip() == answer
    rows = pack_sft(per_turn, seq_len=4 * len(per_turn[-1].ids))
    assert sum(len(r.docs) for r in rows) == 3


def test_gatt_windows_train_each_answer_once_with_the_context_of_its_per_turn_example(tok):
    sampled = with_instruction_every_turn(DIALOG, TEXT)
    per_turn = _per_turn_examples(tok, sampled, TEXT)
    n = len(per_turn[-1].ids)
    (one,) = gatt_windows(tok, sampled, TEXT, seq_len=n)  # the whole dialog fits: one window
    assert one == gatt_training_dialog(sampled, TEXT)
    enc = encode_dialog(tok, one)
    ids, mask = enc.ids, enc.loss_mask
    for ex in per_turn:  # each per-turn example is a prefix of the window, and its trained tokens are trained there
        assert ids[: len(ex.ids)] == ex.ids
        assert all(mask[i] for i, m in enumerate(ex.loss_mask) if m)
    assert sum(mask) == sum(sum(ex.loss_mask) for ex in per_turn)  # and nothing else is
    # a window too small for the dialog: consecutive runs of turns, each fitting and led by the instruction
    windows = gatt_windows(tok, sampled, TEXT, seq_len=n - 2)
    assert len(windows) == 2
    for w in windows:
        assert w[0] == {"role": "system", "content": TEXT} and w[-1]["role"] == "assistant"
        assert len(encode_dialog(tok, w).ids) <= n - 1
    answers = [m["content"] for w in windows for m in w if m["role"] == "assistant"]
    assert answers == [m["content"] for m in DIALOG if m["role"] == "assistant"]
    # the instruction as the first user message's prefix, in its short wording: each window starts with it
    for w in gatt_windows(tok, sampled, TEXT, seq_len=n - 2, place="prefix", keep="Pirate"):
        assert w[0]["role"] == "user" and w[0]["content"].startswith("Pirate")
        assert all(TEXT not in m["content"] and "Pirate" not in m["content"] for m in w[1:])
    # a single exchange longer than the window is kept alone (the fine-tuning truncates it)
    assert len(gatt_windows(tok, sampled, TEXT, seq_len=4)) == 3
    with pytest.raises(ValueError, match="end with an assistant"):
        gatt_windows(tok, sampled[:-1], TEXT, seq_len=n)


def test_adherence_by_turn():
    pirate, caps = ins("pirate"), ins("capitals")
    answers = [
        ["Arr! 4.", "Arr! cba.", "no"],  # 1, 1, 0
        ["FOUR.", "cba"],  # 1, 0
        ["Four."],  # 0
    ]
    got = adherence_by_turn(answers, [pirate, caps, caps], max_turns=5)
    assert got == [pytest.approx(2 / 3), 0.5, 0.0, None, None]
    assert len(adherence_by_turn(answers, [pirate, caps, caps])) == 20
    assert adherence_by_turn([], [], max_turns=2) == [None, None]
    with pytest.raises(ValueError):
        adherence_by_turn(answers, [pirate])


def test_multi_turn_probe_dialogs():
    pool = [f"Question {k}?" for k in range(30)]
    probes = multi_turn_probe_dialogs(random.Random(1), n=8, turns=20, user_messages=pool)
    again = multi_turn_probe_dialogs(random.Random(1), n=8, turns=20, user_messages=pool)
    assert [(p.text, p.user_messages) for p in probes] == [(p.text, p.user_messages) for p in again]
    for p in probes:
        assert isinstance(p, Probe) and len(p.user_messages) == 20 and len(set(p.user_messages)) == 20
        assert p.text in (p.instruction.short, p.instruction.long)
    p = probes[0]
    first = p.prompt([])
    assert first == [{"role": "system", "content": p.text}, {"role": "user", "content": p.user_messages[0]}]
    third = p.prompt(["a1", "a2"])
    assert [m["role"] for m in third] == ["system", "user", "assistant", "user", "assistant", "user"]
    assert third[-1]["content"] == p.user_messages[2] and third[2]["content"] == "a1"
    assert sum(p.text in m["content"] for m in third) == 1
    with pytest.raises(ValueError):
        p.prompt(["a"] * 20)
    small = multi_turn_probe_dialogs(0, n=2, turns=5, user_messages=["hi", "yo"], place="prefix")
    assert all(len(q.user_messages) == 5 for q in small)
    assert small[0].prompt([])[0]["content"] == small[0].text + INSTRUCTION_SEPARATOR + small[0].user_messages[0]
