# ServerApp executor: flower-superexec plus the app's Python dependencies (CPU torch).
# The app code itself is not in the image: it travels with every `flwr run . <connection>`.
# Build from the repository root:  docker build -f docker/server.Dockerfile -t feddifrc-server .
ARG FLWR_VERSION=1.39.0
FROM flwr/superexec:${FLWR_VERSION}

WORKDIR /app
# CPU build first: an unpinned torch resolves to a multi-GB CUDA build the server does not need.
ARG TORCH_VERSION=2.13.0
RUN python -m pip install --no-cache-dir "torch==${TORCH_VERSION}" \
      --index-url https://download.pytorch.org/whl/cpu
COPY pyproject.toml ./
# Dependencies only (flwr is in the base image; the package itself would shadow the shipped app).
RUN python -c "import tomllib; deps = tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']; \
print('\n'.join(d for d in deps if not d.startswith(('flwr', 'torch'))))" > requirements.txt \
 && python -m pip install --no-cache-dir -r requirements.txt "torch==${TORCH_VERSION}" \
 && python -m pip install --no-cache-dir --no-deps "open-clip-torch==3.3.0"
ENV HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false FLWR_TELEMETRY_ENABLED=0 \
    FEDDIFRC_RUNS_DIR=/runs
# Named volumes take the owner of their mount point: make them writable for the image's user.
USER root
RUN mkdir -p /runs && chown app:app /runs
USER app
ENTRYPOINT ["flower-superexec"]
