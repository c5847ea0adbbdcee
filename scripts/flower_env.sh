# Environment for Flower's own commands (`flwr run .`, `flwr ls`, `flwr log`) in this project.
# `make venv` appends a line to .venv/bin/activate that sources this file with the checkout's path,
# so `source .venv/bin/activate` is all a user types. Values already set by the user win.
# Usage: . scripts/flower_env.sh /path/to/checkout

_feddifrc_root="${1:?usage: . scripts/flower_env.sh /path/to/checkout}"

# The project and its dependencies (CPU torch included) are installed in this environment. The
# SuperLink that `flwr run .` starts would otherwise `uv sync` them into a fresh environment for
# every run (a second multi-GB torch). It reads this variable once, when it starts.
export FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION="${FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION:-1}"
export FLWR_TELEMETRY_ENABLED="${FLWR_TELEMETRY_ENABLED:-0}"
# Where runs, caches and the offline teacher live, independent of the directory the local
# SuperLink happened to be started from (a Flower app bundle carries only code).
export FEDDIFRC_RUNS_DIR="${FEDDIFRC_RUNS_DIR:-$_feddifrc_root/runs}"
export FEDDIFRC_CACHE_DIR="${FEDDIFRC_CACHE_DIR:-$_feddifrc_root/.cache/feddifrc}"
export FEDDIFRC_MODELS_DIR="${FEDDIFRC_MODELS_DIR:-$_feddifrc_root/models}"
export HF_HUB_OFFLINE="${HF_HUB_OFFLINE:-1}"
# Quieter ClientApp logs: library advisories and progress bars.
export DIFFUSERS_VERBOSITY="${DIFFUSERS_VERBOSITY:-error}"
export TRANSFORMERS_VERBOSITY="${TRANSFORMERS_VERBOSITY:-error}"
export HF_HUB_DISABLE_PROGRESS_BARS="${HF_HUB_DISABLE_PROGRESS_BARS:-1}"
export TOKENIZERS_PARALLELISM="${TOKENIZERS_PARALLELISM:-false}"
export RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO="${RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO:-0}"
# Ray (the simulation engine) has no authentication and would listen on every interface: the
# processes that `flwr` starts (its local SuperLink and the simulations under it) get the loopback
# settings of scripts/ray_loopback.py. A function, not exports, so nothing else in this shell
# (e.g. a SuperLink you start by hand for a deployment on 0.0.0.0) is touched.
if [ -f "$_feddifrc_root/.venv/lib/feddifrc-ray-loopback.so" ]; then
  export FEDDIFRC_RAY_LOOPBACK="$_feddifrc_root/.venv/lib/feddifrc-ray-loopback.so"
  flwr() {
    LD_PRELOAD="$FEDDIFRC_RAY_LOOPBACK${LD_PRELOAD:+:$LD_PRELOAD}" \
      RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 command flwr "$@"
  }
fi
unset _feddifrc_root
