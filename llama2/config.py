"""Typed dataclass configs: shared groups that every stage nests, YAML files and ``key=value`` overrides, help
drawn from field docstrings, and settings checked once, where the groups are defined.

Every command's options are one dataclass whose fields carry their own documentation (a string literal right
after the field, the convention Sphinx and jsonargparse read). What stages share lives in groups defined once
here and nested by every stage that needs them, each stage giving its own defaults:

* :class:`RunConfig` (``run``): where and how a stage runs: out, seed, device, dtype, strategy, resume,
  tensorboard, compile, activation checkpointing, and the run control of the step loop (eval/save cadence);
* :class:`OptimConfig` (``optim``): the paper's AdamW and learning-rate schedule;
* :class:`SamplingConfig` (``sampling``): how answers are drawn while training (rejection sampling, PPO, GAtt);
* :class:`BatchConfig` (``batch``/``finetune``): packed rows, batch and epochs of a fine-tuning run.

``llama2 <command> --config FILE.yaml key=value ...`` fills a stage's config: defaults, then the YAML file,
then the overrides, left to right, each value checked against the field's type. A field is named by its own
name when that is unambiguous (``lr=1e-4``, ``out=runs/x``: short to type, and the same in every stage), or by
its dotted path (``optim.lr=1e-4``); YAML may use either, or nested mappings. The same
holds for the constructors: ``SFTConfig(lr=1e-4, out="x")`` routes each name into its group. Errors name the
file (or the override) and the field.
"""
from __future__ import annotations

import ast
import dataclasses
import functools
import inspect
import math
import re
import textwrap
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import yaml

__all__ = [
    "ConfigError", "check", "field_docs", "load_config", "apply_overrides", "coerce", "describe", "group", "stage_config",
    "flat_fields", "to_dict", "RunConfig", "OptimConfig", "SamplingConfig", "StageSampling",
    "BatchConfig",
]

T = TypeVar("T")


class ConfigError(ValueError):
    """A bad config file, override or setting; the message names where and which field."""


# -- the shared groups ----------------------------------------------------------------------------------------------
def check(ok: bool, name: str, value: Any, expected: str) -> None:
    if not ok:
        raise ConfigError(f"{name}={value!r}: expected {expected}")


def _finite(x: float) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


DTYPES = ("auto", "float32", "bfloat16", "float16")
STRATEGIES = ("fsdp", "ddp", "single")
_DEVICE_RE = re.compile(r"^(cpu|cuda|mps)(:\d+)?$")


@dataclass
class RunConfig:
    """Where and how a stage runs, and the run control of its step loop."""

    out: str = "runs/out"
    """Output directory: checkpoints/step_NNNNNN, metrics.jsonl and, at its root, the stage's model."""
    seed: int = 0
    """Seed of the initialisation, the data order and the sampling (every seed is derived from it)."""
    device: str = "cpu"
    """cpu, cuda or cuda:N (under torchrun: one GPU per process, cuda becomes cuda:LOCAL_RANK)."""
    dtype: str = "auto"
    """Compute dtype: auto (fp32 on CPU, bf16 autocast on CUDA with fp32 weights), float32 or bfloat16."""
    strategy: str = "fsdp"
    """Under torchrun with several processes: fsdp (FSDP2, fully_shard per block) or ddp; one process trains alone."""
    resume: bool = False
    """Continue from the newest checkpoint in out/checkpoints (exactly: the data position is the step)."""
    overwrite: bool = False
    """Start over in an out= that already holds a run: removes only what a run writes (checkpoints, metrics,
    TensorBoard events, its configs and model files). Without it (or resume=true) such an out= is refused."""
    tensorboard: bool = True
    """Also write the metrics for TensorBoard to OUT/tb."""
    compile: bool | None = None
    """torch.compile each transformer block. None: on CUDA, where it trains much faster, and off on the CPU, where
    the gain is small and a compile takes long to repay (benchmarks/RESULTS.md). A block that fails to compile runs
    eagerly, with a warning."""
    activation_checkpointing: bool = False
    """Recompute each block's activations in the backward pass (less memory, one more forward of each block)."""
    eval_every: int = 0
    """Evaluate every this many steps (0 = only at the end)."""
    save_every: int = 500
    """Checkpoint every this many steps (and always at the end, and when stopped)."""
    keep_last: int = 2
    """How many step checkpoints to keep."""

    def __post_init__(self) -> None:
        check(bool(str(self.out).strip()), "out", self.out, "a directory")
        check(bool(_DEVICE_RE.match(str(self.device))), "device", self.device, "cpu, cuda, cuda:N or mps")
        check(self.dtype in DTYPES and self.dtype != "float16", "dtype", self.dtype,
              "auto, float32 or bfloat16 (float16 training would need loss scaling, which the loop does not do)")
        check(self.strategy in STRATEGIES, "strategy", self.strategy, f"one of {', '.join(STRATEGIES)}")
        check(self.eval_every >= 0, "eval_every", self.eval_every, ">= 0")
        check(self.save_every >= 1, "save_every", self.save_every, ">= 1")
        check(self.keep_last >= 1, "keep_last", self.keep_last, ">= 1")


