"""Property-based tests (hypothesis): the JSONL readers and the config loader never fail other than with their own
one-line errors, whatever the input; the tokenizer gives back every valid text it is given, and refuses invalid
Unicode with an error that says so."""
import json
import string

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from llama2.config import ConfigError, load_config
from llama2.data import read_dialogs, read_preferences, read_prompts
from llama2.train.sft import SFTConfig

SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.sampled_from(["role", "content", "dialog", "prompt",
                                                                                   "chosen", "rejected", "rating", "kind", "x"]),
                                                                  inner, max_size=5),
    max_leaves=20,
)
messages = st.lists(st.fixed_dictionaries({"role": st.sampled_from(["system", "user", "assistant", "bot"]),
                                           "content": st.text(max_size=12)}), max_size=5)
records = st.one_of(json_values, st.fixed_dictionaries({"dialog": messages}),
                    st.fixed_dictionaries({"prompt": messages, "chosen": st.text(max_size=8), "rejected": st.text(max_size=8),
                                           "rating": st.sampled_from(["better", "unsure", "best"]),
                                           "kind": st.sampled_from(["helpfulness", "safety", "x"])}))


@SETTINGS
@given(lines=st.lists(st.one_of(records.map(json.dumps), st.binary(max_size=30).map(lambda b: b.decode("latin-1"))),
                      min_size=1, max_size=6))
def test_readers_return_records_or_name_the_file_and_line(tmp_path, lines):
    path = tmp_path / "data.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8", errors="surrogatepass")
    for reader in (read_dialogs, read_preferences, read_prompts):
        try:
            got = reader(path)
        except ValueError as e:
            assert str(e).startswith(f"{path}:"), e  # FILE:LINE: FIELD: problem
        else:
            assert isinstance(got, list)
        skipped = reader(path, skip_bad=True)  # never raises: bad lines are counted
        assert len(skipped) + len(skipped.skipped) <= len([ln for ln in lines if ln.strip()]) + 1


@SETTINGS
@given(dialog=st.lists(st.text(alphabet=string.ascii_letters + " .?!é😀", min_size=1, max_size=15).filter(str.strip),
                       min_size=2, max_size=6).map(lambda xs: xs[: len(xs) // 2 * 2]))
def test_valid_dialogs_read_back_as_written(tmp_path, dialog):
    msgs = [{"role": "user" if i % 2 == 0 else "assistant", "content": t} for i, t in enumerate(dialog)]
    path = tmp_path / "ok.jsonl"
    path.write_text(json.dumps({"dialog": msgs}) + "\n", encoding="utf-8")
    assert read_dialogs(path) == [msgs]


def test_a_lone_surrogate_is_refused_with_its_place(tmp_path):
    path = tmp_path / "s.jsonl"
    path.write_text('{"dialog": [{"role": "user", "content": "hi \\ud800"}, {"role": "assistant", "content": "yo"}]}\n')
    with pytest.raises(ValueError, match=r"s.jsonl:1: dialog\[0\].content: not valid Unicode"):
        read_dialogs(path)
    deep = tmp_path / "deep.jsonl"
    deep.write_text("[" * 100000 + "]" * 100000 + "\n")
    with pytest.raises(ValueError, match="deep.jsonl:1: JSON nested too deeply"):
        read_prompts(deep)
    with pytest.raises(IsADirectoryError, match="is a directory"):
        read_dialogs(tmp_path)


_SURROGATE = st.characters(min_codepoint=0xD800, max_codepoint=0xDFFF)


@SETTINGS
@given(text=st.text(max_size=40) | st.builds(lambda a, s, b: a + s + b, st.text(max_size=10), _SURROGATE,
                                               st.text(max_size=10)))
def test_tokenizer_round_trip(llama_tokenizer, text):
    """Valid text decodes back to itself; text with a lone surrogate (half the draws) is refused by name."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        with pytest.raises(ValueError, match="not valid Unicode"):
            llama_tokenizer.encode(text)
        return
    assert llama_tokenizer.decode(llama_tokenizer.encode(text)) == text


def test_tokenizer_names_a_lone_surrogate(llama_tokenizer):
    with pytest.raises(ValueError, match="not valid Unicode"):
        llama_tokenizer.encode("a\ud800b")


FIELDS = ["lr", "epochs", "batch_size", "micro_batch", "seq_len", "seed", "device", "strategy", "betas", "resume",
          "min_lr_ratio", "warmup_steps", "val_fraction", "loss_on", "grad_clip", "optim.eps", "run.keep_last"]


@SETTINGS
@given(items=st.lists(st.tuples(st.sampled_from(FIELDS), st.one_of(
    st.text(max_size=8), st.integers(-10, 10).map(str), st.floats(allow_nan=True, allow_infinity=True).map(str),
    st.sampled_from(["[1, 2]", "[0.9]", "true", "none", "inf", "-0", "1e400"]))), max_size=4))
def test_config_overrides_give_a_valid_config_or_a_config_error(items):
    try:
        cfg = load_config(SFTConfig, None, [f"{k}={v}" for k, v in items])
    except ConfigError:
        return
    assert 0 < cfg.optim.lr < float("inf") and cfg.batch.batch_size >= 1 and 0 <= cfg.optim.min_lr_ratio <= 1
