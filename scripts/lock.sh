#!/usr/bin/env bash
# Record the versions installed in a venv as constraints.txt, which scripts/setup.sh installs from.
# Run it on a venv that passed the tests with the newest releases:
#
#   DISTALIGN_VENV=.venv-latest bash scripts/setup.sh --dev --latest
#   .venv-latest/bin/python -m pytest && DISTALIGN_VENV=.venv-latest bash scripts/lock.sh
#
# Everything pip installed is pinned, the dev extra's packages included (a plain install ignores the
# pins of packages it does not need). torch is pinned without its local build label (2.13.0, not
# 2.13.0+cpu), so the same file serves the CPU and CUDA builds of that release.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${DISTALIGN_VENV:-.venv}
python_version=$("$VENV/bin/python" -c 'import platform; print(platform.python_version())')
{
  echo "# The tested versions scripts/setup.sh installs (pip constraints). Written by scripts/lock.sh"
  echo "# on $(date -u +%F) from a venv on Python $python_version that passed the tests; regenerate"
  echo "# it with scripts/lock.sh, never by hand."
  "$VENV/bin/python" -m pip freeze --exclude-editable --disable-pip-version-check \
    | grep -v -e '^#' -e '^-e ' -e '^distalign' \
    | sed -E 's/^(torch==[^+]+)\+.*/\1/'
} > constraints.txt.tmp
mv constraints.txt.tmp constraints.txt
echo "lock: wrote constraints.txt ($(grep -vc '^#' constraints.txt) packages, Python $python_version)" >&2
