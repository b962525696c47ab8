"""The Ghost Attention stage end to end on a tiny model: the instruction on every user turn while sampling, only
in the system message of the training data, only passing answers kept; and the turn-by-turn evaluation."""
import json

import pytest
import torch

from llama2 import Llama
from llama2.rlhf.gatt import Instruction
from llama2.train import gatt as stage
from llama2.eval.gatt import GattEvalConfig, gatt_eval
from llama2.train.gatt import GattConfig, gatt

TEXT = "Use the letter e."
RULE = Instruction("test", "e", TEXT, "Letter: e", check=lambda a: "e" in a)


@pytest.fixture
def setup(tmp_path, tiny_tokenizer, tiny_policy, monkeypatch):
    torch.set_num_threads(1)
    tok = tiny_tokenizer
    dialogs = tmp_path / "d.jsonl"
    dialogs.write_text("".join(json.dumps({"dialog": [{"role": "user", "content": f"Tell me about {w}."},
                                                      {"role": "assistant", "content": "Fine."},
                                                      {"role": "user", "content": f"And {w} again?"},
                                                      {"role": "assistant", "content": "Yes."}]}) + "\n"
                               for w in ["Ada", "Bob", "the sea", "tea"]))
    # a rule a random tiny model meets about half the time, so both branches (kept, ended early) are exercised
    monkeypatch.setattr(stage, "sample_instruction", lambda rng, *a, **k: (RULE, TEXT))
    yield tok, tmp_path
    torch.set_num_threads(2)


