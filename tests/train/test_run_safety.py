"""Nothing lost, nothing mixed: one run per output directory (a lock, and no new run over an old one without
resume=true or overwrite=true), debris of an interrupted write removed at the next start, resume falling back past a
corrupt checkpoint, and training killed with SIGKILL at several points resuming to the uninterrupted result."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from llama2.train.pretrain import PretrainConfig, pretrain
from llama2.train.state import RunLock, RunLocked, latest_checkpoint, verify_checkpoint

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.usefixtures("one_thread")


def cfg(shards, out, **kw):
    base = dict(data=str(shards), out=str(out), model="toy-tiny", seq_len=32, micro_batch=4, batch_tokens=128,
                max_steps=6, save_every=2, eval_every=0, warmup_steps=1, lr=3e-3, keep_last=10, tensorboard=False)
    return PretrainConfig(**{**base, **kw})


def test_a_second_run_on_the_same_out_refuses_and_overwrite_removes_only_the_runs_files(pretrain_shards, tmp_path):
    out = tmp_path / "run"
    pretrain(cfg(pretrain_shards, out, max_steps=2))
    (out / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="already holds a run.*resume=true.*overwrite=true"):
        pretrain(cfg(pretrain_shards, out, max_steps=2))
    hist = pretrain(cfg(pretrain_shards, out, max_steps=2, overwrite=True))["history"]
    assert [r["step"] for r in hist] == [1, 2]
    assert (out / "notes.txt").read_text() == "mine"  # not the run's: kept
    steps = [json.loads(l)["step"] for l in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2]  # the earlier run's records are gone, not interleaved


def test_a_live_run_holds_its_out(tmp_path):
    out = tmp_path / "locked"
    code = ("import sys, time; from llama2.train.state import RunLock; RunLock(sys.argv[1], 'pretrain').acquire(); "
            "print('held', flush=True); time.sleep(30)")
    p = subprocess.Popen([sys.executable, "-c", code, str(out)], stdout=subprocess.PIPE, text=True,
                         env=dict(os.environ, PYTHONPATH=str(ROOT)))
    try:
        assert p.stdout.readline().strip() == "held"
        with pytest.raises(RunLocked, match=rf"in use by pretrain pid {p.pid}"):
            RunLock(out).acquire()
    finally:
        p.kill()
        p.wait()
    RunLock(out).acquire().release()  # the holder died: its lock went with it


def test_resume_skips_a_corrupt_newest_checkpoint_and_debris_is_removed(pretrain_shards, tmp_path, capsys):
    out = tmp_path / "c"
    full = pretrain(cfg(pretrain_shards, out, max_steps=4))["history"]
    newest = out / "checkpoints" / "step_000004"
    data = newest / "model.safetensors"
    raw = bytearray(data.read_bytes())
    raw[len(raw) // 2] ^= 0xFF  # one flipped byte inside a tensor
    data.write_bytes(bytes(raw))
    assert "checksum" in verify_checkpoint(newest)
    assert latest_checkpoint(out) == out / "checkpoints" / "step_000002"
    (out / "checkpoints" / ".step_000006.tmp-abc").mkdir()  # a save killed half-way
    (out / "llama2.json.tmp").write_text("{")  # a copy into OUT killed half-way
    resumed = pretrain(cfg(pretrain_shards, out, max_steps=4, resume=True))["history"]
    err = capsys.readouterr().err
    assert "skipping step_000004" in err and "leftovers" in err
    assert [r["step"] for r in resumed] == [3, 4] and [r["loss"] for r in resumed] == [r["loss"] for r in full[2:]]
    assert not list((out / "checkpoints").glob(".step_*")) and not list(out.glob("*.tmp"))


@pytest.mark.parametrize("kill_after_lines", [1, 3])
def test_sigkill_at_any_point_resumes_to_the_uninterrupted_run(pretrain_shards, tmp_path, kill_after_lines, cli_overrides):
    ref = pretrain(cfg(pretrain_shards, tmp_path / "ref", max_steps=6))["history"]
    out = tmp_path / "killed"
    args = cli_overrides(cfg(pretrain_shards, out, max_steps=6))
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    p = subprocess.Popen([sys.executable, "-m", "llama2.cli", "pretrain", *args], stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL, env=env)
    metrics, deadline = out / "metrics.jsonl", time.time() + 120
    while time.time() < deadline and p.poll() is None:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= kill_after_lines:
            break
        time.sleep(0.01)
    p.send_signal(signal.SIGKILL)
    p.wait()
    assert p.returncode == -signal.SIGKILL  # killed mid-run, not finished before the kill
    assert len(metrics.read_text().splitlines()) < 6
    hist = pretrain(cfg(pretrain_shards, out, max_steps=6, resume=True))["history"]
    logged = [json.loads(l) for l in metrics.read_text().splitlines()]
    assert [r["step"] for r in logged] == list(range(1, 7))  # every step once, none twice
    assert [r["loss"] for r in logged] == [r["loss"] for r in ref]  # bit-equal to the run that was never killed
    assert hist[-1]["step"] == 6
    assert not list((out / "checkpoints").glob(".step_*")) and not list(out.glob("*.tmp"))
