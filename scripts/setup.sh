#!/usr/bin/env bash
# Set up vitscope for development and use: Debian packages it needs (Python venv, Fashion-MNIST,
# Node.js for the web app, Chromium for the browser tests), the web app built into
# src/vitscope/server/static, then `.venv` at the repository root with vitscope installed (editable)
# and every optional extra. Idempotent: a second run only checks and returns within seconds unless
# pyproject.toml or the web app's sources changed.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

say() { printf '\033[1m[setup]\033[0m %s\n' "$*"; }

# --- Debian packages -------------------------------------------------------------------------
need=()
python3 -c 'import ensurepip, venv' 2>/dev/null || need+=(python3-venv)
[ -f /usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz ] || need+=(dataset-fashion-mnist)
command -v npm >/dev/null 2>&1 || need+=(nodejs npm)
[ -x /usr/bin/chromium ] || need+=(chromium)  # the browser tests drive it with Playwright (never a downloaded browser)
if [ "${#need[@]}" -gt 0 ]; then
  sudo=""
  [ "$(id -u)" = 0 ] || sudo="sudo"
  say "installing Debian packages: ${need[*]}"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${need[@]}" >/dev/null
fi

# --- the web app (web/ -> src/vitscope/server/static) ---------------------------------------------
# The same hash as setup.py's web_sources_hash(): sha256 over `sha256sum` lines of the app's sources.
web_hash() {
  { find web/src -type f
    for f in web/index.html web/package-lock.json web/vite.config.ts web/svelte.config.js web/tsconfig.json; do
      [ -f "$f" ] && echo "$f"
    done
  } | LC_ALL=C sort | while IFS= read -r f; do sha256sum "$f"; done | sha256sum | cut -d' ' -f1
}
if [ -f web/package.json ]; then
  lock="$(sha256sum web/package-lock.json | cut -d' ' -f1)"
  if [ ! -d web/node_modules ] || [ "$(cat web/node_modules/.setup-stamp-lock 2>/dev/null)" != "$lock" ]; then
    say "installing the web app's npm packages (npm ci)"
    (cd web && npm ci --no-audit --no-fund --loglevel=error)
    echo "$lock" > web/node_modules/.setup-stamp-lock
  fi
  want_web="$(web_hash)"
  if [ ! -f src/vitscope/server/static/index.html ] || [ "$(cat web/.setup-stamp 2>/dev/null)" != "$want_web" ]; then
    say "building the web app (npx vite build)"
    (cd web && npx vite build --logLevel warn)
    echo "$want_web" > web/.setup-stamp
  fi
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
