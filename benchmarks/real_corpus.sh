#!/usr/bin/env bash
# Try `llama2 prepare` and `llama2 pretrain` on real English text: Debian's bible-kjv and fortunes packages,
# tokenized with the real Llama 2 vocabulary (tests/assets/ggml-vocab-llama-spm.gguf). Installs the two packages
# when missing (needs apt and root). Usage: bash benchmarks/real_corpus.sh [OUT] [MAX_STEPS]
set -euo pipefail
OUT=${1:-runs/real}
STEPS=${2:-60}
BIN=${BIN:-.venv/bin}
if ! command -v bible >/dev/null || [ ! -d /usr/share/games/fortunes ]; then
    apt-get install -y --no-install-recommends fortunes bible-kjv
fi
mkdir -p "$OUT/text"
# the King James text, one chapter per document (blank line between chapters), verse numbers removed
bible -l100000 gen1:1-rev22:21 | sed -E 's/^ +[0-9]+ //; s/^ +//' > "$OUT/text/kjv.txt"
# fortunes: plain-text files only (not the .dat indexes, not the rot13 offensive set); '%' lines separate them
for f in /usr/share/games/fortunes/*; do
    case "$f" in *.dat|*.u8|*/off) continue ;; esac
    [ -f "$f" ] && sed 's/^%$//' "$f"
done > "$OUT/text/fortunes.txt"
wc -c "$OUT"/text/*.txt
/usr/bin/time -v "$BIN/llama2" prepare --input "$OUT/text" --out "$OUT/shards" \
    --tokenizer tests/assets/ggml-vocab-llama-spm.gguf --force val_fraction=0.01 2> "$OUT/prepare.time"
grep -E "Elapsed|Maximum resident" "$OUT/prepare.time"
"$BIN/llama2" pretrain --config configs/pretrain/toy.yaml data="$OUT/shards" out="$OUT/pretrain" \
    max_steps="$STEPS" batch_tokens=8192 micro_batch=8 seq_len=256 eval_every=20 save_every=1000 warmup_steps=10 lr=1e-3
tail -n 3 "$OUT/pretrain/metrics.jsonl"
