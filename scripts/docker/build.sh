#!/usr/bin/env bash
# Build the images of docker/compose*.yaml (CPU variant) from the repository root.
#
#   scripts/docker/build.sh            (FLWR_REPOSITORY picks the Flower images, see below)
#
# 1. Wheelhouse: the CPU build of torch and its dependencies, downloaded into docker/wheels with
#    the host's pip (scripts/docker/wheelhouse.sh); kept between runs.
# 2. Flower images: FLWR_REPOSITORY=flwr uses the official flwr/superlink, flwr/supernode and
#    flwr/superexec (pulled when missing); FLWR_REPOSITORY=feddifrc-flwr builds ours from
#    docker/flower.Dockerfile on BASE_IMAGE (default: the Debian base of `make docker-base`).
#    Unset: official when they are here or can be pulled, ours otherwise.
# 3. feddifrc-certs (TLS overlay); 4. feddifrc-server and feddifrc-client-cpu FROM
#    <repository>/superexec.
# Builds use the classic builder with host networking (only to reach the package index); its
# layer cache makes a rebuild with unchanged Dockerfiles, pyproject.toml and wheels take seconds.
# Prints FLWR_REPOSITORY=... and CERTS_BASE_IMAGE=... on its last two lines (for docker compose).
set -euo pipefail

repo=$(cd "$(dirname "$0")/../.." && pwd)
cd "$repo"
flwr_version=${FLWR_VERSION:-1.39.0}
base_image=${BASE_IMAGE:-feddifrc-debian-base:bookworm}
export DOCKER_BUILDKIT=0  # the classic builder: needs no buildx plugin, honours --network host
say() { echo "docker-build: $*" >&2; }

build() {  # build TAG DOCKERFILE [ARGS...]
  local tag=$1 file=$2 started=$SECONDS
  shift 2
  say "building $tag ($file) ..."
  if ! docker build --network host -f "$file" -t "$tag" \
       --build-arg "FLWR_VERSION=$flwr_version" "$@" . >"$log_dir/build-${tag//[\/:]/_}.log" 2>&1; then
    say "building $tag failed; last lines of $log_dir/build-${tag//[\/:]/_}.log:"
    tail -n 25 "$log_dir/build-${tag//[\/:]/_}.log" >&2
    exit 1
  fi
  say "built $tag in $((SECONDS - started)) s"
}

log_dir=${FEDDIFRC_DOCKER_STATE:-$repo/.cache/docker}
mkdir -p "$log_dir"

# 1. Wheelhouse, and the CA bundle the host's pip trusts (behind a TLS-inspecting proxy the
#    builds' pip needs it to reach the index; docker/wheels/build-ca.crt is not committed).
bash scripts/docker/wheelhouse.sh
py=$repo/.venv/bin/python
[[ -x $py ]] || py=python3
ca=${PIP_CERT:-$("$py" -m pip config get global.cert 2>/dev/null || true)}
rm -f docker/wheels/build-ca.crt
if [[ -n $ca && -f $ca ]]; then cp "$ca" docker/wheels/build-ca.crt; fi

# 2. Flower images.
repository=${FLWR_REPOSITORY:-}
if [[ -z $repository ]]; then
  repository=feddifrc-flwr
  if docker image inspect "flwr/superexec:$flwr_version" >/dev/null 2>&1 \
     || timeout 60 docker pull -q "flwr/superexec:$flwr_version" >/dev/null 2>&1; then
    repository=flwr
  else
    say "flwr/superexec:$flwr_version cannot be pulled here: building Flower's images ourselves"
  fi
fi
if [[ $repository == flwr ]]; then
  for component in superlink supernode superexec; do
    docker image inspect "flwr/$component:$flwr_version" >/dev/null 2>&1 \
      || docker pull -q "flwr/$component:$flwr_version" >/dev/null
  done
else
  docker image inspect "$base_image" >/dev/null 2>&1 || {
    say "base image $base_image is missing: make docker-base (scripts/docker/setup.sh --base)"
    exit 1
  }
  for component in superlink supernode superexec; do
    build "$repository/$component:$flwr_version" docker/flower.Dockerfile --target "$component" \
      --build-arg "BASE_IMAGE=$base_image"
  done
fi

# 3. The certificate maker of the TLS overlay (alpine online; the Debian base has its tools).
if [[ $repository == flwr ]]; then certs_base=alpine:3.20; else certs_base=$base_image; fi
build feddifrc-certs:latest docker/certs.Dockerfile --build-arg "BASE_IMAGE=$certs_base"

# 4. The app's executors (CPU torch).
build "feddifrc-server:$flwr_version" docker/server.Dockerfile --build-arg "FLWR_REPOSITORY=$repository"
build "feddifrc-client-cpu:$flwr_version" docker/client-cpu.Dockerfile \
  --build-arg "FLWR_REPOSITORY=$repository"
echo "FLWR_REPOSITORY=$repository"
echo "CERTS_BASE_IMAGE=$certs_base"
