#!/usr/bin/env bash
# Wall time and peak memory of each qpeft command on the embedded SmolLM2, one at a
# time, from a fresh cache (the README's "How long it takes"; docs/RESULTS.md).
#
#   bash tools/command_times.sh [WORKDIR]      (default /tmp/qpeft-times)
#
# Prints one row per command: name, wall seconds, peak resident KiB.
set -uo pipefail
cd "$(dirname "$0")/.."
qpeft=.venv/bin/qpeft
work=${1:-/tmp/qpeft-times}
rm -rf "$work" && mkdir -p "$work"
export QPEFT_CACHE=$work/cache
timed() {
    local name=$1
    shift
    /usr/bin/time -f "$name|%e|%M" -a -o "$work/times.txt" "$@" >"$work/$name.out" 2>"$work/$name.err" ||
        echo "$name failed: see $work/$name.err"
}
timed convert_eval1 $qpeft eval smollm2 --max-windows 1
timed quantize $qpeft quantize smollm2 --config nf4 --out "$work/nf4"
timed inspect $qpeft inspect "$work/nf4"
timed eval4 $qpeft eval "$work/nf4" --max-windows 4
timed calibrate $qpeft calibrate smollm2 --out "$work/fisher.safetensors"
timed decompose_nf3 $qpeft decompose smollm2 --config nf3 --rank 8 --rounding nearest \
    --fisher "$work/fisher.safetensors" --out "$work/lq-nf3"
timed train4 $qpeft train recipes/smollm2-qlora-nf4.yaml --set output_dir="$work/train" --set train.steps=4 \
    --set train.eval_every=null --set data.eval_max_windows=2
timed export_merged $qpeft export "$work/lq-nf3" --to merged --out "$work/merged"
column -t -s '|' "$work/times.txt"
