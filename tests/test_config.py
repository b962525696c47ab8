"""Typed configs: YAML then key=value overrides, type checks with errors that name the place and the field."""
import pytest

from llama2.config import ConfigError, describe, field_docs, load_config
from llama2.generation import GenerationConfig


def test_yaml_then_overrides(tmp_path):
    f = tmp_path / "gen.yaml"
    f.write_text("temperature: 0.8\nmax_new_tokens: 32\nstop_strings: [\"\\n\\n\", END]\n")
    cfg = load_config(GenerationConfig, f, ["max_new_tokens=64", "seed=3", "logprobs=true"])
    assert cfg.temperature == 0.8 and cfg.max_new_tokens == 64 and cfg.seed == 3 and cfg.logprobs is True
    assert cfg.stop_strings == ("\n\n", "END")
    assert load_config(GenerationConfig, None, ["stop_tokens=2,13"]).stop_tokens == (2, 13)
    assert load_config(GenerationConfig, None, ["seed=none"]).seed is None


@pytest.mark.parametrize(
    "overrides,match",
    [
        (["temprature=1"], "unknown field 'temprature'"),
        (["max_new_tokens=lots"], "field 'max_new_tokens': expected int"),
        (["max_new_tokens=1.5"], "expected int"),
        (["logprobs=maybe"], "expected true/false"),
        (["temperature"], "expected key=value"),
    ],
)
def test_bad_overrides_name_the_field(overrides, match):
    with pytest.raises(ConfigError, match=match):
        load_config(GenerationConfig, None, overrides)


def test_bad_yaml_names_the_file(tmp_path):
    f = tmp_path / "bad.yaml"
    f.write_text("temperature: [1\n")
    with pytest.raises(ConfigError, match="bad.yaml"):
        load_config(GenerationConfig, f)
    f.write_text("top_k: many\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: field 'top_k'"):
        load_config(GenerationConfig, f)
    with pytest.raises(ConfigError, match="not found"):
        load_config(GenerationConfig, tmp_path / "missing.yaml")


def test_every_field_is_documented_in_help():
    docs = field_docs(GenerationConfig)
    text = describe(GenerationConfig)
    for name in GenerationConfig.__dataclass_fields__:
        assert docs.get(name), f"field {name} has no docstring"
        assert f"{name}=" in text
    assert "0.6" in text and "nucleus" in text.lower()
