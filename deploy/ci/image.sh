#!/usr/bin/env bash
# Builds the Hookline image without a Docker engine and without any container registry,
# then runs it with podman: `buildah from scratch` holding the hookline binary, the few
# shared libraries it links (ldd), CA certificates and a passwd entry for uid 10001; the
# same entrypoint, command, environment, user and ports as deploy/Dockerfile (no shell:
# `podman exec CTR hookline …` works, `sh` does not). Then:
#   1. embedded: `serve` (every service, SQLite inside the container), an admin key from
#      `hookline admin create-key` in the container, one event delivered to a receiver on
#      the host;
#   2. distributed, with --network host against this machine's PostgreSQL and RabbitMQ:
#      `migrate` (database URL only), `admin create-key` (database URL only), `serve`, one
#      event delivered.
#
#   deploy/ci/image.sh        # HOOKLINE_BIN=… to package another build (default: release)
#   HOOKLINE_IMAGE=… names the image it leaves behind (default localhost/hookline:VERSION,
#   the chart's default image); push it with
#   `podman push localhost/hookline:0.1.0 docker://REGISTRY/hookline:0.1.0`.
#
# Needs buildah, podman and runc (Debian packages; .ci/run installs them). On this
# machine podman needs --cgroup-manager=cgroupfs --runtime runc and ulimits it may set.
set -euo pipefail
cd "$(dirname "$0")/../.."
source deploy/ci/lib.sh
started=$SECONDS

PODMAN=(podman --cgroup-manager=cgroupfs --runtime runc)
RUN=("${PODMAN[@]}" run --ulimit nofile=1024:1024 --ulimit nproc=1024:1024 --network host)
for tool in buildah podman runc; do
  command -v $tool >/dev/null || die "$tool is missing: apt-get install buildah podman runc"
done
hookline_bin
version=$("$HOOKLINE_BIN" --version | awk '{print $2}')
# The chart's default image (image.repository localhost/hookline, tag = appVersion).
IMAGE=${HOOKLINE_IMAGE:-localhost/hookline:$version}

step "build $IMAGE from scratch with $HOOKLINE_BIN"
root=$WORK/rootfs
mkdir -p "$root"/{usr/local/bin,etc/ssl/certs,tmp,var/lib/hookline}
install -m 0755 "$HOOKLINE_BIN" "$root/usr/local/bin/hookline"
# The release profile keeps line tables for backtraces; the image does without them.
if command -v strip >/dev/null; then strip --strip-debug "$root/usr/local/bin/hookline"; fi
# The dynamic loader and every library the binary links, at the paths ldd reports.
ldd "$HOOKLINE_BIN" | awk '/=>/ && $3 ~ /^\// {print $3} /^[[:space:]]*\// {print $1}' | sort -u |
  while read -r lib; do cp -L --parents "$lib" "$root/"; done
cp -L /etc/ssl/certs/ca-certificates.crt "$root/etc/ssl/certs/ca-certificates.crt"
printf 'root:x:0:0:root:/root:/nonexistent\nhookline:x:10001:10001:hookline:/nonexistent:/nonexistent\n' >"$root/etc/passwd"
printf 'root:x:0:\nhookline:x:10001:\n' >"$root/etc/group"
printf 'hosts: files dns\n' >"$root/etc/nsswitch.conf"
chmod 1777 "$root/tmp"
chown 10001:10001 "$root/var/lib/hookline" && chmod 0750 "$root/var/lib/hookline"
ctr=$(buildah from scratch)
on_exit buildah rm "$ctr" ">/dev/null 2>&1"
# Copied through a mount, which keeps ownership and modes (buildah copy makes all root's).
mnt=$(buildah mount "$ctr")
cp -a "$root/." "$mnt/"
buildah umount "$ctr" >/dev/null
buildah config \
  --entrypoint '["hookline"]' --cmd serve \
  --env PATH=/usr/local/bin --env SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt \
  --env HOOKLINE_GRPC_ADDR=0.0.0.0:50051 --env HOOKLINE_ADMIN_ADDR=0.0.0.0:9090 \
  --user 10001:10001 --workingdir /var/lib/hookline --port 50051 --port 9090 \
  --stop-signal SIGTERM \
  --label org.opencontainers.image.title=hookline \
  --label org.opencontainers.image.version="$version" \
  --label org.opencontainers.image.licenses=Apache-2.0 \
  "$ctr"
