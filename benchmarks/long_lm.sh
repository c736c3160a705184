#!/usr/bin/env bash
# The long-context byte LM of issue 18 (docs/RECALL.md, "Long-context byte LM"): four mixers at equal
# parameters and steps, trained by `sata train` on 2,048-byte windows of the standard library's sources,
# then scored by `sata evaluate` at 2,048 and 8,192 bytes (bits/byte, and by position in the window),
# then their cost (benchmarks/long_lm_cost.py: training s/step, generation ms/token at 1K/10K/100K).
#
#   benchmarks/long_lm.sh [headline|pilot] [RUNS]        (default: headline runs/long_lm)
#   CONFIGS="softmax local" benchmarks/long_lm.sh ...    only these configurations (default: all four), e.g.
#                                                        two shells with two each, one per core
#   TRAIN=0 / EVALUATE=0 / COST=0 benchmarks/long_lm.sh  skip a stage (TRAIN=0 EVALUATE=0 with no runs yet:
#                                                        the training s/step of each configuration only)
#
# Each run trains on one thread (--threads 1), logs to RUNS/NAME.log, and resumes from RUNS/NAME/checkpoint
# when interrupted (run the same command again); a finished run (RUNS/NAME/model) is skipped. The
# evaluation writes RUNS/eval.{json,md,png}. PYTHON (default: python) must import sata.
set -euo pipefail

preset=${1:-headline}
runs=${2:-runs/long_lm}
py=${PYTHON:-python}

# the model: equal for every mixer but the attention (d_model 128, 4 blocks, SwiGLU, tied byte embeddings,
# a width-4 short convolution before each attention: 838,784 parameters); heads of 16 at n_taylor 3
# (153 features) for the SATA and local layers, 2 heads of 64 for softmax
model="--d-model 128 --n-layers 4 --short-conv 4"
case $preset in
  headline)  # ~1.5-2 h per run on one idle core (docs/RECALL.md: measured seconds per step)
    train="--seq-len 2048 --batch-size 8 --steps 360 --warmup 36 --lr 3e-3 --eval-every 60 --save-every 20 --eval-tokens 65536"
    evaluate="--context 2048 8192 --max-bytes 262144" ;;
  pilot)     # a pipeline check in minutes: the same models, a handful of small steps
    train="--seq-len 2048 --batch-size 2 --steps 4 --warmup 1 --lr 3e-3 --eval-every 2 --save-every 2 --eval-tokens 4096"
    evaluate="--context 2048 8192 --max-bytes 16384" ;;
  *) echo "usage: $0 [headline|pilot] [RUNS]" >&2; exit 2 ;;
esac

declare -A mixer=(
  [softmax]="--attention softmax --n-heads 2"                                            # 2 heads of 64, RoPE
  [local]="--attention softmax --n-heads 8 --local-layers all --local-window 64"         # sliding window only
  [sata]="--attention sata --n-heads 8 --n-taylor 3"                                     # the Taylor state only
  [sata-window]="--attention sata --n-heads 8 --n-taylor 3 --window 64 --recentre 0 --learn-mix --learn-recentre"
  # the same with the Taylor part starting weak (beta 0.01 instead of 1): at beta 1 the far keys' summed weight
  # (~N_far at initialisation, up to ~2,000) swamps the window's (~64), and the learned mix barely moves in 360 steps
  [sata-window-mix01]="--attention sata --n-heads 8 --n-taylor 3 --window 64 --recentre 0 --learn-mix --learn-recentre --taylor-mix 0.01"
  # the same pair with a window of 16: the bytes 16..~100 back, which carry most of what these models use
  # (their curves flatten from ~100 bytes on), are then the Taylor state's to supply or nobody's
  [local16]="--attention softmax --n-heads 8 --local-layers all --local-window 16"
  [sata-window16-mix01]="--attention sata --n-heads 8 --n-taylor 3 --window 16 --recentre 0 --learn-mix --learn-recentre --taylor-mix 0.01"
  # beta from 0.01 with its own learning rate (10x): at --lr Adam cannot move it past ~0.02 in 360 steps
  [sata-window16-mixlr]="--attention sata --n-heads 8 --n-taylor 3 --window 16 --recentre 0 --learn-mix --learn-recentre --taylor-mix 0.01 --mix-lr 0.03"
  [sata-window-mixlr]="--attention sata --n-heads 8 --n-taylor 3 --window 64 --recentre 0 --learn-mix --learn-recentre --taylor-mix 0.01 --mix-lr 0.03"
)
configs=${CONFIGS:-softmax local sata sata-window sata-window-mix01}

mkdir -p "$runs"
for name in $configs; do
  [[ -n ${mixer[$name]:-} ]] || { echo "unknown configuration $name (one of ${!mixer[*]})" >&2; exit 2; }
done
for name in $configs; do
  [[ ${TRAIN:-1} != 0 ]] || break
  out=$runs/$name
  if [[ -f $out/model/config.json ]]; then
    echo "$name: done ($out/model)"
    continue
  fi
  resume=()
  [[ -d $out/checkpoint || -d $out/checkpoint.old || -d $out/checkpoint.tmp ]] && resume=(--resume)
  cmd="$py -m sata.cli train $model ${mixer[$name]} $train --seed 0 --threads 1 --no-progress --out $out ${resume[*]}"
  echo "$(date -u +%FT%TZ) $cmd" | tee -a "$runs/$name.log"
  $cmd >> "$runs/$name.log" 2>&1
  tail -n 1 "$runs/$name.log"
done

if [[ ${EVALUATE:-1} != 0 ]]; then
  models=()
  for name in softmax local sata sata-window sata-window-mix01 sata-window-mixlr local16 sata-window16-mix01 sata-window16-mixlr; do
    [[ -f $runs/$name/model/config.json ]] && models+=("$name=$runs/$name/model")
  done
  cmd="$py -m sata.cli evaluate ${models[*]} $evaluate --threads 1 --no-progress --json $runs/eval.json --markdown $runs/eval.md --figure $runs/eval.png"
  echo "$(date -u +%FT%TZ) $cmd" | tee -a "$runs/eval.log"
  $cmd 2>&1 | tee -a "$runs/eval.log"
fi

if [[ ${COST:-1} != 0 ]]; then
  specs=()
  for name in $configs; do specs+=(--config "$name: $model ${mixer[$name]} $train"); done
  here=$(dirname "$0")
  echo "$(date -u +%FT%TZ) $py $here/long_lm_cost.py --runs $runs --json $runs/cost.json ${specs[*]}" | tee -a "$runs/cost.log"
  $py "$here/long_lm_cost.py" --runs "$runs" --json "$runs/cost.json" "${specs[@]}" 2>&1 | tee -a "$runs/cost.log"
fi
