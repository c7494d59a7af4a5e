#!/usr/bin/env bash
# Installs Python `cryptography` (pinned) for the test that verifies `v1a` (ed25519)
# signatures with an implementation that is not Hookline's (docs/receiving/verify_v1a.py, run by
# tests/e2e_signing_tls.rs),
# into ${HOOKLINE_CI_CACHE:-~/.cache/hookline-ci}/signing/python (for PYTHONPATH), when the
# system's python3 cannot import it. Nothing is installed system-wide; a second run does
# nothing.
set -euo pipefail
cd "$(dirname "$0")/../.."
source deploy/ci/lib.sh

PIN="cryptography==46.0.3"
DIR="$CACHE/signing/python"
mkdir -p "$DIR"

command -v python3 >/dev/null || die "python3 is needed to verify v1a signatures"
if python3 -c 'import cryptography' 2>/dev/null; then
  step "python3 already imports cryptography"
  exit 0
fi
if [[ ! -f "$DIR/.pin" || "$(cat "$DIR/.pin")" != "$PIN" ]]; then
  step "pip install $PIN into $DIR"
  python3 -m pip install -q --disable-pip-version-check --upgrade --target "$DIR" "$PIN"
  echo "$PIN" >"$DIR/.pin"
fi
PYTHONPATH="$DIR" python3 -c 'import cryptography' ||
  die "cryptography does not import from $DIR"
step "cryptography ready in $DIR"
