"""The user API of generation: ``generate`` (a batch of prompts, the static engine or the eager reference loop),
``TextStreamer`` (token ids to text deltas) and ``Llama`` (a model with its tokenizer, loaded from any checkpoint).

Sampling defaults are Meta's chat defaults (temperature 0.6, top-p 0.9); temperature 0 is greedy. ``engine="auto"``
(the default) takes the static engine, except for a model whose parameters are gathered by forward hooks (FSDP),
which the eager loop serves. Both paths draw from the same sampler and give the same completions: identical
greedy tokens, and sampled tokens equal up to the float rounding of their logits.
"""
from __future__ import annotations

from pathlib import Path
import dataclasses
from typing import Callable, Sequence

import torch

from ..model import Transformer
from .batch import decode_static
from .eager import decode_eager
from .int8 import is_quantized, quantize_int8
from .params import Completion, GenerationConfig
from .stops import Outputs, find_stop

__all__ = ["generate", "TextStreamer", "Llama"]


@torch.inference_mode()
def generate(
    model: Transformer,
    prompts: Sequence[Sequence[int]],
    config: GenerationConfig | None = None,
    *,
    tokenizer=None,
    on_token: Callable[[int, int], None] | None = None,
    **overrides,
) -> list[Completion]:
    """Continue each prompt (a list of token ids). Keyword overrides set GenerationConfig fields.

    ``on_token(row, token_id)`` is called for every generated token as soon as it is sampled (streaming).
    ``cfg.engine`` picks the path (see the module docstring); both return the same ``Completion`` fields.
    """
    cfg = dataclasses.replace(config or GenerationConfig(), **overrides)
    if not prompts:
        return []
    args = model.args
    if args.head != "lm":
        raise ValueError("generate needs a model with an LM head, not a scalar head")
    lengths = [len(p) for p in prompts]
    for i, n in enumerate(lengths):
        if n == 0:
            raise ValueError(f"prompt {i} is empty: start it with at least BOS")
        if n >= args.max_seq_len:
            raise ValueError(f"prompt {i} has {n} tokens; the model's context is {args.max_seq_len}")
    if cfg.stop_strings and tokenizer is None:
        raise ValueError("stop_strings need a tokenizer")
    stop_tokens = cfg.stop_tokens
    if stop_tokens is None:
        stop_tokens = (tokenizer.eos_id,) if tokenizer is not None else ()
    P = max(lengths)
    fills_context = P + cfg.max_new_tokens > args.max_seq_len  # then a row that meets no stop ends "context"
    outs = Outputs(len(prompts), cfg, stop_tokens, tokenizer, on_token, "context" if fills_context else "length")
    decode = decode_static if cfg.engine == "static" or (cfg.engine == "auto" and _static_engine_applies(model)) \
        else decode_eager
    decode(model, prompts, cfg, outs)
    return [_completion(toks, lps, reason, tokenizer, stop_tokens, cfg) for toks, lps, reason in outs.rows()]


def _static_engine_applies(model: Transformer) -> bool:
    """engine="auto": the static engine reads the parameters directly, so it is used only where they are plain
    tensors and no forward hook is needed to materialise them (a model sharded by FSDP has DTensor parameters
    gathered by hooks around its forward: the eager path serves it)."""
    if model._forward_pre_hooks or (len(model.layers) and model.layers[0]._forward_pre_hooks):
        return False
    w = model.tok_embeddings.weight
    return type(w.data) is torch.Tensor and type(model.layers[0].attention_norm.weight.data) is torch.Tensor


def _completion(ids: list[int], logprobs, finish: str, tokenizer, stop_tokens, cfg: GenerationConfig) -> Completion:
    text = None
    if tokenizer is not None:
        shown = ids[:-1] if ids and ids[-1] in stop_tokens else ids
        text = tokenizer.decode(shown)
        cut = find_stop(text, cfg.stop_strings)
        if cut >= 0:
            text = text[:cut]
    return Completion(ids, text, logprobs, finish)


class TextStreamer:
    """Turns a stream of token ids into text deltas. SentencePiece pieces can end inside a multi-byte UTF-8
    character (byte-fallback tokens), so text is released only when it no longer ends in a partial one."""

    def __init__(self, tokenizer, write: Callable[[str], None]):
        self.tokenizer, self.write = tokenizer, write
        self.ids: list[int] = []
        self.sent = 0

    def put(self, token_id: int) -> None:
        if token_id in (self.tokenizer.eos_id, self.tokenizer.bos_id):
            return
        self.ids.append(token_id)
        text = self.tokenizer.decode(self.ids)
        if text.endswith("\ufffd"):
            return
        if len(text) > self.sent:
            self.write(text[self.sent:])
            self.sent = len(text)


class Llama:
    """A model and its tokenizer: load any checkpoint, generate, chat, save.

    >>> llama = Llama.from_pretrained("path/to/checkpoint")          # native, Meta or Hugging Face dir, or .gguf
    >>> llama.text_completion(["The capital of France is"], temperature=0)
    >>> llama.chat_completion([[{"role": "user", "content": "Hi"}]])
    """

    def __init__(self, model: Transformer, tokenizer=None):
        self.model, self.tokenizer = model, tokenizer

    @property
    def args(self):
        return self.model.args

    @classmethod
    def from_pretrained(cls, path: str | Path, dtype: torch.dtype | str | None = None, device: str | torch.device = "cpu",
                        quantize: str | None = None) -> "Llama":
        """Load a checkpoint (see ``llama2.checkpoint.load``). ``quantize="int8"``: weight-only int8 linear layers
        for generation (``int8.py``; a quarter of fp32's bytes read per decoded token)."""
        from ..checkpoint import load

        if quantize not in (None, "none", "int8"):
            raise ValueError(f"quantize must be None or 'int8', got {quantize!r}")
        model, tokenizer = load(path, dtype=dtype, device=device)
        model.eval()
        if quantize == "int8":
            quantize_int8(model)
        return cls(model, tokenizer)

    def save(self, path: str | Path, format: str = "native", **kwargs) -> Path:
        from ..checkpoint import save

        if is_quantized(self.model):
            raise ValueError("a quantised model is for generation only; save the fp32/bf16 checkpoint it was loaded from")

        return save(self.model, path, format=format, tokenizer=self.tokenizer, **kwargs)

    def _need_tokenizer(self):
        if self.tokenizer is None:
            raise ValueError("this checkpoint has no tokenizer; pass token ids or attach one (llama.tokenizer = ...)")
        return self.tokenizer

    def generate(self, prompts: Sequence[Sequence[int]], on_token=None, **config) -> list[Completion]:
        return generate(self.model, prompts, GenerationConfig(**config), tokenizer=self.tokenizer, on_token=on_token)

    def text_completion(self, prompts: Sequence[str], **config) -> list[str]:
        tok = self._need_tokenizer()
        ids = [tok.encode(p, bos=True) for p in prompts]
        return [c.text for c in self.generate(ids, **config)]

    def chat_completion(self, dialogs, on_token=None, **config) -> list[dict]:
        """Next assistant message for each dialog (Meta's chat format, §3 and llama/generation.py)."""
        from ..chat import encode_dialog_prompt

        tok = self._need_tokenizer()
        ids = [encode_dialog_prompt(tok, d) for d in dialogs]
        return [{"role": "assistant", "content": c.text.strip()} for c in self.generate(ids, on_token=on_token, **config)]
