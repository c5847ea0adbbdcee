# ClientApp executor with CUDA: flower-superexec, a CUDA build of torch and the diffusion
# extractor's dependencies. Needs the NVIDIA container toolkit on the host (compose reserves a GPU).
# Build from the repository root:  docker build -f docker/client.Dockerfile -t feddifrc-client .
ARG CUDA_IMAGE=nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04
FROM ${CUDA_IMAGE}

ARG FLWR_VERSION=1.39.0
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX=https://download.pytorch.org/whl/cu128
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && python3 -m venv /opt/venv \
 && useradd --create-home --uid 49999 app \
 && mkdir -p /cache /hf-cache && chown app:app /cache /hf-cache
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /app
RUN python -m pip install --no-cache-dir "torch==${TORCH_VERSION}" --index-url "${TORCH_INDEX}"
COPY pyproject.toml ./
RUN python -c "import tomllib; deps = tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']; \
print('\n'.join(d for d in deps if not d.startswith(('flwr', 'torch'))))" > requirements.txt \
 && python -m pip install --no-cache-dir -r requirements.txt "torch==${TORCH_VERSION}" \
      "flwr[simulation]==${FLWR_VERSION}" \
 && python -m pip install --no-cache-dir --no-deps "open-clip-torch==3.3.0"
# The offline diffusion teacher (weights are not part of the app bundle `flwr run` ships).
COPY models/fmnist-teacher /opt/feddifrc/models/fmnist-teacher
ENV HF_HOME=/hf-cache HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false FLWR_TELEMETRY_ENABLED=0 \
    FEDDIFRC_MODELS_DIR=/opt/feddifrc/models FEDDIFRC_CACHE_DIR=/cache
USER app
ENTRYPOINT ["flower-superexec"]
