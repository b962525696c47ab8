"""Batched sampling with the KV cache, and ``Llama``: a model with its tokenizer, loaded from any checkpoint.

Prompts of different lengths are left-padded into one batch: each row's rotary positions start at 0 at its
first real token, and an attention mask hides the pads, so a row decodes exactly as it would alone. Meta's
reference instead right-pads and overwrites generated tokens with prompt tokens until every prompt is
consumed; left padding does the prefill in one pass and never recomputes.

Sampling defaults are Meta's chat defaults (temperature 0.6, top-p 0.9); temperature 0 is greedy.

Two paths compute the same completions. ``engine="static"`` (``llama2.engine``) decodes over a preallocated
static KV cache with a fixed-shape step that samples on the device, compacts the batch as rows finish and can be
compiled (a CUDA graph on GPU); ``engine="eager"`` is the loop below over ``model.forward``, the reference the
static engine is tested against: identical greedy tokens, logits within float rounding. ``"auto"`` (the
default) takes the static engine, except for a model whose parameters are gathered by forward hooks (FSDP). Sampled (temperature > 0) draws differ between the two paths: the eager one
draws from one ``torch.Generator`` for the whole batch, the static one from a counter-based hash of (row seed,
token index), so its samples do not depend on batch composition; both follow the same distribution and are
reproducible for a given seed.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch

from .engine import Outputs, SamplingParams, find_stop, generate_static
from .kv_cache import KVCache
from .model import Transformer, causal_mask

__all__ = ["GenerationConfig", "Completion", "sample_next", "generate", "TextStreamer", "Llama"]


@dataclass
class GenerationConfig(SamplingParams):
    """Everything ``generate`` takes: the sampling fields and a request's seed, stops and logprobs
    (:class:`llama2.engine.SamplingParams`), and how the decoding runs."""

    engine: str = "auto"
    """Decoding path: "static" (preallocated cache, fixed-shape step, sampling on the device, finished rows
    compacted away), "eager" (the reference loop over model.forward) or "auto" (static, except for a model
    sharded by FSDP, whose parameters only its own forward gathers)."""
    compile: bool | None = None
    """torch.compile the static decode step (replayed as a CUDA graph on GPU). None: by measured cost: compile
    once the eager steps taken on this model (over all calls) would have paid for the compile, so a short call
    never waits for one. A failed compile falls back to the eager step with a warning."""
    compact: bool = True
    """Static engine: drop finished rows from the batch (and its cache) once a quarter of them are done."""
    prefill_chunk: int = 512
    """Static engine: prompt tokens per prefill forward (bounds activation memory for long prompts)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.engine not in ("auto", "static", "eager"):
            raise ValueError(f"engine must be 'auto', 'static' or 'eager', got {self.engine!r}")
        if self.prefill_chunk < 1:
            raise ValueError(f"prefill_chunk must be >= 1, got {self.prefill_chunk}")


@dataclass
class Completion:
    tokens: list[int]
    """Generated ids (a stop token that ended the sequence is included; tokens of a stop string are not cut)."""
    text: str | None = None
    """Decoded text (cut before a stop string), when a tokenizer was given."""
    logprobs: list[float] | None = None
    finish_reason: str = "length"
    """"stop" (a stop token or string), "length" (max_new_tokens) or "context" (max_seq_len reached)."""


