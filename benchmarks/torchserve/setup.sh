#!/usr/bin/env bash
# TorchServe 0.12 for `benchmarks/serving.py --torchserve`: its own venv (benchmarks/.torchserve,
# torch pinned like Refit's, so both run the same CPU kernels) and a Java runtime from Debian.
# Prints the venv's path.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
venv="$here/../.torchserve"
if ! command -v java >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    apt-get install -y -qq openjdk-17-jre-headless >/dev/null 2>&1 \
      || (apt-get update -qq && apt-get install -y -qq openjdk-17-jre-headless >/dev/null)
  else
    echo "TorchServe needs Java 17: sudo apt-get install openjdk-17-jre-headless" >&2
    exit 1
  fi
fi
if [ ! -x "$venv/bin/torchserve" ] || ! "$venv/bin/python" -c "import yaml" 2>/dev/null; then
  "${PY:-python3.11}" -m venv "$venv"
  "$venv/bin/pip" install -q --upgrade pip
  "$venv/bin/pip" install -q "torch==2.13.0" "torchserve==0.12.0" "torch-model-archiver==0.12.0" \
    pillow numpy pyyaml
fi
echo "$venv"
