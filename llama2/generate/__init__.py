"""Inference, one package: the rest of the code imports this face and nothing deeper (``tests/test_layers.py``).

* the user API (``api.py``): ``generate`` a batch of prompts, ``TextStreamer``, ``Llama`` (a model and its tokenizer
  from any checkpoint); ``GenerationConfig``, ``SamplingParams`` and ``Completion`` (``params.py``);
* whole-batch decoding: the static-cache engine (``batch.py``) and the eager reference loop (``eager.py``);
* continuous batching for a server: ``Engine`` (``engine.py``);
* the pieces the reward models and benchmarks reuse: ``Decoder`` (the compiled decode step and the chunked
  prefill, ``decoder.py``), ``prefill_shared``, ``forward_cached`` (the model over a static cache, ``forward.py``),
  the kernels (``kernels.py``), the token sampler (``sampler.py``), stop strings (``stops.py``);
* weight-only int8 (``int8.py``).

``llama2.generate`` is this package and also callable: ``llama2.generate(model, prompts, ...)`` is
``llama2.generate.generate(model, prompts, ...)``, so the short spelling of the common call keeps working.
"""
from __future__ import annotations

import sys
import types

from .api import Llama, TextStreamer, generate
from .decoder import ATTN_BUCKET, Decoder, attn_bucket, decoder_for, prefill_groups, prefill_shared
from .engine import Engine, StepOutput
from .forward import forward_cached, logits_of
from .int8 import Int8Linear, is_quantized, quantize_int8
from .kernels import dense_linear, linear, materialize
from .params import Completion, GenerationConfig, SamplingParams
from .sampler import Sampler, row_seed, sample_tokens, sampling_mode, token_logprob, uniforms
from .stops import ends_in_stop, find_stop

__all__ = [
    "generate", "GenerationConfig", "SamplingParams", "Completion", "TextStreamer", "Llama", "Engine", "StepOutput",
    "Int8Linear", "quantize_int8", "is_quantized", "Decoder", "decoder_for", "prefill_shared", "prefill_groups",
    "forward_cached", "logits_of", "attn_bucket", "ATTN_BUCKET", "linear", "dense_linear", "materialize", "Sampler",
    "sampling_mode", "sample_tokens", "token_logprob", "uniforms", "row_seed", "find_stop", "ends_in_stop",
]


class _CallableModule(types.ModuleType):
    """This package's module type: calling it calls ``generate``."""

    def __call__(self, *args, **kwargs):
        return generate(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
