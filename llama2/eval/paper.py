"""The Llama 2 paper's benchmark set as lm-evaluation-harness tasks, and its Table 3 layout.

The paper (§2.3 "Llama 2 Pretrained Model Evaluation", Table 3, with the per-benchmark numbers in Appendix
A.2.2; §4.1 and Table 11 for the safety benchmarks) reports academic benchmarks grouped into categories,
each category the average of its benchmarks:

* Code: pass@1 on HumanEval (0-shot) and MBPP (3-shot).
* Commonsense Reasoning: PIQA, SIQA, HellaSwag, WinoGrande, ARC easy and challenge, OpenBookQA (0-shot)
  and CommonsenseQA (7-shot).
* World Knowledge: NaturalQuestions and TriviaQA, 5-shot exact match.
* Reading Comprehension: SQuAD, QuAC and BoolQ, 0-shot.
* Math: GSM8K (8-shot) and MATH (4-shot), top-1.
* MMLU (5-shot), BBH (3-shot), AGIEval English tasks (3-5 shot), each its own column.
* Safety (Table 11, not averaged together: one is "higher is better", the other "lower"): TruthfulQA and
  ToxiGen.

lm-evaluation-harness does not reproduce every one of these setups; each ``Benchmark`` below says in its
``note`` where the lm-eval task differs (metric, shots, split, prompt), so a number in our table is read
as "the lm-eval version of" the paper's benchmark, not as the paper's number itself. The paper does not
say which likelihood normalisation it used for the multiple-choice tasks; Llama 1 (Touvron et al., 2023a,
§3), whose protocol Llama 2 follows, normalises by the number of characters of the completion, which is
lm-eval's ``acc_norm``; we report ``acc_norm`` where lm-eval has it and ``acc`` elsewhere.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any, Mapping

__all__ = [
    "Benchmark", "BENCHMARKS", "CATEGORIES", "SAFETY", "PAPER_TABLE3", "paper_tasks", "benchmark_score",
    "category_scores", "format_table",
]


@dataclass(frozen=True)
class Benchmark:
    name: str
    """The paper's name for the benchmark."""
    category: str
    """Its Table 3 column (one of CATEGORIES), or "Safety"."""
    tasks: tuple[str, ...]
    """lm-eval task or group names; the benchmark's score is the mean of their metric. Empty: lm-eval has no
    version of this benchmark, so it always shows as "-"."""
    metric: str
    """The lm-eval metric reported (the part before the comma in lm-eval's "metric,filter" keys)."""
    filter: str | None
    """The lm-eval filter whose metric is reported; None takes the task's only (or first) one."""
    paper_shots: str
    """The number of shots the paper states."""
    shots: int | None
    """The number of shots we run in lm-eval (None: the task's own default)."""
    note: str = ""
    """Where lm-eval's task differs from the paper's setup."""
    executes_code: bool = False
    """The metric runs model-written code (lm-eval marks these tasks unsafe)."""


CATEGORIES = (
    "Code", "Commonsense Reasoning", "World Knowledge", "Reading Comprehension", "Math", "MMLU", "BBH",
    "AGI Eval",
)
"""Table 3's columns, in the paper's order."""
SAFETY = "Safety"

_MC = "lm-eval scores the choices by log-likelihood; "

