#!/usr/bin/env bash
# The one-GPU check of BENCHMARKS.md, as one script for a machine lent for minutes:
#   1. cuDNN's fused attention against the reference (`bench kernels`), per paper model;
#   2. `bench step` for table7-S/M/L in bfloat16, reference and fast kernels, L with remat;
#   3. a jax.profiler trace of table7-L's step (where the time goes, for TensorBoard);
#   4. the `gpu` profile's six settings under Prefect's temporary server (`deepfusion flow`),
#      with its wall time, when TensorFlow, seqio and Prefect are installed there.
# Every record, log and the report land under OUT. A failed part is logged and the rest run.
# Parts 1-3 need JAX with its GPU plugin, Flax, optax, Orbax, pydantic and typer; part 4 also
# TensorFlow, seqio and Prefect (the project's `make install`), and ../shared/data.
#
#   scripts/gpu_check.sh OUT            on the GPU machine
#   SMALL=1 scripts/gpu_check.sh OUT    the same commands at CPU sizes (tiny models, smoke)
set -uo pipefail
OUT=${1:?usage: scripts/gpu_check.sh OUT}
OUT=$(mkdir -p "$OUT" && cd "$OUT" && pwd)
cd "$(dirname "$0")/.."
DEEPFUSION=${DEEPFUSION:-deepfusion}  # or "python3 -m deepfusion_cli.main" without an install
export PYTHONUNBUFFERED=1 PREFECT_SERVER_ANALYTICS_ENABLED=false PREFECT_HOME="$OUT/prefect"

if [[ -n "${SMALL:-}" ]]; then
  MODELS=(tiny-S:8 tiny-M:4 tiny-L:2); SEQ=64,16; DTYPE=float32; FAST=xla; PROFILE=smoke; STEPS=3
else
  MODELS=(table7-S:64 table7-M:32 table7-L:16); SEQ=512,114; DTYPE=bfloat16; FAST=cudnn
  PROFILE=gpu; STEPS=10
fi

part() {  # part NAME COMMAND...: run it, its output in OUT/NAME.log, its status in OUT/status
  local name=$1; shift
  local start=$SECONDS
  "$@" >"$OUT/$name.log" 2>&1
  local rc=$?
  echo "$name rc=$rc $((SECONDS - start))s" | tee -a "$OUT/status"
  return $rc
}

nvidia-smi >"$OUT/nvidia-smi.txt" 2>&1 || true
python3 -c "import jax; print(jax.__version__, jax.devices())" >"$OUT/jax.txt" 2>&1

fast_ok=1
for entry in "${MODELS[@]}"; do
  model=${entry%%:*}
  part "kernels-$model" $DEEPFUSION bench kernels --preset "$model" --batch 2 --seq-len "$SEQ" \
    --dtype "$DTYPE" --attention "$FAST" --loss-chunk 32 || fast_ok=0
done
[[ $fast_ok == 1 ]] || FAST=reference  # a kernel that fails its check is not timed

for entry in "${MODELS[@]}"; do
  model=${entry%%:*}; batch=${entry##*:}
  common=(--preset "$model" --batch "$batch" --seq-len "$SEQ" --dtype "$DTYPE" --steps "$STEPS" --no-torch)
  part "step-$model-reference" $DEEPFUSION bench step "${common[@]}"
  part "step-$model-$FAST" $DEEPFUSION bench step "${common[@]}" --attention "$FAST"
  part "step-$model-$FAST-chunk" $DEEPFUSION bench step "${common[@]}" --attention "$FAST" --loss-chunk 32
done
largest=${MODELS[2]}
part "step-${largest%%:*}-remat-$FAST" $DEEPFUSION bench step --preset "${largest%%:*}" \
  --batch "${largest##*:}" --seq-len "$SEQ" --dtype "$DTYPE" --steps "$STEPS" --no-torch \
  --remat --attention "$FAST"
part trace $DEEPFUSION bench trace --preset "${largest%%:*}" --batch "${largest##*:}" \
  --seq-len "$SEQ" --dtype "$DTYPE" --attention "$FAST" --out "$OUT/trace"
grep -h '^{' "$OUT"/step-*.log "$OUT"/kernels-*.log >"$OUT/records.jsonl"

if python3 -c "import tensorflow, seqio, prefect" 2>/dev/null; then
  stages=stages.yaml
  if [[ $FAST != cudnn && -z "${SMALL:-}" ]]; then  # the profile asks for cuDNN: fall back
    stages=stages.fallback.yaml
    sed 's/attention: cudnn/attention: reference/' stages.yaml >"$stages"
  fi
  part flow $DEEPFUSION flow "$stages" --profile "$PROFILE" --runs-dir "$OUT/runs"
  cp -r "$OUT/runs/six-settings/report/$PROFILE" "$OUT/report" 2>/dev/null
else
  echo "flow skipped: TensorFlow, seqio or Prefect is not installed here" | tee -a "$OUT/status"
fi
cat "$OUT/status"
