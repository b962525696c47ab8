"""Pretraining: the paper's schedule, exact resume, and an output directory that loads as a model."""
import json
import math
import shutil
from pathlib import Path

import pytest
import torch

from llama2 import Llama
from llama2.train.loop import lr_at, make_optimizer
from llama2.train.pretrain import PretrainConfig, pretrain


def test_schedule_follows_the_paper():
    peak, warm, total = 3e-4, 2000, 10000
    assert lr_at(0, peak, warm, total) == pytest.approx(peak / warm)
    assert lr_at(warm - 1, peak, warm, total) == pytest.approx(peak)
    mid = warm + (total - warm) // 2
    assert lr_at(mid, peak, warm, total) == pytest.approx(peak * (0.1 + 0.9 * 0.5))
    assert lr_at(total, peak, warm, total) == pytest.approx(0.1 * peak)  # decays to 10% of the peak
    lrs = [lr_at(s, peak, warm, total) for s in range(warm, total + 1, 100)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))


def test_optimizer_is_the_papers_adamw():
    from llama2 import ModelArgs, Transformer

    m = Transformer(ModelArgs.from_preset("toy-tiny"))
    opt = make_optimizer(m, 3e-4)
    decayed, plain = opt.param_groups
    assert decayed["weight_decay"] == 0.1 and plain["weight_decay"] == 0.0
    assert decayed["betas"] == (0.9, 0.95) and decayed["eps"] == 1e-5
    assert all(p.dim() == 2 for p in decayed["params"]) and all(p.dim() == 1 for p in plain["params"])


@pytest.fixture
def shards(pretrain_shards):
    return pretrain_shards


def cfg(shards, out, **kw):
    base = dict(data=str(shards), out=str(out), model="toy-tiny", seq_len=64, micro_batch=4, batch_tokens=512,
                max_steps=8, save_every=4, eval_every=4, warmup_steps=2, lr=3e-3, keep_last=3)
    base.update(kw)
    return PretrainConfig(**base)


def test_resume_reproduces_the_uninterrupted_run_exactly(shards, tmp_path):
    full = pretrain(cfg(shards, tmp_path / "a"))["history"]
    assert full[-1]["loss"] < full[0]["loss"] - 0.5
    assert len(full) == 8 and {"val_loss", "val_ppl"} <= set(full[3])
    # a run killed after step 4: only its step-4 checkpoint survives
    (tmp_path / "b" / "checkpoints").mkdir(parents=True)
    shutil.copytree(tmp_path / "a" / "checkpoints" / "step_000004", tmp_path / "b" / "checkpoints" / "step_000004")
    resumed = pretrain(cfg(shards, tmp_path / "b", resume=True))["history"]
    assert [r["step"] for r in resumed] == [5, 6, 7, 8]
    assert [r["loss"] for r in resumed] == [r["loss"] for r in full[4:]]  # exact on CPU
    a = Llama.from_pretrained(tmp_path / "a").model.state_dict()
    b = Llama.from_pretrained(tmp_path / "b").model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_output_is_a_loadable_model_with_metrics(shards, tmp_path):
    pretrain(cfg(shards, tmp_path / "o", max_steps=4))
    llama = Llama.from_pretrained(tmp_path / "o")
    assert llama.tokenizer is not None and llama.text_completion(["Ada"], temperature=0, max_new_tokens=3)
    recs = [json.loads(l) for l in (tmp_path / "o" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in recs] == [1, 2, 3, 4]
    assert all(math.isfinite(r["loss"]) and r["lr"] > 0 and r["tokens_per_s"] > 0 for r in recs)
    assert all(0 < r["mfu"] < 1 and r["peak_mem_gib"] > 0 for r in recs)
    # the same records for TensorBoard
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ea = EventAccumulator(str(tmp_path / "o" / "tb"))
    ea.Reload()
    assert [e.step for e in ea.Scalars("loss")] == [1, 2, 3, 4]
    assert [e.value for e in ea.Scalars("loss")] == pytest.approx([r["loss"] for r in recs])


def test_bad_settings_are_rejected(shards, tmp_path):
    with pytest.raises(ValueError, match="multiple"):
        pretrain(cfg(shards, tmp_path / "x", batch_tokens=500))
    with pytest.raises(ValueError, match="manifest"):
        pretrain(cfg(tmp_path, tmp_path / "x"))


def test_ctrl_c_saves_the_last_step_and_resumes(shards, tmp_path, cli_overrides):
    import os
    import signal
    import subprocess
    import sys
    import time

    out = tmp_path / "int"
    args = cli_overrides(cfg(shards, out, max_steps=10_000, save_every=10_000, eval_every=0, tensorboard=False))
    p = subprocess.Popen([sys.executable, "-m", "llama2.cli", "pretrain", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True, env=dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[2])))
    metrics = out / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and (not metrics.exists() or len(metrics.read_text().splitlines()) < 3):
        time.sleep(0.2)
    p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=120)
    assert p.returncode == 130, err[-2000:]
    done = len(metrics.read_text().splitlines())
    assert (out / "checkpoints" / f"step_{done:06d}" / "trainer_state.pt").is_file(), err[-2000:]
    assert Llama.from_pretrained(out).model is not None
    resumed = pretrain(cfg(shards, out, max_steps=done + 2, resume=True, tensorboard=False))["history"]
    assert [r["step"] for r in resumed] == [done + 1, done + 2]
