"""Tests for llama2.data (records, sft, preferences): JSONL readers, SFT encoding/truncation/packing, reward pairs, mixing."""
from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
import torch

from llama2 import ModelArgs, Transformer
from llama2.chat import encode_dialog
from llama2.data import (
    EncodedPair,
    Preference,
    Prompt,
    SFTExample,
    collate,
    collate_pairs,
    encode_preference,
    encode_preferences,
    encode_sft_example,
    encode_sft_examples,
    gather_last,
    mix_preferences,
    pack_sft,
    read_dialogs,
    read_preferences,
    read_prompts,
    split_holdout,
)



@pytest.fixture(scope="module")
def tok(llama_tokenizer):
    return llama_tokenizer


def msg(role: str, content: str) -> dict[str, str]:
    return {"role": role, "content": content}


SYSTEM = msg("system", "You are terse.")
MULTI = [
    SYSTEM,
    msg("user", "Hello, who are you?"),
    msg("assistant", "A helpful assistant."),
    msg("user", "What is 12 + 30?"),
    msg("assistant", "12 + 30 = 42."),
    msg("user", "And in words?"),
    msg("assistant", "Forty-two."),
]
ANSWERS = ["A helpful assistant.", "12 + 30 = 42.", "Forty-two."]


def write_lines(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def good_pref(**overrides) -> dict:
    rec = {"prompt": [msg("user", "Is the sky blue?")], "chosen": "Yes, on a clear day.", "rejected": "No.",
           "rating": "better", "kind": "helpfulness"}
    rec.update(overrides)
    return rec


# ------------------------------------------------------------------------------------------------ readers


def test_read_dialogs(tmp_path):
    f1 = write_lines(tmp_path / "a.jsonl", [
        json.dumps({"dialog": MULTI, "id": 7}),  # extra fields are ignored
        "",
        "   ",
        json.dumps({"dialog": [msg("user", "hi"), msg("assistant", "hello")]}),
    ])
    f2 = write_lines(tmp_path / "b.jsonl", [json.dumps({"dialog": MULTI[1:3]})])
    dialogs = read_dialogs(f1)
    assert dialogs == [MULTI, [msg("user", "hi"), msg("assistant", "hello")]]
    assert dialogs.skipped == []
    assert read_dialogs([f1, str(f2)]) == [*dialogs, MULTI[1:3]]


def test_read_preferences_and_prompts(tmp_path):
    f = write_lines(tmp_path / "p.jsonl", [
        json.dumps(good_pref()),
        json.dumps(good_pref(kind="safety", rating="unsure", chosen_safe=True, rejected_safe=False,
                             prompt=[SYSTEM, msg("user", "Tell me the secret.")])),
    ])
    prefs = read_preferences(f)
    assert prefs[0] == Preference(prompt=[msg("user", "Is the sky blue?")], chosen="Yes, on a clear day.",
                                  rejected="No.", rating="better", kind="helpfulness", chosen_safe=None,
                                  rejected_safe=None, source=f"{f}:1")
    assert (prefs[1].kind, prefs[1].rating, prefs[1].chosen_safe, prefs[1].rejected_safe) == (
        "safety", "unsure", True, False)
    assert prefs[1].source == f"{f}:2"
    assert prefs[1].chosen_dialog == [SYSTEM, msg("user", "Tell me the secret."),
                                      msg("assistant", "Yes, on a clear day.")]
    with pytest.raises(AttributeError):
        prefs[0].rating = "unsure"  # frozen

    g = write_lines(tmp_path / "q.jsonl", [
        json.dumps({"dialog": [msg("user", "Hi")]}),
        json.dumps({"dialog": [SYSTEM, msg("user", "Secret?")], "safety": True}),
    ])
    assert read_prompts(g) == [Prompt([msg("user", "Hi")], False, f"{g}:1"),
                               Prompt([SYSTEM, msg("user", "Secret?")], True, f"{g}:2")]


U, A = msg("user", "u"), msg("assistant", "a")
DIALOG_ERRORS = [
    ('{"dialog": [', "not valid JSON"),
    ("[1, 2]", "expected a JSON object, got list"),
    ('{"turns": []}', "dialog: missing field"),
    ('{"dialog": "hi"}', "dialog: expected a list of messages, got string"),
    ('{"dialog": []}', "dialog: empty dialog"),
    ('{"dialog": ["hi"]}', "dialog[0]: expected an object"),
    (json.dumps({"dialog": [{"content": "u"}, A]}), "dialog[0].role: missing field"),
    (json.dumps({"dialog": [{"role": "user"}, A]}), "dialog[0].content: missing field"),
    (json.dumps({"dialog": [msg("bot", "u"), A]}), "dialog[0].role: unknown role 'bot'"),
    (json.dumps({"dialog": [U, A, U, U]}), "dialog[3].role: expected 'assistant', got 'user'"),
    (json.dumps({"dialog": [A, U]}), "dialog[0].role: expected 'user', got 'assistant'"),
    (json.dumps({"dialog": [U, SYSTEM, A]}), "dialog[1].role: expected 'assistant', got 'system' (a system"),
    (json.dumps({"dialog": [U, {"role": "assistant", "content": 3}]}), "dialog[1].content: expected a string, got number"),
    (json.dumps({"dialog": [U, msg("assistant", "  \n")]}), "dialog[1].content: empty content"),
    (json.dumps({"dialog": [msg("user", "[INST] x"), A]}), "dialog[0].content: contains the chat template tag '[INST]'"),
    (json.dumps({"dialog": [U, A, U]}), "dialog: must end with an assistant message, but dialog[2] is 'user'"),
    (json.dumps({"dialog": [SYSTEM]}), "dialog: must end with an assistant message"),
]


@pytest.mark.parametrize("line, error", DIALOG_ERRORS)
def test_dialog_errors_name_file_line_and_field(tmp_path, line, error):
    f = write_lines(tmp_path / "data.jsonl", [json.dumps({"dialog": [U, A]}), "", line])
    with pytest.raises(ValueError) as e:
        read_dialogs(f)
    assert str(e.value).startswith(f"{f}:3: ")
    assert error in str(e.value)


PREF_ERRORS = [
    (good_pref(chosen=None), "chosen: expected a string, got null"),
    ({k: v for k, v in good_pref().items() if k != "rejected"}, "rejected: missing field"),
    (good_pref(rejected=" Yes, on a clear day. "), "rejected: same text as chosen"),
    (good_pref(rating="much_better"), "rating: unknown rating 'much_better'"),
    (good_pref(rating=3), "rating: unknown rating number"),
    (good_pref(kind="honesty"), "kind: unknown kind 'honesty'"),
    ({k: v for k, v in good_pref().items() if k != "kind"}, "kind: missing field"),
    (good_pref(chosen_safe="yes"), "chosen_safe: expected true or false, got string"),
    (good_pref(prompt=[U, A]), "prompt: must end with a user message, but prompt[1] is 'assistant'"),
    (good_pref(prompt=[msg("user", "")]), "prompt[0].content: empty content"),
    (good_pref(chosen=""), "chosen: empty content"),
]


@pytest.mark.parametrize("rec, error", PREF_ERRORS)
def test_preference_errors(tmp_path, rec, error):
    f = write_lines(tmp_path / "prefs.jsonl", [json.dumps(good_pref()), json.dumps(rec)])
    with pytest.raises(ValueError) as e:
        read_preferences(f)
    assert str(e.value).startswith(f"{f}:2: ")
    assert error in str(e.value)


@pytest.mark.parametrize("rec, error", [
    ({"dialog": [U], "safety": "no"}, "safety: expected true or false, got string"),
    ({"dialog": [U, A]}, "dialog: must end with a user message"),
    ({"prompt": [U]}, "dialog: missing field"),
])
def test_prompt_errors(tmp_path, rec, error):
    f = write_lines(tmp_path / "prompts.jsonl", [json.dumps(rec)])
    with pytest.raises(ValueError) as e:
        read_prompts(f)
    assert str(e.value).startswith(f"{f}:1: ") and error in str(e.value)


def test_invalid_utf8_and_skip_bad(tmp_path):
    f = tmp_path / "mixed.jsonl"
    good = json.dumps({"dialog": [U, A]}).encode()
    f.write_bytes(b"\n".join([good, b'{"dialog": "\xff"}', good, b'{"dialog": [}', b"", good]) + b"\n")
    with pytest.raises(ValueError, match=rf"^{f}:2: invalid UTF-8"):
        read_dialogs(f)
    got = read_dialogs(f, skip_bad=True)
    assert got == [[U, A]] * 3
    assert [b.source for b in got.skipped] == [f"{f}:2", f"{f}:4"]
    assert str(got.skipped[1]).startswith(f"{f}:4: not valid JSON")


# ------------------------------------------------------------------------------------------------ SFT encoding


def test_sft_example_that_fits_is_the_chat_encoding(tok):
    enc = encode_dialog(tok, MULTI)
    ex = encode_sft_example(tok, MULTI, seq_len=len(enc.ids) - 1)  # L tokens fit a window of L - 1 positions
    assert ex == SFTExample(enc.ids, enc.loss_mask)
    assert not ex.truncated
    assert encode_sft_example(tok, MULTI, seq_len=len(enc.ids) - 2, overflow="skip") is None


def test_truncation_drops_whole_exchanges_first_and_keeps_the_system_prompt(tok):
    full = encode_dialog(tok, MULTI)
    without_first = [SYSTEM, *MULTI[3:]]
    enc1 = encode_dialog(tok, without_first)
    ex = encode_sft_example(tok, MULTI, seq_len=len(full.ids) - 2)  # one token too long
    assert ex.ids == enc1.ids and ex.loss_mask == enc1.loss_mask
    assert ex.ids[0] == tok.bos_id and "<<SYS>>" in tok.decode(ex.ids[:12])  # a well-formed start
    assert ex.dropped_exchanges == 1
    assert ex.dropped_tokens == len(full.ids) - len(enc1.ids)
    assert ex.dropped_loss_tokens == sum(full.loss_mask) - sum(enc1.loss_mask) > 0


def test_left_truncation_never_drops_a_kept_loss_token(tok):
    full = encode_dialog(tok, MULTI)
    last = encode_dialog(tok, [SYSTEM, *MULTI[-2:]])
    n_answer = sum(last.loss_mask)  # the final answer and its EOS
    seen_none = False
    for seq_len in range(2, len(full.ids) + 2):
        ex = encode_sft_example(tok, MULTI, seq_len)
        if ex is None:
            assert seq_len < n_answer  # only when the final answer alone does not fit
            seen_none = True
            continue
        assert len(ex.ids) <= seq_len + 1 and len(ex.ids) == len(ex.loss_mask)
        assert ex.loss_mask[0] == 0  # at least one prompt token before any answer token
        # what is kept is a suffix of the encoding of the dialog without its first k exchanges, and that
        # encoding's answer tokens are all kept
        ref = encode_dialog(tok, [SYSTEM, *MULTI[1 + 2 * ex.dropped_exchanges:]])
        assert ref.ids[len(ref.ids) - len(ex.ids):] == ex.ids
        assert sum(ex.loss_mask) == sum(ref.loss_mask)
        assert ex.dropped_loss_tokens == sum(full.loss_mask) - sum(ex.loss_mask)
        assert ex.dropped_tokens == len(full.ids) - len(ex.ids)
        if seq_len < len(last.ids) - 1:  # the last exchange itself had to be cut
            assert ex.dropped_exchanges == 2 and len(ex.ids) == seq_len + 1
    assert seen_none
    assert encode_sft_example(tok, MULTI, n_answer) is not None
    assert encode_sft_example(tok, MULTI, n_answer - 1) is None


def test_encode_sft_examples_counts_everything(tok):
    long_answer = [msg("user", "Count."), msg("assistant", " ".join(str(i) for i in range(40)))]
    short = [msg("user", "Hi"), msg("assistant", "Hello!")]
    dialogs = [short, MULTI, long_answer]
    examples, stats = encode_sft_examples(tok, dialogs, seq_len=30)
    assert len(examples) == 2
    assert (stats.total, stats.kept, stats.truncated, stats.too_long, stats.skipped) == (3, 2, 1, 1, 0)
    assert stats.dropped_exchanges == examples[1].dropped_exchanges > 0
    assert stats.dropped_loss_tokens == examples[1].dropped_loss_tokens > 0
    assert "1 dropped" in str(stats) and "2/3 kept" in str(stats)
    examples, stats = encode_sft_examples(tok, dialogs, seq_len=30, overflow="skip")
    assert (len(examples), stats.kept, stats.skipped, stats.too_long, stats.truncated) == (1, 1, 2, 0, 0)
    with pytest.raises(ValueError, match="must end with an assistant"):
        encode_sft_example(tok, [msg("user", "Hi")], 30)
    with pytest.raises(ValueError, match="overflow"):
        encode_sft_example(tok, short, 30, overflow="wrap")


# ------------------------------------------------------------------------------------------------ SFT packing

DIALOGS = [
    MULTI,
    [msg("user", "Name a prime."), msg("assistant", "7")],
    [msg("user", "Reverse 'abc'."), msg("assistant", "cba"), msg("user", "Now 'xy'."), msg("assistant", "yx")],
]


def test_packed_targets_cover_exactly_the_assistant_tokens(tok):
    examples = [encode_sft_example(tok, d, 256) for d in DIALOGS]
    rows = pack_sft(examples, seq_len=256)
    assert len(rows) == 1 and rows[0].docs == tuple(examples)
    b = collate(rows)
    tokens, targets, pos, doc = b["tokens"][0], b["targets"][0], b["position_ids"][0], b["doc_ids"][0]
    t = 0
    for d, (dialog, ex) in enumerate(zip(DIALOGS, examples)):
        n = len(ex.ids) - 1
        assert tokens[t:t + n].tolist() == ex.ids[:-1]
        assert pos[t:t + n].tolist() == list(range(n))
        assert (doc[t:t + n] == d).all()
        # the loss positions: runs of targets != -100, one run per assistant answer, each ending with EOS
        tgt = targets[t:t + n].tolist()
        runs, run = [], []
        for x in tgt + [-100]:
            if x != -100:
                run.append(x)
            elif run:
                runs.append(run)
                run = []
        answers = [m["content"] for m in dialog if m["role"] == "assistant"]
        assert len(runs) == len(answers)
        for r, answer in zip(runs, answers):
            assert r[-1] == tok.eos_id
            assert tok.decode(r[:-1]).strip() == answer
        # exactly the positions whose next token carries loss
        assert [x != -100 for x in tgt] == [bool(m) for m in ex.loss_mask[1:]]
        t += n
    assert (doc[t:] == -1).all() and (targets[t:] == -100).all() and (tokens[t:] == 0).all()
    assert rows[0].n_targets == int((targets != -100).sum())  # what SFT counts per step without the tensors


def test_packed_mask_is_causal_and_block_diagonal(tok):
    examples = [encode_sft_example(tok, d, 64) for d in DIALOGS]
    rows = pack_sft(examples, seq_len=64)
    assert max(len(r.docs) for r in rows) >= 2
    b = collate(rows)
    mask, doc = b["mask"], b["doc_ids"]
    assert mask.dtype == torch.bool and mask.shape == (len(rows), 64, 64)
    for i in range(len(rows)):
        for q in range(64):
            for k in range(64):
                expected = (k <= q and doc[i, q] == doc[i, k] and doc[i, q] >= 0) or q == k
                assert bool(mask[i, q, k]) == expected
    assert mask.any(-1).all()  # every query sees at least one key: no NaN rows


def test_pack_best_fit_and_determinism():
    def ex(n):  # an example of n tokens, loss on the last
        return SFTExample(list(range(1, n + 1)), [0] * (n - 1) + [1])

    examples = [ex(n) for n in (7, 5, 4, 3, 3, 2, 9, 6)]  # positions 6 4 3 2 2 1 8 5 = 31
    rows = pack_sft(examples, seq_len=10)
    assert all(r.n_positions <= 10 for r in rows)
    packed = sorted(id(d) for r in rows for d in r.docs)
    assert packed == sorted(id(e) for e in examples)  # each example exactly once
    assert len(rows) == 4  # ceil(31 / 10)
    assert [[len(d.ids) for d in r.docs] for r in pack_sft(examples, 10)] == [[len(d.ids) for d in r.docs] for r in rows]
    a = [[d.ids for d in r.docs] for r in pack_sft(examples, 10, seed=1)]
    assert a == [[d.ids for d in r.docs] for r in pack_sft(examples, 10, seed=1)]
    with pytest.raises(ValueError, match="holds 2..11"):
        pack_sft([ex(12)], seq_len=10)


def tiny_model(vocab_size: int = 32000, head: str = "lm") -> Transformer:
    args = ModelArgs(dim=32, n_layers=1, n_heads=2, n_kv_heads=1, vocab_size=vocab_size, multiple_of=16,
                     max_seq_len=64, head=head)
    return Transformer(args).init_weights(seed=0).eval()


def test_packed_document_gives_the_same_logits_as_alone(tok):
    a = encode_sft_example(tok, DIALOGS[1], 63)
    b = encode_sft_example(tok, DIALOGS[2], 63)
    rows = pack_sft([a, b], seq_len=64)
    assert len(rows) == 1
    batch = collate(rows)
    model = tiny_model()
    with torch.no_grad():
        packed = model(batch["tokens"], mask=batch["mask"], position_ids=batch["position_ids"])  # (1, 64, V)
        alone_a = model(torch.tensor([a.ids[:-1]]))
        alone_b = model(torch.tensor([b.ids[:-1]]))
    na, nb = len(a.ids) - 1, len(b.ids) - 1
    assert torch.isfinite(packed).all()  # the padding rows too
    torch.testing.assert_close(packed[0, :na], alone_a[0], atol=1e-5, rtol=0)
    torch.testing.assert_close(packed[0, na:na + nb], alone_b[0], atol=1e-5, rtol=0)
    # without the mask and positions, b would see a: the logits differ
    with torch.no_grad():
        naive = model(batch["tokens"])
    assert not torch.allclose(naive[0, na:na + nb], alone_b[0], atol=1e-3)


# ------------------------------------------------------------------------------------------------ reward pairs


def make_pref(prompt, chosen="Forty-two, I believe.", rejected="No idea.", rating="better") -> Preference:
    return Preference(prompt=prompt, chosen=chosen, rejected=rejected, rating=rating, kind="helpfulness")


def test_encode_preference_is_two_finished_dialogs(tok):
    pref = make_pref(MULTI[:-1])
    pair = encode_preference(tok, pref, seq_len=256)
    chosen, rejected = pair
    assert chosen == encode_dialog(tok, pref.chosen_dialog).ids
    assert rejected == encode_dialog(tok, pref.rejected_dialog).ids
    assert chosen[-1] == rejected[-1] == tok.eos_id
    assert pair.rating == "better" and pair.dropped_tokens == 0


def test_encode_preference_truncates_the_shared_prompt_only(tok):
    pref = make_pref(MULTI[:-1], chosen="Forty-two, I believe, written in words.", rejected="No.")
    full_c = encode_dialog(tok, pref.chosen_dialog)
    pairs, stats = encode_preferences(tok, [pref], seq_len=len(full_c.ids) - 1)
    assert stats.truncated == 1
    (c, r), = [tuple(p) for p in pairs]
    assert len(c) <= len(full_c.ids) - 1 and len(r) <= len(full_c.ids) - 1
    n_prompt = len(encode_dialog(tok, [SYSTEM, *MULTI[3:-1]]).ids)  # the prompt without its first exchange
    # same prompt context for both, and each response intact at the end
    assert c[:n_prompt] == r[:n_prompt]
    assert c == encode_dialog(tok, [SYSTEM, *MULTI[3:-1], msg("assistant", pref.chosen)]).ids
    assert r == encode_dialog(tok, [SYSTEM, *MULTI[3:-1], msg("assistant", pref.rejected)]).ids
    assert pairs[0].dropped_exchanges == 1
    # a tight window cuts into the last prompt, the same tokens from both, never into a response
    answer_c = encode_dialog(tok, [msg("user", "x"), msg("assistant", pref.chosen)])
    n_resp = sum(answer_c.loss_mask)
    for seq_len in range(n_resp + 1, n_resp + 12):
        c, r = encode_preference(tok, pref, seq_len)
        assert len(c) <= seq_len and len(r) <= seq_len
        assert c[-n_resp:] == answer_c.ids[-n_resp:]
        assert c[:len(c) - n_resp] == r[:len(c) - n_resp]  # identical prompt context
    assert encode_preference(tok, pref, n_resp) is None  # the response alone fills the window
    assert encode_preference(tok, pref, len(full_c.ids) - 1, overflow="skip") is None


def test_collate_pairs_layout():
    pairs = [EncodedPair([1, 5, 6, 2], [1, 5, 2], "better"), EncodedPair([1, 7, 2], [1, 7, 8, 9, 2], "unsure")]
    right = collate_pairs(pairs)
    assert right["tokens"].tolist() == [[1, 5, 6, 2, 0], [1, 7, 2, 0, 0], [1, 5, 2, 0, 0], [1, 7, 8, 9, 2]]
    assert right["last_index"].tolist() == [3, 2, 2, 4]
    assert right["position_ids"][0].tolist()[:4] == [0, 1, 2, 3]
    assert right["ratings"] == ["better", "unsure"]
    left = collate_pairs([([1, 5, 6, 2], [1, 5, 2])], pad_id=0, side="left")
    assert left["tokens"].tolist() == [[1, 5, 6, 2], [0, 1, 5, 2]]
    assert left["position_ids"].tolist() == [[0, 1, 2, 3], [0, 0, 1, 2]]
    assert left["last_index"].tolist() == [3, 3]
    assert left["attention_mask"].tolist() == [[True] * 4, [False, True, True, True]]
    assert "ratings" not in left
    m = left["mask"][1]
    assert m[0].tolist() == [True, False, False, False]  # a padding query sees only itself
    assert m[3].tolist() == [False, True, True, True]  # a real query never sees padding
    v = torch.arange(8.0).reshape(2, 4)
    assert gather_last(v, torch.tensor([3, 1])).tolist() == [3.0, 5.0]


def test_gather_last_same_score_for_left_and_right_padding(tok):
    prefs = [make_pref([msg("user", "What is 6 x 7?")]), make_pref(MULTI[:3] + [msg("user", "Again?")],
                                                                  chosen="Yes.", rejected="I said: an assistant.")]
    pairs = [encode_preference(tok, p, 64) for p in prefs]
    seqs = [p.chosen for p in pairs] + [p.rejected for p in pairs]
    model = tiny_model(head="scalar")
    with torch.no_grad():
        alone = torch.stack([model(torch.tensor([s]))[0, -1] for s in seqs])  # (4,)
        scores = {}
        for side in ("right", "left"):
            b = collate_pairs(pairs, side=side)
            values = model(b["tokens"], mask=b["mask"], position_ids=b["position_ids"])  # (4, T)
            assert torch.isfinite(values).all()
            scores[side] = gather_last(values, b["last_index"])
    torch.testing.assert_close(scores["right"], alone, atol=1e-5, rtol=0)
    torch.testing.assert_close(scores["left"], alone, atol=1e-5, rtol=0)
    r_chosen, r_rejected = scores["left"].chunk(2)
    torch.testing.assert_close(r_chosen, alone[:2], atol=1e-5, rtol=0)
    torch.testing.assert_close(r_rejected, alone[2:], atol=1e-5, rtol=0)


# ------------------------------------------------------------------------------------------------ mixing, holdout


def prefs_of(kind: str, n: int) -> list[Preference]:
    return [Preference([msg("user", f"{kind} {i}")], "a", "b", "better", kind, source=f"{kind}:{i}")
            for i in range(n)]


def test_mix_helpfulness_equal_parts():
    prefs = prefs_of("helpfulness", 20) + prefs_of("safety", 50)
    mix = mix_preferences(prefs, "helpfulness", seed=0)
    kinds = Counter(p.kind for p in mix)
    assert kinds == {"helpfulness": 20, "safety": 20}
    assert {p.source for p in mix if p.kind == "helpfulness"} == {f"helpfulness:{i}" for i in range(20)}
    assert len({p.source for p in mix if p.kind == "safety"}) == 20  # without replacement
    again = mix_preferences(prefs, "helpfulness", seed=0)
    assert [p.source for p in again] == [p.source for p in mix]
    other = mix_preferences(prefs, "helpfulness", seed=1)
    assert [p.source for p in other] != [p.source for p in mix]


def test_mix_safety_90_10_and_options():
    prefs = prefs_of("safety", 90) + prefs_of("helpfulness", 50)
    mix = mix_preferences(prefs, "safety")
    assert Counter(p.kind for p in mix) == {"safety": 90, "helpfulness": 10}
    mix = mix_preferences(prefs, "safety", other_ratio=0.25)
    assert Counter(p.kind for p in mix) == {"safety": 90, "helpfulness": 30}
    assert Counter(p.kind for p in mix_preferences(prefs, "safety", other_ratio=0)) == {"safety": 90}
    # fewer others than asked: whole copies, then a sample without replacement
    mix = mix_preferences(prefs_of("helpfulness", 10) + prefs_of("safety", 3), "helpfulness")
    counts = Counter(p.source for p in mix if p.kind == "safety")
    assert sum(counts.values()) == 10 and set(counts.values()) <= {3, 4}
    with pytest.raises(ValueError, match="there are none"):
        mix_preferences(prefs_of("safety", 5), "safety")
    with pytest.raises(ValueError, match="other_ratio"):
        mix_preferences(prefs, "safety", other_ratio=1.0)


def test_split_holdout():
    items = list(range(100))
    train, held = split_holdout(items, 0.1, seed=3)
    assert len(held) == 10 and len(train) == 90
    assert sorted(train + held) == items and train == sorted(train) and held == sorted(held)
    assert split_holdout(items, 0.1, seed=3) == (train, held)
    assert split_holdout(items, 0.1, seed=4)[1] != held
    assert split_holdout(items[:5], 0.01, seed=0)[1] != []  # never an empty test set by rounding
    assert split_holdout(items, 0.0, seed=0) == (items, [])
    with pytest.raises(ValueError):
        split_holdout(items, 1.5, seed=0)
