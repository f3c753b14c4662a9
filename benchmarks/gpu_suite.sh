#!/usr/bin/env bash
# pyseg GPU suite: build, CUDA/Triton tests, every kernel benchmark, fps per model.
#
# On the lent GPU machine (one call, from the repository root):
#   set -o pipefail; bash benchmarks/gpu_suite.sh 2>&1 | tee $OUT/log
# Everything lands in $OUT/suite/ and is packed into $OUT/suite.tar.gz (the device tool returns at
# most 8 files), with a short $OUT/summary.txt. Commit the unpacked files unedited under
# benchmarks/results/<date>-<gpu>/ together with the commit they measured.
#
# Knobs (environment):
#   STAGES="build tests bench fps"   which stages to run (split across calls if 10 min is short)
#   PYSEG_COMMIT=<sha>               the commit measured (the device copy may have no .git)
#   FPS_MODELS="hyperseg-m ..."      models for fps.py (default: every registry model)
#   QUICK=1                          small benchmark sizes (smoke test of the suite itself)
#   DEVICE=cpu                       run the bench/fps stages on the CPU (smoke test without a GPU)
#   ROOFLINE_GPU=h100|h200           GPU whose floors the bench stage's roofline tables use (default: from nvidia-smi)
set -uo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
cd "$ROOT"
OUT="${OUT:-$ROOT/out}"
RES="$OUT/suite"
mkdir -p "$RES"
STAGES="${STAGES:-build tests bench fps}"
PY="${PYTHON:-python3}"
export PYTHONUNBUFFERED=1
COMMIT="${PYSEG_COMMIT:-$(git rev-parse HEAD 2>/dev/null || echo unknown)}"
QUICK_FLAG=""
DEVICE="${DEVICE:-cuda}"
[ "${QUICK:-0}" = "1" ] && QUICK_FLAG="--quick"
FAILED=()

stage() { case " $STAGES " in *" $1 "*) return 0 ;; *) return 1 ;; esac; }
run() {  # run NAME CMD...: log to $RES/NAME.log, remember failures, never abort the suite
  local name="$1"; shift
  echo "=== [$name] $*"
  local t0=$SECONDS
  "$@" >"$RES/$name.log" 2>&1
  local rc=$?
  tail -n "${RUN_TAIL:-25}" "$RES/$name.log"
  echo "=== [$name] rc=$rc in $((SECONDS - t0)) s"
  [ $rc -eq 0 ] || FAILED+=("$name(rc=$rc)")
  return $rc
}

{
  echo "commit: $COMMIT"
  echo "date: $(date -u +%FT%TZ)"
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,clocks.max.mem --format=csv 2>&1
  "$PY" -c "import torch, sys; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda)"
  "$PY" -c "import triton; print('triton', triton.__version__)" 2>&1
  nvcc --version 2>&1 | tail -1
} | tee "$RES/env.txt"

if stage build; then
  MAX_JOBS="${MAX_JOBS:-16}" TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}" PYSEG_FORCE_CUDA=1 \
    run build "$PY" -m pip install --no-build-isolation --no-deps -v -e . || { echo "build failed"; }
  "$PY" -c "import pyseg, json; print(json.dumps(pyseg.backends(), indent=1))" 2>&1 | tee "$RES/backends.json"
fi

if stage tests; then
  PYSEG_EXPECT_CUDA_KERNELS=1 run tests "$PY" -m pytest tests -q -rs --durations=15 \
    --junitxml="$RES/tests.xml" -p no:cacheprovider
fi

if stage bench; then
  for b in benchmarks/bench_*.py; do
    n="$(basename "$b" .py)"
    case "$n" in
      bench_hmsa)  # fusion stage: inputs at each scale's resolution (full), and stride-4 network outputs
                   # resized inside the fusion via scale_sizes (native)
        run "$n" "$PY" "$b" --device "$DEVICE" $QUICK_FLAG --layout both --json "$RES/$n.json" ;;
      bench_meta_block)  # both fused GPU backends, forward in every dtype, forward+backward in fp32/bf16
        for be in cuda triton; do
          [ "$DEVICE" = "cpu" ] && be=cpu
          for dt in float32 bfloat16 float16; do
            run "${n}_${be}_${dt}" "$PY" "$b" --device "$DEVICE" --backend "$be" --dtype "$dt" $QUICK_FLAG \
              --json "$RES/${n}_${be}_${dt}.json"
          done
          for dt in float32 bfloat16; do
            run "${n}_${be}_${dt}_bwd" "$PY" "$b" --device "$DEVICE" --backend "$be" --dtype "$dt" --backward \
              $QUICK_FLAG --json "$RES/${n}_${be}_${dt}_bwd.json"
          done
          [ "$DEVICE" = "cpu" ] && break
        done ;;
      *)           # op benchmarks: every float dtype the op runs in
        for dt in float32 bfloat16 float16; do
          run "${n}_${dt}" "$PY" "$b" --device "$DEVICE" --dtype "$dt" $QUICK_FLAG --json "$RES/${n}_${dt}.json"
        done ;;
    esac
  done
  # every modelled kernel: measured median (cuda backend) against its floor and the model's prediction
  # (benchmarks/roofline.py; ~10 s of CPU per dtype, meta-device capture, no GPU work). With DEVICE=cpu the
  # medians are the cpu backend's, which roofline.py does not merge: the tables then smoke-test the step.
  RGPU="${ROOFLINE_GPU:-$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1 |
          grep -qi h100 && echo h100 || echo h200)}"
  for dt in float32 bfloat16 float16; do
    meas=()
    for f in "$RES/bench_meta_block_cuda_${dt}.json" "$RES/bench_meta_block_cuda_${dt}_bwd.json" \
             "$RES/bench_meta_block_cpu_${dt}.json" "$RES/bench_meta_block_cpu_${dt}_bwd.json" \
             "$RES/bench_patchwise_conv2d_${dt}.json"; do
      [ -f "$f" ] && meas+=("$f")
    done
    [ ${#meas[@]} -gt 0 ] || continue
    RUN_TAIL=200 run "roofline_${RGPU}_${dt}" "$PY" benchmarks/roofline.py --gpu "$RGPU" --dtype "$dt" \
      --models hyperseg-m hyperseg-s --measured "${meas[@]}" --json "$RES/roofline_${RGPU}_${dt}.json"
  done
fi

if stage fps; then
  MODELS="${FPS_MODELS:-$("$PY" -c 'import pyseg.models as m; print(" ".join(x for x in m.list_models()))')}"
  for m in $MODELS; do
    for dt in fp32 bf16; do
      for bs in 1 16; do
        for g in "" "--cuda-graph"; do
          tag="fps_${m}_${dt}_b${bs}${g:+_graph}"
          run "$tag" "$PY" benchmarks/fps.py --model "$m" --device "$DEVICE" --dtype "$dt" --batch "$bs" $g \
            --compare-reference --json "$RES/$tag.json"
        done
      done
    done
  done
fi

{
  echo "commit: $COMMIT"
  echo "stages: $STAGES"
  if [ ${#FAILED[@]} -eq 0 ]; then echo "all steps passed"; else echo "FAILED: ${FAILED[*]}"; fi
} | tee "$OUT/summary.txt"
tar -C "$OUT" -czf "$OUT/suite.tar.gz" suite
[ ${#FAILED[@]} -eq 0 ]
