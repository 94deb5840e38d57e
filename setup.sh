#!/usr/bin/env bash
# Set up a fresh machine: a virtual environment in .venv with everything the project needs.
#   bash setup.sh          runtime (generate, stream, serve)
#   bash setup.sh --dev    + tests, benchmarks, and (as root, with apt) PortAudio and JACK
# Safe to re-run: it installs only what is missing.
set -euo pipefail
cd "$(dirname "$0")"
dev=0
for arg in "$@"; do
  case "$arg" in
    --dev) dev=1 ;;
    *) echo "usage: bash setup.sh [--dev]" >&2; exit 2 ;;
  esac
done

# PortAudio lets sounddevice play audio; JACK's dummy driver is the audio clock of the playback
# tests. Both come from the system's packages, so only when we may install them.
if command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
  pkgs="libportaudio2"
  [ "$dev" = 1 ] && pkgs="$pkgs jackd2"
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
echo "setup: installing Python packages into .venv"
"${pip[@]}" -r requirements.txt
"${pip[@]}" --no-deps -r requirements-nodeps.txt
if [ "$dev" = 1 ]; then
  "${pip[@]}" -r requirements-dev.txt
fi
.venv/bin/python -c "import torch, moshi, silentcipher; print(f'setup: ok (torch {torch.__version__}, cuda available: {torch.cuda.is_available()})')"