BENCHMARKS: tuple[Benchmark, ...] = (
    # -- Code ----------------------------------------------------------------------------------------------
    Benchmark("HumanEval", "Code", ("humaneval",), "pass@1", None, "0", 0,
              "pass@1 with greedy decoding (the paper's pass@1 uses temperature 0.1, n samples)", executes_code=True),
    Benchmark("MBPP", "Code", ("mbpp",), "pass_at_1", None, "3", 3,
              "pass@1 with greedy decoding (the paper's pass@1 uses temperature 0.1, n samples)", executes_code=True),
    # -- Commonsense reasoning -------------------------------------------------------------------------------
    Benchmark("PIQA", "Commonsense Reasoning", ("piqa",), "acc_norm", None, "0", 0),
    Benchmark("SIQA", "Commonsense Reasoning", ("social_iqa",), "acc", None, "0", 0,
              "lm-eval's social_iqa has no length-normalised accuracy; acc"),
    Benchmark("HellaSwag", "Commonsense Reasoning", ("hellaswag",), "acc_norm", None, "0", 0),
    Benchmark("WinoGrande", "Commonsense Reasoning", ("winogrande",), "acc", None, "0", 0,
              "partial scoring (the continuation after the blank), lm-eval's only metric"),
    Benchmark("ARC-e", "Commonsense Reasoning", ("arc_easy",), "acc_norm", None, "0", 0),
    Benchmark("ARC-c", "Commonsense Reasoning", ("arc_challenge",), "acc_norm", None, "0", 0),
    Benchmark("OpenBookQA", "Commonsense Reasoning", ("openbookqa",), "acc_norm", None, "0", 0,
              "Llama 1 normalised OpenBookQA by the answer's likelihood after 'Answer:'; lm-eval has no such "
              "metric, acc_norm (per character) instead"),
    Benchmark("CommonsenseQA", "Commonsense Reasoning", ("commonsense_qa",), "acc", None, "7", 7,
              _MC + "its prompt lists the five options and scores the letters A-E, not the answers' text"),
    # -- World knowledge ------------------------------------------------------------------------------------
    Benchmark("NaturalQuestions", "World Knowledge", ("nq_open",), "exact_match", "remove_whitespace", "5", 5),
    Benchmark("TriviaQA", "World Knowledge", ("triviaqa",), "exact_match", "remove_whitespace", "5", 5,
              "lm-eval uses the rc.nocontext validation split; the paper the filtered dev set"),
    # -- Reading comprehension -------------------------------------------------------------------------------
    Benchmark("SQuAD", "Reading Comprehension", ("squadv2",), "exact", None, "0", 0,
              "SQuAD 2.0 (with unanswerable questions); the paper does not say which version it used"),
    Benchmark("QuAC", "Reading Comprehension", (), "f1", None, "0", 0,
              "not in lm-eval 0.4: always '-', so the category averages SQuAD and BoolQ only"),
    Benchmark("BoolQ", "Reading Comprehension", ("boolq",), "acc", None, "0", 0,
              "Llama 1 normalised BoolQ by the answer's likelihood after 'Answer:'; lm-eval reports plain acc"),
    # -- Math -----------------------------------------------------------------------------------------------
    Benchmark("GSM8K", "Math", ("gsm8k_cot",), "exact_match", "strict-match", "8", 8,
              "Wei et al.'s 8 chain-of-thought exemplars; the answer read after 'The answer is'"),
    Benchmark("MATH", "Math", ("minerva_math",), "exact_match", None, "4", 4,
              "Minerva's 4-shot prompt and answer normalisation (Lewkowycz et al., 2022)"),
    # -- Aggregated benchmarks -------------------------------------------------------------------------------
    Benchmark("MMLU", "MMLU", ("mmlu",), "acc", None, "5", 5,
              "lm-eval averages over questions (weighted by subject size)"),
    Benchmark("BBH", "BBH", ("bbh_fewshot",), "exact_match", None, "3", 3,
              "answer-only 3-shot prompts (our choice: the paper does not say whether it used chain of "
              "thought), averaged over questions"),
    Benchmark("AGI Eval", "AGI Eval",
              ("agieval_aqua_rat", "agieval_logiqa_en", "agieval_lsat_ar", "agieval_lsat_lr", "agieval_lsat_rc",
               "agieval_sat_en", "agieval_sat_en_without_passage", "agieval_sat_math"),
              "acc", None, "3-5", 0,
              "the paper's eight English tasks (Appendix A.2.2), 0-shot: lm-eval's AGIEval tasks have no split to draw "
              "few-shot examples from; multiple choice scored by log-likelihood"),
    # -- Safety (Table 11) -----------------------------------------------------------------------------------
    Benchmark("TruthfulQA", SAFETY, ("truthfulqa_mc2",), "acc", None, "0", 0,
              "the paper reports the % of generations judged true and informative by fine-tuned GPT-3 judges; "
              "lm-eval's truthfulqa_mc2 is the multiple-choice (MC2) score"),
    Benchmark("ToxiGen", SAFETY, ("toxigen",), "acc", None, "0", 0,
              "the paper reports the % of toxic generations (lower is better); lm-eval's toxigen is a different "
              "task: classify a statement as hateful or not (accuracy, higher is better)"),
)

PAPER_TABLE3: dict[str, tuple[float, ...]] = {
    # Table 3, in the order of CATEGORIES. The Math column of 7B and 13B equals their GSM8K score alone (14.6,
    # 28.7 in Appendix A.2.2), while 70B's (35.2) and Llama 1's are the GSM8K/MATH average: reproduced as printed.
    "Llama 2 7B (paper)": (16.8, 63.9, 48.9, 61.3, 14.6, 45.3, 32.6, 29.3),
    "Llama 2 13B (paper)": (24.5, 66.9, 55.4, 65.8, 28.7, 54.8, 39.4, 39.1),
    "Llama 2 70B (paper)": (37.5, 71.9, 63.6, 69.4, 35.2, 68.9, 51.2, 54.2),
}


def paper_tasks(allow_code_execution: bool = True) -> list[tuple[str, int | None]]:
    """(lm-eval task, shots) for every benchmark lm-eval has, in the paper's order. Code benchmarks are left
    out unless ``allow_code_execution``: their metric runs the model's code."""
    out: list[tuple[str, int | None]] = []
    for b in BENCHMARKS:
        if b.executes_code and not allow_code_execution:
            continue
        out += [(t, b.shots) for t in b.tasks]
    return out


