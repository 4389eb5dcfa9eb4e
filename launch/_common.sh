# Sourced by the launch scripts: which launcher to run, and CPU threads per rank.
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

# On CPU several ranks on few cores thrash with one OpenMP pool each: one thread per rank
# unless the caller chose.
one_thread_per_rank_on_cpu() {
  if ! "$PYTHON" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
    export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
  fi
}
