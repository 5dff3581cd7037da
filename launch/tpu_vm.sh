#!/usr/bin/env bash
# One rlhf_jax job on a Cloud TPU VM slice: create the slice, ship the code to every
# worker, install, mount a Cloud Storage bucket with gcsfuse on every worker (--bucket),
# run the same command on all workers (jax.distributed reads the slice from the TPU
# metadata), then delete the slice, also when a step fails (trap).
# Every command is printed, one line, shell-quoted, prefixed '+ ', before it runs.
set -euo pipefail

usage() {
  cat <<'EOF'
usage: launch/tpu_vm.sh --name=NAME --zone=ZONE --accelerator=TYPE --config=FILE[:VARIANT] --workdir=DIR [options] [-- --config.a.b=v ...]

Creates the TPU VM slice NAME, copies (or clones) this repository to every worker,
installs requirements-tpu.txt into a Python venv there, with --bucket=BUCKET mounts
gs://BUCKET at /mnt/BUCKET on every worker (gcsfuse, installed if missing), runs
  python -m rlhf_jax.main --config=... --workdir=... --distributed=auto [overrides]
on all workers at once, streaming the output, and deletes the slice at the end.

required:
  --name=NAME            TPU VM (and queued resource) name
  --zone=ZONE            e.g. us-central2-b (v4), us-west4-a (v5e), us-east5-a (v5p)
  --accelerator=TYPE     v4-N, v5litepod-N (or v5e-N) or v5p-N, e.g. v4-32
  --config=FILE[:VAR]    e.g. configs/pretrain.py:tpu_v4_32
  --workdir=DIR          a POSIX path (not gs://: the run writes it with plain file
                         calls); on a multi-host slice (more than 8 cores or chips)
                         one that all workers see: /mnt/BUCKET/PATH with --bucket, or
                         a shared filesystem you mounted under /mnt/ yourself
options:
  --bucket=BUCKET        mount the Cloud Storage bucket BUCKET at /mnt/BUCKET on every
                         worker (gcsfuse --implicit-dirs), so that checkpoints, metrics
                         and config.json of --workdir=/mnt/BUCKET/PATH land in it
  --version=RUNTIME      TPU software version (default: tpu-ubuntu2204-base for v4,
                         v2-alpha-tpuv5 for v5p, v2-alpha-tpuv5-lite for v5e)
  --project=PROJECT      passed to every gcloud call (default: gcloud's configured one)
  --spot                 spot capacity (cheaper, can be preempted)
  --queued               request through a queued resource and wait until it is ACTIVE
  --code=copy|clone      copy: pack this working tree (without .git and runs/) and scp
                         it to all workers (default); clone: git clone --repo_url there
  --repo_url=URL         repository to clone (required with --code=clone)
  --ref=REF              git ref to check out after cloning
  --python=VERSION       Python of the venv on the workers, made by uv (default 3.11)
  --log=FILE             copy of the run's output (default runs/tpu_vm/NAME.log)
  --existing             use the existing TPU VM NAME: no create, no delete
  --keep                 do not delete the slice at the end (prints how to)
  --dry-run              print the commands, run nothing
  -h, --help             this message
Anything after -- is appended to the rlhf_jax.main command (e.g. --config.train.steps=10).
EOF
}

# die_usage, quote, quote_cmd
# shellcheck disable=SC1091  # common.sh, beside this script
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

# Prints the command; runs it unless --dry-run.
run() {
  echo "+ $(quote_cmd "$@")"
  if (( DRY_RUN )); then return 0; fi
  "$@"
}

NAME='' ZONE='' ACCEL='' CONFIG='' WORKDIR='' BUCKET='' VERSION='' PROJECT='' CODE=copy REPO_URL='' REF=''
PYTHON_VERSION=3.11 LOG='' SPOT=0 QUEUED=0 KEEP=0 EXISTING=0 DRY_RUN=0
EXTRA=()

set_opt() {
  local key=${1//_/-} val=$2
  case $key in
    --name) NAME=$val ;;
    --zone) ZONE=$val ;;
    --accelerator) ACCEL=$val ;;
    --config) CONFIG=$val ;;
    --workdir) WORKDIR=$val ;;
    --bucket) BUCKET=$val ;;
    --version) VERSION=$val ;;
    --project) PROJECT=$val ;;
    --code) CODE=$val ;;
    --repo-url) REPO_URL=$val ;;
    --ref) REF=$val ;;
    --python) PYTHON_VERSION=$val ;;
    --log) LOG=$val ;;
    *) die_usage "unknown option: $1" ;;
  esac
}

