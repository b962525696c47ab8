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
    for d in ("world", "tokenizer", "shards", "pretrain", "sft", "rlhf", "rlhf/v1", "rlhf/v2", "ppo", "gatt", "eval", "report"):
        assert (out / d / "DONE").is_file(), d
    text = report.read_text()
    m = json.loads((out / "metrics.json").read_text())
    assert len(m["effects"]) == 8 and all(isinstance(e["holds"], bool) for e in m["effects"])
    for e in m["effects"]:  # each effect is stated plainly, yes or NO, with its numbers
        assert e["claim"] in text and e["detail"] in text
    assert set(m["reward_models"]) == {"helpfulness RM (no margin)", "helpfulness RM (margin)", "safety RM (no margin)",
                                       "safety RM (margin)"}
    assert list(m["stages"]) == ["SFT", "RS v2", "PPO", "GAtt (final)"]
    assert set(m["compare"]) == {"RS v2 vs SFT", "PPO vs SFT", "GAtt (final) vs SFT"}
    n_items = len((out / "world" / "eval.jsonl").read_text().splitlines())
    for c in m["compare"].values():  # every model answered every item twice, compared answer for answer
        h = c["head_to_head"]
        assert h["win"] + h["tie"] + h["loss"] == h["answers"] == 2 * n_items and h["n"] == n_items
        assert h["low95"] <= h["rate"] <= h["high95"]
        assert c["helpfulness"]["n"] > 0 and set(c["accuracy"]) == {"knowledge", "reading", "math", "commonsense", "code"}
    sel = m["selection"]
    assert sel["k"] == 4 and all(a <= b + 1e-9 for a, b in zip(sel["judge_of_rm_pick"], sel["judge_max"]))
    assert all(a <= b + 1e-9 for a, b in zip(sel["judge_max"], sel["judge_max"][1:]))  # the oracle's max only grows
    assert set(m["rm_fresh"]) == {"v1", "v2"} and any("RM v1" in k for k in m["rm_fresh"]["v2"])  # v1's RMs on v2's pairs
    assert set(m["rs_selection"]) == {"v1", "v2"} and 0 <= m["rs_selection"]["v1"]["pass_at_k"] <= 1
    assert m["ppo"] and {"reward", "kl", "clip_fraction", "entropy", "explained_variance", "adv_reward_corr_safety",
                         "adv_reward_corr_other"} <= set(m["ppo"][0])
    # PPO chose its checkpoint on the validation prompts, never the evaluation's
    assert json.loads((out / "ppo" / "ppo_config.json").read_text())["val_prompts"] == str(out / "world" / "prompts_val.jsonl")
    # each version annotated the latest model's answers to new prompts: the versions split the world's prompts
    p1 = (out / "rlhf" / "v1" / "prompts.jsonl").read_text().splitlines()
    p2 = (out / "rlhf" / "v2" / "prompts.jsonl").read_text().splitlines()
    every = (out / "world" / "prompts.jsonl").read_text().splitlines()
    assert p1 and p2 and p1 == every[0::2] and p2 == every[1::2]
    assert len(m["gatt"]["adherence"]["with GAtt"]) == 20
    for png in ("loss", "reward", "stages", "gatt", "winrate", "ppo"):
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


def test_a_stopped_stage_stops_the_pipeline_before_it_is_marked_done(tmp_path, monkeypatch):
    import llama2.pipeline as pipeline
    from llama2.pipeline import Ctx, size_settings, stage_pretrain
    from llama2.toyworld import ToyWorld

    monkeypatch.setattr(pipeline, "pretrain", lambda cfg: {"stopped": True, "history": []})
    c = Ctx(tmp_path, "quick", 0, size_settings("quick"), ToyWorld(0, "quick"))
    with pytest.raises(SystemExit) as e:
        stage_pretrain(c)
    assert e.value.code == 130 and not (tmp_path / "pretrain" / "DONE").exists()


def test_overrides_name_a_stage_and_a_field():
    from llama2.config import ConfigError
    from llama2.pipeline import parse_overrides

    assert parse_overrides(["ppo.kl_beta=0.02", "sft.lr=1e-4", "ppo.clip=0.1"]) == {"ppo": ["kl_beta=0.02", "clip=0.1"],
                                                                                  "sft": ["lr=1e-4"]}
    for bad, match in (("kl_beta=0.02", "STAGE.FIELD"), ("ppo.nope=1", "unknown field"), ("ppo.kl_beta=-1", "kl_beta"),
                       ("world.seed=1", "STAGE.FIELD")):
        with pytest.raises(ConfigError, match=match):
            parse_overrides([bad])


