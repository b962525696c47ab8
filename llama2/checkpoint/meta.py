"""Meta's release format (github.com/facebookresearch/llama, ``download.sh`` and ``Llama.build``).

    llama-2-13b/
      params.json            {"dim": 5120, "multiple_of": 256, "n_heads": 40, "n_layers": 40, "norm_eps": 1e-05, "vocab_size": -1}
      consolidated.00.pth    model-parallel shard 0 (a pickled dict of tensors, Meta's parameter names)
      consolidated.01.pth    shard 1 ...
    tokenizer.model          beside the model directory in Meta's download layout (we also look inside it)

Meta trains and ships each model split for fairscale model parallelism (one shard per GPU: 1 for 7B, 2 for
13B, 8 for 70B). Every shard holds every tensor name, holding a slice of it:

* ColumnParallelLinear (wq, wk, wv, w1, w3, output) splits its output features: weight dim 0;
* RowParallelLinear (wo, w2) splits its input features: weight dim 1;
* ParallelEmbedding (tok_embeddings) splits the embedding dimension: weight dim 1;
* RMSNorm weights are replicated in every shard.

Loading concatenates the slices back; saving with ``shards=N`` cuts them the same way. Meta's released
files also hold ``rope.freqs`` (a precomputed rotary table), which we ignore: our rotary tables are derived.
The ``.pth`` files are pickles, so they are only ever read with ``torch.load(weights_only=True)``, which
unpickles tensors and plain containers and refuses anything else (no code from the file can run).
"""
from __future__ import annotations

import re
from pathlib import Path

import torch

from ..model import ModelArgs, Transformer
from ._common import (
    PathLike, _fmt_names, atomic_dir, build_model, check_tokenizer, require_lm_head, resolve_dtype, target_dtype,
    write_json,
)

PARAMS_FILE = "params.json"
TOKENIZER_FILE = "tokenizer.model"
_SHARD_RE = re.compile(r"^consolidated\.(\d+)\.pth$")
# Tensors in Meta's files that are derived state, not weights.
_IGNORED = {"rope.freqs"}


def shard_files(path: Path) -> list[Path]:
    """consolidated.00.pth, consolidated.01.pth, ... in shard order (checked to be 0..N-1, no gaps)."""
    found = {int(m.group(1)): p for p in path.iterdir() if (m := _SHARD_RE.match(p.name))}
    order = sorted(found)
    if order != list(range(len(order))):
        raise ValueError(f"{path}: model-parallel shards must be numbered 0..N-1, found {[found[i].name for i in order]}")
    return [found[i] for i in order]


def is_meta(path: Path) -> bool:
    return path.is_dir() and (path / PARAMS_FILE).is_file()


def split_dim(name: str) -> int | None:
    """The dimension Meta's model parallelism splits this weight along; None for replicated ones."""
    if name == "tok_embeddings.weight":
        return 1  # ParallelEmbedding: the embedding dim
    if name == "output.weight":
        return 0  # ColumnParallelLinear over the vocabulary
    leaf = name.rsplit(".", 2)[-2] if name.count(".") >= 2 else name
    if leaf in ("wq", "wk", "wv", "w1", "w3"):
        return 0  # ColumnParallelLinear
    if leaf in ("wo", "w2"):
        return 1  # RowParallelLinear
    return None  # RMSNorm weights (attention_norm, ffn_norm, norm): replicated


def _torch_load(f: Path, mmap: bool = True) -> dict[str, torch.Tensor]:
    try:
        try:
            obj = torch.load(f, map_location="cpu", weights_only=True, mmap=mmap)
        except RuntimeError as err:
            if not mmap or "mmap" not in str(err):
                raise
            # Files written with torch's pre-1.6 (non-zip) serialisation cannot be memory-mapped.
            obj = torch.load(f, map_location="cpu", weights_only=True)
    except Exception as err:  # UnpicklingError for anything that is not plain tensors and containers
        raise ValueError(
            f"{f}: refused to load: torch.load(weights_only=True) failed, so this is not a plain tensor "
            f"checkpoint (arbitrary pickled objects are never loaded): {err}"
        ) from err
    if not isinstance(obj, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()):
        raise ValueError(f"{f}: expected a dict of tensor names to tensors, found {type(obj).__name__}")
    return obj


