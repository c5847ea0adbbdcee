#!/usr/bin/env bash
# The CPU build of torch and its dependencies as wheels in docker/wheels, for offline image builds.
#
#   scripts/docker/wheelhouse.sh
#
# Uses the host's pip (the project's .venv when it exists): here the CPU wheel of torch comes from
# pip's find-links (a file of this machine) and the package index serves only CUDA builds, so
# containers cannot get it themselves. Elsewhere set WHEELHOUSE_PIP_ARGS, e.g.
#   WHEELHOUSE_PIP_ARGS="--index-url https://download.pytorch.org/whl/cpu --extra-index-url https://pypi.org/simple"
# Refuses a CUDA build (its wheel is several GB and the CPU images do not need it).
set -euo pipefail

repo=$(cd "$(dirname "$0")/../.." && pwd)
out=$repo/docker/wheels
torch_spec=${TORCH_SPEC:-torch==2.13.0}
py=$repo/.venv/bin/python
[[ -x $py ]] || py=python3
mkdir -p "$out"
if compgen -G "$out/torch-${torch_spec#torch==}*.whl" >/dev/null; then
  echo "docker-wheelhouse: $(basename "$out"/torch-"${torch_spec#torch==}"*.whl) already in $out" >&2
  exit 0
fi
echo "docker-wheelhouse: pip download $torch_spec into $out ..." >&2
# shellcheck disable=SC2086  # word splitting of the extra arguments is wanted
"$py" -m pip download -q --only-binary=:all: -d "$out" ${WHEELHOUSE_PIP_ARGS:-} "$torch_spec" >&2
wheel=$(compgen -G "$out/torch-*.whl" | head -n 1)
if [[ $wheel != *+cpu* ]] && unzip -l "$wheel" 2>/dev/null | grep -q "libcudart\|nvidia"; then
  echo "docker-wheelhouse: $wheel is a CUDA build; give a CPU index in WHEELHOUSE_PIP_ARGS" >&2
  rm -f "$wheel"
  exit 1
fi
echo "docker-wheelhouse: $(ls "$out"/*.whl | wc -l) wheels, $(du -sh "$out" | cut -f1) in $out" >&2
