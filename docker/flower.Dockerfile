# Flower's own images (superlink, supernode, superexec) for hosts that cannot pull flwr/* from a
# registry: the same layout as the official ones (user `app`, uid 49999, HOME and WORKDIR /app,
# Python in the venv /python/venv, one ENTRYPOINT per component), on a base of our choosing.
#
#   docker build --network host -f docker/flower.Dockerfile --target superlink \
#     --build-arg BASE_IMAGE=feddifrc-debian-base:bookworm -t feddifrc-flwr/superlink:1.39.0 .
#
# BASE_IMAGE needs python3 (>= 3.10) with venv and pip: `make docker-base` makes one from the
# Debian archive (scripts/docker/setup.sh --base). Host networking only reaches the package index.
ARG BASE_IMAGE=feddifrc-debian-base:bookworm
FROM ${BASE_IMAGE} AS base
ARG FLWR_VERSION=1.39.0
ENV PATH=/python/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONIOENCODING=UTF-8 \
    LANG=C.UTF-8 \
    LC_ALL=C.UTF-8
# build-ca.crt: the CA bundle the host's pip trusts (scripts/docker/build.sh copies it when pip
# has one configured, e.g. behind a TLS-inspecting proxy); used for this download only.
COPY docker/wheels/README.md docker/wheels/*.crt /tmp/build/
# /app/state exists so that a named volume mounted there belongs to `app` (SuperLink database).
RUN if [ -f /tmp/build/build-ca.crt ]; then export PIP_CERT=/tmp/build/build-ca.crt; fi \
 && python3 -m venv /python/venv \
 && python -m pip install --no-cache-dir "flwr==${FLWR_VERSION}" \
 && groupadd --gid 49999 app \
 && useradd --uid 49999 --gid 49999 --home-dir /app --no-create-home --shell /bin/bash app \
 && mkdir -p /app/state && chown -R app:app /app /python/venv && rm -rf /tmp/build
WORKDIR /app
USER app
ENV HOME=/app

FROM base AS superlink
ENTRYPOINT ["flower-superlink"]

FROM base AS supernode
ENTRYPOINT ["flower-supernode"]

FROM base AS superexec
ENTRYPOINT ["flower-superexec"]