def load_shards(files: list[Path], mmap: bool = True) -> dict[str, torch.Tensor]:
    """One state dict from N model-parallel shards (see the module docstring for the split dimensions).

    One shard: its tensors are returned as loaded (memory-mapped, no copy). Several: each merged weight is
    allocated once and every shard, opened (mapped) in turn, copies its slice into place and is closed
    before the next is opened, so peak memory is the merged weights plus one shard (1 + 1/N copies), not
    all shards plus the merged weights (2 copies) as concatenating them would need.

    mmap: map the files (no copy, but a mapped page stays resident until the whole map is released) or read
    them into memory (freed tensor by tensor as the caller converts them)."""
    first = _torch_load(files[0], mmap)
    for name in _IGNORED:
        first.pop(name, None)
    if len(files) == 1:
        return first
    n = len(files)
    names = set(first)
    merged = _allocate_merged(first, n)
    shard: dict[str, torch.Tensor] | None = first
    del first  # from here on `shard` holds the only reference to a shard's tensors
    for i, f in enumerate(files):
        if shard is None:
            shard = _torch_load(f, mmap)
            for name in _IGNORED:
                shard.pop(name, None)
        if set(shard) != names:
            diff = sorted(set(shard) ^ names)
            raise ValueError(f"{f}: holds different tensor names than {files[0].name}: {_fmt_names(diff)}")
        _copy_slices(shard, merged, i, n, f, files[0])
        shard = None  # drop the shard (and its memory map) before opening the next
    return merged


def _copy_slices(
    shard: dict[str, torch.Tensor], merged: dict[str, torch.Tensor], i: int, n: int, f: Path, first: Path
) -> None:
    """Copy shard i's slice of every split weight into place; check its replicated weights match."""
    for name, part in shard.items():
        dim = split_dim(name)
        target = merged[name]
        if dim is None:
            if part.shape != target.shape or not torch.equal(part, target):
                raise ValueError(f"{f}: replicated tensor {name} differs from the one in {first.name}")
            continue
        width = target.shape[dim] // n
        expected = list(target.shape)
        expected[dim] = width
        if list(part.shape) != expected or part.dtype != target.dtype:
            raise ValueError(
                f"{f}: {name} has shape {tuple(part.shape)} ({part.dtype}); shard 0 implies {tuple(expected)} ({target.dtype})"
            )
        target.narrow(dim, i * width, width).copy_(part)


def _allocate_merged(first: dict[str, torch.Tensor], n: int) -> dict[str, torch.Tensor]:
    """Uninitialised full-size tensors for the split weights; copies of the replicated (small) ones."""
    merged: dict[str, torch.Tensor] = {}
    for name, part in first.items():
        dim = split_dim(name)
        if dim is None:
            merged[name] = part.clone()  # a copy, so that shard 0's file can be unmapped
        else:
            shape = list(part.shape)
            shape[dim] *= n
            merged[name] = torch.empty(shape, dtype=part.dtype)
    return merged


def _plan(shard0: dict[str, torch.Tensor], dtype, device: torch.device) -> tuple[torch.dtype, bool]:
    """(target dtype, whether to keep the files memory-mapped) from shard 0's stored dtypes."""
    emb = shard0.get("tok_embeddings.weight")
    dtype_ = target_dtype(dtype, device, emb.dtype if emb is not None else torch.float32)
    keep = device.type == "cpu" and all(t.dtype == dtype_ for n, t in shard0.items() if n not in _IGNORED)
    return dtype_, keep


def load(path: PathLike, dtype: torch.dtype | str | None = None, device: torch.device | str = "cpu"):
    """(model, tokenizer or None) from a Meta checkpoint directory."""
    from ..tokenizer import Tokenizer

    path = Path(path)
    files = shard_files(path)
    if not files:
        raise FileNotFoundError(f"{path}: has {PARAMS_FILE} but no consolidated.NN.pth weight files")
    # Peek at shard 0 (mapped: only its pickle is read) for the stored dtype. Loading it as it is, the
    # files stay mapped (no copy). Converting it, they are read into memory instead: each tensor's
    # original is then freed as soon as it is converted, where a mapped one would stay resident.
    device_ = torch.device(device)
    dtype_, keep_mapped = _plan(_torch_load(files[0], mmap=True), dtype, device_)
    sd = load_shards(files, mmap=keep_mapped)  # opens shard 0 again: it must hold the only reference to it
    emb = sd.get("tok_embeddings.weight")
    # params.json's vocab_size is -1 in Meta's releases ("ask the tokenizer"); the embedding knows it too.
    args = ModelArgs.from_params_json(path / PARAMS_FILE, vocab_size=emb.shape[0] if emb is not None else None)
    where = str(files[0]) if len(files) == 1 else f"{path} ({len(files)} consolidated.*.pth shards)"
    model = build_model(args, sd, source=where, dtype=dtype_, device=device)
    tokenizer = None
    for candidate in (path / TOKENIZER_FILE, path.parent / TOKENIZER_FILE):
        if candidate.is_file():
            tokenizer = Tokenizer.from_file(candidate)
            break
    return model, tokenizer


