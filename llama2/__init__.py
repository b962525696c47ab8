"""llama2: the whole Llama 2 recipe (Touvron et al., 2023) in one readable PyTorch package."""
from .model import ModelArgs, PRESETS, Transformer
from .kv_cache import KVCache
from .tokenizer import Tokenizer, train_tokenizer
from . import chat
from . import generate  # the inference package; callable: llama2.generate(model, prompts, ...)
from .generate import Engine, GenerationConfig, Llama, SamplingParams, quantize_int8
from .rlhf.reward_model import RewardModel

__version__ = "0.1.0"
__all__ = [
    "ModelArgs", "PRESETS", "Transformer", "KVCache", "Tokenizer", "train_tokenizer", "chat", "generate",
    "Llama", "GenerationConfig", "Engine", "SamplingParams", "quantize_int8", "RewardModel",
]
