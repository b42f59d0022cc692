#!/usr/bin/env bash
# Creates a venv (default .venv) and installs har_jax with its test dependencies and the onnx extra
# (idempotent), then the [tool.har_jax] install-no-deps of pyproject.toml (jax2onnx) without their
# declared dependencies.
# Uses $PYTHON if set, else the newest supported interpreter on the machine (3.13, 3.12, 3.11).
#
#   bash scripts/setup.sh [cpu|cuda12|cuda13|tpu]
#
# The argument picks JAX's accelerator (default cpu): the extra of the same name in pyproject.toml,
# held to the project's jax pin. Switching an existing venv to another one leaves the first one's
# packages in place; use a fresh VENV for that.
set -euo pipefail
cd "$(dirname "$0")/.."
accelerator="${1:-cpu}"
case "$#:$accelerator" in
  [01]:cpu) extras=test,onnx ;;
  1:cuda12 | 1:cuda13 | 1:tpu) extras="test,onnx,$accelerator" ;;
  *) echo "error: unknown accelerator '$*'; use one of: cpu, cuda12, cuda13, tpu" \
          "(e.g. bash scripts/setup.sh tpu)" >&2
     exit 2 ;;
esac
VENV="${VENV:-.venv}"
supported='import sys; sys.exit(not (3, 11) <= sys.version_info[:2] < (3, 14))'
if [ -z "${PYTHON:-}" ]; then
  for candidate in python3.13 python3.12 python3.11 python3; do
    if command -v "$candidate" >/dev/null 2>&1 && "$candidate" -c "$supported" 2>/dev/null; then
      PYTHON="$candidate"
      break
    fi
  done
fi
if [ -z "${PYTHON:-}" ] || ! "$PYTHON" -c "$supported" 2>/dev/null; then
  echo "error: har_jax needs Python 3.11, 3.12 or 3.13 (none found${PYTHON:+; $PYTHON is not one})." \
       "Install one, or point PYTHON at it: PYTHON=/path/to/python3.12 bash scripts/setup.sh" >&2
  exit 1
fi
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
echo "setup: $VENV with $("$VENV/bin/python" --version), jax for $accelerator"
"$VENV/bin/python" -m pip install -q --upgrade pip
"$VENV/bin/python" -m pip install -q -e ".[$extras]"
# jax2onnx, whose declared dependencies conflict with the orbax pin (see the onnx extra).
no_deps="$("$VENV/bin/python" -c 'import tomllib
print(" ".join(tomllib.load(open("pyproject.toml", "rb"))["tool"]["har_jax"]["install-no-deps"]))')"
"$VENV/bin/python" -m pip install -q --no-deps $no_deps
