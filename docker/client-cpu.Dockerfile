# ClientApp executor, CPU variant: flower-superexec, CPU torch and the diffusion extractor's
# dependencies (diffusers, transformers, the CLIP vocabulary from open-clip-torch), the offline
# teacher. Steps 1-3 are those of docker/server.Dockerfile, so the two images share those layers.
# Build from the repository root (scripts/docker/build.sh does this, with a local wheelhouse):
#   docker build --network host -f docker/client-cpu.Dockerfile -t feddifrc-client-cpu:1.39.0 .
ARG FLWR_REPOSITORY=flwr
ARG FLWR_VERSION=1.39.0
FROM ${FLWR_REPOSITORY}/superexec:${FLWR_VERSION}

ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
COPY docker/wheels/ /tmp/wheels/
RUN if [ -f /tmp/wheels/build-ca.crt ]; then export PIP_CERT=/tmp/wheels/build-ca.crt; fi; \
    if ls /tmp/wheels/torch-*.whl >/dev/null 2>&1; then \
      python -m pip install --no-cache-dir --no-index --find-links /tmp/wheels "torch==${TORCH_VERSION}"; \
    else \
      python -m pip install --no-cache-dir --index-url "${TORCH_INDEX}" "torch==${TORCH_VERSION}"; \
    fi
COPY pyproject.toml /tmp/pyproject.toml
RUN python -c "import tomllib; deps = tomllib.load(open('/tmp/pyproject.toml', 'rb'))['project']['dependencies']; \
print('\n'.join(d for d in deps if not d.startswith(('flwr', 'torch'))))" > /tmp/requirements.txt \
 && if [ -f /tmp/wheels/build-ca.crt ]; then export PIP_CERT=/tmp/wheels/build-ca.crt; fi \
 && echo "torch==${TORCH_VERSION}" > /tmp/constraints.txt \
 && python -m pip install --no-cache-dir --find-links /tmp/wheels -c /tmp/constraints.txt \
      -r /tmp/requirements.txt \
 && python -m pip install --no-cache-dir --no-deps "open-clip-torch==3.3.0" \
 && python -c "import torch; assert '+cu' not in torch.__version__, torch.__version__"
COPY models/fmnist-teacher /opt/feddifrc/models/fmnist-teacher
# Data, feature caches and the Hugging Face cache are volumes (see docker/compose.yaml).
ENV HF_HOME=/hf-cache HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false FLWR_TELEMETRY_ENABLED=0 \
    FEDDIFRC_MODELS_DIR=/opt/feddifrc/models FEDDIFRC_CACHE_DIR=/cache
USER root
RUN mkdir -p /cache /hf-cache && chown app:app /cache /hf-cache
USER app
ENTRYPOINT ["flower-superexec"]
