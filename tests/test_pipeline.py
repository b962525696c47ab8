"""`llama2 pipeline --quick` end to end: every stage runs through its ordinary code on the toy world's files, the
report states each expected effect with its measured numbers, and a rerun skips every finished stage."""
import json
import time

import pytest

from llama2.pipeline import STAGES, run_pipeline


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("pipe") / "toy"
    t0 = time.time()
    report = run_pipeline(out, quick=True)
    return out, report, time.time() - t0


def test_quick_run_writes_every_stage_and_the_report(run):
    out, report, seconds = run
    print(f"pipeline --quick took {seconds:.0f} s")
    for d in ("world", "tokenizer", "shards", "pretrain", "sft", "reward", "rejection", "ppo", "gatt", "eval", "report"):
        assert (out / d / "DONE").is_file(), d
    text = report.read_text()
    m = json.loads((out / "metrics.json").read_text())
    assert len(m["effects"]) == 5 and all(isinstance(e["holds"], bool) for e in m["effects"])
    for e in m["effects"]:  # each effect is stated plainly, yes or NO, with its numbers
        assert e["claim"] in text and e["detail"] in text
    assert set(m["reward_models"]) == {"helpfulness RM (no margin)", "helpfulness RM (margin)", "safety RM (no margin)",
                                       "safety RM (margin)"}
    assert list(m["stages"])[:1] == ["SFT"] and "PPO" in m["stages"] and any(k.startswith("RS") for k in m["stages"])
    assert len(m["gatt"]["adherence"]["with GAtt"]) == 20
    for png in ("loss", "reward", "stages", "gatt"):
        assert (out / "report" / f"{png}.png").stat().st_size > 1000
    assert (out / "final" / "llama2.json").is_file()


def test_rerun_skips_finished_stages_and_from_redoes_the_tail(run, capsys):
    out, report, _ = run
    t0 = time.time()
    run_pipeline(out, quick=True)
    assert time.time() - t0 < 30
    err = capsys.readouterr().err
    assert err.count("done, skipped") == len(STAGES)
    before = (out / "report" / "DONE").stat().st_mtime_ns
    run_pipeline(out, quick=True, from_stage="report")
    assert (out / "report" / "DONE").stat().st_mtime_ns != before and (out / "eval" / "DONE").is_file()
    with pytest.raises(ValueError, match="quick run"):
        run_pipeline(out, quick=False)
