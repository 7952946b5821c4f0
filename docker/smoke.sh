#!/usr/bin/env bash
# Docker smoke test: build the CPU image, run it, use it, restart it, check the compose file.
#
#   bash docker/smoke.sh                   # from anywhere; ../shared must sit beside the repo
#
# 1. makes the local base images (../shared/tools/docker-local-base.sh: dockerd, no registry)
# 2. builds docker/Dockerfile.cpu on local/python:3.11-slim (--network host: pip and PyPI)
# 3. runs it with --network host on 127.0.0.1:<free port> with a named volume, waits for
#    /readyz and for Docker's HEALTHCHECK to report healthy, checks it runs as non-root
#    without torch
# 4. enrols and verifies real LFW photos, identifies held-out ones, sends a bad upload,
#    scrapes /metrics (every metric the Grafana dashboard reads must be exported)
# 5. restarts the container (graceful), then kills it and starts a fresh one on the same
#    volume: each time the gallery must be intact
# 6. runs two replicas of the image on one PostgreSQL store (a throwaway server from the
#    host's PostgreSQL binaries, as in the compose postgres-replicas profile): what one
#    replica enrols or deletes, the other one finds or stops finding
# 7. validates docker-compose.yml (docker-compose config), the services of each profile and
#    the Prometheus / Grafana / nginx files; no registry image is pulled or run
#
# Environment:
#   FACEGATE_SHARED         the shared tree (default: ../shared beside the repo)
#   FACEGATE_SMOKE_MODELS   installed (default: the image's own models from `facegate models
#                           install`, MTCNN + dlib ResNet) | shared (reference models of
#                           ../shared/models mounted read-only, yunet_2023mar +
#                           mobilefacenet_peer_128d)
#   FACEGATE_SMOKE_GPU=1    also build the GPU image docker/Dockerfile (large; not run here)
#   FACEGATE_SMOKE_KEEP=1   keep the containers and the volume for inspection
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$(pwd)
shared=$(realpath "${FACEGATE_SHARED:-$repo/../shared}")
lfw=$shared/data/lfw/images
models_mode=${FACEGATE_SMOKE_MODELS:-installed}
base_image=local/python:3.11-slim
image=facegate:cpu-smoke
run_id=facegate-smoke-$$
volume=$run_id-data
tmp=$(mktemp -d)
pg_root=""
pg_bin=""
t0=$(date +%s)
containers=()

log() { echo "[smoke +$(( $(date +%s) - t0 ))s] $*"; }
fail() { echo "[smoke] FAIL: $*" >&2; exit 1; }
free_port() {
  python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}
as_postgres() {  # PostgreSQL refuses to run as root
  if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi
}

cleanup() {
  local rc=$?
  for c in "${containers[@]}"; do
    if [ "$rc" -ne 0 ] && docker inspect "$c" >/dev/null 2>&1; then
      echo "--- last log lines of $c ---" >&2
      docker logs --tail 40 "$c" >&2 2>&1 || true
    fi
    [ "${FACEGATE_SMOKE_KEEP:-0}" = 1 ] || docker rm -fv "$c" >/dev/null 2>&1 || true
  done
  [ "${FACEGATE_SMOKE_KEEP:-0}" = 1 ] || docker volume rm -f "$volume" >/dev/null 2>&1 || true
  if [ -n "$pg_root" ]; then
    as_postgres "$pg_bin/pg_ctl" stop -D "$pg_root/data" -m immediate -w >/dev/null 2>&1 || true
    rm -rf "$pg_root"
  fi
  rm -rf "$tmp"
  if [ "$rc" -eq 0 ]; then log "PASS"; else echo "[smoke] failed after $(( $(date +%s) - t0 ))s" >&2; fi
}
trap cleanup EXIT

[ -d "$lfw" ] || fail "LFW not found under $shared/data/lfw"

# --- 1. base images and daemon -----------------------------------------------------------
log "local base images"
bash "$shared/tools/docker-local-base.sh" >/dev/null

# --- 2. images -------------------------------------------------------------------------
log "building $image (docker/Dockerfile.cpu)"
docker build -q --network host --build-arg BASE_IMAGE=$base_image \
  -f docker/Dockerfile.cpu -t "$image" . >/dev/null
log "built $image: $(docker image inspect -f '{{.Size}}' "$image" | awk '{printf "%.0f MB", $1/1e6}')"
if [ "${FACEGATE_SMOKE_GPU:-0}" = 1 ]; then
  log "building facegate:gpu-smoke (docker/Dockerfile)"
  docker build -q --network host --build-arg BASE_IMAGE=$base_image \
    -f docker/Dockerfile -t facegate:gpu-smoke . >/dev/null
  log "built facegate:gpu-smoke: $(docker image inspect -f '{{.Size}}' facegate:gpu-smoke \
    | awk '{printf "%.0f MB", $1/1e6}')"
fi

