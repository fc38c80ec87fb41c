#!/usr/bin/env bash
# NVIDIA Triton for `benchmarks/serving.py --triton`: its own venv (benchmarks/.triton) with
# PyTriton, whose wheel bundles the `tritonserver` binary and its Python backend (glibc >= 2.35),
# OpenVINO (the same release as Refit's, so both run the same graphs the same way) and the CPU
# torch Refit pins. Prints the venv's path.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
venv="$here/../.triton"
if ! "$venv/bin/python" -c "import pytriton, openvino, torch, PIL" 2>/dev/null; then
  "${PY:-python3.11}" -m venv "$venv"
  "$venv/bin/pip" install -q --upgrade pip
  "$venv/bin/pip" install -q "nvidia-pytriton==0.7.0" "openvino==2026.4.1" "torch==2.13.0" \
    pillow numpy
fi
echo "$venv"
