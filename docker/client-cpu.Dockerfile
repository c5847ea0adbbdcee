# ClientApp executor, CPU variant: flower-superexec, CPU torch and the diffusion extractor's
# dependencies (diffusers, transformers, the CLIP vocabulary from open-clip-torch).
# Build from the repository root:  docker build -f docker/client-cpu.Dockerfile -t feddifrc-client-cpu .
ARG FLWR_VERSION=1.39.0
FROM flwr/superexec:${FLWR_VERSION}

WORKDIR /app
ARG TORCH_VERSION=2.13.0
RUN python -m pip install --no-cache-dir "torch==${TORCH_VERSION}" \
      --index-url https://download.pytorch.org/whl/cpu
COPY pyproject.toml ./
RUN python -c "import tomllib; deps = tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']; \
print('\n'.join(d for d in deps if not d.startswith(('flwr', 'torch'))))" > requirements.txt \
 && python -m pip install --no-cache-dir -r requirements.txt "torch==${TORCH_VERSION}" \
 && python -m pip install --no-cache-dir --no-deps "open-clip-torch==3.3.0"
# Data, feature caches and the Hugging Face cache are volumes (see docker/compose.yaml).
ENV HF_HOME=/hf-cache HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false FLWR_TELEMETRY_ENABLED=0 \
    FEDDIFRC_CACHE_DIR=/cache
# Named volumes take the owner of their mount point: make them writable for the image's user.
USER root
RUN mkdir -p /cache /hf-cache && chown app:app /cache /hf-cache
USER app
ENTRYPOINT ["flower-superexec"]
