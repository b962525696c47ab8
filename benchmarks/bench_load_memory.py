"""Peak memory of loading a checkpoint, as a multiple of the weights' size.

Writes one random fp32 model (about 400 MB by default) in each format, then loads each in a fresh Python
process and reports the growth of its peak resident set (VmHWM, i.e. ``ru_maxrss`` of this process image) over the
baseline after
``import torch, llama2``: right after ``load``, and again after a forward pass and a sum over every weight
(memory-mapped weights are only read from disk when first touched, so the second number is the honest one).
A loader that keeps one copy of the weights scores about 1.0; one that builds a randomly initialised model
and then copies the checkpoint into it scores about 2.0 (the "naive" row, for reference).

    python benchmarks/bench_load_memory.py [--dim 1024 --layers 3 --vocab 32000] [--dir /tmp/bench-ckpt]
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# Runs in a fresh interpreter: baseline after imports, then load, then a forward pass.
_CHILD = r"""
import json, resource, sys, time
import torch, llama2
from llama2.checkpoint import load
from llama2.model import Transformer, ModelArgs

def peak_mib():
    # VmHWM: this address space's peak RSS. ru_maxrss would do, except that Linux carries it across exec,
    # so a child of a big parent starts out with the parent's peak.
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB

path, how = sys.argv[1], sys.argv[2]
torch.set_num_threads(1)
# Warm up: the first forward pass loads CPU kernels, and the first model built on the meta device imports
# torch's Python meta-kernel registrations (~70 MiB, once per process). Neither grows with the model, so
# both are paid before the baseline.
tiny = ModelArgs(dim=64, n_layers=1, n_heads=4, vocab_size=64, max_seq_len=16)
with torch.no_grad():
    Transformer(tiny)(torch.zeros(1, 4, dtype=torch.long))
with torch.device("meta"):
    Transformer(tiny)
base = peak_mib()
t0 = time.perf_counter()
if how == "naive":
    # what a straightforward loader does: allocate (and randomly initialise) a model, then copy weights in
    from safetensors.torch import load_file
    cfg = json.load(open(path + "/llama2.json"))["model_args"]
    model = Transformer(ModelArgs(**cfg))
    model.load_state_dict(load_file(path + "/model.safetensors"))
else:
    model, _ = load(path)
load_s = time.perf_counter() - t0
after_load = peak_mib()
with torch.no_grad():
    model(torch.zeros(1, 8, dtype=torch.long))
    checksum = sum(float(p.sum()) for p in model.parameters())  # touches every weight, embeddings included
after_forward = peak_mib()
print(json.dumps({"load_s": load_s, "load_mib": after_load - base, "forward_mib": after_forward - base}))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dim", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=3)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--dir", type=Path, default=None, help="where to write the checkpoints (default: a temp dir)")
    opts = parser.parse_args()

    sys.path.insert(0, str(ROOT))
    import torch

    from llama2.checkpoint import save
    from llama2.model import ModelArgs, Transformer

    args = ModelArgs(dim=opts.dim, n_layers=opts.layers, n_heads=opts.heads, vocab_size=opts.vocab)
    work = opts.dir or Path(tempfile.mkdtemp(prefix="bench-load-"))
    work.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    model = Transformer(args)  # PyTorch's default init: random, which is all we need
    weight_bytes = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    print(f"model: dim {args.dim}, {args.n_layers} layers, vocab {args.vocab_size}: "
          f"{model.num_params() / 1e6:.1f}M params, {weight_bytes / 2**20:.0f} MiB of fp32 weights")

    cases = [  # (label, format, save kwargs, how the child loads it)
        ("native", "native", {}, "load"),
        ("native, naive loader", "native", {}, "naive"),
        ("hf", "hf", {}, "load"),
        ("meta, 1 shard", "meta", {}, "load"),
        ("meta, 2 shards", "meta", {"shards": 2}, "load"),
        ("gguf f32", "gguf", {}, "load"),
        ("native bf16 -> fp32", "native", {"dtype": "bfloat16"}, "load"),
        ("gguf f16 -> fp32", "gguf", {"dtype": "f16"}, "load"),
        ("meta bf16 -> fp32", "meta", {"dtype": "bfloat16"}, "load"),
        ("hf bf16 -> fp32", "hf", {"dtype": "bfloat16"}, "load"),
    ]
    written: dict[tuple[str, str], Path] = {}
    for _, fmt, kw, _ in cases:
        key = (fmt, json.dumps(kw, sort_keys=True))
        if key not in written:
            target = work / (fmt + "".join(f"-{k}-{v}" for k, v in kw.items()))
            if fmt == "gguf":
                target = target.with_suffix(".gguf")
            t0 = time.perf_counter()
            written[key] = save(model, target, format=fmt, overwrite=True, **kw)
            print(f"wrote {written[key]} in {time.perf_counter() - t0:.1f}s")
    del model

    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    rows = []
    for label, fmt, kw, how in cases:
        path = written[(fmt, json.dumps(kw, sort_keys=True))]
        out = subprocess.run([sys.executable, "-c", _CHILD, str(path), how], env=env, check=True,
                             capture_output=True, text=True)
        r = json.loads(out.stdout.strip().splitlines()[-1])
        mib = weight_bytes / 2**20
        rows.append((label, r["load_s"], r["load_mib"] / mib, r["forward_mib"] / mib))

    print()
    print(f"{'format':<22} {'load s':>7} {'peak/weights after load':>24} {'after touching all':>19}")
    for label, secs, at_load, at_fwd in rows:
        print(f"{label:<22} {secs:>7.2f} {at_load:>24.2f} {at_fwd:>19.2f}")
    if opts.dir is None:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
