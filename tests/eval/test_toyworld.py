"""llama2 eval --tasks toyworld on a checkpoint that is not inside a pipeline run, and the readers' errors."""
import json
import math

import pytest

from llama2.toyworld import pipeline_world
from llama2.data.records import read_eval_items
from llama2.eval.toyworld import read_pipeline_marker, toyworld_suite


def test_a_checkpoint_outside_a_pipeline_run_is_scored_on_the_default_world(tiny_policy):
    """No pipeline.json above the checkpoint: seed 0 and the default size (this used to pass seed=None on and
    fail); a fractional limit takes that share of the items, as lm-eval's --limit does."""
    r = toyworld_suite(tiny_policy, limit=3, max_new_tokens=4)
    assert set(r["accuracy"]) == {"knowledge", "reading", "math", "commonsense", "code"}
    assert r["n"]["total"] == 3
    n_items = len(pipeline_world(0, "default").data()["eval"])
    few = toyworld_suite(tiny_policy, limit=0.02, max_new_tokens=2)
    assert few["n"]["total"] == math.ceil(0.02 * n_items) < n_items  # 2% of the items, not all of them


def test_bad_files_are_named_with_their_line(tmp_path):
    bad = tmp_path / "eval.jsonl"
    bad.write_text(json.dumps({"dialog": [{"role": "user", "content": "hi"}], "category": "math"}) + "\n{oops\n")
    with pytest.raises(ValueError, match=r"eval.jsonl:2: not valid JSON"):
        read_eval_items(bad)
    bad.write_text(json.dumps({"category": "math"}) + "\n")
    with pytest.raises(ValueError, match=r"eval.jsonl:1: .*dialog"):
        read_eval_items(bad)
    marker = tmp_path / "pipeline.json"
    marker.write_text("[1]")
    with pytest.raises(ValueError, match="pipeline.json: not a pipeline marker"):
        read_pipeline_marker(marker)
