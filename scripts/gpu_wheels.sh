#!/usr/bin/env bash
# Download, here, the wheels benchmarks/gpu_check.py installs on the lent GPU machine, which has no
# internet: the packages its image lacks, at the tested versions in constraints.txt, built for its
# Python (3.12, x86-64 Linux; override with GPU_PYTHON=3.13). gpu_check.py installs only those the
# machine does not have, with --no-deps --no-index, so torch and transformers are never downloaded.
#
#   bash scripts/gpu_wheels.sh      # then carry benchmarks/wheels (git-ignored) with the device run
#
# Why these: TRL 1.16 (its DPOTrainer is the baseline) needs datasets, and datasets needs dill and
# multiprocess; distalign's config needs pydantic (with pydantic-core, annotated-types and
# typing-inspection). The image has the rest of both projects' requirements (accelerate, pyarrow,
# pandas, psutil, jinja2, pyyaml, xxhash, fsspec, huggingface-hub, ...); gpu_check.py lists any
# requirement of what it installed that the image does not meet.
set -euo pipefail
cd "$(dirname "$0")/.."
PACKAGES=(trl datasets dill multiprocess pydantic pydantic_core annotated-types typing-inspection)
DIR=benchmarks/wheels
LIMIT_MB=60
GPU_PYTHON=${GPU_PYTHON:-3.12}

pinned() {  # "name==version" from constraints.txt, matching - and _ alike, any case
    local pattern="^${1//[-_]/[-_]}=="
    grep -i -E "$pattern" constraints.txt || { echo "gpu_wheels: $1 is not in constraints.txt" >&2; exit 1; }
}

mkdir -p "$DIR"
rm -f "$DIR"/*.whl  # one version of each: pip refuses two of the same package in one install
specs=()
for name in "${PACKAGES[@]}"; do specs+=("$(pinned "$name")"); done
python=${PYTHON:-.venv/bin/python}
"$python" -m pip download --quiet --disable-pip-version-check --no-deps --only-binary=:all: \
    --python-version "$GPU_PYTHON" --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d "$DIR" "${specs[@]}"
size_mb=$(du -sm "$DIR" | cut -f1)
ls -1 "$DIR"
echo "gpu_wheels: ${#specs[@]} wheels, ${size_mb} MB in $DIR (carry it: git ignores it)"
if [ "$size_mb" -ge "$LIMIT_MB" ]; then
    echo "gpu_wheels: over ${LIMIT_MB} MB; the device tool carries at most 64 MiB with the tree" >&2
    exit 1
fi