def test_eval_toyworld_judges_a_pipeline_model_as_the_report_does(run):
    """`llama2 eval --tasks toyworld` on a pipeline's checkpoint rebuilds that run's world and scores it the same."""
    from llama2.eval.toyworld import toyworld_suite

    out, _, _ = run
    m = json.loads((out / "metrics.json").read_text())
    r = toyworld_suite(out / "sft")
    assert r["accuracy"] == m["stages"]["SFT"]["accuracy"] and r["n"] == m["stages"]["SFT"]["n"]


@pytest.mark.parametrize("size", ["quick", "default", "large"])
def test_every_size_builds_valid_stage_configs(size, tmp_path):
    """Each size's settings name real fields with valid values (the large size runs only on a GPU, so this is what
    CI can check of it)."""
    from llama2.pipeline import CONFIGS, Ctx, size_settings
    from llama2.toyworld import PIPELINE_WORLDS

    s = size_settings(size)
    assert s["world"] in PIPELINE_WORLDS and len(s["rejection"]["temperatures"]) == s["versions"]
    c = Ctx(tmp_path, size, 0, s, world=None)
    for stage, cls in CONFIGS.items():
        values = {k: v for k, v in s[stage].items() if k != "temperatures"} if stage in s else {}
        cfg = c.config(cls, stage, **values)
        assert cfg.run.seed == 0 and cfg.run.device == "cpu"


def test_cli_stage_names_are_the_pipelines():
    """`llama2 pipeline --from` offers exactly the pipeline's stages, plus aliases that map onto one of them."""
    from llama2.cli import build_parser
    from llama2.pipeline import ALIASES

    sub = next(a for a in build_parser()._actions if a.dest == "command").choices["pipeline"]
    choices = next(a for a in sub._actions if a.dest == "from_stage").choices
    assert tuple(choices) == STAGES + tuple(ALIASES) and set(ALIASES.values()) <= set(STAGES)


def test_a_size_file_is_checked_and_named_in_its_errors(tmp_path):
    """--size takes a YAML file of a size's settings; a missing key, an unknown one or a file that is not a mapping
    is an error naming the file."""
    import yaml

    from llama2.pipeline import SIZE_NAMES, size_settings

    mine = tmp_path / "mine.yaml"
    mine.write_text(yaml.safe_dump(size_settings("quick")))
    assert size_settings(str(mine)) == size_settings("quick") and SIZE_NAMES == ("quick", "default", "large")
    for text, match in (("[1, 2]", "expected a mapping"), ("world: quick\n", "missing"), ("{{", "not valid YAML")):
        mine.write_text(text)
        with pytest.raises(ValueError, match=f"{mine.name}.*{match}"):
            size_settings(str(mine))
    with pytest.raises(ValueError, match="no such file"):
        size_settings("tiny")


def test_the_oracle_run_scores_with_the_judges_and_the_report_compares_against_it(run, tmp_path):
    """`--reward judges`: rejection sampling and PPO scored by the world's exact judges (no reward models trained);
    a run's report then reads the oracle's comparison (`--oracle DIR`)."""
    out, _, _ = run
    oracle = tmp_path / "oracle"
    run_pipeline(oracle, quick=True, reward="judges")
    assert not (oracle / "rlhf" / "v1" / "reward").exists() and (oracle / "rlhf" / "v2" / "DONE").is_file()
    om = json.loads((oracle / "metrics.json").read_text())
    assert om["reward"] == "judges" and not om["reward_models"] and "selection" not in om
    kept = [json.loads(x) for x in (oracle / "rlhf" / "v1" / "rejection" / "iter_1" / "kept.jsonl").read_text().splitlines()]
    samples = [json.loads(x) for x in (oracle / "rlhf" / "v1" / "rejection" / "iter_1" / "samples.jsonl").read_text().splitlines()]
    from llama2.pipeline import size_settings
    from llama2.toyworld import pipeline_world

    world = pipeline_world(0, size_settings("quick")["world"])
    s = samples[0]
    judged = world.reward([s["prompt"]] * len(s["samples"]), [x["text"] for x in s["samples"]]).tolist()
    assert [x["score"] for x in s["samples"]] == pytest.approx(judged)  # the judges scored the samples
    assert kept and all(0 < r["score"] < 1 for r in kept)
    with pytest.raises(ValueError, match="scored by models"):
        run_pipeline(out, quick=True, oracle=out)  # a run scored by reward models is no oracle
    run_pipeline(out, quick=True, from_stage="report", oracle=oracle)
    m = json.loads((out / "metrics.json").read_text())
    assert m["oracle"]["run"] == str(oracle) and "the oracle:" in m["effects"][5]["detail"]
    assert "The oracle" in (out / "report.md").read_text()
