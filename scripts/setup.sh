#!/usr/bin/env bash
# Sets up everything voxlm needs on a fresh Debian 12 machine: the Debian packages the offline corpus and
# the tests use, a .venv with the project and its extras. Re-running it is fast when nothing changed:
# each half is skipped while its stamp matches the files it was built from.
set -euo pipefail
cd "$(dirname "$0")/.."

APT_PACKAGES=(
  espeak-ng libespeak-ng1 flite festival festvox-kallpc16k festvox-kdlpc16k festvox-us-slt-hts  # speech sources
  sox fortunes bible-kjv bible-kjv-text                                            # audio tools, text
  pocketsphinx-testdata                                                            # real LibriVox clips
  chromium chromium-driver                                                         # the web page's test
)
PYTHON=${PYTHON:-python3}
VENV=.venv

missing=()
for pkg in "${APT_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "setup: installing Debian packages: ${missing[*]}"
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

stamp=$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -c1-16)
if [ ! -x "$VENV/bin/python" ]; then
  "$PYTHON" -m venv "$VENV"
fi
if [ "$(cat "$VENV/.setup-stamp" 2>/dev/null)" != "$stamp" ]; then
  echo "setup: installing voxlm and its extras into $VENV (first time: ~3 minutes)"
  "$VENV/bin/pip" install -q --upgrade pip 2>&1 | grep -v -i "is ignored" || true
  # torch 2.14.1 is on this machine's disk (pip's find-links); pip warns about local index folders it skips.
  "$VENV/bin/pip" install -q -e ".[eval,serve,dev]" 2>&1 | grep -v -i "is ignored" || true
  "$VENV/bin/python" -c "import voxlm, torch, torchaudio, lightning, hydra, datasets, transformers, trl, max" \
    || { echo "setup: the install is incomplete (see pip's messages above)"; exit 1; }
  echo "$stamp" > "$VENV/.setup-stamp"
fi
echo "setup: ready ($("$VENV/bin/python" -c 'import torch; print("torch", torch.__version__)'))"
