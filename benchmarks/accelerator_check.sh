#!/usr/bin/env bash
# The accelerator check: how fast one accelerator trains configs/default.py in bf16, how many clips
# per second this host's input pipeline delivers on all its cores, and how much of real training's
# wall time goes to waiting for input. One short run; figures in benchmarks/RESULTS.md.
#
#   bash benchmarks/accelerator_check.sh DATA_DIR OUT_DIR
#
# DATA_DIR holds generated UCF101-format records in both layouts (commands in
# benchmarks/RESULTS.md, "Goal 5: on an accelerator"): ucf101/ucf101_1_256 (stock TFDS records, as
# generated: each split in one file) and ucf101_frames/s128 (frame store). PY names the Python
# (default .venv/bin/python). PARTS (default "train_step input train extra") picks the parts; e.g.
# PARTS=input measures the host pipeline alone. Each step writes OUT_DIR/<step>.log; a failed step
# is reported and the next one runs.
#
#   train_step_b32, train_step_b128 (last; EXTRA_BATCHES= skips it)
#                scripts/benchmark_train.py: the pmapped train step alone, bf16, frames shipped at
#                128x128 and cropped on the device as the pipeline ships the stock records
#   input        scripts/benchmark_input.py: the training pipeline on all host cores, in one run:
#                stock records in one file, the same records at UCF101's size (TRAIN_RECORDS,
#                9,536, in RECORD_FILES, 64, files: benchmarks/reshard_records.py; 8.5 GB in $WORK),
#                the frame index of those (prepare_ucf101.py --frame_index), and the frame store;
#                per round: clips/s, cores busy
#   train_stock, train_index, train_frames
#                main.py for STEPS (250) steps, bf16, batch 32, on each layout (the frame index of
#                DATA's records is written into DATA): perf/clips_per_sec
#                and perf/input_wait_fraction every LOG (50) steps (the first window includes
#                compilation), then the final evaluation (one view per video)
set -uo pipefail
DATA=${1:?usage: accelerator_check.sh DATA_DIR OUT_DIR}
OUT=${2:?usage: accelerator_check.sh DATA_DIR OUT_DIR}
PY=${PY:-.venv/bin/python}
mkdir -p "$OUT"
WORK=$(mktemp -d)  # Training workdirs (removed at the end).
export PYTHONUNBUFFERED=1 TF_CPP_MIN_LOG_LEVEL=1

step() {  # step NAME COMMAND...: runs it, logs to OUT/NAME.log, says how it ended and how long.
  local name=$1 t0=$SECONDS
  shift
  echo "== $name: $*"
  "$@" > "$OUT/$name.log" 2>&1
  echo "== $name: exit $? after $((SECONDS - t0)) s"
}

echo "host: $(nproc) cores, $(free -g | awk '/Mem:/ {print $2}') GiB; $(date -u +%FT%TZ)"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || true
step versions "$PY" -c '
import jax, flax, numpy, tensorflow as tf, tensorflow_datasets as tfds
for module in (jax, flax, tf, tfds, numpy):
  print(module.__name__, module.__version__)
print(jax.devices())'
cat "$OUT/versions.log"

train_step() {  # train_step BATCH
  step "train_step_b$1" "$PY" scripts/benchmark_train.py --config=configs/default.py \
      --dtype=bfloat16 --device_crop_from=128 --batch_size="$1" --steps=20 \
      --matmul_size="${MATMUL:-8192}"
  grep -E "^(backend|compile_s|clips_per_s)" "$OUT/train_step_b$1.log"
}

PARTS=" ${PARTS:-train_step input train extra} "
if [[ $PARTS == *" train_step "* ]]; then
  train_step "${BATCH:-32}"
fi

if [[ $PARTS == *" input "* ]]; then
  # The same records at UCF101's size: split 1's 9,537 train videos in TFDS's ~64 files.
  "$PY" benchmarks/reshard_records.py "$DATA" "$WORK/files" --files="${RECORD_FILES:-64}" \
      --train_records="${TRAIN_RECORDS:-9536}" > "$OUT/reshard.log" 2>&1 || tail -3 "$OUT/reshard.log"
  # Read once: freshly written pages cost up to 2x the CPU on their first reads (RESULTS.md).
  find "$WORK/files" -name '*train.tfrecord*' -exec cat {} + > /dev/null
  step index_files "$PY" scripts/prepare_ucf101.py --frame_index --data_dir="$WORK/files"
  stock=ucf101/ucf101_1_256:train
  step input "$PY" scripts/benchmark_input.py --config=configs/default.py --data_dir="$DATA" \
      --datasets="$stock,$stock@$WORK/files,frame_index/$stock@$WORK/files,ucf101_frames/s128:train1" \
      --rounds="${ROUNDS:-3}" --seconds=6 --warmup_seconds=3 --naive=false
  grep -E "file\(s\)|cores busy|ms_per_clip_core|ratio_" "$OUT/input.log"
fi

[[ $PARTS == *" train "* ]] && step index "$PY" scripts/prepare_ucf101.py --frame_index --data_dir="$DATA"
for layout in stock index frames; do
  [[ $PARTS == *" train "* ]] || break
  config=configs/default.py name=ucf101/ucf101_1_256
  [ "$layout" = index ] && name=frame_index/ucf101/ucf101_1_256
  [ "$layout" = frames ] && config=configs/ucf101_frames.py name=ucf101_frames/s128
  step "train_$layout" "$PY" main.py --config=$config --workdir="$WORK/$layout" \
      --config.dataset.name=$name --config.dataset.data_dir="$DATA" --config.dtype=bfloat16 \
      --config.num_train_steps="${STEPS:-250}" \
      --config.log_every_steps="${LOG:-50}" --config.eval_every_steps=1000000 \
      --config.checkpoint_every_steps=1000000 --config.eval.num_clips=1 --config.eval.num_crops=1
  "$PY" - "$OUT/train_$layout.log" <<'PARSE'
import re, sys
for line in open(sys.argv[1]):
  step = re.search(r'\[(\d+)\]', line)
  values = dict(re.findall(r'(perf/\w+)=([-0-9.e+]+)', line))
  if step and 'perf/input_wait_fraction' in values:
    print(f"  step {step.group(1)}: clips_per_s={float(values['perf/clips_per_sec']):.1f} "
          f"input_wait_fraction={float(values['perf/input_wait_fraction']):.3f}")
PARSE
done
rm -rf "$WORK"
for batch in ${EXTRA_BATCHES-128}; do  # Last: the step at a larger batch, if time allows.
  [[ $PARTS == *" extra "* ]] || break
  train_step "$batch"
done