while (( $# )); do
  arg=$1
  shift
  case $arg in
    --) EXTRA=("$@"); break ;;
    -h|--help) usage; exit 0 ;;
    --dry-run|--dry_run) DRY_RUN=1 ;;
    --spot) SPOT=1 ;;
    --queued) QUEUED=1 ;;
    --keep) KEEP=1 ;;
    --existing) EXISTING=1 ;;
    --*=*) set_opt "${arg%%=*}" "${arg#*=}" ;;
    --name|--zone|--accelerator|--config|--workdir|--bucket|--version|--project|--code|--repo_url|--repo-url|--ref|--python|--log)
      (( $# )) || die_usage "$arg needs a value"
      set_opt "$arg" "$1"
      shift ;;
    *) die_usage "unknown argument: $arg" ;;
  esac
done

for required in name zone accelerator config workdir; do
  case $required in
    name) [[ -n $NAME ]] ;;
    zone) [[ -n $ZONE ]] ;;
    accelerator) [[ -n $ACCEL ]] ;;
    config) [[ -n $CONFIG ]] ;;
    workdir) [[ -n $WORKDIR ]] ;;
  esac || die_usage "--$required is required"
done

if [[ $ACCEL =~ ^(v4|v5p|v5litepod|v5e)-([0-9]+)$ ]]; then
  family=${BASH_REMATCH[1]}
else
  die_usage "unsupported --accelerator=$ACCEL: the family must be v4, v5litepod (v5e) or v5p, e.g. v4-32, v5litepod-16, v5p-8"
fi
if [[ $family == v5e ]]; then  # gcloud knows v5e slices as v5litepod-N
  family=v5litepod
  ACCEL=v5litepod-${BASH_REMATCH[2]}
fi
if [[ -z $VERSION ]]; then
  case $family in
    v4) VERSION=tpu-ubuntu2204-base ;;
    v5p) VERSION=v2-alpha-tpuv5 ;;
    v5litepod) VERSION=v2-alpha-tpuv5-lite ;;
  esac
fi
case $CODE in
  copy) ;;
  clone) [[ -n $REPO_URL ]] || die_usage "--code=clone needs --repo_url=URL" ;;
  *) die_usage "--code must be copy or clone, not '$CODE'" ;;
esac
[[ $NAME =~ ^[a-z]([-a-z0-9]*[a-z0-9])?$ ]] ||
  die_usage "--name=$NAME: use lower-case letters, digits and hyphens, starting with a letter"
[[ $PYTHON_VERSION =~ ^3\.[0-9]+$ ]] || die_usage "--python=$PYTHON_VERSION: give a version like 3.11"
if [[ -n $BUCKET ]]; then
  # The characters of Cloud Storage bucket names (which also keep the remote commands
  # below free of quoting; upper case too, for the placeholder MY_BUCKET of the docs'
  # dry runs); gcsfuse judges the rest.
  [[ $BUCKET =~ ^[[:alnum:]]([-[:alnum:]_.]*[[:alnum:]])?$ ]] ||
    die_usage "--bucket=$BUCKET: give a bucket name (letters, digits, -, _ and .), without gs:// or a path"
