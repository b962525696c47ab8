"""Typed configs: YAML then key=value overrides, type checks with errors that name the place and the field."""
import pytest

from llama2.config import ConfigError, describe, field_docs, load_config
from llama2.generate import GenerationConfig


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


# -- stage configs: shared groups nested by every stage ---------------------------------------------------------
from llama2.config import OptimConfig, RunConfig, flat_fields  # noqa: E402
from llama2.train.ppo import PPOConfig  # noqa: E402
from llama2.train.rejection import RejectionConfig  # noqa: E402
from llama2.train.sft import SFTConfig  # noqa: E402


def test_flat_and_dotted_names_reach_the_groups(tmp_path):
    cfg = SFTConfig(lr=1e-4, out="x", seq_len=128)  # the names that worked before the groups existed
    assert cfg.optim.lr == 1e-4 and cfg.run.out == "x" and cfg.batch.seq_len == 128
    assert load_config(SFTConfig, None, ["optim.lr=5e-5", "run.seed=3", "epochs=1"]).optim.lr == 5e-5
    f = tmp_path / "sft.yaml"
    f.write_text("lr: 2.0e-4\nrun:\n  out: y\n  save_every: 7\nbatch.micro_batch: 2\n")
    cfg = load_config(SFTConfig, f, ["seed=9"])
    assert (cfg.optim.lr, cfg.run.out, cfg.run.save_every, cfg.batch.micro_batch, cfg.run.seed) == (2e-4, "y", 7, 2, 9)
    assert cfg.run.keep_last == RunConfig().keep_last  # fields not named keep the stage's defaults
    assert SFTConfig().optim.lr == 2e-5 and PPOConfig().optim.lr == 1e-6 and PPOConfig().optim.schedule == "constant"


def test_groups_are_shared_not_repeated():
    for cls in (SFTConfig, PPOConfig, RejectionConfig):
        names = [f.name for f in __import__("dataclasses").fields(cls)]
        assert "lr" not in names and "seed" not in names and "out" not in names, cls
        assert isinstance(cls().run, RunConfig) and isinstance(cls().optim, OptimConfig)
    flat = flat_fields(RejectionConfig)
    # rejection sampling's fine-tuning is the SFT batch group itself, not copies of its fields
    assert flat["seq_len"] == ("finetune", "seq_len") and flat["temperature"] == ("sampling", "temperature")


def test_overrides_round_trip(cli_overrides):
    cfg = PPOConfig(prompts="p.jsonl", kl_beta=0.02, lr=3e-6, betas=(0.8, 0.9), temperature=0.7, out="o")
    assert load_config(PPOConfig, None, cli_overrides(cfg)) == cfg


@pytest.mark.parametrize("override,match", [
    ("lr=inf", "lr=inf: expected a finite number > 0"),
    ("lr=0", "lr=0.0: expected a finite number > 0"),
    ("min_lr_ratio=-3", r"min_lr_ratio=-3.0: expected in \[0, 1\]"),
    ("batch_size=0", "batch_size=0: expected >= 1"),
    ("micro_batch=0", "micro_batch=0: expected >= 1"),
    ("epochs=0", "epochs=0.0: expected a finite number > 0"),
    ("save_every=0", "save_every=0: expected >= 1"),
    ("strategy=zero", "strategy='zero': expected one of"),
    ("device=tpu", "device='tpu': expected cpu, cuda"),
    ("betas=[0.9]", "expected 2 values"),
    ("no_such_field=1", "unknown field 'no_such_field'"),
])
def test_bad_settings_are_refused_before_any_work(override, match):
    with pytest.raises(ConfigError, match=match):
        load_config(SFTConfig, None, [override])


@pytest.mark.parametrize("override,match", [("kl_beta=-1", "kl_beta=-1.0"), ("clip=-1", "clip=-1.0"),
                                             ("minibatch=0", "minibatch=0"), ("temperature=nan", "temperature=nan")])
def test_ppo_settings_are_checked(override, match):
    with pytest.raises(ConfigError, match=match):
        load_config(PPOConfig, None, [override])


def test_help_lists_every_group_field_with_its_stage_default():
    text = describe(SFTConfig)
    for name in ("data", "lr", "betas", "out", "seed", "seq_len", "batch_size", "resume", "tensorboard"):
        assert f"{name}=" in text, name
    assert "lr=2e-05" in text and "out='runs/sft'" in text  # this stage's defaults, not the group's
    assert "\n run (" in text and "\n optim (" in text


def test_float16_training_is_refused_with_the_reason():
    """fp16 autocast without loss scaling underflows gradients; the loop has no GradScaler, so float16 is refused."""
    from llama2.config import ConfigError, RunConfig

    with pytest.raises(ConfigError, match="dtype='float16'.*loss scaling"):
        RunConfig(dtype="float16")
    assert RunConfig(dtype="bfloat16").dtype == "bfloat16"
