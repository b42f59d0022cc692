#!/usr/bin/env bash
# Alternates the har_jax train-step benchmark with the PyTorch reference, so that both see the same
# machine load, and prints each round's step times and the clips/s ratio (har_jax / PyTorch).
#
#   bash benchmarks/compare_pytorch.sh TORCH_PYTHON [ROUNDS] [extra benchmark_train.py flags]
#
# TORCH_PYTHON is a Python with torch installed (not the project's venv: PyTorch is not a project
# dependency), e.g. /tmp/torch/bin/python after `python -m venv /tmp/torch && /tmp/torch/bin/pip
# install torch numpy`. The workload is issue 7's: ResNet-18 LRCN, 8 clips x 16 frames x 112 x 112.
set -euo pipefail
cd "$(dirname "$0")/.."
torch_python=${1:?usage: compare_pytorch.sh TORCH_PYTHON [ROUNDS] [benchmark_train.py flags]}
rounds=${2:-3}
shift $(( $# >= 2 ? 2 : 1 ))
jax_python=${JAX_PYTHON:-.venv/bin/python}
sizes=(--batch_size=8 --num_frames=16 --image_size=112)

last_field() {  # last_field KEY < output: the value of KEY=... on the last line that has it.
  grep -o "$1=[0-9.]*" | tail -1 | cut -d= -f2
}

echo "round har_jax_step_s pytorch_step_s pytorch_channels_last_step_s ratio ratio_channels_last"
for round in $(seq "$rounds"); do
  jax_out=$("$jax_python" scripts/benchmark_train.py --config=configs/default.py "${sizes[@]}" \
    --steps=3 "$@" 2>&1)
  torch_out=$("$torch_python" benchmarks/pytorch_reference.py "${sizes[@]}" --steps=3 2>&1)
  torch_cl_out=$("$torch_python" benchmarks/pytorch_reference.py "${sizes[@]}" --steps=3 \
    --channels_last 2>&1)
  jax_s=$(last_field step_s <<<"$jax_out")
  torch_s=$(last_field step_s <<<"$torch_out")
  torch_cl_s=$(last_field step_s <<<"$torch_cl_out")
  if [[ -z "$jax_s" || -z "$torch_s" || -z "$torch_cl_s" ]]; then
    echo "error: a benchmark printed no step_s; its output:" >&2
    printf '%s\n---\n%s\n---\n%s\n' "$jax_out" "$torch_out" "$torch_cl_out" >&2
    exit 1
  fi
  ratio=$(python3 -c "print(f'{$torch_s / $jax_s:.3f}')")
  ratio_cl=$(python3 -c "print(f'{$torch_cl_s / $jax_s:.3f}')")
  echo "$round $jax_s $torch_s $torch_cl_s $ratio $ratio_cl"
  grep -E "^(backend|compile_s|clips_per_s)" <<<"$jax_out" | sed 's/^/  har_jax: /'
done
