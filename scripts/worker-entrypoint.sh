#!/bin/sh
# Entrypoint of the compose `worker` service (installed in the image as /usr/local/bin/allconv-worker):
# take one GPU of this host for this container, then exec `allconv "$@"`.
#
# Docker gives every replica of `docker compose up --scale worker=N` the same GPUs, so replicas on one host
# would all train on cuda:0. Each replica therefore takes an exclusive flock on <lock dir>/gpu-<i>.lock (a volume
# shared by the replicas of one host) for the first free GPU i and keeps it for its lifetime (the lock fd stays
# open across exec; the kernel drops it when the container stops). More replicas than GPUs: the extra ones share
# GPUs round-robin. CUDA_VISIBLE_DEVICES set by the user wins.
#
# ALLCONV_GPU_LOCK_DIR  lock folder  [/var/lib/allconv/gpu-locks]
# ALLCONV_GPU_COUNT     GPUs to share [counted with torch]
set -eu
lock_dir="${ALLCONV_GPU_LOCK_DIR:-/var/lib/allconv/gpu-locks}"
if [ -z "${CUDA_VISIBLE_DEVICES:-}" ]; then
    count="${ALLCONV_GPU_COUNT:-$(python -c 'import torch; print(torch.cuda.device_count())' 2>/dev/null || echo 0)}"
    if [ "$count" -gt 1 ] && mkdir -p "$lock_dir" 2>/dev/null && command -v flock >/dev/null; then
        i=0
        while [ "$i" -lt "$count" ]; do
            exec 9>>"$lock_dir/gpu-$i.lock"
            if flock -n 9; then
                CUDA_VISIBLE_DEVICES=$i
                break
            fi
            exec 9>&-
            i=$((i + 1))
        done
        if [ -z "${CUDA_VISIBLE_DEVICES:-}" ]; then  # every GPU is taken: share one
            CUDA_VISIBLE_DEVICES=$(( $(od -An -N2 -tu2 /dev/urandom | tr -d ' ') % count ))
        fi
        export CUDA_VISIBLE_DEVICES
        echo "allconv-worker: $(hostname) uses GPU $CUDA_VISIBLE_DEVICES of $count" >&2
    fi
fi
exec allconv "$@"
