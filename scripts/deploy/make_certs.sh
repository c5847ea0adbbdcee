#!/usr/bin/env bash
# Certificates and SuperNode keys for a TLS deployment with SuperNode authentication.
#
#   scripts/deploy/make_certs.sh OUT_DIR NUM_NODES [SAN ...]
#
# Writes into OUT_DIR:
#   ca.crt, ca.key            self-signed CA (the root certificate every SuperNode and `flwr` trusts)
#   server.pem, server.key    SuperLink certificate; its SANs always hold localhost, 127.0.0.1 and ::1,
#                             plus every SAN given (e.g. IP:10.77.0.1 DNS:superlink): they must cover
#                             every address that nodes, executors and the `flwr` CLI dial.
#   supernodes/snI, snI.pub   one ECDSA P-384 key pair per SuperNode (I = 1..NUM_NODES), OpenSSH format
#                             as `flwr supernode register` expects.
# Existing files are kept (re-running adds missing node keys only); set FORCE=1 to make everything anew.
# CERTS_OWNER=uid:gid (as root) hands every file to that user at the end, e.g. 49999:49999 for the
# Flower container images, whose processes run as `app` and must read their keys.
# Everything is written in a temporary folder first and moved into place, so a kill leaves no half files.
set -euo pipefail

usage() {
  echo "usage: $0 OUT_DIR NUM_NODES [SAN ...]   (SAN like IP:10.77.0.1 or DNS:superlink)" >&2
  exit 2
}
[[ $# -ge 2 ]] || usage
out_dir=$1
num_nodes=$2
shift 2
if ! [[ $num_nodes =~ ^[0-9]+$ ]]; then
  echo "make_certs.sh: NUM_NODES must be a non-negative integer, got '$num_nodes'" >&2
  exit 2
fi
sans="DNS:localhost,IP:127.0.0.1,IP:0:0:0:0:0:0:0:1"
for san in "$@"; do
  if ! [[ $san =~ ^(IP|DNS):[A-Za-z0-9.:_-]+$ ]]; then
    echo "make_certs.sh: SAN must look like IP:10.77.0.1 or DNS:superlink, got '$san'" >&2
    exit 2
  fi
  sans="$sans,$san"
done
for tool in openssl ssh-keygen; do
  command -v "$tool" >/dev/null || { echo "make_certs.sh: '$tool' is missing (apt-get install openssl openssh-client)" >&2; exit 3; }
done

mkdir -p "$out_dir/supernodes"
tmp=$(mktemp -d "$out_dir/.tmp.XXXXXX")
trap 'rm -rf "$tmp"' EXIT
days=3650

# 1. CA and server certificate (ECDSA P-256: fast to make, accepted by gRPC and the HTTP APIs).
if [[ ${FORCE:-0} == 1 || ! -f $out_dir/ca.crt || ! -f $out_dir/server.pem ]]; then
  openssl ecparam -name prime256v1 -genkey -noout -out "$tmp/ca.key" 2>/dev/null
  openssl req -x509 -new -key "$tmp/ca.key" -sha256 -days "$days" -subj "/CN=FedDifRC deployment CA" \
    -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign" \
    -out "$tmp/ca.crt" 2>/dev/null
  openssl ecparam -name prime256v1 -genkey -noout -out "$tmp/server.key" 2>/dev/null
  openssl req -new -key "$tmp/server.key" -subj "/CN=feddifrc-superlink" -out "$tmp/server.csr" 2>/dev/null
  printf 'subjectAltName=%s\nbasicConstraints=CA:FALSE\nkeyUsage=digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth\n' \
    "$sans" >"$tmp/server.ext"
  openssl x509 -req -in "$tmp/server.csr" -CA "$tmp/ca.crt" -CAkey "$tmp/ca.key" -CAcreateserial \
    -days "$days" -sha256 -extfile "$tmp/server.ext" -out "$tmp/server.pem" 2>/dev/null
  openssl verify -CAfile "$tmp/ca.crt" "$tmp/server.pem" >/dev/null
  chmod 600 "$tmp/ca.key" "$tmp/server.key"
  for f in ca.key ca.crt server.key server.pem; do mv -f "$tmp/$f" "$out_dir/$f"; done
  echo "make_certs.sh: CA and server certificate with SANs $sans in $out_dir"
fi

# 2. One ECDSA key pair per SuperNode; the SuperLink learns the public halves by registration.
for ((i = 1; i <= num_nodes; i++)); do
  key=$out_dir/supernodes/sn$i
  if [[ ${FORCE:-0} == 1 || ! -f $key || ! -f $key.pub ]]; then
    ssh-keygen -q -t ecdsa -b 384 -N "" -C "feddifrc-sn$i" -f "$tmp/sn$i" <<<y >/dev/null
    mv -f "$tmp/sn$i.pub" "$key.pub"
    mv -f "$tmp/sn$i" "$key"
  fi
done
echo "make_certs.sh: $num_nodes SuperNode key pairs in $out_dir/supernodes"
if [[ -n ${CERTS_OWNER:-} && $(id -u) == 0 ]]; then
  chown -R "$CERTS_OWNER" "$out_dir"
fi