fi
# The run directory is written with open()/os calls (config.json, metrics.jsonl,
# TensorBoard), so it must be a path, not a URL.
if [[ $WORKDIR == gs://* ]]; then
  gs_path=${WORKDIR#gs://}
  gs_bucket=${gs_path%%/*}
  die_usage "--workdir=$WORKDIR: the run directory must be a POSIX path, since config.json," \
    "metrics.jsonl and the TensorBoard files are written with plain file calls; mount the" \
    "bucket on every worker with --bucket=NAME and use --workdir=/mnt/NAME/PATH" \
    "(here: --bucket=$gs_bucket --workdir=/mnt/$gs_path)"
fi
# Whether $WORKDIR lies inside the directory $1 (no '..' to climb out of it).
workdir_under() {
  [[ $WORKDIR == "$1"/?* && /$WORKDIR/ != */../* ]]
}
# v4-8, v5p-8 (cores) and v5litepod-8 (chips) are the largest one-host slices.
if (( 10#${ACCEL##*-} > 8 )); then
  if [[ -n $BUCKET ]]; then
    workdir_under "/mnt/$BUCKET" ||
      die_usage "--workdir=$WORKDIR: $ACCEL has several hosts, which must all see the run" \
        "directory; with --bucket=$BUCKET it must be under the mount, e.g." \
        "--workdir=/mnt/$BUCKET/runs/$NAME"
  else
    workdir_under /mnt ||
      die_usage "--workdir=$WORKDIR would be on each worker's own disk, but $ACCEL has several" \
        "hosts, which must all see the run directory: pass --bucket=NAME and" \
        "--workdir=/mnt/NAME/PATH (the bucket is mounted there with gcsfuse), or use a" \
        "shared filesystem that you mounted under /mnt/ on every worker yourself"
  fi
elif [[ -n $BUCKET ]] && ! workdir_under "/mnt/$BUCKET"; then
  echo "warning: --bucket=$BUCKET is mounted at /mnt/$BUCKET, but --workdir=$WORKDIR is not" \
       "under it" >&2
fi
if ! workdir_under /mnt && (( ! KEEP && ! EXISTING )); then
  echo "warning: --workdir=$WORKDIR is on the TPU VM's disk and is deleted with the slice" \
       "at the end; use --bucket=NAME --workdir=/mnt/NAME/PATH to keep the run (or --keep)" >&2
fi

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
LOG=${LOG:-$REPO/runs/tpu_vm/$NAME.log}
TARBALL=${TMPDIR:-/tmp}/rlhf_jax-$NAME.tar.gz
LOCATION=(--zone="$ZONE")
if [[ -n $PROJECT ]]; then LOCATION+=(--project="$PROJECT"); fi
SPOT_FLAG=()
if (( SPOT )); then SPOT_FLAG=(--spot); fi
SSH=(gcloud compute tpus tpu-vm ssh "$NAME" "${LOCATION[@]}" --worker=all)
if (( QUEUED )); then
  DELETE=(gcloud compute tpus queued-resources delete "$NAME" "${LOCATION[@]}" --force --quiet)
else
  DELETE=(gcloud compute tpus tpu-vm delete "$NAME" "${LOCATION[@]}" --quiet)
fi

CREATED=0 CREATING=0 RUN_PID=''
cleanup() {
  local rc=$?
  trap - EXIT INT TERM HUP
  if [[ -n $RUN_PID ]]; then kill "$RUN_PID" 2>/dev/null || true; fi
  if [[ $CODE == copy ]] && (( ! DRY_RUN )); then rm -f "$TARBALL"; fi
  if (( EXISTING )); then
    :
  elif (( KEEP )); then
    if (( CREATED || DRY_RUN )); then
      echo "kept $NAME; ssh into it with: $(quote_cmd "${SSH[@]}")" >&2
      echo "delete it with: $(quote_cmd "${DELETE[@]}")" >&2
    fi
  elif (( CREATED || DRY_RUN )); then
    run "${DELETE[@]}" || echo "warning: teardown failed; delete $NAME by hand: $(quote_cmd "${DELETE[@]}")" >&2
  elif (( rc != 0 && CREATING )); then
    echo "if $NAME was created nevertheless, delete it with: $(quote_cmd "${DELETE[@]}")" >&2
  fi
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM
trap 'exit 129' HUP

# 1. Pack the code first, so that a packing error costs no TPU time.
if [[ $CODE == copy ]]; then
  run tar -czf "$TARBALL" --exclude=./.git --exclude=./runs --exclude=./workdir --exclude=./.venv \
    --exclude='*.egg-info' --exclude=__pycache__ --exclude=.pytest_cache --exclude=.ruff_cache \
    --exclude=.benchmarks -C "$REPO" .
fi

# 2. Create the slice.
if (( ! EXISTING )); then
  CREATING=1
  if (( QUEUED )); then
    run gcloud compute tpus queued-resources create "$NAME" "${LOCATION[@]}" --node-id="$NAME" \
      --accelerator-type="$ACCEL" --runtime-version="$VERSION" ${SPOT_FLAG[@]+"${SPOT_FLAG[@]}"}
    CREATED=1
    DESCRIBE=(gcloud compute tpus queued-resources describe "$NAME" "${LOCATION[@]}" --format='value(state.state)')
    echo "+ $(quote_cmd "${DESCRIBE[@]}")   # every ${POLL_SECONDS:-30} s until ACTIVE"
    if (( ! DRY_RUN )); then
      last='' errors=0
      while :; do
        if state=$("${DESCRIBE[@]}"); then
          errors=0
        else  # a passing network error is no reason to give the slice up
          errors=$(( errors + 1 ))
          (( errors < 5 )) || { echo "error: describe failed $errors times in a row" >&2; exit 1; }
          state=$last
        fi
        if [[ $state != "$last" ]]; then echo "queued resource $NAME: $state"; last=$state; fi
        case $state in
          ACTIVE) break ;;
          FAILED|SUSPENDED|SUSPENDING|DELETING)
            echo "error: queued resource $NAME is $state" >&2
            exit 1 ;;
        esac
        sleep "${POLL_SECONDS:-30}"
      done
    fi
  else
    run gcloud compute tpus tpu-vm create "$NAME" "${LOCATION[@]}" --accelerator-type="$ACCEL" \
      --version="$VERSION" ${SPOT_FLAG[@]+"${SPOT_FLAG[@]}"}
    CREATED=1
  fi
fi

# 3. The code on every worker, in ~/rlhf_jax.
if [[ $CODE == copy ]]; then
  run gcloud compute tpus tpu-vm scp "$TARBALL" "$NAME:rlhf_jax.tar.gz" "${LOCATION[@]}" --worker=all
  run "${SSH[@]}" --command="rm -rf rlhf_jax && mkdir -p rlhf_jax && tar -xzf rlhf_jax.tar.gz -C rlhf_jax && rm rlhf_jax.tar.gz"
else
  fetch="rm -rf rlhf_jax && git clone $(quote "$REPO_URL") rlhf_jax"
  if [[ -n $REF ]]; then fetch+=" && git -C rlhf_jax checkout $(quote "$REF")"; fi
  run "${SSH[@]}" --command="$fetch"
fi

# 4. Install. The TPU images ship Python 3.10, older than the pinned wheels need, so the
# requirements go into a venv made by uv with its own Python.
run "${SSH[@]}" --command="cd rlhf_jax && python3 -m pip install --user --quiet uv && python3 -m uv venv --seed --python=$PYTHON_VERSION .venv && .venv/bin/pip install -r requirements-tpu.txt -e ."

# 5. The bucket on every worker at /mnt/$BUCKET: gcsfuse from Google's apt repository if
# missing (the documented steps for Ubuntu), then the mount unless it is there already
# (--existing). The mount belongs to the ssh user, who runs the job. orbax commits a
# checkpoint by renaming its temporary directory, which gcsfuse refuses on a bucket without
# hierarchical namespace unless --rename-dir-limit allows it (then non-atomically: an
# object-by-object copy).
if [[ -n $BUCKET ]]; then
  mnt=/mnt/$BUCKET
  # shellcheck disable=SC2016  # expanded on the workers, not here
  gcsfuse_install='export GCSFUSE_REPO=gcsfuse-$(lsb_release -c -s)'
  # shellcheck disable=SC2016
  gcsfuse_install+=' && echo "deb [signed-by=/usr/share/keyrings/cloud.google.asc] https://packages.cloud.google.com/apt $GCSFUSE_REPO main" | sudo tee /etc/apt/sources.list.d/gcsfuse.list'
  gcsfuse_install+=' && curl -fsSL https://packages.cloud.google.com/apt/doc/apt-key.gpg | sudo tee /usr/share/keyrings/cloud.google.asc >/dev/null'
  gcsfuse_install+=' && sudo apt-get update -q && sudo apt-get install -y -o DPkg::Lock::Timeout=600 gcsfuse'
  run "${SSH[@]}" --command="if ! command -v gcsfuse >/dev/null; then $gcsfuse_install; fi && { mountpoint -q $mnt || { sudo mkdir -p $mnt && sudo chown \"\$(id -u):\$(id -g)\" $mnt && gcsfuse --implicit-dirs --rename-dir-limit=100000 $BUCKET $mnt; }; }"
fi

# 6. The same command on every worker; its output streams here and into $LOG.
main=(.venv/bin/python -m rlhf_jax.main --config="$CONFIG" --workdir="$WORKDIR" --distributed=auto
      ${EXTRA[@]+"${EXTRA[@]}"})
RUN=("${SSH[@]}" --command="cd rlhf_jax && $(quote_cmd "${main[@]}")")
if (( DRY_RUN )); then
  run "${RUN[@]}"
else
  mkdir -p "$(dirname "$LOG")"
  echo "log: $LOG"
  echo "+ $(quote_cmd "${RUN[@]}")"
  # In the background, because `wait` (unlike a foreground command) returns as soon as a
  # signal arrives, so that a SIGTERM or SIGHUP tears the slice down at once.
  "${RUN[@]}" 2>&1 | tee -a "$LOG" &
  tee_pid=$!
  RUN_PID=$(jobs -p | tail -n 1)  # the pipeline's first process: gcloud
  wait "$tee_pid"  # the pipeline's status (pipefail)
  RUN_PID=''
fi
# 7. Teardown happens in cleanup (trap on EXIT), unless --keep or --existing.
