# Shared machinery for slurm/*.sbatch (sourced, not run): rendezvous, CPU binding, loader
# workers, optional staging of the feature cache to node-local NVMe, one srun task per GPU
# (or CPU ranks on gloo when GPUS_PER_NODE=0), preemption signal forwarding and requeue.
#
#   source "${VLM_REPO:-$SLURM_SUBMIT_DIR}/slurm/common.sh"
#   vlm_setup                          # resolve the knobs below, cd to the repo, print them
#   vlm_train "$@"                     # the trainer with CONFIG/DS_CONFIG/paths, through vlm_srun
#   vlm_srun CMD ARGS...               # any command, one task per GPU; returns its exit code
#
# Knobs (environment variables; every one optional):
#   VLM_REPO          repository root                        (default: the sbatch submit dir)
#   PYTHON            python of the environment that has vlm_dist installed (default: python)
#   GPUS_PER_NODE     GPUs per node; 0 runs CPU ranks on gloo (default: SLURM_GPUS_ON_NODE /
#                     SLURM_GPUS_PER_NODE, else 0)
#   TASKS_PER_NODE    ranks per node (default: SLURM_NTASKS_PER_NODE, else GPUS_PER_NODE, else 1)
#   CPUS_PER_TASK     cores per rank (default: SLURM_CPUS_PER_TASK, else 1)
#   CPU_BIND          srun --cpu-bind value (default: cores with GPUs, none without)
#   LOADER_WORKERS    data loader worker processes per rank, passed as --data.num_workers
#                     (default with GPUs: CPUS_PER_TASK-2, at most 8; without: the config's value)
#   VERIFY_CACHE      1: before training, a full `vlm-cache verify` (SHA-256) of CACHE_DIR, once
#                     per job (not on requeues); 0 skips it (default: 1). Between full checks
#                     training trusts each file's size and mtime.
#   STAGE_DIR         node-local NVMe directory; when set, vlm_stage_cache copies the feature
#                     cache there on every node before training (e.g. /raid/$USER/vlm_cache)
#   NCCL_ENV          file with the NCCL/InfiniBand settings (default: slurm/env.sh; "" = none)
#   SRUN_ARGS         extra srun flags, e.g. "--exclusive"
#   MASTER_PORT       rendezvous port (default: 20000 + job id % 20000)

REQUEUE_EXIT_CODE=75   # = vlm_dist.dist.REQUEUE_EXIT_CODE: stopped on a signal after a checkpoint

vlm_log() { echo "[$(date -u +%H:%M:%S)] slurm: $*"; }

vlm_setup() {
    VLM_REPO=${VLM_REPO:-${SLURM_SUBMIT_DIR:-$PWD}}
    cd "$VLM_REPO" || { echo "slurm: VLM_REPO=$VLM_REPO does not exist" >&2; exit 2; }
    PYTHON=${PYTHON:-python}
    GPUS_PER_NODE=${GPUS_PER_NODE:-${SLURM_GPUS_ON_NODE:-${SLURM_GPUS_PER_NODE:-0}}}
    GPUS_PER_NODE=${GPUS_PER_NODE##*:}          # "gpu:8" or "h100:8" -> 8
    TASKS_PER_NODE=${TASKS_PER_NODE:-${SLURM_NTASKS_PER_NODE:-$((GPUS_PER_NODE > 0 ? GPUS_PER_NODE : 1))}}
    CPUS_PER_TASK=${CPUS_PER_TASK:-${SLURM_CPUS_PER_TASK:-1}}
    NNODES=${SLURM_JOB_NUM_NODES:-1}
    if (( GPUS_PER_NODE > 0 )); then
        CPU_BIND=${CPU_BIND:-cores}
        LOADER_WORKERS=${LOADER_WORKERS:-$(( CPUS_PER_TASK > 10 ? 8 : (CPUS_PER_TASK > 3 ? CPUS_PER_TASK - 2 : 1) ))}
        NCCL_ENV=${NCCL_ENV-slurm/env.sh}
        [[ -n "$NCCL_ENV" ]] && source "$NCCL_ENV"
    else
        CPU_BIND=${CPU_BIND:-none}
        export DS_ACCELERATOR=cpu               # DeepSpeed's CPU accelerator; vlm_dist.dist picks gloo
        export CUDA_VISIBLE_DEVICES=""
    fi
    # the main process of a rank needs few threads; the loader workers get the rest
    local workers=${LOADER_WORKERS:-0}
    export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(( CPUS_PER_TASK > workers ? CPUS_PER_TASK - workers : 1 ))}
    # rendezvous on the allocation's first node; vlm_dist.dist.discover() derives the same values
    export MASTER_ADDR=${MASTER_ADDR:-$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)}
    export MASTER_PORT=${MASTER_PORT:-$((20000 + SLURM_JOB_ID % 20000))}
    export PYTHONUNBUFFERED=1
    vlm_log "job $SLURM_JOB_ID (restart ${SLURM_RESTART_COUNT:-0}) on $NNODES node(s) [$SLURM_JOB_NODELIST]:" \
            "$TASKS_PER_NODE ranks/node, $GPUS_PER_NODE GPUs/node, $CPUS_PER_TASK CPUs/rank," \
            "loader workers ${LOADER_WORKERS:-config}, OMP threads $OMP_NUM_THREADS," \
            "rendezvous $MASTER_ADDR:$MASTER_PORT, repo $VLM_REPO"
}

