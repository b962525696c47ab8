"""Data: JSONL records and their readers (:mod:`~llama2.data.records`), padding (:mod:`~llama2.data.batching`),
SFT encoding and packing (:mod:`~llama2.data.sft`), reward-model pairs and mixes (:mod:`~llama2.data.preferences`),
and pretraining token shards (:mod:`~llama2.data.prepare`)."""
from __future__ import annotations

from .batching import Padded, causal_padding_mask, pad_sequences
from .preferences import EncodedPair, collate_pairs, encode_preference, encode_preferences, gather_last, mix_preferences
from .prepare import PrepareConfig, TokenDataset, load_manifest, load_shards, prepare
from .records import (
    KINDS, RATINGS, BadLine, Preference, Prompt, Records, read_dialogs, read_preferences, read_prompts, split_holdout,
)
from .sft import (
    IGNORE_INDEX, EncodeStats, PackedRow, SFTExample, collate, encode_sft_example, encode_sft_examples,
    last_answer_only, pack_sft,
)

__all__ = [
    "PrepareConfig", "prepare", "load_manifest", "load_shards", "TokenDataset", "KINDS", "RATINGS", "BadLine",
    "Records", "Preference", "Prompt", "read_dialogs", "read_preferences", "read_prompts", "split_holdout",
    "Padded", "pad_sequences", "causal_padding_mask", "IGNORE_INDEX", "SFTExample", "EncodeStats",
    "encode_sft_example", "encode_sft_examples", "last_answer_only", "PackedRow", "pack_sft", "collate",
    "EncodedPair", "encode_preference", "encode_preferences", "collate_pairs", "gather_last", "mix_preferences",
]
