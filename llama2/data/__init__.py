"""Data for pretraining: text corpora tokenized once into flat shards of token ids (:mod:`llama2.data.prepare`)."""
from __future__ import annotations

from .prepare import PrepareConfig, TokenDataset, load_manifest, load_shards, prepare

__all__ = ["PrepareConfig", "prepare", "load_manifest", "load_shards", "TokenDataset"]
