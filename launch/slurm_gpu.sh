#!/usr/bin/env bash
#SBATCH --job-name=rlhf_jax
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=16
#SBATCH --time=04:00:00
#SBATCH --output=slurm-%x-%j.out
# One rlhf_jax job on a SLURM GPU cluster: one process per node, each driving all of its
# node's GPUs; process 0's node is the jax.distributed coordinator. Submit from the
# repository root (sbatch runs a copy of this file, so paths are taken from the submit
# directory); the header's values are defaults that sbatch flags override.
set -euo pipefail

# sbatch runs a spooled copy of this file, away from launch/: the repository is the
# directory the job was submitted from.
REPO=${SLURM_SUBMIT_DIR:-$(dirname "${BASH_SOURCE[0]}")/..}
if [[ ! -f $REPO/launch/common.sh ]]; then
  echo "error: $REPO is not the rlhf_jax repository: submit from its root" >&2
  exit 2
fi
# shellcheck disable=SC1091  # common.sh, in the submit directory
source "$REPO/launch/common.sh"

usage() {
  cat <<'EOF'
usage: sbatch [--nodes=N --gpus-per-node=G --time=T ...] launch/slurm_gpu.sh --config=FILE[:VARIANT] --workdir=DIR [--config.a.b=v ...] [--dry-run]

Runs, on every node of the allocation (srun, one task per node),
  $PYTHON -m rlhf_jax.main ARGS --coordinator=HEAD:PORT --num_processes=$SLURM_NTASKS --process_id=$SLURM_PROCID
with HEAD the first node of $SLURM_JOB_NODELIST. DIR must be on a filesystem every
node sees. Environment: PYTHON (default python; e.g. a venv's python on the shared
filesystem), PORT (default 20000 + job id mod 10000), DRY_RUN=1 (same as --dry-run:
print the srun command and each task's command instead of running them).
EOF
}

DRY_RUN=${DRY_RUN:-0}
[[ $DRY_RUN == 1 ]] || DRY_RUN=0
ARGS=()
has_config=0 has_workdir=0
for arg in "$@"; do
  case $arg in
    -h|--help) usage; exit 0 ;;
    --dry-run|--dry_run) DRY_RUN=1; continue ;;
    --config=?*|--config) has_config=1 ;;
    --workdir=?*|--workdir) has_workdir=1 ;;
    --coordinator*|--num_processes*|--process_id*|--distributed*)
      die_usage "$arg is set by this script" ;;
  esac
  ARGS+=("$arg")
done
(( has_config )) || die_usage "--config is required"
(( has_workdir )) || die_usage "--workdir is required"

if [[ -z ${SLURM_JOB_NODELIST:-} ]]; then
  (( DRY_RUN )) || die_usage "not inside a SLURM allocation: submit with sbatch (or use --dry-run)"
  HEAD=localhost
else
  command -v scontrol >/dev/null || { echo "error: scontrol not found" >&2; exit 2; }
  # Not `| head -1`: with pipefail, scontrol could die of SIGPIPE on a long node list.
  HEAD=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | sed -n 1p)
  [[ -n $HEAD ]] || { echo "error: no node in SLURM_JOB_NODELIST=$SLURM_JOB_NODELIST" >&2; exit 2; }
fi
NUM_PROCESSES=${SLURM_NTASKS:-${SLURM_NNODES:-1}}
# A port per job, so that two jobs sharing a head node do not collide.
PORT=${PORT:-$(( 20000 + ${SLURM_JOB_ID:-0} % 10000 ))}
PYTHON=${PYTHON:-python}
cd "$REPO"

COMMON=("$PYTHON" -m rlhf_jax.main "${ARGS[@]}" --coordinator="$HEAD:$PORT"
        --num_processes="$NUM_PROCESSES")
# srun starts one bash per task; SLURM_PROCID is expanded there, per task, not here.
# --kill-on-bad-exit: one failed process ends the step instead of leaving the others
# waiting in a collective.
# shellcheck disable=SC2016
SRUN=(srun --kill-on-bad-exit=1 bash -c 'exec "$@" --process_id="$SLURM_PROCID"' rlhf_jax_task
      "${COMMON[@]}")

echo "+ $(quote_cmd "${SRUN[@]}")"
if (( DRY_RUN )); then
  for (( i = 0; i < NUM_PROCESSES; i++ )); do
    echo "  task $i: $(quote_cmd "${COMMON[@]}" --process_id="$i")"
  done
  exit 0
fi
echo "rlhf_jax: $NUM_PROCESSES processes, coordinator $HEAD:$PORT, nodes $SLURM_JOB_NODELIST"
exec "${SRUN[@]}"
