"""llama2: the whole Llama 2 recipe (Touvron et al., 2023) in one readable PyTorch package."""
from .model import ModelArgs, PRESETS, Transformer
from .kv_cache import KVCache
from .tokenizer import Tokenizer, train_tokenizer
from . import chat
from .generation import Llama, generate, GenerationConfig
from .engine import Engine, SamplingParams
from .quant import quantize_int8
from .rlhf.reward_model import RewardModel

__version__ = "0.1.0"
__all__ = [
    "ModelArgs", "PRESETS", "Transformer", "KVCache", "Tokenizer", "train_tokenizer", "chat",
    "Llama", "generate", "GenerationConfig", "Engine", "SamplingParams", "quantize_int8", "RewardModel",
]
