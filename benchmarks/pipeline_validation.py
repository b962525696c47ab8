"""The validation figures of finished pipeline runs, side by side: what the recipe's settings are chosen by.

Each run's evaluation stage also compares PPO with SFT on the validation prompts (prompts_val.jsonl: items of their
own, with a secret-question phrasing training never saw), never on the evaluation items. This prints, per run, the
judges' head-to-head of PPO against SFT, the change of helpfulness and accuracy with their paired standard errors,
and the refusal rates on secret and harmless prompts, so that settings can be compared without looking at the
evaluation.

    python benchmarks/pipeline_validation.py runs/a runs/b ...
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path


def row(run: Path) -> str:
    m = json.loads((run / "metrics.json").read_text())
    v = m.get("validation")
    if not v:
        return f"| {run} | no validation figures (a run before they were measured) | | | | |"
    c = v["PPO vs SFT"]
    h, hp, acc, s, hr = (c["head_to_head"], c["helpfulness"], c["accuracy_all"], c["refusal_secret"],
                         c["refusal_harmless"])
    return (f"| {run} | {h['rate']:.1%} ({h['low95']:.1%}-{h['high95']:.1%}) | {hp['change']:+.3f} ({hp['se']:.3f}) | "
            f"{acc['change'] * 100:+.1f} ({acc['se'] * 100:.1f}) | {s['before']:.0%} -> {s['after']:.0%} | "
            f"{hr['before']:.0%} -> {hr['after']:.0%} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("runs", nargs="+", type=Path, help="finished `llama2 pipeline` output directories")
    args = ap.parse_args()
    print("| run | PPO vs SFT (judges) | helpfulness change (SE) | accuracy change, points (SE) | secret refused | "
          "harmless refused |")
    print("|---|---|---|---|---|---|")
    for run in args.runs:
        print(row(run))


if __name__ == "__main__":
    main()