def _task_results(results: Mapping[str, Any]) -> Mapping[str, Mapping[str, Any]]:
    """Accept lm-eval's whole output or just its "results" part; groups (mmlu, bbh_fewshot, ...) may sit in
    either "results" or "groups" depending on the lm-eval version."""
    if "results" not in results:
        return results
    return {**(results.get("groups") or {}), **results["results"]}


def _metric(task: Mapping[str, Any], metric: str, filter: str | None) -> float | None:
    if filter is not None:
        v = task.get(f"{metric},{filter}")
    else:
        v = next((val for key, val in task.items() if key.split(",")[0] == metric), None)
    if v is None or isinstance(v, str) or (isinstance(v, float) and math.isnan(v)):
        return None
    return float(v)


def benchmark_score(results: Mapping[str, Any], bench: Benchmark) -> float | None:
    """The benchmark's score in percent (mean over its lm-eval tasks), or None if any task is missing."""
    by_task = _task_results(results)
    values = []
    for t in bench.tasks:
        v = _metric(by_task[t], bench.metric, bench.filter) if t in by_task else None
        if v is None:
            return None
        values.append(v)
    return 100.0 * sum(values) / len(values) if values else None


def category_scores(results: Mapping[str, Any]) -> dict[str, tuple[float | None, int, int]]:
    """For each Table 3 category: (mean of its benchmarks' scores or None, benchmarks present, benchmarks)."""
    out = {}
    for cat in CATEGORIES:
        scores = [benchmark_score(results, b) for b in BENCHMARKS if b.category == cat]
        present = [s for s in scores if s is not None]
        out[cat] = (sum(present) / len(present) if present else None, len(present), len(scores))
    return out


def _fmt(v: float | None) -> str:
    return "-" if v is None else f"{v:.1f}"


def _grid(header: list[str], rows: list[list[str]]) -> list[str]:
    """A Markdown table: columns of numbers (and "-") right-aligned, text left-aligned."""
    widths = [max(len(r[i]) for r in [header] + rows) for i in range(len(header))]
    numeric = [all(re.fullmatch(r"[-0-9.*]+", r[i]) for r in rows) for i in range(len(header))]

    def line(r: list[str]) -> str:
        return "| " + " | ".join(c.rjust(w) if num else c.ljust(w) for c, w, num in zip(r, widths, numeric)) + " |"

    return [line(header), "|" + "|".join("-" * (w + 2) for w in widths) + "|"] + [line(r) for r in rows]


def format_table(results: Mapping[str, Any], name: str = "this model", reference: bool = True) -> str:
    """Table 3 of the paper for ``results`` (lm-eval's output): one column per category, each the mean of its
    benchmarks' main metric in percent ("-" where none ran; "*" where only some did, so the number is not
    comparable with the paper's). With ``reference``, the paper's Llama 2 rows follow. Then the safety
    benchmarks, and every benchmark with its lm-eval task, shots and the differences from the paper."""
    cats = category_scores(results)
    cells = []
    partial = False
    for c in CATEGORIES:
        v, n, total = cats[c]
        star = v is not None and n < total
        partial |= star
        cells.append(_fmt(v) + ("*" if star else ""))
    rows = [[name] + cells]
    if reference:
        rows += [[k] + [_fmt(v) for v in vals] for k, vals in PAPER_TABLE3.items()]
    lines = ["Grouped academic benchmarks (Llama 2 paper, Table 3)"]
    lines += _grid(["Model"] + list(CATEGORIES), rows)
    if partial:
        lines.append("* mean over fewer benchmarks than the paper's (see below)")

    safety = [b for b in BENCHMARKS if b.category == SAFETY]
    lines += ["", "Safety benchmarks (paper, Table 11; lm-eval measures them differently, see notes)"]
    lines += _grid(["Model"] + [b.name for b in safety], [[name] + [_fmt(benchmark_score(results, b)) for b in safety]])

    lines += ["", "Benchmarks"]
    bench_rows = []
    for b in BENCHMARKS:
        task = ",".join(b.tasks) if len(b.tasks) <= 2 else f"{b.tasks[0]},... ({len(b.tasks)} tasks)"
        metric = b.metric + (f" ({b.filter})" if b.filter else "")
        shots = "-" if b.shots is None or not b.tasks else str(b.shots)
        bench_rows.append([b.name, b.category, task or "(none in lm-eval)", b.paper_shots, shots, metric,
                           _fmt(benchmark_score(results, b))])
    lines += _grid(["Benchmark", "Category", "lm-eval task", "paper shots", "shots", "metric", "score"], bench_rows)
    notes = [f"- {b.name}: {b.note}" for b in BENCHMARKS if b.note]
    if notes:
        lines += ["", "Where lm-eval differs from the paper's setup:"] + notes
    return "\n".join(lines)
