"""What a generation call is told and what it returns: a request's sampling settings (``SamplingParams``), a
whole call's (``GenerationConfig``: the request's fields plus how the decoding runs) and one ``Completion``."""
from __future__ import annotations

from dataclasses import dataclass

from ..config import SamplingConfig

__all__ = ["SamplingParams", "GenerationConfig", "Completion"]


@dataclass
class SamplingParams(SamplingConfig):
    """How one request is sampled: the sampling fields, plus its seed, stops and logprobs (the per-request subset
    of ``GenerationConfig``)."""

    seed: int | None = None
    """Seed of the draws: the same seed, prompt and model give the same tokens (whatever else runs in the batch)."""
    stop_tokens: tuple[int, ...] | None = None
    """Token ids that end a sequence (kept in the output). None means the tokenizer's EOS."""
    stop_strings: tuple[str, ...] = ()
    """Strings that end a sequence; the text is cut before them. Needs a tokenizer."""
    logprobs: bool = False
    """Also return the log-probability of each generated token under the model (temperature 1)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.stop_strings, str):
            self.stop_strings = (self.stop_strings,)


@dataclass
class GenerationConfig(SamplingParams):
    """Everything ``generate`` takes: the sampling fields and a request's seed, stops and logprobs
    (``SamplingParams``), and how the decoding runs."""

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
