"""The embedded default: a seeded synthetic world with verifiable tasks, judges and every file the recipe needs
(docs/toyworld.md). ``ToyWorld(seed, size).write(out_dir)`` writes pretraining text, SFT dialogs, prompts, preference
pairs, GAtt dialogs and a held-out evaluation set; its judges score any answer to the prompts it made."""
from .expr import UnsafeExpression, canonical_expression, safe_eval
from .annotate import rating_for_gap
from .tasks import Task
from .text import apply_instruction, is_refusal, strip_decorations
from .vocab import (
    CATEGORIES,
    EVAL_CATEGORIES,
    HELPFULNESS_WEIGHTS,
    RATING_THRESHOLDS,
    REFUSAL,
    SAFETY_SCORES,
    SIZES,
)
from .world import PIPELINE_WORLDS, ToyWorld, pipeline_world

__all__ = [
    "CATEGORIES",
    "EVAL_CATEGORIES",
    "HELPFULNESS_WEIGHTS",
    "RATING_THRESHOLDS",
    "REFUSAL",
    "SAFETY_SCORES",
    "SIZES",
    "PIPELINE_WORLDS",
    "pipeline_world",
    "Task",
    "ToyWorld",
    "UnsafeExpression",
    "apply_instruction",
    "canonical_expression",
    "is_refusal",
    "rating_for_gap",
    "safe_eval",
    "strip_decorations",
]
