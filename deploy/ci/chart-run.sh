#!/usr/bin/env bash
# Runs what the Helm chart (helm/hookline) and deploy/compose.yaml describe, on this
# machine's PostgreSQL and RabbitMQ, with the hookline binary standing in for the image:
# renders the chart with this run's own database and queue prefix, runs each hook Job's
# command with exactly its rendered args and environment (must exit 0), starts each
# Deployment's command the same way with only its listen ports moved (must pass its
# readiness probe), creates the admin key as NOTES.txt tells an operator, and delivers one
# event through the ingest process via the dispatcher to a local receiver. Then the same
# for the compose file's Hookline services. See deploy/ci/chart_run.py.
#
#   deploy/ci/chart-run.sh            # HOOKLINE_BIN=path/to/hookline to use another build
#
# Needs PostgreSQL on 127.0.0.1:5432 (user postgres, trust) and RabbitMQ on
# 127.0.0.1:5672 (guest/guest), like the tests. Its database and queues are removed on exit.
set -euo pipefail
cd "$(dirname "$0")/../.."
source deploy/ci/lib.sh
started=$SECONDS

ensure_helm
ensure_pyyaml
hookline_bin
private_helm_home
echo "helm $("$HELM" version --template '{{.Version}}'), hookline: $HOOKLINE_BIN ($("$HOOKLINE_BIN" --version))"

own_database_and_queues chartrun
cat >"$WORK/values.yaml" <<VALUES
database:
  url: "$PG_URL"
amqp:
  url: "$AMQP_URL"
config:
  queuePrefix: "$RUN_PREFIX"
  logFormat: text
# The test receiver listens on this machine's loopback, which the egress policy refuses
# by default: open exactly that, the way an operator opens an internal receiver.
egress:
  allow: ["127.0.0.1/32"]
VALUES

step "helm template helm/hookline (database $RUN_DB, queue prefix $RUN_PREFIX)"
"$HELM" template hookline helm/hookline --namespace hookline -f "$WORK/values.yaml" >"$WORK/rendered.yaml"
# `helm template` leaves NOTES.txt out; a client-side dry-run install renders it.
"$HELM" install hookline helm/hookline --dry-run=client --namespace hookline -f "$WORK/values.yaml" |
  sed -n '/^NOTES:$/,$p' >"$WORK/NOTES.txt"
[[ -s $WORK/NOTES.txt ]] || die "helm rendered no NOTES.txt"

step "run the chart's hook Jobs and Deployments"
python3 deploy/ci/chart_run.py --bin "$HOOKLINE_BIN" --workdir "$WORK" \
  chart --rendered "$WORK/rendered.yaml" --notes "$WORK/NOTES.txt"
drop_database_and_queues "$RUN_DB" "$RUN_PREFIX"

step "run deploy/compose.yaml's Hookline services"
# Here the receiver is on loopback, not at the compose network's fixed receiver address:
# the compose file takes HOOKLINE_EGRESS_ALLOW from the environment.
HOOKLINE_EGRESS_ALLOW=127.0.0.1/32 python3 deploy/ci/chart_run.py --bin "$HOOKLINE_BIN" --workdir "$WORK" \
  compose --compose deploy/compose.yaml --readme deploy/README.md \
  --database-url "$PG_URL" --amqp-url "$AMQP_URL" --queue-prefix "$RUN_PREFIX"

echo "chart-run: passed in $((SECONDS - started))s"
