# Sourced by the launch scripts: which launcher to run, how loud, and CPU threads per rank.
#
# The launcher: $DEEPSPEED when set (e.g. "python3 -m deepspeed.launcher.runner"), else the
# `deepspeed` script, else the same launcher through $PYTHON (default python3) when the script
# is not on PATH (wheels installed with --target, some images). Sets the array DS.
PYTHON=${PYTHON:-python3}
if [[ -n "${DEEPSPEED:-}" ]]; then
  read -r -a DS <<<"$DEEPSPEED"
elif command -v deepspeed >/dev/null 2>&1; then
  DS=(deepspeed)
else
  DS=("$PYTHON" -m deepspeed.launcher.runner)
fi

# Quiet by default: DeepSpeed's launcher logs, at INFO level, its command line and every
# variable it sets for the ranks. Unless ES_LLM_VERBOSE is set (es-llm --verbose sets it for
# the ranks) or --verbose is among the arguments, ask the launcher itself for LEVEL and above
# (its --log_level flag; DeepSpeed releases without the flag keep their output).
# `quiet_launcher LEVEL "$@"`: LEVEL is "warning", or "error" on one node, where the
# launcher's only warning is that there is no hostfile (there is none by design).
quiet_launcher() {
  local arg level=$1
  shift
  if [[ -n "${ES_LLM_VERBOSE:-}" && "${ES_LLM_VERBOSE}" != "0" ]]; then
    return 0
  fi
  for arg in "$@"; do
    if [[ "$arg" == "--verbose" ]]; then
      return 0
    fi
  done
  if "$PYTHON" -c '
import importlib.util, os, sys
spec = importlib.util.find_spec("deepspeed")
runner = os.path.join(os.path.dirname(spec.origin), "launcher", "runner.py")
sys.exit(0 if "\"--log_level\"" in open(runner).read() else 1)
' 2>/dev/null; then
    DS+=(--log_level "$level")
  fi
}

# On CPU several ranks on few cores thrash with one OpenMP pool each: one thread per rank
# unless the caller chose. And the accelerator is named (DS_ACCELERATOR=cpu, unless set):
# DeepSpeed would pick the CPU anyway, but warns in the launcher and in every rank that it
# "fell back" to it.
one_thread_per_rank_on_cpu() {
  if ! "$PYTHON" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
    export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
    export DS_ACCELERATOR="${DS_ACCELERATOR:-cpu}"
  fi
}
