"""Helpers shared by the checkpoint formats: dtypes, building a model from a state dict without a second
copy of the weights, checking a state dict against the model's expected names and shapes, sharded
safetensors files, and atomic directory writes.

Memory. A model is built on the meta device (no storage), the incoming tensors are checked and handed to
``load_state_dict(..., assign=True)``, which puts them into the module as they are instead of copying them
into freshly allocated parameters. Two reading strategies, chosen per checkpoint:

* Already in the requested dtype, loading to the CPU: the tensors are views of a private (copy-on-write)
  memory map of the file (safetensors' loader, ``torch.load(mmap=True)``, gguf's memmap). Nothing is copied;
  pages are read from disk when first touched. Peak: one copy of the weights.
* Converting (bf16 -> fp32 on the CPU, or moving to a GPU): tensors are read into ordinary memory and
  converted one at a time, each original freed right after. Memory-mapping would be worse here: a mapped
  page stays resident until the whole map is released, adding the file's size to the peak.

``benchmarks/bench_load_memory.py`` measures the peak of both against the weights' size.

The catch with mapped weights: the file must not be truncated in place while such a model is alive (a
process rewriting it in place, e.g. another program's ``save``, would make those pages vanish under it).
Our writers never do that: they write a new directory (or file) and rename it into place, so a model mapped
from the old files keeps them (the old inode lives until unmapped).
"""
from __future__ import annotations

import json
import math
import os
import re
import shutil
import struct
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterable, Iterator, Mapping

import torch

from ..model import ModelArgs, Transformer, ffn_hidden_dim

PathLike = str | os.PathLike

# ---------------------------------------------------------------------------------------------- dtypes

_DTYPE_NAMES: dict[str, torch.dtype] = {
    "float32": torch.float32, "fp32": torch.float32, "f32": torch.float32, "float": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16, "f16": torch.float16, "half": torch.float16,
}


class TensorNames:
    """The mapping between another format's tensor names and ours (Meta's): whole-model tensors by name, and per-layer
    tensors under ``{layer_prefix}{i}.`` in the other format against ``layers.{i}.`` in ours."""

    _OURS = re.compile(r"^layers\.(\d+)\.(.+)$")

    def __init__(self, global_names: Mapping[str, str], layer_names: Mapping[str, str], layer_prefix: str) -> None:
        self.glob, self.layer, self.prefix = dict(global_names), dict(layer_names), layer_prefix
        self.glob_inv = {v: k for k, v in self.glob.items()}
        self.layer_inv = {v: k for k, v in self.layer.items()}
        self._theirs = re.compile(rf"^{re.escape(layer_prefix)}(\d+)\.(.+)$")

    def to_ours(self, name: str) -> str | None:
        """Our name for one of theirs, or None when there is no counterpart."""
        return self._map(name, self.glob, self._theirs, self.layer, "layers.")

    def to_theirs(self, name: str) -> str:
        """Their name for one of ours (unchanged when there is no counterpart)."""
        return self._map(name, self.glob_inv, self._OURS, self.layer_inv, self.prefix) or name

    @staticmethod
    def _map(name, glob, layer_re, layer, prefix) -> str | None:
        if name in glob:
            return glob[name]
        m = layer_re.match(name)
        return f"{prefix}{m.group(1)}.{layer[m.group(2)]}" if m and m.group(2) in layer else None


def resolve_dtype(dtype: torch.dtype | str | None) -> torch.dtype | None:
    """A torch dtype from a dtype or its name ("float32", "bfloat16", "float16", or "torch.float16")."""
    if dtype is None or isinstance(dtype, torch.dtype):
        if dtype is not None and not dtype.is_floating_point:
            raise ValueError(f"dtype must be a floating-point type, got {dtype}")
        return dtype
    if isinstance(dtype, str):
        key = dtype.lower().removeprefix("torch.")
        if key in _DTYPE_NAMES:
            return _DTYPE_NAMES[key]
    raise ValueError(f"unknown dtype {dtype!r}; use a torch dtype or one of 'float32', 'bfloat16', 'float16'")


def dtype_name(dtype: torch.dtype) -> str:
    """'float32' for torch.float32: the spelling of safetensors headers and HF's config.json."""
    return str(dtype).removeprefix("torch.")


