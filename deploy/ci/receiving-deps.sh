#!/usr/bin/env bash
# Installs what the receiver snippets of docs/RECEIVING.md need, for the test that runs
# them against real deliveries (tests/e2e_receiving.rs): the Python and Node
# `standardwebhooks` libraries, pinned, into ${HOOKLINE_CI_CACHE:-~/.cache/hookline-ci}/receiving
# (python/ for PYTHONPATH, node/node_modules for NODE_PATH). Nothing is installed system-wide;
# a second run with the pins already in place does nothing. Go is shown in the document but
# run only where `go` is installed (it is not on the CI machine).
set -euo pipefail
cd "$(dirname "$0")/../.."
source deploy/ci/lib.sh

PY_PIN="standardwebhooks==1.1.0"
NODE_PIN="standardwebhooks@1.1.1"
DIR="$CACHE/receiving"
mkdir -p "$DIR/python" "$DIR/node"

command -v python3 >/dev/null || die "python3 is needed for the Python snippet"
command -v node >/dev/null || die "node is needed for the Node snippet"

if [[ ! -f "$DIR/python/.pin" || "$(cat "$DIR/python/.pin")" != "$PY_PIN" ]]; then
  step "pip install $PY_PIN into $DIR/python"
  python3 -m pip install -q --disable-pip-version-check --upgrade --target "$DIR/python" "$PY_PIN"
  echo "$PY_PIN" >"$DIR/python/.pin"
fi
PYTHONPATH="$DIR/python" python3 -c 'import standardwebhooks' ||
  die "standardwebhooks does not import from $DIR/python"

if [[ ! -f "$DIR/node/.pin" || "$(cat "$DIR/node/.pin")" != "$NODE_PIN" ]]; then
  step "npm install $NODE_PIN into $DIR/node"
  npm install --silent --no-audit --no-fund --prefix "$DIR/node" "$NODE_PIN"
  echo "$NODE_PIN" >"$DIR/node/.pin"
fi
NODE_PATH="$DIR/node/node_modules" node -e 'require("standardwebhooks")' ||
  die "standardwebhooks does not load from $DIR/node/node_modules"
step "receiver snippet libraries ready in $DIR"
