# Shell helpers shared by launch/tpu_vm.sh, launch/local.sh and launch/slurm_gpu.sh
# (sourced, not run; slurm_gpu.sh finds this file through the submit directory).

# Needs the sourcing script's usage().
die_usage() {
  echo "error: $*" >&2
  usage >&2
  exit 2
}

# One argument quoted for a POSIX shell, only where it needs quoting; of a --flag=value
# (or NAME=value) only the value is quoted.
quote() {
  local s=$1 sq="'"
  if [[ $s =~ ^(--[[:alnum:]_.-]+=|[[:alpha:]_][[:alnum:]_]*=)(.*[^[:alnum:]_@%+=:,./-].*)$ ]]; then
    printf '%s' "${BASH_REMATCH[1]}"
    s=${BASH_REMATCH[2]}
  fi
  case $s in
    '') printf "''" ;;
    *[![:alnum:]_@%+=:,./-]*) s=${s//$sq/$sq\\$sq$sq}; printf "'%s'" "$s" ;;
    *) printf '%s' "$s" ;;
  esac
}

quote_cmd() {
  local out='' a
  for a in "$@"; do out="$out${out:+ }$(quote "$a")"; done
  printf '%s' "$out"
}