def params_json(args: ModelArgs) -> dict:
    """params.json as Meta writes it. Keys Meta's Llama 2 files leave out stay out when at their default:
    n_kv_heads (absent for the MHA 7B/13B), ffn_dim_multiplier (absent unless set, as in 70B) and rope_theta
    (Meta's Llama 2 ModelArgs has no such field and would reject it; Code Llama writes it, so we do when it
    is not 10000). max_seq_len is never written: Meta's ``Llama.build`` passes it separately, and a second
    value in the file would be a duplicate keyword argument. vocab_size is written explicitly (not -1)."""
    p: dict = {
        "dim": args.dim,
        "multiple_of": args.multiple_of,
        "n_heads": args.n_heads,
        "n_layers": args.n_layers,
        "norm_eps": args.norm_eps,
        "vocab_size": args.vocab_size,
    }
    if args.n_kv_heads != args.n_heads:
        p["n_kv_heads"] = args.n_kv_heads
    if args.ffn_dim_multiplier is not None:
        p["ffn_dim_multiplier"] = args.ffn_dim_multiplier
    if args.rope_theta != 10000.0:
        p["rope_theta"] = args.rope_theta
    return dict(sorted(p.items()))


def _check_split(args: ModelArgs, sd: dict[str, torch.Tensor], shards: int) -> None:
    if args.n_heads % shards or args.n_kv_heads % shards:
        raise ValueError(
            f"cannot split attention (layers.*.attention.wq/wk/wv/wo) into {shards} shards: n_heads "
            f"{args.n_heads} and n_kv_heads {args.n_kv_heads} must both be divisible by {shards}"
        )
    for name, t in sd.items():
        dim = split_dim(name)
        if dim is not None and t.shape[dim] % shards:
            raise ValueError(f"cannot split {name} (shape {tuple(t.shape)}) into {shards} shards along dim {dim}")


def _standalone(t: torch.Tensor) -> torch.Tensor:
    """A tensor owning exactly its bytes: torch.save writes a view's whole underlying storage, so a slice
    saved as is would carry the full weight into every shard."""
    if t.is_contiguous() and t.storage_offset() == 0 and t.untyped_storage().nbytes() == t.numel() * t.element_size():
        return t
    return t.clone(memory_format=torch.contiguous_format)


def save(
    model: Transformer,
    path: PathLike,
    tokenizer=None,
    *,
    shards: int = 1,
    dtype: torch.dtype | str | None = None,
    overwrite: bool = False,
) -> Path:
    """Write ``model`` as Meta's params.json + consolidated.NN.pth (``shards`` model-parallel files) and
    ``tokenizer.model`` (inside the directory). dtype: convert on the way out (Meta ships bfloat16)."""
    require_lm_head(model, "Meta")
    check_tokenizer(model, tokenizer)
    if shards < 1:
        raise ValueError(f"shards must be >= 1, got {shards}")
    dtype_ = resolve_dtype(dtype)
    sd = {k: v.detach() for k, v in model.state_dict().items()}
    _check_split(model.args, sd, shards)
    with atomic_dir(path, overwrite=overwrite) as tmp:
        for i in range(shards):
            shard = {}
            for name, t in sd.items():
                dim = split_dim(name)
                part = t if dim is None or shards == 1 else t.chunk(shards, dim=dim)[i]
                shard[name] = _standalone(part.to(device="cpu", dtype=dtype_ or part.dtype))
            torch.save(shard, tmp / f"consolidated.{i:02d}.pth")
            del shard
        write_json(tmp / PARAMS_FILE, params_json(model.args))
        if tokenizer is not None:
            tokenizer.save(tmp / TOKENIZER_FILE)
    return Path(path)