def test_sampling_data_and_fine_tuning(setup):
    tok, tmp = setup
    cfg = GattConfig(dialogs=str(tmp / "d.jsonl"), init_from=str(tmp / "policy"), out=str(tmp / "g"), turns=3, k=3,
                     max_new_tokens=6, temperature=1.0, seq_len=128, batch_size=4, micro_batch=2, epochs=1, lr=1e-3,
                     tensorboard=False)
    result = gatt(cfg)
    counts = result["counts"]
    samples = [json.loads(l) for l in (tmp / "g" / "samples.jsonl").read_text().splitlines()]
    data = [json.loads(l)["dialog"] for l in (tmp / "g" / "gatt_data.jsonl").read_text().splitlines()]
    # packed (the default): every kept answer trained once, in windows of consecutive turns
    trained = sum(m["role"] == "assistant" for d in data for m in d)
    assert counts["turns_kept"] == sum(len(s["dialog"]) // 2 for s in samples) == trained == counts["examples"] > 0
    assert len(data) <= trained
    for s in samples:  # sampling: the instruction before every user message; every kept answer follows it
        assert all(m["content"].startswith(TEXT + "\n") for m in s["dialog"] if m["role"] == "user")
        assert all(RULE.check(m["content"]) for m in s["dialog"] if m["role"] == "assistant")
    for d in data:  # training: the instruction only as the system message
        assert d[0] == {"role": "system", "content": TEXT}
        assert all(TEXT not in m["content"] for m in d[1:])
        assert d[-1]["role"] == "assistant"
    assert len(result["history"]) >= 1 and Llama.from_pretrained(tmp / "g").model is not None
    # a rerun refuses to start over the finished run; resuming does not sample again; overwrite samples anew
    from dataclasses import replace

    with pytest.raises(FileExistsError, match="already holds a run"):
        gatt(cfg)
    assert gatt(replace(cfg, resume=True))["counts"] == {}
    with pytest.raises(ValueError, match="written with every_turn=True, pack=True"):  # its data holds packed windows
        gatt(replace(cfg, resume=True, pack=False))
    assert gatt(replace(cfg, overwrite=True))["counts"]["turns_sampled"] == counts["turns_sampled"]


def test_eval_reports_adherence_per_turn(setup):
    tok, tmp = setup
    res = gatt_eval(GattEvalConfig(ckpts=[str(tmp / "policy"), str(tmp / "policy")], names=["a", "b"],
                                   dialogs=str(tmp / "d.jsonl"), out=str(tmp / "ev"), n=4, turns=5, max_new_tokens=4))
    assert res["turns"] == [1, 2, 3, 4, 5]
    assert res["adherence"]["a"] == res["adherence"]["b"]  # greedy: the same model gives the same answers
    assert all(0 <= x <= 1 for x in res["adherence"]["a"])
    assert (tmp / "ev" / "gatt_adherence.png").stat().st_size > 1000
    saved = json.loads((tmp / "ev" / "gatt_eval.json").read_text())
    assert saved["adherence"] == res["adherence"]


def test_sampling_uses_the_full_instruction_and_only_training_shortens_it(setup, monkeypatch):
    """§3.3: the instruction is concatenated in full to every user message while sampling; only the training data's
    first turn may carry its short form."""
    tok, tmp = setup
    monkeypatch.setattr(stage, "sample_instruction", lambda rng, *a, **k: (RULE, RULE.short))  # the short draw
    cfg = GattConfig(dialogs=str(tmp / "d.jsonl"), init_from=str(tmp / "policy"), out=str(tmp / "s"), turns=2, k=3,
                     max_new_tokens=6, temperature=1.0, seq_len=128, batch_size=4, micro_batch=2, epochs=1, lr=1e-3,
                     tensorboard=False)
    gatt(cfg)
    samples = [json.loads(l) for l in (tmp / "s" / "samples.jsonl").read_text().splitlines()]
    data = [json.loads(l)["dialog"] for l in (tmp / "s" / "gatt_data.jsonl").read_text().splitlines()]
    assert samples and data
    for s in samples:
        assert all(m["content"].startswith(RULE.long + "\n") for m in s["dialog"] if m["role"] == "user")
    for d in data:
        assert d[0] == {"role": "system", "content": RULE.short}
        assert all(RULE.long not in m["content"] and RULE.short not in m["content"] for m in d[1:])


def test_a_failed_turn_is_retried_with_another_user_message(setup, monkeypatch):
    """``retries``: a turn whose k samples all break the instruction is tried again with another message from the pool,
    so a hard turn does not end the dialog (without retries it does, and later turns hold only easy dialogs)."""
    from types import SimpleNamespace

    from llama2.data.records import read_dialogs

    tok, tmp = setup

    def fake_sampler(model, tokenizer, contexts, sampling, k=1, **kw):  # follows the rule except when asked about Bob
        return [[SimpleNamespace(text="no" if "Bob" in ctx[-1]["content"] else "yes") for _ in range(k)]
                for ctx in contexts]

    monkeypatch.setattr(stage, "draw_answers", fake_sampler)
    dialogs = list(read_dialogs(str(tmp / "d.jsonl")))
    runs = {}
    for retries in (0, 4):
        cfg = GattConfig(dialogs=str(tmp / "d.jsonl"), turns=6, k=2, retries=retries, seed=3)
        runs[retries] = stage.sample_gatt_dialogs(None, None, dialogs, cfg, None, show=False)
    (_, plain_counts), (retried, retried_counts) = runs[0], runs[4]
    assert plain_counts["ended_early"] >= 1 and plain_counts["retried"] == 0  # the Bob dialog ends at its first turn
    assert retried_counts["retried"] >= 1 and retried_counts["ended_early"] < plain_counts["ended_early"]
    assert retried_counts["turns_kept"] > plain_counts["turns_kept"]
    pool = {m["content"] for d in dialogs for m in d if m["role"] == "user"}
    for s in retried:  # kept turns follow the rule; a replaced message is one of the pool's
        users = [m["content"].split("\n", 1)[1] for m in s["dialog"] if m["role"] == "user"]
        assert all("Bob" not in u and u in pool for u in users)
        assert all(m["content"] == "yes" for m in s["dialog"] if m["role"] == "assistant")