@dataclass
class OptimConfig:
    """AdamW and the learning-rate schedule (Llama 2 §2.2: beta1 0.9, beta2 0.95, eps 1e-5, weight decay 0.1,
    gradient clipping 1.0, linear warmup then cosine decay to 10% of the peak)."""

    lr: float = 3e-4
    """Peak learning rate (3e-4 for 7B/13B pretraining, 1.5e-4 for 34B/70B; 2e-5 for SFT; 1e-6 for PPO)."""
    betas: tuple[float, float] = (0.9, 0.95)
    """AdamW beta1, beta2 (0.9, 0.95 in the paper)."""
    eps: float = 1e-5
    """AdamW epsilon (1e-5 in the paper)."""
    weight_decay: float = 0.1
    """AdamW weight decay, on matrices only (0.1 in the paper)."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this (0 = off; 1.0 in the paper)."""
    warmup_steps: int = 0
    """Linear warmup steps (2000 in pretraining)."""
    min_lr_ratio: float = 0.1
    """The cosine schedule ends at this fraction of the peak (0.1 in the paper)."""
    schedule: str = "cosine"
    """cosine (warmup, then cosine decay to min_lr_ratio) or constant (PPO's constant 1e-6)."""

    def __post_init__(self) -> None:
        check(_finite(self.lr) and self.lr > 0, "lr", self.lr, "a finite number > 0")
        check(len(self.betas) == 2 and all(_finite(b) and 0 <= b < 1 for b in self.betas), "betas", self.betas,
               "two numbers in [0, 1)")
        check(_finite(self.eps) and self.eps > 0, "eps", self.eps, "a finite number > 0")
        check(_finite(self.weight_decay) and self.weight_decay >= 0, "weight_decay", self.weight_decay, "finite and >= 0")
        check(_finite(self.grad_clip) and self.grad_clip >= 0, "grad_clip", self.grad_clip, "finite and >= 0")
        check(self.warmup_steps >= 0, "warmup_steps", self.warmup_steps, ">= 0")
        check(_finite(self.min_lr_ratio) and 0 <= self.min_lr_ratio <= 1, "min_lr_ratio", self.min_lr_ratio, "in [0, 1]")
        check(self.schedule in ("cosine", "constant"), "schedule", self.schedule, "cosine or constant")


@dataclass
class SamplingConfig:
    """How answers are drawn: the fields generation (GenerationConfig), the engine's requests (SamplingParams) and
    every stage that samples share. The defaults are Meta's chat defaults (temperature 0.6, top-p 0.9)."""

    max_new_tokens: int = 256
    """Most tokens to generate (fewer when the prompt leaves less room in the context)."""
    temperature: float = 0.6
    """Softmax temperature; 0 = greedy (argmax)."""
    top_p: float = 0.9
    """Nucleus sampling: keep the smallest set of tokens whose probability mass reaches top_p (1 = off)."""
    top_k: int = 0
    """Keep only the k most likely tokens (0 = off); applied before top_p."""

    def __post_init__(self) -> None:
        check(self.max_new_tokens >= 0, "max_new_tokens", self.max_new_tokens, ">= 0")
        check(_finite(self.temperature) and self.temperature >= 0, "temperature", self.temperature, "finite and >= 0")
        check(_finite(self.top_p) and 0 < self.top_p <= 1, "top_p", self.top_p, "in (0, 1]")
        check(self.top_k >= 0, "top_k", self.top_k, ">= 0")


