#!/bin/sh
# Worker container entrypoint: give this replica its own slice of the box's GPUs, then
# run the command (`trainctl worker` by default).
#
# Every replica reserves all GPUs (compose `count: all`): Docker turns `count: N` into
# GPUs 0..N-1 in *every* container, so it cannot spread `--scale worker=N` replicas over
# a box by itself. Here each replica claims a free slot with a lock file on the shared
# checkpoints volume and sets CUDA_VISIBLE_DEVICES to that slot's GPUs; the lock is held
# by the worker process itself (fd 9 survives exec), so it frees when the worker dies.
#
#   TRAINCTL_GPUS_PER_WORKER  all (default: one worker owns every GPU) or a number k:
#                             slot s gets GPUs s*k .. s*k+k-1; replicas beyond the last
#                             slot wait as standbys until a slot frees
#   TRAINCTL_GPU_COUNT        GPUs on the box (default: counted with nvidia-smi / torch)
#   TRAINCTL_GPU_SLOT_DIR     lock directory (default: $TRAINCTL_WORKDIR/.gpu-slots)
#   TRAINCTL_GPU_SLOT_RETRY   seconds between claim attempts for a standby (default 10)
set -eu

per="${TRAINCTL_GPUS_PER_WORKER:-all}"
if [ "$per" = "all" ] || [ -z "$per" ]; then
  exec "$@"
fi
case "$per" in
  *[!0-9]*|0) echo "trainctl-worker-entrypoint: TRAINCTL_GPUS_PER_WORKER must be 'all' or a positive integer, got '$per'" >&2
     exit 2 ;;
esac
if [ -n "${CUDA_VISIBLE_DEVICES:-}" ]; then
  echo "trainctl-worker-entrypoint: CUDA_VISIBLE_DEVICES=$CUDA_VISIBLE_DEVICES already set; not slicing" >&2
  exec "$@"
fi

count="${TRAINCTL_GPU_COUNT:-}"
if [ -z "$count" ]; then
  count="$(nvidia-smi -L 2>/dev/null | grep -c '^GPU ' || true)"
fi
if [ -z "$count" ] || [ "$count" = "0" ]; then
  count="$(python -c 'import torch; print(torch.cuda.device_count())' 2>/dev/null || echo 0)"
fi
slots=$((count / per))
if [ "$slots" -lt 1 ]; then
  echo "trainctl-worker-entrypoint: $count GPU(s) visible, fewer than TRAINCTL_GPUS_PER_WORKER=$per" >&2
  exit 3
fi

dir="${TRAINCTL_GPU_SLOT_DIR:-${TRAINCTL_WORKDIR:-/var/lib/trainctl/runs}/.gpu-slots}"
mkdir -p "$dir"
waiting=""
while :; do
  s=0
  while [ "$s" -lt "$slots" ]; do
    exec 9>"$dir/slot-$s.lock"
    if flock -n 9; then
      first=$((s * per))
      devs="$first"
      i=1
      while [ "$i" -lt "$per" ]; do
        devs="$devs,$((first + i))"
        i=$((i + 1))
      done
      export CUDA_VISIBLE_DEVICES="$devs"
      echo "trainctl-worker-entrypoint: GPU slot $s of $slots, CUDA_VISIBLE_DEVICES=$devs" >&2
      exec "$@"
    fi
    exec 9>&-
    s=$((s + 1))
  done
  if [ -z "$waiting" ]; then
    echo "trainctl-worker-entrypoint: all $slots GPU slot(s) of $per GPU(s) are taken; standing by" >&2
    waiting=1
  fi
  sleep "${TRAINCTL_GPU_SLOT_RETRY:-10}"
done
