"""llama.cpp (through llama-cpp-python) as a peer in the inference benchmark, on the GGUF files we write.

``benchmarks/setup_llamacpp.sh`` builds the binding into ``build/llamacpp`` (outside .venv, never in ``make test``);
``load_llamacpp()`` imports it from there. ``export_ggufs`` writes our model as f32 and f16 GGUF with
``llama2.checkpoint.save`` (the real Llama 2 vocabulary from tests/assets, which llama.cpp needs in the file) and
lets llama.cpp quantize the f32 file to Q8_0. Decoding is driven token by token through ``Llama.eval`` with a
greedy argmax over the context's last logits: the same work as our greedy ``generate`` (one cached step per
token, no sampler chain), in the same Python process.
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
LLAMACPP_DIR = ROOT / "build" / "llamacpp"
VOCAB_GGUF = ROOT / "tests" / "assets" / "ggml-vocab-llama-spm.gguf"


def load_llamacpp():
    """The llama_cpp module, from build/llamacpp when there; None (with the reason printed) when missing."""
    if LLAMACPP_DIR.is_dir() and str(LLAMACPP_DIR) not in sys.path:
        sys.path.append(str(LLAMACPP_DIR))
    try:
        import llama_cpp
    except ImportError as e:  # pragma: no cover - depends on the set-up
        print(f"llama.cpp: not available ({e}); run `bash benchmarks/setup_llamacpp.sh` first")
        return None
    return llama_cpp


def export_ggufs(model, out_dir: Path, kinds=("f32", "f16", "q8_0")) -> dict[str, Path]:
    """Write ``model`` as GGUF files in ``out_dir``: f32 and f16 by our converter, Q8_0 by llama.cpp's quantizer
    from the f32 file (llama.cpp's own Q8_0: blocks of 32 weights with one fp16 scale)."""
    from llama2.checkpoint import save
    from llama2.tokenizer import Tokenizer

    llama_cpp = load_llamacpp()
    tok = Tokenizer.from_file(VOCAB_GGUF)
    out_dir.mkdir(parents=True, exist_ok=True)
    files = {}
    for kind in ("f32", "f16"):
        if kind in kinds or (kind == "f32" and "q8_0" in kinds):
            files[kind] = save(model, out_dir / f"model-{kind}.gguf", format="gguf", tokenizer=tok, dtype=kind,
                               overwrite=True)
    if "q8_0" in kinds:
        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype = llama_cpp.LLAMA_FTYPE_MOSTLY_Q8_0
        params.nthread = 2
        dst = out_dir / "model-q8_0.gguf"
        rc = llama_cpp.llama_model_quantize(str(files["f32"]).encode(), str(dst).encode(), params)
        if rc != 0:
            raise RuntimeError(f"llama_model_quantize failed with {rc}")
        files["q8_0"] = dst
    return {k: files[k] for k in kinds}


class LlamaCpp:
    """One llama.cpp context over a GGUF file: prefill, greedy decode and logits, as our benchmark needs them."""

    def __init__(self, path: Path, n_ctx: int, threads: int, logits_all: bool = False, kv_f32: bool = False):
        """``kv_f32``: keep the KV cache in f32 (llama.cpp's default is f16), as our fp32 cache; used for the f32
        file, so that the f32 comparison is the same arithmetic end to end."""
        llama_cpp = load_llamacpp()
        kv = {"type_k": llama_cpp.GGML_TYPE_F32, "type_v": llama_cpp.GGML_TYPE_F32} if kv_f32 else {}
        self.llm = llama_cpp.Llama(
            model_path=str(path), n_ctx=n_ctx, n_batch=512, n_ubatch=512, n_threads=threads,
            n_threads_batch=threads, logits_all=logits_all, verbose=False, **kv,
        )
        self.n_vocab = self.llm.n_vocab()

    def last_logits(self) -> np.ndarray:
        """(vocab,) logits of the last evaluated token (a view into llama.cpp's buffer)."""
        return np.ctypeslib.as_array(self.llm._ctx.get_logits(), shape=(self.n_vocab,))

    def prefill(self, tokens: list[int]) -> np.ndarray:
        """A fresh context: evaluate ``tokens`` (in n_batch chunks), return the last position's logits."""
        self.llm.reset()
        self.llm._ctx.kv_cache_clear()
        self.llm.eval(tokens)
        return self.last_logits()

    def greedy(self, prompt: list[int], n: int) -> list[int]:
        """``n`` greedy tokens after ``prompt``: prefill, then one cached step per token."""
        logits = self.prefill(prompt)
        out = []
        for i in range(n):
            t = int(np.argmax(logits))
            out.append(t)
            if i == n - 1:
                break
            self.llm.eval([t])
            logits = self.last_logits()
        return out

    def all_logits(self, tokens: list[int]) -> np.ndarray:
        """(T, vocab) logits of every position (needs ``logits_all=True``)."""
        self.llm.reset()
        self.llm._ctx.kv_cache_clear()
        self.llm.eval(tokens)
        return np.array(self.llm.scores[: len(tokens)])