@dataclass
class StageSampling(SamplingConfig):
    """How a stage draws answers from the policy (rejection sampling, PPO rollouts, GAtt, evaluation)."""

    gen_batch: int = 8
    """Prompts per generation call (each expanded to its k samples)."""
    engine: str = "auto"
    """Decoding path: auto or static (the static-cache engine), eager (the reference loop; see llama2.generate)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        check(self.max_new_tokens >= 1, "max_new_tokens", self.max_new_tokens, ">= 1")
        check(self.gen_batch >= 1, "gen_batch", self.gen_batch, ">= 1")
        check(self.engine in ("auto", "static", "eager"), "engine", self.engine, "auto, static or eager")

    def generate_kwargs(self) -> dict:
        """The fields ``llama2.generate.generate`` takes."""
        return dict(temperature=self.temperature, top_p=self.top_p, top_k=self.top_k, max_new_tokens=self.max_new_tokens,
                    engine=self.engine)


@dataclass
class BatchConfig:
    """Rows, batch and epochs of a fine-tuning run (SFT, and the SFT inside rejection sampling and GAtt)."""

    seq_len: int = 4096
    """Positions per packed row (4096 in the paper)."""
    batch_size: int = 64
    """Packed rows per optimizer step (64 in the paper)."""
    micro_batch: int = 4
    """Rows per forward/backward on each rank; gradients are accumulated to batch_size, so a smaller micro_batch
    (when memory is short) trains the same model."""
    epochs: float = 2.0
    """Passes over the training rows (2 in the paper)."""

    def __post_init__(self) -> None:
        check(self.seq_len >= 8, "seq_len", self.seq_len, ">= 8")
        check(self.batch_size >= 1, "batch_size", self.batch_size, ">= 1")
        check(self.micro_batch >= 1, "micro_batch", self.micro_batch, ">= 1")
        check(_finite(self.epochs) and self.epochs > 0, "epochs", self.epochs, "a finite number > 0")


# -- groups inside stage configs ---------------------------------------------------------------------------------
def group(cls: type[T], **defaults: Any) -> Any:
    """A field holding a group (``cls``) with this stage's defaults: ``run: RunConfig = group(RunConfig, out=...)``."""
    return dataclasses.field(default_factory=functools.partial(cls, **defaults), metadata={"group": True})


def _is_group(f: dataclasses.Field) -> bool:
    return bool(f.metadata.get("group"))


def flat_fields(cls: type) -> dict[str, tuple[str, ...]]:
    """{name: path} of every settable field: top-level fields by their own name, group fields by their own name
    too where no other field has it, and every field by its dotted path (``optim.lr``)."""
    paths: dict[str, tuple[str, ...]] = {}
    seen: dict[str, list[tuple[str, ...]]] = {}
    for f in dataclasses.fields(cls):
        if _is_group(f):
            sub = _group_cls(cls, f)
            for g in dataclasses.fields(sub):
                paths[f"{f.name}.{g.name}"] = (f.name, g.name)
                seen.setdefault(g.name, []).append((f.name, g.name))
        else:
            paths[f.name] = (f.name,)
            seen.setdefault(f.name, []).insert(0, (f.name,))
    for name, where in seen.items():
        if len(where[0]) == 1:  # a top-level field wins over a group's field of the same name
            paths[name] = where[0]
        elif len(where) == 1:
            paths[name] = where[0]
    return paths


def _group_cls(cls: type, f: dataclasses.Field) -> type:
    return typing.get_type_hints(cls).get(f.name, f.type) if isinstance(f.type, str) else f.type


