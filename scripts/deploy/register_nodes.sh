#!/usr/bin/env bash
# Register SuperNode public keys with a SuperLink that runs with --enable-supernode-auth.
#
#   scripts/deploy/register_nodes.sh CONTROL_ADDRESS CA_CERT KEYS_DIR [TIMEOUT_S]
#
# e.g. register_nodes.sh superlink:8000 /certs/ca.crt /certs/supernodes   (the compose TLS overlay)
# Waits (at most TIMEOUT_S, default 120) for the Control API, then registers every KEYS_DIR/*.pub.
# A key that is already registered counts as done, so re-running after a restart is harmless
# (the SuperLink keeps registrations in its --database).
set -euo pipefail

[[ $# -ge 3 ]] || { echo "usage: $0 CONTROL_ADDRESS CA_CERT KEYS_DIR [TIMEOUT_S]" >&2; exit 2; }
address=$1
ca_cert=$(cd "$(dirname "$2")" && pwd)/$(basename "$2")  # flwr wants an absolute path
keys_dir=$3
timeout_s=${4:-120}
export FLWR_TELEMETRY_ENABLED=0
FLWR_HOME=$(mktemp -d)
export FLWR_HOME
trap 'rm -rf "$FLWR_HOME"' EXIT
cat >"$FLWR_HOME/config.toml" <<EOF
[superlink]
default = "deployment"

[superlink.deployment]
address = "$address"
root-certificates = "$ca_cert"
EOF

shopt -s nullglob
keys=("$keys_dir"/*.pub)
if [[ ${#keys[@]} -eq 0 ]]; then
  echo "register_nodes.sh: no *.pub keys in $keys_dir (run make_certs.sh first)" >&2
  exit 3
fi

# 1. Wait for the SuperLink's Control API.
deadline=$((SECONDS + timeout_s))
until flwr supernode list deployment --format json 2>/dev/null | grep -q '"success": true'; do
  if ((SECONDS >= deadline)); then
    echo "register_nodes.sh: SuperLink Control API at $address unreachable after ${timeout_s} s" >&2
    exit 4
  fi
  sleep 1
done

# 2. Register every key; "already in use" means an earlier run registered it.
for pub in "${keys[@]}"; do
  out=$(flwr supernode register "$pub" deployment --format json 2>&1 || true)
  if grep -q '"success": true' <<<"$out"; then
    echo "register_nodes.sh: registered $(basename "$pub" .pub): $(grep -o '"node-id": [0-9]*' <<<"$out")"
  elif grep -q "already in use" <<<"$out"; then
    echo "register_nodes.sh: $(basename "$pub" .pub) was already registered"
  else
    echo "register_nodes.sh: registering $pub failed: $out" >&2
    exit 5
  fi
done
