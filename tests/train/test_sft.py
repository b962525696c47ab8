"""Supervised fine-tuning: loss on answers only, packed dialogs, exact resume, and a tiny model that learns a
handful of dialogs well enough to answer them in `llama2 chat` greedily."""
import io
import json
import shutil
import sys

import pytest

from llama2.cli import main
from llama2.data import IGNORE_INDEX, collate, encode_sft_examples, pack_sft
from llama2.tokenizer import Tokenizer
from llama2.train.sft import SFTConfig, sft, step_rows

DIALOGS = [
    [{"role": "user", "content": "What colour is the sky?"}, {"role": "assistant", "content": "The sky is blue."}],
    [{"role": "user", "content": "Who wrote the letter?"}, {"role": "assistant", "content": "Ada wrote the letter."}],
    [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "Name a fruit."},
     {"role": "assistant", "content": "An apple."}],
    [{"role": "user", "content": "Count to three."}, {"role": "assistant", "content": "One, two, three."},
     {"role": "user", "content": "And back?"}, {"role": "assistant", "content": "Three, two, one."}],
]


@pytest.fixture
def data(tmp_path, pretrain_shards):
    path = tmp_path / "dialogs.jsonl"
    path.write_text("".join(json.dumps({"dialog": d}) + "\n" for d in DIALOGS))
    return path, pretrain_shards.parent / "tok.model"


def settings(data, out, **kw):
    path, tok = data
    base = dict(data=str(path), tokenizer=str(tok), out=str(out), model="toy-tiny", seq_len=96, batch_size=4,
                micro_batch=2, epochs=120, lr=3e-3, warmup_steps=5, val_fraction=0, save_every=10_000, tensorboard=False)
    base.update(kw)
    return SFTConfig(**base)


def test_the_loss_counts_answer_tokens_only(data):
    path, tok = data
    tok = Tokenizer.from_file(tok)
    ex, stats = encode_sft_examples(tok, DIALOGS, 96)
    assert stats.kept == 4
    b = collate(pack_sft(ex, 96))
    runs = []  # maximal runs of consecutive positions that carry loss, row by row
    for row in b["targets"].tolist():
        for t, prev in zip(row, [IGNORE_INDEX] + row[:-1]):
            if t != IGNORE_INDEX:
                runs.append([t]) if prev == IGNORE_INDEX else runs[-1].append(t)
    answers = [m["content"] for d in DIALOGS for m in d if m["role"] == "assistant"]
    assert all(r[-1] == tok.eos_id and tok.eos_id not in r[:-1] for r in runs)  # each answer ends with its EOS
    assert sorted(tok.decode(r[:-1]).strip() for r in runs) == sorted(answers)  # the answers, nothing else


def test_rows_stream_covers_each_epoch_once():
    rows = [i for s in range(5) for i in step_rows(10, 4, seed=3, step=s)]  # 20 positions = 2 epochs
    assert sorted(rows[:10]) == list(range(10)) and sorted(rows[10:]) == list(range(10))
    assert rows[:10] != rows[10:]  # a new order each epoch


def test_tiny_model_learns_the_dialogs_and_chat_answers_them(data, tmp_path, monkeypatch, capsys):
    result = sft(settings(data, tmp_path / "m"))
    hist = result["history"]
    assert hist[-1]["loss"] < 0.05 < hist[0]["loss"]
    # multi-turn: the second answer depends on the first exchange, kept in the dialog by `llama2 chat`
    monkeypatch.setattr(sys, "stdin", io.StringIO("Count to three.\nAnd back?\n/reset\nWho wrote the letter?\n/exit\n"))
    main(["chat", "--ckpt", str(tmp_path / "m"), "temperature=0", "max_new_tokens=16"])
    said = [l.strip() for l in capsys.readouterr().out.splitlines() if l.strip()]
    assert said == ["One, two, three.", "Three, two, one.", "Ada wrote the letter."]
    # with a system prompt, as it was trained
    monkeypatch.setattr(sys, "stdin", io.StringIO("Name a fruit.\n"))
    main(["chat", "--ckpt", str(tmp_path / "m"), "--system", "Answer briefly.", "temperature=0", "max_new_tokens=16"])
    assert capsys.readouterr().out.strip() == "An apple."


def test_resume_is_exact(data, tmp_path):
    full = sft(settings(data, tmp_path / "a", epochs=4, save_every=2, keep_last=5))["history"]
    (tmp_path / "b" / "checkpoints").mkdir(parents=True)
    shutil.copytree(tmp_path / "a" / "checkpoints" / "step_000002", tmp_path / "b" / "checkpoints" / "step_000002")
    resumed = sft(settings(data, tmp_path / "b", epochs=4, save_every=2, resume=True))["history"]
    assert [r["step"] for r in resumed] == [3, 4]
    assert [r["loss"] for r in resumed] == [r["loss"] for r in full[2:]]


def test_bad_settings(data, tmp_path):
    with pytest.raises(ValueError, match="multiple"):
        sft(settings(data, tmp_path / "x", batch_size=3))
    with pytest.raises(ValueError, match="init_from"):
        sft(settings(data, tmp_path / "x", tokenizer=""))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"dialog": [{"role": "user", "content": "hi"}]}\n')
    with pytest.raises(ValueError, match="bad.jsonl:1"):
        sft(settings((bad, data[1]), tmp_path / "x"))


def test_loss_on_last_answer_only_for_ghost_attention(data):
    from llama2.train.sft import last_answer_only

    tok = Tokenizer.from_file(data[1])
    ex, _ = encode_sft_examples(tok, [DIALOGS[3]], 96)
    full, last = ex[0], last_answer_only(ex[0])
    kept = [t for t, m in zip(last.ids, last.loss_mask) if m]
    assert tok.decode(kept[:-1]).strip() == "Three, two, one." and kept[-1] == tok.eos_id
    assert sum(last.loss_mask) < sum(full.loss_mask)  # the first answer no longer counts