def _route(cls: type, values: dict[str, Any], where: str = "") -> dict[str, Any]:
    """Constructor keywords with flat or dotted names of group fields gathered into their groups."""
    paths = flat_fields(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    top: dict[str, Any] = {}
    nested: dict[str, dict[str, Any]] = {}
    for key, value in values.items():
        path = (key,) if key in fields else paths.get(key)
        if path is None:
            raise ConfigError(f"{where}unknown field {key!r}; known fields: {', '.join(_public_names(cls))}")
        if len(path) == 1:
            if _is_group(fields[key]) and isinstance(value, dict):
                nested.setdefault(key, {}).update(value)
            else:
                top[key] = value
        else:
            nested.setdefault(path[0], {})[path[1]] = value
    for name, vals in nested.items():
        f = fields[name]
        base = top.get(name)
        if base is None:
            base = f.default_factory()  # type: ignore[misc]
        sub = _group_cls(cls, f)
        hints = _type_hints(sub)
        unknown = [k for k in vals if k not in {g.name for g in dataclasses.fields(sub)}]
        if unknown:
            raise ConfigError(f"{where}unknown field {name}.{unknown[0]!r}")
        try:
            top[name] = dataclasses.replace(base, **{k: coerce(v, hints.get(k, Any), f"{where}field {k!r}") for k, v in vals.items()})
        except ConfigError as e:
            raise ConfigError(f"{where}{e}" if where and not str(e).startswith(where) else str(e)) from None
    return top


def _public_names(cls: type) -> list[str]:
    paths = flat_fields(cls)
    return [k for k, p in paths.items() if "." not in k]


def stage_config(cls: type[T]) -> type[T]:
    """``@stage_config``: a dataclass whose constructor also takes the flat or dotted names of its groups' fields
    (``SFTConfig(lr=1e-4, out="x")`` sets ``optim.lr`` and ``run.out``), as every command line and YAML file may."""
    cls = dataclass(cls)
    init = cls.__init__

    @functools.wraps(init)
    def __init__(self, **kwargs: Any) -> None:
        init(self, **_route(type(self), kwargs))

    cls.__init__ = __init__  # type: ignore[method-assign]
    return cls


def to_dict(cfg: Any) -> dict:
    """The config as plain nested dicts (for the *_config.json a stage writes beside its output)."""
    return dataclasses.asdict(cfg)


# -- docs, types, values --------------------------------------------------------------------------------------------
def field_docs(cls: type) -> dict[str, str]:
    """{field name: docstring} from the string literals that follow each field in the class body (base
    classes first, so a subclass can override a field's doc)."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if klass is object or not dataclasses.is_dataclass(klass):
            continue
        try:
            tree = ast.parse(textwrap.dedent(inspect.getsource(klass)))
        except (OSError, TypeError):
            continue
        body = tree.body[0].body if tree.body and isinstance(tree.body[0], ast.ClassDef) else []
        for stmt, nxt in zip(body, body[1:]):
            if (
                isinstance(stmt, ast.AnnAssign)
                and isinstance(stmt.target, ast.Name)
                and isinstance(nxt, ast.Expr)
                and isinstance(nxt.value, ast.Constant)
                and isinstance(nxt.value.value, str)
            ):
                docs[stmt.target.id] = " ".join(nxt.value.value.split())
    return docs


def _type_hints(cls: type) -> dict[str, Any]:
    try:
        return typing.get_type_hints(cls)
    except Exception:  # pragma: no cover - unresolved forward references
        return {f.name: f.type for f in dataclasses.fields(cls)}


def coerce(value: Any, tp: Any, where: str) -> Any:
    """Convert ``value`` (from YAML or a command-line string) to the annotated type ``tp``."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            if type(None) in args:
                return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return coerce(value, a, where)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"{where}: cannot read {value!r} as {tp}")
    if origin is typing.Literal:
        if value in args:
            return value
        raise ConfigError(f"{where}: {value!r} is not one of {list(args)}")
    if origin in (tuple, list):
        if isinstance(value, str):
            value = yaml.safe_load(value) if value.strip().startswith("[") else [v for v in value.split(",") if v != ""]
        if not isinstance(value, (list, tuple)):
            value = [value]
        if origin is tuple and len(args) > 1 and args[-1] is not Ellipsis:
            if len(value) != len(args):
                raise ConfigError(f"{where}: expected {len(args)} values, got {list(value)!r}")
            return tuple(coerce(v, a, where) for v, a in zip(value, args))
        inner = args[0] if args else Any
        items = [coerce(v, inner, where) if inner is not Any and inner is not Ellipsis else v for v in value]
        return tuple(items) if origin is tuple else items
    if tp is Any:
        return value
    if dataclasses.is_dataclass(tp) and isinstance(tp, type):
        if isinstance(value, tp):
            return value
        if isinstance(value, dict):
            return tp(**value)
        raise ConfigError(f"{where}: expected a mapping of {tp.__name__} fields, got {value!r}")
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "yes", "1", "on"):
            return True
        if isinstance(value, str) and value.lower() in ("false", "no", "0", "off"):
            return False
        raise ConfigError(f"{where}: expected true/false, got {value!r}")
    if tp in (int, float):
        if isinstance(value, bool):
            raise ConfigError(f"{where}: expected {tp.__name__}, got {value!r}")
        try:
            if tp is int:
                if isinstance(value, float) and not value.is_integer():
                    raise ValueError
                if isinstance(value, str):
                    f = float(value)
                    if not f.is_integer():
                        raise ValueError
                    return int(f)
                return int(value)
            return float(value)
        except (TypeError, ValueError, OverflowError):
            raise ConfigError(f"{where}: expected {tp.__name__}, got {value!r}") from None
    if tp is str:
        if isinstance(value, (dict, list)):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return str(value)
    if tp is Path:
        return Path(value)
    return value