buildah commit --quiet --rm "$ctr" "$IMAGE" >/dev/null
printf '   %s: %s, %s libraries\n' "$IMAGE" \
  "$(podman image inspect --format '{{.Size}}' "$IMAGE" | awk '{printf "%.1f MB", $1/1e6}')" \
  "$(find "$root" -name '*.so*' | wc -l)"

name=hookline-ci-$$
on_exit "${PODMAN[@]}" rm --force --ignore -t 5 "$name-emb" "$name-dist" '>/dev/null 2>&1'
port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
wait_ready() { # container, admin port
  for _ in $(seq 1 240); do
    python3 -c 'import sys, urllib.request as u; u.urlopen(sys.argv[1], timeout=2)' \
      "http://127.0.0.1:$2/readyz" >/dev/null 2>&1 && return 0
    [[ $("${PODMAN[@]}" inspect -f '{{.State.Running}}' "$1") == true ]] ||
      { "${PODMAN[@]}" logs "$1" | tail -n 20; die "container $1 exited before it was ready"; }
    sleep 0.25
  done
  "${PODMAN[@]}" logs "$1" | tail -n 20
  die "container $1 was not ready within 60 s"
}
token_of() { grep -E '^hl_' | tail -n1; }

step "embedded: podman run $IMAGE (serve), key from podman exec, one event to a receiver on the host"
g=$(port) a=$(port)
"${RUN[@]}" -d --name "$name-emb" -e HOOKLINE_EGRESS_ALLOW=127.0.0.1/32 -e HOOKLINE_GRPC_ADDR=127.0.0.1:$g -e HOOKLINE_ADMIN_ADDR=127.0.0.1:$a "$IMAGE" >/dev/null
wait_ready "$name-emb" "$a"
token=$("${PODMAN[@]}" exec "$name-emb" hookline admin create-key --name ci | token_of)
[[ -n $token ]] || die "admin create-key in the container printed no token"
printf '   %s\n' "$(python3 deploy/ci/deliver.py --bin "$HOOKLINE_BIN" --registry "http://127.0.0.1:$g" \
  --ingest "http://127.0.0.1:$g" --token "$token")"
"${PODMAN[@]}" stop -t 30 "$name-emb" >/dev/null

step "distributed: migrate, admin create-key and serve against this machine's PostgreSQL and RabbitMQ"
own_database_and_queues image
"${RUN[@]}" --rm -e HOOKLINE_DATABASE_URL="$PG_URL" "$IMAGE" migrate
token=$("${RUN[@]}" --rm -e HOOKLINE_DATABASE_URL="$PG_URL" "$IMAGE" admin create-key --name ci | token_of)
[[ -n $token ]] || die "admin create-key (database URL only) printed no token"
g=$(port) a=$(port)
"${RUN[@]}" -d --name "$name-dist" -e HOOKLINE_EGRESS_ALLOW=127.0.0.1/32 -e HOOKLINE_DATABASE_URL="$PG_URL" -e HOOKLINE_AMQP_URL="$AMQP_URL" \
  -e HOOKLINE_QUEUE_PREFIX="$RUN_PREFIX" -e HOOKLINE_GRPC_ADDR=127.0.0.1:$g -e HOOKLINE_ADMIN_ADDR=127.0.0.1:$a \
  "$IMAGE" serve >/dev/null
wait_ready "$name-dist" "$a"
printf '   %s\n' "$(python3 deploy/ci/deliver.py --bin "$HOOKLINE_BIN" --registry "http://127.0.0.1:$g" \
  --ingest "http://127.0.0.1:$g" --token "$token")"
"${PODMAN[@]}" stop -t 30 "$name-dist" >/dev/null

echo "image: built and ran $IMAGE in $((SECONDS - started))s"
