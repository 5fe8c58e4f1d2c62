#!/usr/bin/env bash
# Set up a working copy, idempotently: a .venv with the pinned project
# installed, a git repository, DVC initialised. Re-running it after nothing
# changed takes about a second (the install is skipped while pyproject.toml
# and requirements.lock are unchanged).
set -euo pipefail
cd "$(dirname "$0")/.."

python=${PYTHON:-python3.11}
command -v "$python" >/dev/null 2>&1 || python=python3
[ -x .venv/bin/python ] || "$python" -m venv .venv

stamp=.venv/.mmrad-installed
wanted=$(cat pyproject.toml requirements.lock | sha256sum | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$wanted" ]; then
  echo "setup: installing the pinned environment into .venv (first time: a few minutes)" >&2
  pip=(.venv/bin/python -m pip install --quiet --disable-pip-version-check)
  # (this workplace's pip.conf names local mirrors that may be absent: drop those warnings)
  "${pip[@]}" --upgrade pip 2> >(grep -v "^WARNING: Location .* is ignored" >&2)
  "${pip[@]}" -c requirements.lock -e ".[dev]" 2> >(grep -v "^WARNING: Location .* is ignored" >&2)
  echo "$wanted" > "$stamp"
fi

# DVC wants a git repository (dvc exp, metrics diff); a plain copy gets one.
[ -e .git ] || git init --quiet
[ -f .dvc/config ] || .venv/bin/dvc init --quiet
