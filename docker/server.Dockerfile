# ServerApp executor: flower-superexec plus the app's Python dependencies (CPU torch).
# The app code itself is not in the image: it travels with every `flwr run . <connection>`.
# Build from the repository root (scripts/docker/build.sh does this, with a local wheelhouse):
#   docker build --network host -f docker/server.Dockerfile -t feddifrc-server:1.39.0 .
# FLWR_REPOSITORY=flwr: the official flwr/superexec; feddifrc-flwr: ours (docker/flower.Dockerfile).
ARG FLWR_REPOSITORY=flwr
ARG FLWR_VERSION=1.39.0
FROM ${FLWR_REPOSITORY}/superexec:${FLWR_VERSION}

# 1. CPU torch: from the wheelhouse docker/wheels when it holds one (scripts/docker/wheelhouse.sh,
#    no network needed), else from the PyTorch CPU index. An unpinned torch would resolve to a
#    multi-GB CUDA build the CPU images do not need.
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
COPY docker/wheels/ /tmp/wheels/
RUN if [ -f /tmp/wheels/build-ca.crt ]; then export PIP_CERT=/tmp/wheels/build-ca.crt; fi; \
    if ls /tmp/wheels/torch-*.whl >/dev/null 2>&1; then \
      python -m pip install --no-cache-dir --no-index --find-links /tmp/wheels "torch==${TORCH_VERSION}"; \
    else \
      python -m pip install --no-cache-dir --index-url "${TORCH_INDEX}" "torch==${TORCH_VERSION}"; \
    fi
# 2. The app's dependencies from pyproject.toml (flwr is in the base image; the package itself
#    would shadow the app that `flwr run` ships). torch stays the one above (constraint).
COPY pyproject.toml /tmp/pyproject.toml
RUN python -c "import tomllib; deps = tomllib.load(open('/tmp/pyproject.toml', 'rb'))['project']['dependencies']; \
print('\n'.join(d for d in deps if not d.startswith(('flwr', 'torch'))))" > /tmp/requirements.txt \
 && if [ -f /tmp/wheels/build-ca.crt ]; then export PIP_CERT=/tmp/wheels/build-ca.crt; fi \
 && echo "torch==${TORCH_VERSION}" > /tmp/constraints.txt \
 && python -m pip install --no-cache-dir --find-links /tmp/wheels -c /tmp/constraints.txt \
      -r /tmp/requirements.txt \
 && python -m pip install --no-cache-dir --no-deps "open-clip-torch==3.3.0" \
 && python -c "import torch; assert '+cu' not in torch.__version__, torch.__version__"
# 3. The offline diffusion teacher (weights are not part of the app bundle `flwr run` ships).
COPY models/fmnist-teacher /opt/feddifrc/models/fmnist-teacher
ENV HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false FLWR_TELEMETRY_ENABLED=0 \
    FEDDIFRC_MODELS_DIR=/opt/feddifrc/models FEDDIFRC_RUNS_DIR=/runs
# Named volumes take the owner of their mount point: make them writable for the image's user.
USER root
RUN mkdir -p /runs && chown app:app /runs
USER app
ENTRYPOINT ["flower-superexec"]
