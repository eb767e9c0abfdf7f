#!/usr/bin/env bash
# End to end on one host (not in CI: it needs a local dockerd, debootstrap and root): a Debian base image made
# with debootstrap (no registry image needed), the two project images, the compose deployment, one federated
# run, then one prediction from the registered champion.
set -euo pipefail
cd "$(dirname "$0")/.."
command -v docker >/dev/null && docker info >/dev/null || { echo "e2e needs a running dockerd" >&2; exit 2; }
command -v debootstrap >/dev/null || { echo "e2e needs debootstrap (apt-get install debootstrap)" >&2; exit 2; }
compose="docker compose"
$compose version >/dev/null 2>&1 || compose=docker-compose
command -v "${compose%% *}" >/dev/null && $compose version >/dev/null 2>&1 \
  || { echo "e2e needs docker compose (or apt-get install docker-compose)" >&2; exit 2; }

base=health-mlops-base:bookworm
if ! docker image inspect "$base" >/dev/null 2>&1; then
  root=$(mktemp -d)
  trap 'rm -rf "$root"' EXIT
  debootstrap --variant=minbase bookworm "$root"
  tar -C "$root" -c . | docker import - "$base"
fi
# pip inside a build container may need the host's CA bundle (a proxy that re-signs TLS).
cert=""
if [ -f /etc/ssl/certs/ca-certificates.crt ]; then
  mkdir -p docker/certs && cp /etc/ssl/certs/ca-certificates.crt docker/certs/host-ca.crt
  cert=/src/docker/certs/host-ca.crt
fi
# A CPU torch wheel already on this machine (pip's find-links) saves the download from PyTorch's index.
mkdir -p docker/wheels
torch_index=https://download.pytorch.org/whl/cpu
for dir in ${PIP_FIND_LINKS:-}; do
  for wheel in "$dir"/torch-*+cpu-cp311-*.whl; do
    [ -f "$wheel" ] && cp "$wheel" docker/wheels/ && torch_index=""
  done
done
for target in full serve prometheus; do
  name=health-mlops; [ "$target" != full ] && name=health-mlops-$target
  docker build -f docker/Dockerfile --target "$target" --build-arg BASE="$base" --build-arg PIP_CERT="$cert" \
    --build-arg TORCH_INDEX="$torch_index" -t "$name:0.1.0" .
done

$compose up -d
trap '$compose down -v' EXIT
started=$SECONDS
echo "waiting for the federated run to register a champion…"
for _ in $(seq 1 180); do
  version=$(curl -fsS http://127.0.0.1:7860/api/v1/model 2>/dev/null \
    | python3 -c "import json, sys; print(json.load(sys.stdin)['version'])" 2>/dev/null || true)
  [ -n "$version" ] && [ "$version" != None ] && break
  sleep 5
done
[ -n "${version:-}" ] && [ "$version" != None ] || { $compose logs --tail 50; echo "no champion after 15 minutes" >&2; exit 1; }
# One patient from hospital-1's data, typed as the served model's spec says.
spec=$(curl -fsS http://127.0.0.1:7860/api/v1/model)
row=$($compose run --rm -T -e SPEC="$spec" --entrypoint python3 setup -c "import csv, glob, json, os
features = json.loads(os.environ['SPEC'])['spec']['features']
r = next(csv.DictReader(open(sorted(glob.glob('/data/hospital-1/*.csv'))[0])))
print(json.dumps({f['name']: float(r[f['name']]) if f['type'] == 'numeric' else r[f['name']] for f in features}))")
echo "champion v$version registered $((SECONDS - started)) s after \`compose up\`; one prediction:"
curl -fsS -X POST http://127.0.0.1:7860/api/v1/predict -H 'Content-Type: application/json' -d "$row"
echo
# Prometheus scrapes every service: the aggregator, five nodes and the dashboard.
for _ in $(seq 1 24); do
  up=$(curl -fsS http://127.0.0.1:9090/api/v1/targets 2>/dev/null | python3 -c "import json, sys
targets = json.load(sys.stdin)['data']['activeTargets']
print(sum(t['health'] == 'up' for t in targets), len(targets))" 2>/dev/null || true)
  [ "$up" = "7 7" ] && break
  sleep 5
done
echo "Prometheus targets up: ${up:-none}"
[ "$up" = "7 7" ] || { echo "not every target is up" >&2; exit 1; }
