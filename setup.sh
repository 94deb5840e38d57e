#!/usr/bin/env bash
# Set up a fresh machine: a virtual environment in .venv with everything the project needs.
#   bash setup.sh            generate, stream, serve, talk (engine + LLM SDKs)
#   bash setup.sh --dev      + tests, benchmarks, Ray Serve, and (as root, with apt) PortAudio,
#                              JACK and Chromium for the playback and page tests
#   bash setup.sh --client   only the remote client (a laptop listening to a server): no torch
# Dependencies: ranges in pyproject.toml, the tested pins in requirements.txt (constraints).
# Safe to re-run: pip skips what is there.
set -euo pipefail
cd "$(dirname "$0")"
mode=run
for arg in "$@"; do
  case "$arg" in
    --dev) mode=dev ;;
    --client) mode=client ;;
    *) echo "usage: bash setup.sh [--dev | --client]" >&2; exit 2 ;;
  esac
done

# PortAudio lets sounddevice play audio; JACK's dummy driver is the audio clock of the playback
# tests; Chromium and its driver run the page's test. System packages, so only when we may.
if command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
  pkgs="libportaudio2"
  [ "$mode" = dev ] && pkgs="$pkgs jackd2 chromium chromium-driver"
  missing=""
  for p in $pkgs; do dpkg -s "$p" >/dev/null 2>&1 || missing="$missing $p"; done
  if [ -n "$missing" ]; then
    echo "setup: installing system packages:$missing"
    apt-get update -qq >/dev/null
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $missing >/dev/null
  fi
fi

python=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$python" -m venv .venv
pip=(.venv/bin/python -m pip install -q --disable-pip-version-check)
echo "setup: installing Python packages into .venv ($mode)"
# pyproject.toml says what is needed (ranges); requirements.txt pins the tested versions.
case "$mode" in
  client) "${pip[@]}" -c requirements.txt -e . ;;
  run) "${pip[@]}" -c requirements.txt -e ".[engine,llm]" ;;
  dev) "${pip[@]}" -c requirements.txt -e ".[engine,llm,ray,dev]" ;;
esac
if [ "$mode" = client ]; then
  .venv/bin/python -c "import numpy, sounddevice, rich, websockets; print('setup: ok (client)')"
  echo "setup: listen to a server with: .venv/bin/csm-stream --server http://localhost:8000 --play-audio"
  exit 0
fi
"${pip[@]}" --no-deps -r requirements-nodeps.txt
.venv/bin/python -W ignore -c "import torch, moshi, silentcipher; print(f'setup: ok (torch {torch.__version__}, cuda available: {torch.cuda.is_available()})')"