def target_dtype(requested: torch.dtype | str | None, device: torch.device, stored: torch.dtype) -> torch.dtype:
    """The dtype to load weights in. None means float32 on the CPU (CPUs without bf16 units run bf16
    matmuls far slower than fp32, and fp16 barely at all), else the checkpoint's stored dtype."""
    resolved = resolve_dtype(requested)
    if resolved is not None:
        return resolved
    return torch.float32 if device.type == "cpu" else stored


# ------------------------------------------------------------------------------------- args helpers


def ffn_args_for_hidden(dim: int, hidden_dim: int) -> tuple[int, float | None]:
    """(multiple_of, ffn_dim_multiplier) such that ``ffn_hidden_dim(dim, ...)`` equals ``hidden_dim``.

    Hugging Face and llama.cpp store the SwiGLU width itself (intermediate_size / feed_forward_length);
    Meta's params.json stores the recipe that produces it. We prefer the recipes Meta actually used
    (multiple_of 256 for 7B/13B, 4096 with multiplier 1.3 for 70B, Code Llama's multiplier 1.0), then any
    power-of-two ``multiple_of`` without a multiplier, then an exact fallback that always works:
    ``multiple_of = hidden_dim`` (rounding up to one multiple of it), scaled down first by
    ``ffn_dim_multiplier = hidden_dim / int(8 dim / 3)`` when the plain 8/3 rule would exceed ``hidden_dim``.
    """
    if hidden_dim <= 0:
        raise ValueError(f"feed-forward width must be positive, got {hidden_dim}")
    candidates: list[tuple[int, float | None]] = [(256, None), (4096, 1.3), (256, 1.3), (256, 1.0)]
    candidates += [(2**k, None) for k in range(12, -1, -1)]
    for multiple_of, mult in candidates:
        if ffn_hidden_dim(dim, multiple_of, mult) == hidden_dim:
            return multiple_of, mult
    base = int(2 * (4 * dim) / 3)
    if base <= hidden_dim:
        found: tuple[int, float | None] = (hidden_dim, None)
    else:
        # int(mult * base) must land in (0, hidden_dim], which then rounds up to hidden_dim; float rounding can
        # leave hidden_dim / base a hair low, so step it up to the next float until it does.
        mult = hidden_dim / base
        while int(mult * base) < hidden_dim:
            mult = math.nextafter(mult, math.inf)
        found = (hidden_dim, mult)
    got = ffn_hidden_dim(dim, *found)
    if got != hidden_dim:  # pragma: no cover - the arithmetic above guarantees it
        raise AssertionError(f"cannot express feed-forward width {hidden_dim} for dim {dim} (got {got})")
    return found


# ------------------------------------------------------------------------- building the model


def _fmt_names(names: list[str], limit: int = 20) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f", ... and {len(names) - limit} more" if len(names) > limit else "")


def check_state_dict(
    sd: Mapping[str, torch.Tensor],
    expected: Mapping[str, torch.Size | tuple[int, ...]],
    source: str,
    display: Callable[[str], str] | None = None,
) -> None:
    """Raise ValueError naming every missing, unexpected and mis-shaped tensor.

    ``display`` maps our (Meta) names to the names used in the file, so the message speaks the file's
    language (e.g. ``model.layers.0.self_attn.q_proj.weight`` for a Hugging Face checkpoint)."""
    show = display or (lambda n: n)
    missing = [show(n) for n in expected if n not in sd]
    unexpected = [show(n) for n in sd if n not in expected]
    shapes = [
        f"{show(n)} (expected {tuple(expected[n])}, found {tuple(t.shape)})"
        for n, t in sd.items()
        if n in expected and tuple(t.shape) != tuple(expected[n])
    ]
    problems = []
    if missing:
        problems.append(f"missing tensors: {_fmt_names(missing)}")
    if unexpected:
        problems.append(f"unexpected tensors: {_fmt_names(unexpected)}")
    if shapes:
        problems.append(f"tensors with the wrong shape: {_fmt_names(shapes)}")
    if problems:
        raise ValueError(f"{source}: the weights do not match the model's configuration; " + "; ".join(problems))


