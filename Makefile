# Two set-up commands on a fresh machine: `make demo` and `make test`.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# The CPU build of torch that lies on the machine's disk; an unpinned torch pulls a multi-GB CUDA build.
TORCH_SPEC ?= torch==2.13.0
OPEN_CLIP_SPEC ?= open-clip-torch==3.3.0
FMNIST_DEFAULT := /usr/share/datasets/fashion-mnist
# Fashion-MNIST IDX files; `make demo FMNIST_DIR=/folder` uses a folder of your own (no apt needed).
FMNIST_DIR ?= $(FMNIST_DEFAULT)
DATA_ARG := $(if $(filter-out $(FMNIST_DEFAULT),$(FMNIST_DIR)),-c "data-path='$(FMNIST_DIR)'",)
export FLWR_TELEMETRY_ENABLED := 0
export FLWR_HOME := $(CURDIR)/.flwr-home
export FEDDIFRC_CACHE_DIR ?= $(CURDIR)/.cache/feddifrc
export FEDDIFRC_RUNS_DIR ?= $(CURDIR)/runs
export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM := false

.PHONY: venv data demo test lint

venv: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[dev]" "$(TORCH_SPEC)"
	# open-clip-torch ships the real CLIP BPE vocabulary; --no-deps because it requires torchvision.
	$(PY) -m pip install -q --no-deps "$(OPEN_CLIP_SPEC)"
	# Ray has no authentication: simulations keep it on loopback with a bind() shim that needs a
	# C compiler (scripts/ray_loopback.py); without one they warn and Ray listens everywhere.
	-$(PY) scripts/ray_loopback.py
	# `source .venv/bin/activate` also sets what plain `flwr run .` needs (scripts/flower_env.sh).
	@grep -q 'scripts/flower_env.sh' $(VENV)/bin/activate || \
	  echo '. "$(CURDIR)/scripts/flower_env.sh" "$(CURDIR)"  # feddifrc: docs/running.md' >> $(VENV)/bin/activate
	@touch $(STAMP)

data:
	@if [ -f $(FMNIST_DIR)/train-images-idx3-ubyte.gz ] || [ -f $(FMNIST_DIR)/train-images-idx3-ubyte ]; then exit 0; fi; \
	if [ "$(FMNIST_DIR)" = "$(FMNIST_DEFAULT)" ] && command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ]; then \
	  echo "Installing Fashion-MNIST (Debian package dataset-fashion-mnist) ..."; \
	  (apt-get install -y -qq dataset-fashion-mnist >/dev/null 2>&1 || \
	   (apt-get update -qq >/dev/null && apt-get install -y -qq dataset-fashion-mnist >/dev/null)); \
	else \
	  echo "Fashion-MNIST is missing from $(FMNIST_DIR). Install the Debian package"; \
	  echo "dataset-fashion-mnist (as root: apt-get install dataset-fashion-mnist) or put the four"; \
	  echo "IDX files in a folder and run: make demo FMNIST_DIR=/that/folder"; exit 1; \
	fi

# FedAvg and FedDifRC, offline, on the same partition, seed and budget (pyproject
# [tool.flwr.app.config] defaults), one plot and a table; exits non-zero when a Flower run fails.
# Extra settings for both: make demo DEMO_ARGS='-c "num-rounds=3"'.
DEMO_ARGS ?=
demo: venv data
	$(PY) scripts/demo.py --supernodes 10 --cpus-per-client 1 $(DATA_ARG) $(DEMO_ARGS)

lint: venv
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy

test: venv data lint
	$(VENV)/bin/pytest -q

# Retrain the offline diffusion teacher shipped in models/fmnist-teacher (teacher/: public half
# of Fashion-MNIST, 6 epochs, ~36 min on 2 free cores; resumable from
# $(FEDDIFRC_CACHE_DIR)/teacher-train). TEACHER_STOP is the step the shipped model was exported at.
TEACHER_STEPS ?= 2808
TEACHER_STOP ?= $(TEACHER_STEPS)
.PHONY: teacher
teacher: venv data
	OMP_WAIT_POLICY=PASSIVE $(PY) -m teacher --out models/fmnist-teacher \
	  --work-dir $(FEDDIFRC_CACHE_DIR)/teacher-train --threads 2 --max-steps $(TEACHER_STEPS) \
	  --stop-at-step $(TEACHER_STOP)

# --- Deployment (docs/deploy.md): SuperLink + SuperNodes as separate processes, TLS + node auth.
DEPLOY := $(PY) scripts/deploy/deploy.py
DEPLOY_NODES ?= 2
DEPLOY_HOSTS ?= loopback
DEPLOY_DATA ?= $(FMNIST_DIR)
DEPLOY_ARGS ?=
RUN_CONFIG ?= num-rounds=2
.PHONY: deploy-certs deploy-up deploy-run deploy-status deploy-down deploy-netns-demo deploy-soak deploy-test

deploy-certs: venv
	bash scripts/deploy/make_certs.sh .cache/deploy/certs $(DEPLOY_NODES)

