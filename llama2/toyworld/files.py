"""The world's files: every dataset built in one fixed order, its metadata, and writing them to a directory in
the formats of :mod:`llama2.data.records` (docs/toyworld.md).

Each dataset draws from its own seeded stream ("pretrain", "sft", ...), but the training streams of the generated
categories are shared, so the build order below is part of the output: changing it changes every file after.
"""
from __future__ import annotations

import hashlib
import json
import os
import random
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from .annotate import preference_records
from .corpus import pretraining_text
from .dialogs import eval_records, gatt_dialogs, prompt_records, sft_dialogs
from .facts import Facts
from .pools import TaskPools
from .vocab import (
    CATEGORIES, COLOURS, EVAL_CATEGORIES, FOODS, HELPFULNESS_WEIGHTS, ITEMS, JOBS, PETS, RATING_THRESHOLDS,
    READ_NAMES, READ_PLACES, REFUSAL, RULES, SAFETY_SCORES, SECRET_QUESTIONS, TOWNS,
)

__all__ = ["FILES", "build_files", "metadata", "world_record", "write_files", "fingerprint"]

# Dataset name -> file name; "world" is the world itself (world.json), every other name a dataset.
FILES = {
    "pretrain": "pretrain.txt", "sft": "sft.jsonl", "sft_val": "sft_val.jsonl", "prompts": "prompts.jsonl",
    "prompts_val": "prompts_val.jsonl", "prompts_heldout": "prompts_heldout.jsonl", "preferences": "preferences.jsonl",
    "preferences_heldout": "preferences_heldout.jsonl", "gatt_dialogs": "gatt_dialogs.jsonl", "eval": "eval.jsonl",
    "world": "world.json",
}


def build_files(streams: Callable[[str], random.Random], facts: Facts, pools: TaskPools, cfg: Mapping[str, Any],
                mix: Mapping[str, float]) -> dict[str, Any]:
    """Every dataset, in memory: text for "pretrain", lists of records for the others (``streams(purpose)``: the
    world's seeded stream of a purpose)."""
    files: dict[str, Any] = {}
    files["pretrain"] = pretraining_text(streams("pretrain"), facts, pools, cfg["pretrain_bytes"])
    files["sft"] = sft_dialogs(streams("sft"), pools, cfg["sft"], mix)
    files["sft_val"] = sft_dialogs(streams("sft_val"), pools, cfg["sft_val"], mix)
    files["prompts"] = prompt_records(streams("prompts"), pools, cfg["prompts"], mix)
    files["prompts_val"] = prompt_records(streams("prompts_val"), pools, cfg["prompts_val"], mix, split="val")
    files["eval"] = eval_records(streams("eval"), pools, cfg)
    files["prompts_heldout"] = [{"dialog": e["dialog"], "safety": e["safety"], "category": e["category"]}
                                for e in files["eval"]]
    files["preferences"] = preference_records(streams("preferences"), facts, pools, cfg["preferences"], "train", mix)
    files["preferences_heldout"] = preference_records(streams("preferences_heldout"), facts, pools,
                                                      cfg["preferences_heldout"], "heldout", mix)
    files["gatt_dialogs"] = gatt_dialogs(streams("gatt"), pools, cfg["gatt_dialogs"], cfg["gatt_turns"])
    return files


def metadata(seed: int, size: str, cfg: Mapping[str, Any], mix: Mapping[str, float], files: Mapping[str, Any],
             pools: TaskPools) -> dict[str, Any]:
    """Settings, counts (bytes of text, records of the rest), ratings per preference set, and the judges' rules."""
    counts = {k: (len(v.encode()) if isinstance(v, str) else len(v)) for k, v in files.items()}
    ratings: dict[str, dict[str, int]] = {}
    for name in ("preferences", "preferences_heldout"):
        for r in files[name]:
            ratings.setdefault(f"{name}/{r['kind']}", {}).setdefault(r["rating"], 0)
            ratings[f"{name}/{r['kind']}"][r["rating"]] += 1
    return {
        "seed": seed, "size": size, "config": cfg, "mix": mix,
        "counts": counts, "pretrain_bytes": counts["pretrain"], "rating_counts": ratings,
        "categories": list(CATEGORIES), "eval_categories": list(EVAL_CATEGORIES), "refusal": REFUSAL,
        "rating_thresholds": {name: t for name, t in RATING_THRESHOLDS} | {"unsure": 0.0},
        "rating_rule": "gap = chosen score - rejected score (helpfulness pairs: helpfulness judge; safety pairs: "
                       "safety judge, or the helpfulness judge between two equally safe answers on a harmless "
                       "prompt); gap >= 0.75 significantly_better, >= 0.5 better, >= 0.25 slightly_better, "
                       ">= 0.1 negligibly_better, (0, 0.1) unsure",
        "helpfulness_weights": HELPFULNESS_WEIGHTS, "safety_scores": SAFETY_SCORES,
        "heldout": {k: len(v) for k, v in pools.heldout.items()}, "val": {k: len(v) for k, v in pools.val.items()},
        "sft_flaws": _flaw_counts(files["sft"]),
    }


def _flaw_counts(dialogs: list[dict]) -> dict[str, int]:
    """How many of the SFT answers carry each writer's flaw ("clean": none)."""
    counts: dict[str, int] = {}
    for d in dialogs:
        for flaw in d.get("flaws", []):
            counts[flaw or "clean"] = counts.get(flaw or "clean", 0) + 1
    return counts


def world_record(facts: Facts, meta: dict[str, Any]) -> dict[str, Any]:
    """The world itself (people with their secrets, places, rules) and the metadata: world.json."""
    return {
        "people": [vars(p) | {} for p in facts.people],
        "towns": TOWNS, "jobs": JOBS, "pets": PETS, "colours": COLOURS, "foods": FOODS,
        "reading": {"names": READ_NAMES, "items": ITEMS, "places": READ_PLACES},
        "rules": [{"question": q, "yes": list(pos), "no": list(neg)} for q, pos, neg, _, _ in RULES],
        "secret_questions": SECRET_QUESTIONS,
        "metadata": meta,
    }


def write_files(out_dir: str | os.PathLike[str], files: Mapping[str, Any], world: Callable[[], dict[str, Any]]
                ) -> dict[str, Path]:
    """Write every file of :data:`FILES` to ``out_dir`` (created if needed) and return {name: path}; ``world()``
    gives world.json's record. A file already holding the same bytes is left untouched."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {}
    for name, fname in FILES.items():
        if name == "world":
            text = json.dumps(world(), indent=1, ensure_ascii=False) + "\n"
        elif name == "pretrain":
            text = files[name]
        else:
            text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in files[name])
        path = out / fname
        data = text.encode("utf-8")
        if not (path.exists() and path.stat().st_size == len(data) and path.read_bytes() == data):
            tmp = path.with_suffix(path.suffix + ".tmp")
            tmp.write_bytes(data)
            os.replace(tmp, path)
        paths[name] = path
    return paths


def fingerprint(world: dict[str, Any], files: Mapping[str, Any]) -> str:
    """A short hash of everything the world writes."""
    h = hashlib.sha256(json.dumps(world, sort_keys=True).encode())
    for name in FILES:
        if name != "world":
            h.update(json.dumps(files[name], sort_keys=True).encode())
    return h.hexdigest()[:16]