def build_model(
    args: ModelArgs,
    sd: dict[str, torch.Tensor],
    *,
    source: str,
    dtype: torch.dtype | str | None = None,
    device: torch.device | str = "cpu",
    display: Callable[[str], str] | None = None,
) -> Transformer:
    """A Transformer holding the tensors of ``sd`` (consumed: the dict is emptied as tensors move in).

    The model is created on the meta device and the tensors are assigned, not copied. Tensors not yet in
    the target dtype/device (the readers usually convert them already) are converted one at a time."""
    device = torch.device(device)
    with torch.device("meta"):
        model = Transformer(args)
    check_state_dict(sd, {n: t.shape for n, t in model.state_dict().items()}, source, display)
    stored = sd["tok_embeddings.weight"].dtype
    dtype_ = target_dtype(dtype, device, stored)
    for name in list(sd):
        t = sd[name]
        if t.dtype != dtype_ or t.device != device:
            # converted one tensor at a time, replacing the entry, so the old one can be freed right away
            sd[name] = t.to(device=device, dtype=dtype_)
    model.load_state_dict(sd, strict=True, assign=True)
    sd.clear()
    model.reset_rope()  # the rotary tables are non-persistent buffers, still on the meta device
    return model


# ---------------------------------------------------------------------------------- safetensors

SAFETENSORS_SINGLE = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"