def _set(cfg: Any, key: str, value: Any, where: str) -> Any:
    """``cfg`` with the field named ``key`` (flat or dotted) set to ``value`` read as the field's type."""
    cls = type(cfg)
    key = key.strip().lstrip("-").replace("-", "_")
    path = flat_fields(cls).get(key)
    if path is None and isinstance(value, dict) and key in {f.name for f in dataclasses.fields(cls)}:
        path = (key,)  # a nested mapping for a group in YAML
    if path is None:
        raise ConfigError(f"{where}: unknown field {key!r}; known fields: {', '.join(_public_names(cls))}")
    try:
        if len(path) == 1:
            f = {f.name: f for f in dataclasses.fields(cls)}[path[0]]
            if _is_group(f):
                if not isinstance(value, dict):
                    raise ConfigError(f"{where}: field {key!r}: expected a mapping of its fields, got {value!r}")
                sub = getattr(cfg, path[0])
                for k, v in value.items():
                    sub = _set(sub, str(k), v, where)
                return dataclasses.replace(cfg, **{path[0]: sub})
            hints = _type_hints(cls)
            return dataclasses.replace(cfg, **{path[0]: coerce(value, hints.get(path[0], Any), f"{where}: field {key!r}")})
        sub = getattr(cfg, path[0])
        hints = _type_hints(type(sub))
        new_sub = dataclasses.replace(sub, **{path[1]: coerce(value, hints.get(path[1], Any), f"{where}: field {key!r}")})
        return dataclasses.replace(cfg, **{path[0]: new_sub})
    except ConfigError as e:
        msg = str(e)
        raise ConfigError(msg if msg.startswith(where) else f"{where}: {msg}") from None


def load_config(cls: type[T], path: str | Path | None = None, overrides: list[str] | None = None, **base: Any) -> T:
    """Defaults of ``cls`` (updated by ``base``), then the YAML file, then ``key=value`` overrides."""
    cfg = cls(**base)
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML: {e}") from None
        except UnicodeDecodeError as e:
            raise ConfigError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: expected a mapping of field: value at the top level")
        for k, v in data.items():
            cfg = _set(cfg, str(k), v, str(path))
    return apply_overrides(cfg, overrides or [])


def apply_overrides(cfg: T, overrides: list[str]) -> T:
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r}: expected key=value")
        k, v = item.split("=", 1)
        cfg = _set(cfg, k, v, f"override {item!r}")
    return cfg


def _default_of(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        return f.default_factory()  # type: ignore[misc]
    return "(required)"


def _describe_fields(cls: type, values: Any | None, prefix: str, lines: list[str], flat: dict[str, tuple[str, ...]]) -> None:
    docs = field_docs(cls)
    hints = _type_hints(cls)
    for f in dataclasses.fields(cls):
        if _is_group(f):
            continue
        default = getattr(values, f.name) if values is not None else _default_of(f)
        tp = hints.get(f.name, f.type)
        tname = getattr(tp, "__name__", None) or str(tp).replace("typing.", "")
        dotted = f"{prefix}{f.name}"
        name = f.name if flat.get(f.name) == tuple(dotted.split(".")) else dotted
        lines.append(f"  {name}={default!r}  [{tname}]")
        if docs.get(f.name):
            lines.extend("      " + ln for ln in textwrap.wrap(docs[f.name], 88))


def describe(cls: type) -> str:
    """Every field with its type, default and meaning: the body of a command's --help. A group's fields are listed
    under its name; each is set by its own name (or, where two groups share a name, by its dotted path)."""
    flat = flat_fields(cls)
    lines: list[str] = []
    _describe_fields(cls, None, "", lines, flat)
    for f in dataclasses.fields(cls):
        if not _is_group(f):
            continue
        sub = _group_cls(cls, f)
        title = (sub.__doc__ or "").strip().splitlines()[0] if sub.__doc__ else sub.__name__
        lines.append(f"\n {f.name} ({title.rstrip('.')}; also {f.name}.FIELD=...):")
        _describe_fields(sub, f.default_factory(), f"{f.name}.", lines, flat)  # type: ignore[misc]
    return "\n".join(lines)