deploy-up: venv
	$(DEPLOY) up --nodes $(DEPLOY_NODES) --hosts $(DEPLOY_HOSTS) --data-path "$(DEPLOY_DATA)" $(DEPLOY_ARGS)

deploy-run: venv
	$(DEPLOY) run -c "$(RUN_CONFIG)"

deploy-status:
	$(DEPLOY) status

deploy-down:
	$(DEPLOY) down

# Two SuperNodes in their own network namespaces (root), a 2-round run with the tiny extractor.
deploy-netns-demo: venv
	$(DEPLOY) up --nodes 2 --hosts netns
	$(DEPLOY) run -c "num-rounds=2 dataset='digits' model='small-cnn' diffusion-model='tiny-sd' train-samples=200 test-samples=100 validation-samples=100 local-epochs=1 fraction-train=1.0 partition='iid' data-subset='all'"; \
	  status=$$?; $(DEPLOY) down; exit $$status

# 4 SuperNodes, 20 rounds of the probe app, node 2 killed at round 5 and restarted.
deploy-soak: venv
	$(PY) scripts/deploy/soak.py --nodes 4 --rounds 20

deploy-test: venv
	$(VENV)/bin/pytest -q tests/test_deploy.py tests/test_deploy_compose.py

# --- benchmarks (docs/results.md): resumable, rerun the same target to continue ----------------
BENCH_ARGS ?=
.PHONY: benchmark-accuracy benchmark-accuracy-ssl benchmark-accuracy-redraw benchmark-round-cost

# The accuracy evidence (issue 22; docs/results.md "Accuracy benchmark (ten seeds)"): FedDifRC vs
# FedAvg and the controls that get the teacher's public data (warm start, distillation), with a
# validation split; alpha 0.1 seeds 7-16 and alpha 0.5 seeds 7-11 of six arms, FedProx/MOON
# seeds 7-11 at both: 110 runs in benchmarks/results/accuracy/cpu-v3, about 10 h on 2 cores
# (baselines 3-4 min; a seed's first FedDifRC run ~12 min, which extracts, and its first
# fedavg-kd run ~10 min, which computes the teacher logits; the runs after those reuse them;
# the warm start ~3 min once per seed). Resumable; tables go into docs/results.md.
benchmark-accuracy: venv data
	nice -n 5 $(PY) benchmarks/accuracy.py --suite ten-seed --publish docs/results.md $(BENCH_ARGS)

# Self-supervised entry: linear probe of feddifrc-ssl vs simclr vs the random-init encoder.
benchmark-accuracy-ssl: venv data
	nice -n 5 $(PY) benchmarks/accuracy.py --suite ssl-three-seed --publish docs/results.md $(BENCH_ARGS)

# The earlier records without a validation split (cpu-v2: five seeds and the SSL table;
# cpu-v2-confirm: the first 4 head-confirmation runs), redrawn into docs/results.md in today's
# table format; no runs.
benchmark-accuracy-redraw: venv
	$(PY) benchmarks/accuracy.py --out benchmarks/results/accuracy/cpu-v2 --suite five-seed --report-only --publish docs/results.md
	$(PY) benchmarks/accuracy.py --out benchmarks/results/accuracy/cpu-v2-confirm --suite confirm-head --report-only --publish docs/results.md

# Local training time per round, FedDifRC (cached representations) vs FedAvg, one client.
benchmark-round-cost: venv data
	nice -n 5 $(PY) benchmarks/round_cost.py $(BENCH_ARGS)

# --- Docker compose (docs/deploy.md, section 5): images, the real compose deployment ------------
# docker-setup: engine + compose v2 + daemon (installed/started where root on Debian);
# docker-base: plus the offline Debian base image; docker-images: every image of the CPU compose
# deployment (reused while Dockerfiles, pyproject.toml and wheels are unchanged);
# docker-demo: TLS + SuperNode auth, 2 SuperNodes, FedDifRC with the offline teacher on
# Fashion-MNIST (mounted read-only), status check, summary, `down -v` (also on failure/Ctrl-C).
# Extra settings: make docker-demo DOCKER_DEMO_ARGS='--rounds 5 -c "local-epochs=2"'.
DOCKER_DEMO_ARGS ?=
.PHONY: docker-setup docker-base docker-images docker-demo docker-test docker-stop-daemon

docker-setup: venv
	bash scripts/docker/setup.sh

docker-base: venv
	bash scripts/docker/setup.sh --base

docker-images: docker-base
	bash scripts/docker/build.sh

docker-demo: venv data
	$(PY) scripts/docker/compose_demo.py --data-dir "$(FMNIST_DIR)" $(DOCKER_DEMO_ARGS)

docker-test: venv
	$(VENV)/bin/pytest -q tests/test_docker_compose.py

# Stops the daemon only when scripts/docker/setup.sh started it (its pid file in .cache/docker).
docker-stop-daemon:
	bash scripts/docker/setup.sh --stop-daemon