def sample_next(
    logits: torch.Tensor, temperature: float, top_p: float = 1.0, top_k: int = 0, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Pick one token per row from (B, V) logits. Greedy at temperature 0; otherwise softmax(logits / T),
    restricted to the top-k and then to the top-p nucleus (Holtzman et al., 2020; Meta's sample_top_p)."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_k == 0 and top_p >= 1.0:
        return torch.multinomial(probs, 1, generator=generator).squeeze(-1)
    sorted_probs, sorted_idx = probs.sort(dim=-1, descending=True)
    if top_k > 0:
        sorted_probs[:, top_k:] = 0.0
    if top_p < 1.0:
        # drop a token when the mass before it already reaches top_p (the first token always stays)
        before = sorted_probs.cumsum(dim=-1) - sorted_probs
        sorted_probs[before > top_p * sorted_probs.sum(-1, keepdim=True)] = 0.0
    sorted_probs /= sorted_probs.sum(dim=-1, keepdim=True)
    choice = torch.multinomial(sorted_probs, 1, generator=generator)
    return sorted_idx.gather(-1, choice).squeeze(-1)


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
    if cfg.engine == "static" or (cfg.engine == "auto" and _static_engine_applies(model)):
        rows = generate_static(model, prompts, cfg, stop_tokens, tokenizer=tokenizer, on_token=on_token)
        return [_completion(toks, lps, reason, tokenizer, stop_tokens, cfg) for toks, lps, reason in rows]
    device = model.tok_embeddings.weight.device
    B, P = len(prompts), max(lengths)
    total = min(args.max_seq_len, P + cfg.max_new_tokens)
    n_new = total - P

    # Left-pad: row b's real tokens occupy columns pad[b]..P-1.
    pad = torch.tensor([P - n for n in lengths], device=device)
    tokens = torch.zeros(B, P, dtype=torch.long, device=device)
    for b, p in enumerate(prompts):
        tokens[b, P - len(p):] = torch.as_tensor(list(p), dtype=torch.long)
    ragged = bool(pad.any())
    positions = (torch.arange(P, device=device)[None, :] - pad[:, None]).clamp(min=0)  # (B, P)
    if ragged:
        valid = torch.arange(total, device=device)[None, :] >= pad[:, None]  # (B, total): key is a real token
        # causal & real key; a pad query sees itself so its softmax is never over nothing (no NaN in the cache)
        mask = (causal_mask(P, P, device)[None] & valid[:, None, :P]) | torch.eye(P, dtype=torch.bool, device=device)
        mask = mask[:, None]  # (B, 1, P, P)
    else:
        valid, mask = None, None

    gen = torch.Generator(device=device)
    if cfg.seed is not None:
        gen.manual_seed(cfg.seed)
    else:
        gen.seed()

    cache = KVCache.for_model(model, B, total)
    logits = model(tokens, 0, cache, mask, positions if ragged else None, last_only=True)[:, -1]  # (B, V)
    # rows that hit a stop token or string keep decoding (in the batch) but record nothing
    outs = Outputs(B, cfg, stop_tokens, tokenizer, on_token, "length" if n_new == cfg.max_new_tokens else "context")
    next_pos = positions[:, -1] + 1  # (B,)

    for step in range(n_new):
        nxt = sample_next(logits, cfg.temperature, cfg.top_p, cfg.top_k, gen)  # (B,)
        lp = (torch.log_softmax(logits.float(), dim=-1).gather(-1, nxt[:, None]).squeeze(-1).tolist()
              if cfg.logprobs else None)
        if outs.record(range(B), nxt.tolist(), lp) == B or step == n_new - 1:
            break
        start = P + step
        step_mask = valid[:, None, None, : start + 1] if ragged else None  # (B, 1, 1, S)
        step_pos = next_pos[:, None] if ragged else None
        logits = model(nxt[:, None], start, cache, step_mask, step_pos, last_only=True)[:, -1]
        next_pos = next_pos + 1

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
        for generation (``llama2.quant``; about 4x fewer bytes per decoded token than fp32)."""
        from .checkpoint import load

        if quantize not in (None, "none", "int8"):
            raise ValueError(f"quantize must be None or 'int8', got {quantize!r}")
        model, tokenizer = load(path, dtype=dtype, device=device)
        model.eval()
        if quantize == "int8":
            from .quant import quantize_int8

            quantize_int8(model)
        return cls(model, tokenizer)

    def save(self, path: str | Path, format: str = "native", **kwargs) -> Path:
        from .checkpoint import save
        from .quant import is_quantized

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
        from .chat import encode_dialog_prompt

        tok = self._need_tokenizer()
        ids = [encode_dialog_prompt(tok, d) for d in dialogs]
        return [{"role": "assistant", "content": c.text.strip()} for c in self.generate(ids, on_token=on_token, **config)]