# Full SHA-256 check of $CACHE_DIR on the batch node: training's own check trusts size and
# mtime, so a byte altered with its mtime restored is caught here. Skipped with
# VERIFY_CACHE=0, and on a requeue (the first start checked this cache).
vlm_verify_cache() {
    if [[ "${VERIFY_CACHE:-1}" == 0 ]]; then
        vlm_log "VERIFY_CACHE=0: not verifying $CACHE_DIR (training checks size and mtime only)"
        return 0
    fi
    if (( ${SLURM_RESTART_COUNT:-0} > 0 )); then
        vlm_log "requeued: $CACHE_DIR was verified at the job's first start"
        return 0
    fi
    vlm_log "verifying $CACHE_DIR (full SHA-256; VERIFY_CACHE=0 skips this)"
    $PYTHON -m preprocess.cache_cli verify "$CACHE_DIR" \
        || { echo "slurm: feature cache $CACHE_DIR fails verification (see above)" >&2; return 1; }
}

# With STAGE_DIR set: copy the feature cache $CACHE_DIR to $STAGE_DIR on every node (once
# per node, in parallel; rsync makes a requeued job's second copy cheap) and point
# CACHE_DIR at the copy. Without STAGE_DIR: nothing.
vlm_stage_cache() {
    [[ -z "${STAGE_DIR:-}" ]] && return 0
    local dst="$STAGE_DIR/$(basename "$CACHE_DIR")"
    vlm_log "staging $CACHE_DIR -> $dst on $NNODES node(s)"
    srun --nodes="$NNODES" --ntasks-per-node=1 --ntasks="$NNODES" --kill-on-bad-exit=1 \
        bash -c "mkdir -p '$dst' && if command -v rsync >/dev/null; then rsync -a --delete '$CACHE_DIR/' '$dst/'; \
                 else rm -rf '$dst' && cp -a '$CACHE_DIR' '$dst'; fi" \
        || { echo "slurm: staging $CACHE_DIR to $dst failed" >&2; return 1; }
    CACHE_DIR=$dst
}

# Forward the preemption signal to the ranks: `#SBATCH --signal=B:USR1@T` signals only
# this batch shell, and bash runs a trap only between commands, so srun runs in the
# background and we wait for it.
_vlm_forward() {
    vlm_log "got $1: forwarding to the ranks (they save a checkpoint and exit $REQUEUE_EXIT_CODE)"
    [[ -n "${_VLM_SRUN_PID:-}" ]] && kill -s "$1" "$_VLM_SRUN_PID" 2>/dev/null
}

# srun one task per GPU (or CPU rank) running "$@"; a rank that fails kills the others
# (--kill-on-bad-exit). Exit code REQUEUE_EXIT_CODE requeues the job, which then resumes.
vlm_srun() {
    trap '_vlm_forward USR1' USR1
    trap '_vlm_forward TERM' TERM
    vlm_log "srun: $*"
    # shellcheck disable=SC2086
    srun --nodes="$NNODES" --ntasks-per-node="$TASKS_PER_NODE" --ntasks=$((NNODES * TASKS_PER_NODE)) \
         --cpus-per-task="$CPUS_PER_TASK" --cpu-bind="$CPU_BIND" --kill-on-bad-exit=1 --label \
         ${SRUN_ARGS:-} "$@" &
    _VLM_SRUN_PID=$!
    local rc
    while true; do
        wait "$_VLM_SRUN_PID"; rc=$?
        # wait returns >128 when a trapped signal interrupted it; srun is still running then
        kill -0 "$_VLM_SRUN_PID" 2>/dev/null || break
    done
    trap - USR1 TERM
    if (( rc == REQUEUE_EXIT_CODE )); then
        vlm_log "ranks stopped for preemption (exit $rc): requeueing job $SLURM_JOB_ID"
        scontrol requeue "$SLURM_JOB_ID" || { echo "slurm: scontrol requeue $SLURM_JOB_ID failed" >&2; return $rc; }
    elif (( rc != 0 )); then
        vlm_log "srun failed with exit code $rc (the lines above prefixed 'N:' are rank N's)"
    fi
    return $rc
}

# Run the trainer with the stage's CONFIG / DS_CONFIG, the path knobs as config overrides,
# --resume $RESUME, then "$@" (the sbatch script's extra arguments, e.g. --train.max_steps=100).
vlm_train() {
    local args=(--deepspeed "$DS_CONFIG" --config "$CONFIG")
    [[ -n "${RUN_DIR:-}" ]] && args+=("--train.output_dir=$RUN_DIR")
    [[ -n "${RECORDS:-}" ]] && args+=("--data.records=$RECORDS")
    if [[ -n "${CACHE_DIR:-}" ]]; then
        vlm_verify_cache || return 1
        vlm_stage_cache || return 1
        args+=("--data.cache=$CACHE_DIR")
    fi
    [[ -n "${LOADER_WORKERS:-}" ]] && args+=("--data.num_workers=$LOADER_WORKERS")
    [[ -n "${RESUME-auto}" ]] && args+=(--resume "${RESUME-auto}")
    # shellcheck disable=SC2086
    vlm_srun ${TRAIN_CMD:-$PYTHON launch/train.py} "${args[@]}" "$@"
}
