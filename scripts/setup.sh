#!/usr/bin/env bash
# Set up vitscope for development and use: Debian packages it needs, then `.venv` at the repository
# root with vitscope installed (editable) and every optional extra. Idempotent: a second run only
# checks and returns within seconds unless pyproject.toml changed.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

say() { printf '\033[1m[setup]\033[0m %s\n' "$*"; }

# --- Debian packages -------------------------------------------------------------------------
need=()
python3 -c 'import ensurepip, venv' 2>/dev/null || need+=(python3-venv)
[ -f /usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz ] || need+=(dataset-fashion-mnist)
if [ "${#need[@]}" -gt 0 ]; then
  sudo=""
  [ "$(id -u)" = 0 ] || sudo="sudo"
  say "installing Debian packages: ${need[*]}"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${need[@]}" >/dev/null
fi

# --- Python >= 3.11 --------------------------------------------------------------------------
PY="${PYTHON:-python3}"
if ! "$PY" -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
  echo "vitscope needs Python >= 3.11; found $("$PY" --version 2>&1). Set PYTHON=/path/to/python3.11 and re-run." >&2
  exit 1
fi

# --- virtual environment ---------------------------------------------------------------------
if [ ! -x .venv/bin/python ]; then
  say "creating .venv"
  "$PY" -m venv .venv
fi
stamp=.venv/.vitscope-setup
want="$(sha256sum pyproject.toml | cut -d' ' -f1)"
if [ ! -x .venv/bin/vitscope ] || [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  say "installing vitscope and its dependencies into .venv (first time: a few minutes, PyTorch is large)"
  [ -x .venv/bin/uv ] || .venv/bin/python -m pip install -q --disable-pip-version-check uv
  .venv/bin/uv pip install --python .venv/bin/python -q -e ".[hf,server,test]"
  echo "$want" > "$stamp"
fi
say "ready: .venv/bin/vitscope"