def write_safetensors(
    directory: Path,
    tensors: Iterable[tuple[str, torch.Tensor]],
    *,
    max_shard_bytes: int | None = None,
    dtype: torch.dtype | None = None,
    metadata: dict[str, str] | None = None,
) -> list[Path]:
    """Write tensors as ``model.safetensors``, or, when they exceed ``max_shard_bytes``, as
    ``model-00001-of-0000N.safetensors`` shards plus ``model.safetensors.index.json`` (Hugging Face's layout:
    {"metadata": {"total_size": bytes}, "weight_map": {name: file}}). A tensor larger than the limit gets a
    shard of its own. Tensors are converted (dtype, to the CPU, contiguous) one shard at a time."""
    from safetensors.torch import save_file

    if max_shard_bytes is not None and max_shard_bytes <= 0:
        raise ValueError(f"max_shard_bytes must be positive, got {max_shard_bytes}")
    items = list(tensors)

    def nbytes(t: torch.Tensor) -> int:
        return t.numel() * (dtype.itemsize if dtype is not None else t.element_size())

    groups: list[list[tuple[str, torch.Tensor]]] = [[]]
    size = 0
    for name, t in items:
        n = nbytes(t)
        if max_shard_bytes is not None and groups[-1] and size + n > max_shard_bytes:
            groups.append([])
            size = 0
        groups[-1].append((name, t))
        size += n
    meta = {"format": "pt", **(metadata or {})}  # transformers refuses files whose "format" is not "pt"

    def prepared(group: list[tuple[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        out = {}
        for name, t in group:
            t = t.detach().to(device="cpu", dtype=dtype or t.dtype)
            out[name] = t.contiguous()
        return out

    if len(groups) == 1:
        path = directory / SAFETENSORS_SINGLE
        save_file(prepared(groups[0]), str(path), metadata=meta)
        return [path]
    paths, weight_map = [], {}
    for i, group in enumerate(groups):
        path = directory / f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
        save_file(prepared(group), str(path), metadata=meta)
        paths.append(path)
        weight_map.update({name: path.name for name, _ in group})
    index = {"metadata": {"total_size": sum(nbytes(t) for _, t in items)}, "weight_map": weight_map}
    index_path = directory / SAFETENSORS_INDEX
    index_path.write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
    return [*paths, index_path]


_ST_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool,
}


def _safetensors_header(path: Path) -> tuple[dict, int]:
    """The JSON header of a safetensors file (tensor name -> dtype, shape, data_offsets) and where the data
    starts. The format: an 8-byte little-endian header length, the header, then the tensors' bytes."""
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) != 8:
            raise ValueError(f"{path}: not a safetensors file (too short)")
        (n,) = struct.unpack("<Q", raw)
        if n > 100 * 2**20:
            raise ValueError(f"{path}: not a safetensors file (header length {n})")
        try:
            header = json.loads(f.read(n))
        except ValueError as err:
            raise ValueError(f"{path}: not a safetensors file (bad header: {err})") from err
    header.pop("__metadata__", None)
    for name, info in header.items():
        if info.get("dtype") not in _ST_DTYPES:
            raise ValueError(f"{path}: tensor {name} has unsupported dtype {info.get('dtype')!r}")
    return header, 8 + n


def _read_converted(path: Path, header: dict, start: int, dtype: torch.dtype, device: torch.device):
    """(name, tensor) for every tensor of one file, read with ordinary file reads and converted one at a time.

    Used instead of the memory map when every tensor must be converted anyway (bf16 -> fp32 on the CPU, or
    to a GPU): a mapped file's pages stay resident until the whole map is released, which would add the
    file's size to the peak; a read buffer is freed as soon as its tensor is converted."""
    with open(path, "rb", buffering=0) as f:
        for name, info in header.items():
            begin, end = info["data_offsets"]
            src_dtype, shape = _ST_DTYPES[info["dtype"]], info["shape"]
            if end == begin:
                yield name, torch.empty(shape, dtype=dtype, device=device)
                continue
            buf = bytearray(end - begin)
            view, got = memoryview(buf), 0
            f.seek(start + begin)
            while got < len(buf):
                n = f.readinto(view[got:])
                if not n:
                    raise ValueError(f"{path}: file ends inside tensor {name}")
                got += n
            t = torch.frombuffer(buf, dtype=src_dtype).reshape(shape)
            yield name, t.to(device=device, dtype=dtype)  # no copy when it already matches: t owns buf


def read_safetensors(
    directory: Path,
    dtype: torch.dtype | str | None = None,
    device: torch.device | str = "cpu",
    reference: str = "tok_embeddings.weight",
) -> tuple[dict[str, torch.Tensor], str, torch.dtype]:
    """All tensors of ``model.safetensors`` or of the shards listed in ``model.safetensors.index.json``, in
    the dtype ``target_dtype(dtype, device, <dtype of the reference tensor>)`` on ``device``.

    When the files already hold that dtype and the device is the CPU, the tensors are memory-mapped (no copy:
    safetensors' torch loader maps the file privately and returns views of it); otherwise each tensor is
    read and converted in turn. Returns (tensors, description of the source, the dtype)."""
    from safetensors import safe_open

    device = torch.device(device)
    index_path = directory / SAFETENSORS_INDEX
    single = directory / SAFETENSORS_SINGLE
    if index_path.is_file():
        index = json.loads(index_path.read_text(encoding="utf-8"))
        weight_map = index.get("weight_map")
        if not isinstance(weight_map, dict):
            raise ValueError(f"{index_path}: no 'weight_map' object")
        files = sorted(set(weight_map.values()))
        sources = [directory / f for f in files]
        for p in sources:
            if not p.is_file():
                raise FileNotFoundError(f"{index_path} lists {p.name}, which does not exist")
        where = f"{index_path} ({len(files)} shards)"
    elif single.is_file():
        sources, weight_map, where = [single], None, str(single)
    else:
        raise FileNotFoundError(f"{directory}: neither {SAFETENSORS_SINGLE} nor {SAFETENSORS_INDEX} found")
    headers = {p: _safetensors_header(p) for p in sources}
    seen: dict[str, Path] = {}
    for p, (header, _) in headers.items():
        for name in header:
            if name in seen:
                raise ValueError(f"{where}: tensor {name} appears in both {seen[name].name} and {p.name}")
            if weight_map is not None and weight_map.get(name) != p.name:
                raise ValueError(f"{where}: tensor {name} is in {p.name} but the index says {weight_map.get(name)}")
            seen[name] = p
    if weight_map is not None:
        absent = sorted(set(weight_map) - set(seen))
        if absent:
            raise ValueError(f"{where}: the index lists tensors missing from the shards: {_fmt_names(absent)}")
    stored = {name: _ST_DTYPES[headers[p][0][name]["dtype"]] for name, p in seen.items()}
    if not stored:
        raise ValueError(f"{where}: holds no tensors")
    reference_dtype = stored.get(reference) or next(iter(stored.values()))
    dtype_ = target_dtype(dtype, device, reference_dtype)
    sd: dict[str, torch.Tensor] = {}
    if device.type == "cpu" and all(d == dtype_ for d in stored.values()):
        for p in sources:
            with safe_open(str(p), framework="pt", device="cpu") as f:
                for name in f.keys():
                    sd[name] = f.get_tensor(name)
    else:
        for p, (header, start) in headers.items():
            sd.update(_read_converted(p, header, start, dtype_, device))
    return sd, where, dtype_


# ------------------------------------------------------------------------------------ writing


# Every file a checkpoint of ours consists of (native, Meta, Hugging Face, GGUF in a directory, plus what training
# keeps beside a step's model). A directory is replaced only when it holds nothing else: a save never deletes what
# it did not write.
_CHECKPOINT_FILE = re.compile(
    r"^(llama2\.json|params\.json|config\.json|generation_config\.json|tokenizer\.model|tokenizer_config\.json"
    r"|special_tokens_map\.json|model(-\d{5}-of-\d{5})?\.safetensors|model\.safetensors\.index\.json"
    r"|consolidated\.\d+\.pth|model\.gguf|trainer_state\.pt|manifest\.json|reward_config\.json|eval\.json)$")


def is_gguf_file(path: Path) -> bool:
    """Whether ``path`` starts with the GGUF magic (a text file merely named .gguf does not)."""
    try:
        with open(path, "rb") as f:
            return f.read(4) == b"GGUF"
    except OSError:
        return False


def foreign_entries(path: Path) -> list[str]:
    """The entries of directory ``path`` that are not a checkpoint's own files (a .gguf must really be GGUF)."""
    out = []
    for e in path.iterdir():
        ours = e.is_file() and not e.is_symlink() and _CHECKPOINT_FILE.match(e.name) is not None
        if not ours or (e.suffix == ".gguf" and not is_gguf_file(e)):
            out.append(e.name + ("/" if e.is_dir() else ""))
    return sorted(out)


def fsync_file(path: Path) -> None:
    """Flush a file's data to the disk (before it is renamed into place)."""
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def fsync_dir(path: Path) -> None:
    """Make the renames inside ``path`` durable (POSIX: a directory entry is only on disk once its directory is)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextmanager
def atomic_dir(path: PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a fresh temporary directory beside ``path``; on success it is renamed to ``path``.

    A reader never sees a half-written checkpoint, and a failed save leaves the old one untouched. An
    existing ``path`` must be an empty directory, or, with ``overwrite=True``, a directory holding nothing but
    a checkpoint's own files: it is then replaced as a whole (so stale shards of a larger earlier save cannot
    linger). A directory holding anything else is never deleted: the save refuses and names what is in the way.
    """
    path = Path(path)
    if path.exists():
        if not path.is_dir():
            raise FileExistsError(f"{path} exists and is not a directory")
        if any(path.iterdir()):
            if not overwrite:
                raise FileExistsError(f"{path} already exists and is not empty; pass overwrite=True to replace it")
            foreign = foreign_entries(path)
            if foreign:
                shown = ", ".join(foreign[:8]) + (f", ... ({len(foreign)} in all)" if len(foreign) > 8 else "")
                raise FileExistsError(
                    f"{path} holds files that are not part of a checkpoint ({shown}); refusing to replace it "
                    "(choose a new or empty directory)"
                )
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        yield tmp
        os.chmod(tmp, 0o755)  # mkdtemp makes it 0700
        for f in tmp.iterdir():  # every file on disk before the directory is renamed into place
            if f.is_file():
                fsync_file(f)
        fsync_dir(tmp)
        if path.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{path.name}.old-", dir=path.parent))
            os.rename(path, old / "ckpt")  # rename, not delete-then-write: models mapped from it keep working
            try:
                os.rename(tmp, path)
            except OSError:
                os.rename(old / "ckpt", path)  # put the old checkpoint back
                os.rmdir(old)
                raise
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, path)
        fsync_dir(path.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_json(path: Path, obj: object) -> None:
    path.write_text(json.dumps(obj, indent=2) + "\n", encoding="utf-8")


def check_tokenizer(model: Transformer, tokenizer) -> None:
    """A tokenizer whose ids the embedding cannot look up would break generation; refuse to pair them."""
    if tokenizer is not None and tokenizer.vocab_size > model.args.vocab_size:
        raise ValueError(
            f"the tokenizer has {tokenizer.vocab_size} pieces but the model's vocab_size is {model.args.vocab_size}"
        )


def require_lm_head(model: Transformer, fmt: str) -> None:
    if model.args.head != "lm":
        raise ValueError(
            f"a model with a {model.args.head!r} head cannot be saved in the {fmt} format, which only describes "
            "language models with a vocabulary-sized output layer; save it with format='native'"
        )
