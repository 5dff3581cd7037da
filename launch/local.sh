#!/usr/bin/env bash
# N rlhf_jax processes on this machine, on CPU, joined by jax.distributed through a
# coordinator on localhost: the multi-host code paths (process 0 writes, the others
# only compute) without a cluster. Written for bash 3.2 too (macOS).
set -euo pipefail

usage() {
  cat <<'EOF'
usage: launch/local.sh [--dry-run] N --config=FILE[:VARIANT] --workdir=DIR [--config.a.b=v ...]

Starts N processes of
  $PYTHON -m rlhf_jax.main ARGS --coordinator=localhost:PORT --num_processes=N --process_id=i
with JAX_PLATFORMS=cpu, from the current directory (the repository root, unless the
package is installed). Logs go to $LOG_DIR/process_<i>.log; process 0's also to the
terminal. Waits for all; when one fails, stops the others and exits with its status.
Environment: LOCAL_DEVICES=k (k CPU devices per process, appended to XLA_FLAGS),
PORT (default: a free port), LOG_DIR (default: a new temporary directory),
PYTHON (default python, else python3), DRY_RUN=1 (same as --dry-run: print the N
commands, run nothing).
EOF
}

# die_usage, quote, quote_cmd
# shellcheck disable=SC1091  # common.sh, beside this script
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

DRY_RUN=${DRY_RUN:-0}
[[ $DRY_RUN == 1 ]] || DRY_RUN=0
while (( $# )); do
  case $1 in
    -h|--help) usage; exit 0 ;;
    --dry-run|--dry_run) DRY_RUN=1; shift ;;
    *) break ;;
  esac
done
(( $# )) || die_usage "N (the number of processes) is missing"
N=$1
shift
if ! [[ $N =~ ^[0-9]+$ ]] || (( 10#$N == 0 )); then
  die_usage "N must be a positive integer, not '$N'"
fi
N=$(( 10#$N ))
for arg in "$@"; do
  case $arg in
    --coordinator*|--num_processes*|--process_id*|--distributed*)
      die_usage "$arg is set by this script" ;;
  esac
done

if [[ -n ${LOCAL_DEVICES:-} ]]; then
  if ! [[ $LOCAL_DEVICES =~ ^[0-9]+$ ]] || (( 10#$LOCAL_DEVICES == 0 )); then
    die_usage "LOCAL_DEVICES must be a positive integer, not '$LOCAL_DEVICES'"
  fi
fi
if [[ -z ${PYTHON:-} ]]; then
  if command -v python >/dev/null; then PYTHON=python; else PYTHON=python3; fi
fi
if [[ -z ${PORT:-} ]]; then
  PORT=$("$PYTHON" -c 'import socket; s = socket.socket(); s.bind(("localhost", 0)); print(s.getsockname()[1])')
fi

ENV=(JAX_PLATFORMS=cpu)
if [[ -n ${LOCAL_DEVICES:-} ]]; then
  ENV+=("XLA_FLAGS=${XLA_FLAGS:+$XLA_FLAGS }--xla_force_host_platform_device_count=$(( 10#$LOCAL_DEVICES ))")
fi

command_of() {  # the command of process $1, into CMD
  CMD=("${ENV[@]}" "$PYTHON" -m rlhf_jax.main "${@:2}" --coordinator="localhost:$PORT"
       --num_processes="$N" --process_id="$1")
}

if (( DRY_RUN )); then
  for (( i = 0; i < N; i++ )); do
    command_of "$i" "$@"
    echo "+ $(quote_cmd "${CMD[@]}")"
  done
  exit 0
fi

if [[ -z ${LOG_DIR:-} ]]; then LOG_DIR=$(mktemp -d "${TMPDIR:-/tmp}/rlhf_jax_local.XXXXXX"); fi
mkdir -p "$LOG_DIR"
echo "logs: $LOG_DIR/process_<i>.log (process 0 follows here)"

PIDS=()
TAIL_PID=''
stop_all() {  # signal $1 to every process still running
  local pid
  for pid in ${PIDS[@]+"${PIDS[@]}"}; do
    if [[ -n $pid ]]; then kill "-$1" "$pid" 2>/dev/null || true; fi
  done
}
# shellcheck disable=SC2317  # invoked by the traps below
on_signal() {
  trap - INT TERM HUP
  echo "local.sh: interrupted; stopping the processes" >&2
  stop_all TERM
  if [[ -n $TAIL_PID ]]; then kill "$TAIL_PID" 2>/dev/null || true; fi
  exit "$1"
}
trap 'on_signal 130' INT
trap 'on_signal 143' TERM
trap 'on_signal 129' HUP

for (( i = 0; i < N; i++ )); do
  command_of "$i" "$@"
  echo "+ $(quote_cmd "${CMD[@]}") > $(quote "$LOG_DIR/process_$i.log") 2>&1"
  env "${CMD[@]}" >"$LOG_DIR/process_$i.log" 2>&1 &
  PIDS[i]=$!
done
# GNU tail stops by itself once process 0 is gone and its log is read to the end.
GNU_TAIL=0
case $(tail --version 2>/dev/null || true) in *GNU*) GNU_TAIL=1 ;; esac
if (( GNU_TAIL )); then
  tail -n +1 -f --pid="${PIDS[0]}" "$LOG_DIR/process_0.log" &
else
  tail -n +1 -f "$LOG_DIR/process_0.log" &
fi
TAIL_PID=$!

# Poll rather than `wait -n` (bash >= 4.3): every finished process is reaped in turn.
status=0 failed='' remaining=$N stopped_at=''
while (( remaining > 0 )); do
  for (( i = 0; i < N; i++ )); do
    pid=${PIDS[i]}
    if [[ -z $pid ]] || kill -0 "$pid" 2>/dev/null; then continue; fi
    if wait "$pid"; then rc=0; else rc=$?; fi
    PIDS[i]=''
    remaining=$(( remaining - 1 ))
    if (( rc != 0 && status == 0 )); then
      status=$rc failed=$i
      echo "local.sh: process $i exited with status $rc (log: $LOG_DIR/process_$i.log);" \
           "stopping the others" >&2
      stop_all TERM
      stopped_at=$SECONDS
    fi
  done
  if [[ -n $stopped_at ]] && (( SECONDS - stopped_at > 10 )); then stop_all KILL; fi
  if (( remaining > 0 )); then sleep 0.2; fi
done

if (( GNU_TAIL )); then
  wait "$TAIL_PID" 2>/dev/null || true
else
  sleep 1
  kill "$TAIL_PID" 2>/dev/null || true
  wait "$TAIL_PID" 2>/dev/null || true
fi
if (( status != 0 )) && [[ $failed != 0 ]]; then
  echo "--- last lines of $LOG_DIR/process_$failed.log ---" >&2
  tail -n 20 "$LOG_DIR/process_$failed.log" >&2
fi
echo "local.sh: all $N processes done (status $status); logs in $LOG_DIR"
exit "$status"