# --- 3. run ----------------------------------------------------------------------------
model_args=()
case "$models_mode" in
  installed) ;;
  shared) model_args=(-v "$shared/models:/models:ro" -e FACEGATE_MODELS_DIR=/models
                      -e FACEGATE_DETECTOR=yunet_2023mar
                      -e FACEGATE_RECOGNIZER=mobilefacenet_peer_128d) ;;
  *) fail "FACEGATE_SMOKE_MODELS must be installed or shared, not $models_mode" ;;
esac

start_container() {  # name port [docker run options...]: start, wait until ready and healthy
  local name=$1 port=$2
  shift 2
  containers+=("$name")
  docker run -d --name "$name" --network host -e FACEGATE_HOST=127.0.0.1 -e FACEGATE_PORT="$port" \
    --health-interval 2s --health-start-period 120s "${model_args[@]}" "$@" "$image" >/dev/null
  wait_ready "$name" "$port"
}

wait_ready() {  # name port: /readyz answers 200 and Docker's HEALTHCHECK reports healthy
  local name=$1 port=$2 deadline=$(( $(date +%s) + 180 ))
  until python3 docker/smoke_client.py ready "http://127.0.0.1:$port" 2 2>/dev/null; do
    [ "$(docker inspect -f '{{.State.Running}}' "$name")" = true ] \
      || fail "$name exited with status $(docker inspect -f '{{.State.ExitCode}}' "$name")"
    [ "$(date +%s)" -lt "$deadline" ] || fail "$name: /readyz not ready within 180s"
  done
  until [ "$(docker inspect -f '{{.State.Health.Status}}' "$name")" = healthy ]; do
    [ "$(date +%s)" -lt "$deadline" ] \
      || fail "$name: HEALTHCHECK not healthy ($(docker inspect -f '{{json .State.Health}}' "$name"))"
    sleep 1
  done
}

port=$(free_port)
url=http://127.0.0.1:$port
log "starting $run_id-a on $url (models: $models_mode)"
start_container "$run_id-a" "$port" -v "$volume:/var/lib/facegate"
log "ready and healthy"
[ "$(docker exec "$run_id-a" id -u)" != 0 ] || fail "the service runs as root"
docker exec "$run_id-a" python -c \
  'import importlib.util, sys; sys.exit(importlib.util.find_spec("torch") is not None)' \
  || fail "torch is installed in the service image"

# --- 4. use it -------------------------------------------------------------------------
log "enrol, verify, identify, metrics"
python3 docker/smoke_client.py populate "$url" "$lfw" "$tmp/state.json" \
  docker/grafana/dashboards/facegate.json

# --- 5. restarts: graceful, then killed and replaced on the same volume ----------------------
log "docker restart (graceful stop)"
docker restart -t 30 "$run_id-a" >/dev/null
wait_ready "$run_id-a" "$port"
python3 docker/smoke_client.py persisted "$url" "$lfw" "$tmp/state.json"
log "killing the container, a fresh one on the same volume"
docker rm -fv "$run_id-a" >/dev/null
start_container "$run_id-b" "$port" -v "$volume:/var/lib/facegate"
python3 docker/smoke_client.py persisted "$url" "$lfw" "$tmp/state.json"
docker rm -fv "$run_id-b" >/dev/null

# --- 6. two replicas on one PostgreSQL store ------------------------------------------------
pg_bin=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -1 || true)
if [ -z "$pg_bin" ]; then
  log "installing Debian's postgresql (server binaries)"
  apt-get update -qq >/dev/null
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null
  pg_bin=$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -1)
fi
pg_root=$(mktemp -d)
[ "$(id -u)" != 0 ] || chown postgres:postgres "$pg_root"
pg_port=$(free_port)
as_postgres "$pg_bin/initdb" -D "$pg_root/data" -U postgres -A trust -E UTF8 --no-sync >/dev/null
as_postgres "$pg_bin/pg_ctl" start -w -t 60 -D "$pg_root/data" -l "$pg_root/server.log" \
  -o "-c listen_addresses=127.0.0.1 -p $pg_port -k $pg_root -c fsync=off" >/dev/null
store_url=postgresql://postgres@127.0.0.1:$pg_port/postgres
port_1=$(free_port)
port_2=$(free_port)
log "two replicas on $store_url: ports $port_1 and $port_2"
start_container "$run_id-r1" "$port_1" -e FACEGATE_STORE_URL="$store_url"
start_container "$run_id-r2" "$port_2" -e FACEGATE_STORE_URL="$store_url"
python3 docker/smoke_client.py replicas "http://127.0.0.1:$port_1" "http://127.0.0.1:$port_2" "$lfw"

# --- 7. compose and monitoring configuration --------------------------------------------------
log "docker-compose config"
FACEGATE_REPLICAS=4 docker-compose -f docker-compose.yml config > "$tmp/compose.yml"
grep -q "driver: nvidia" "$tmp/compose.yml" && grep -q "capabilities:" "$tmp/compose.yml" \
  || fail "the GPU service reserves no NVIDIA device"
grep -q "replicas: 4" "$tmp/compose.yml" || fail "FACEGATE_REPLICAS does not set the replica count"
docker run --rm --network none -v "$repo:/repo:ro" "$image" \
  python /repo/docker/check_configs.py /repo
log "compose, Prometheus, Grafana and nginx configuration valid"
