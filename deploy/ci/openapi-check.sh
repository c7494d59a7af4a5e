#!/usr/bin/env bash
# Validates the OpenAPI 3.1 document the REST API serves (GET /v1/openapi.json) with an
# independent validator (PyPI openapi-spec-validator, pip-installed into the CI cache
# when missing). Starts the binary embedded, in a temporary data directory.
set -euo pipefail
cd "$(dirname "$0")/../.."
source deploy/ci/lib.sh

ensure_python_module openapi_spec_validator "openapi-spec-validator>=0.7,<0.10"
hookline_bin

step "starting hookline (embedded) with the REST API"
HOOKLINE_DATA_DIR="$WORK/data" "$HOOKLINE_BIN" serve --rest-addr 127.0.0.1:0 \
  --grpc-addr 127.0.0.1:0 --admin-addr 127.0.0.1:0 >"$WORK/stdout" 2>"$WORK/stderr" &
pid=$!
on_exit "kill $pid 2>/dev/null; wait $pid 2>/dev/null"
rest=
for _ in $(seq 1 300); do
  rest=$(sed -n 's/^hookline: rest listening on //p' "$WORK/stdout")
  [[ -n $rest ]] && break
  kill -0 "$pid" 2>/dev/null || { cat "$WORK/stderr" >&2; die "hookline exited before listening"; }
  sleep 0.1
done
[[ -n $rest ]] || die "hookline did not print where the REST API listens"

step "GET http://$rest/v1/openapi.json"
python3 - "http://$rest/v1/openapi.json" "$WORK/openapi.json" <<'PY'
import sys, urllib.request
with urllib.request.urlopen(sys.argv[1], timeout=30) as r:
    assert r.status == 200, r.status
    open(sys.argv[2], "wb").write(r.read())
PY
step "openapi-spec-validator"
python3 -m openapi_spec_validator --schema 3.1 "$WORK/openapi.json" || die "the OpenAPI document is not valid"
echo "openapi-check: OK"
