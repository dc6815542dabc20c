# Shared by the sbatch scripts in this folder, which source it.

# job_folder NAME: runs/slurm/$SLURM_JOB_ID with a link to Slurm's own output; sets JOB_DIR and PYTHON.
job_folder() {
    PYTHON=${BGTRAIN_PYTHON:-python}
    JOB_DIR=runs/slurm/$SLURM_JOB_ID
    mkdir -p "$JOB_DIR"
    local stdout
    stdout=$(scontrol show job "$SLURM_JOB_ID" 2>/dev/null | sed -n 's/^ *StdOut=//p')
    [ -n "$stdout" ] && ln -sfn "$stdout" "$JOB_DIR/batch.log"
    return 0
}

# detect_devices: GPU count on this (the first) node; nodes of one job are assumed alike, preflight checks
# each. Sets NGPU, DEVICE (gpu|cpu) and NPROC (processes per node), and says which in the log.
detect_devices() {
    NGPU=0
    if command -v nvidia-smi >/dev/null 2>&1; then
        NGPU=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU ' || true)
        if [ -n "${CUDA_VISIBLE_DEVICES:-}" ] && [ "$NGPU" -gt 0 ]; then
            NGPU=$(echo "$CUDA_VISIBLE_DEVICES" | tr ',' '\n' | grep -c .)
        fi
    fi
    if [ "$NGPU" -gt 0 ]; then
        DEVICE=gpu
        NPROC=${NPROC:-${GPUS_PER_NODE:-8}}
        log "$NGPU GPU(s) visible on $(hostname); $NPROC process(es) per node on NCCL"
    else
        DEVICE=cpu
        NPROC=${NPROC:-2}
        log "no GPU found on $(hostname) (nvidia-smi missing or lists no GPU): falling back to $NPROC CPU" \
            "process(es) per node on gloo"
    fi
}

# gpu_request: what the job asked Slurm for (--gpus-per-node, --gres=gpu:N, --gpus), or "none". After
# detect_devices, a job that asked for GPUs but sees none says so loudly (a site whose gres hides them).
gpu_request() {
    local req=${SLURM_GPUS_PER_NODE:-${SLURM_GPUS_ON_NODE:-${SLURM_GPUS:-}}}
    GPU_REQUEST=${req:-none}
    if [ "$GPU_REQUEST" != none ] && [ "$DEVICE" = cpu ]; then
        log "WARNING: the job asked Slurm for GPUs ($GPU_REQUEST per node) but none is visible on $(hostname);" \
            "a config with device: cuda stops at start-up, device: auto would train on CPU"
    fi
}

# prebuild_ops: build the BoostLU extension once per node before torchrun, so no rank compiles at its first step.
# Into $BGTRAIN_OPS_CACHE (default ~/.cache/bgtrain/ops; a shared folder builds once per GPU type, keyed by torch,
# sources and archs), exported so the ranks load that build; TORCH_CUDA_ARCH_LIST (default: this node's GPUs' compute
# capabilities) is exported with it. BGTRAIN_PREBUILD: auto (default) = GPU jobs only;
# 1 = also on CPU jobs (the C++ CPU extensions, --cpu-only); 0 = never. A failed build does not stop the job here:
# the ranks then fall back to the torch reference with a warning, or stop with the cause under ops.boostlu=cuda.
prebuild_ops() {
    local mode=${BGTRAIN_PREBUILD:-auto} rc
    local -a args=()
    if [ "$mode" = 0 ]; then log "BoostLU extension prebuild skipped (BGTRAIN_PREBUILD=0)"; return 0; fi
    if [ "$DEVICE" != gpu ]; then
        if [ "$mode" != 1 ]; then
            log "CPU job: no BoostLU extension to prebuild (CPU tensors use the torch reference)"
            return 0
        fi
        args+=(--cpu-only)
    fi
    export BGTRAIN_OPS_CACHE=${BGTRAIN_OPS_CACHE:-$HOME/.cache/bgtrain/ops}
    if [ "$DEVICE" = gpu ] && [ -z "${TORCH_CUDA_ARCH_LIST:-}" ]; then
        # The build and the ranks must pick the same archs (the cache folder is keyed by them), even if the build
        # step were to see no GPU: take them from this node's GPUs and export them to both.
        local caps
        caps=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null | tr -d ' ' | sort -u | paste -sd';')
        [ -n "$caps" ] && export TORCH_CUDA_ARCH_LIST=$caps
    fi
    log "prebuilding the BoostLU extension on each of ${SLURM_NNODES:-1} node(s) into $BGTRAIN_OPS_CACHE" \
        "(archs ${TORCH_CUDA_ARCH_LIST:-of the visible GPUs}) ${args[*]}"
    srun --ntasks-per-node=1 --output="$JOB_DIR/prebuild-node%n.log" \
        "$PYTHON" -m bgtrain.ops build --cache "$BGTRAIN_OPS_CACHE" "${args[@]}"
    rc=$?
    cat "$JOB_DIR"/prebuild-node*.log 2>/dev/null
    if [ $rc -ne 0 ]; then
        log "BoostLU extension prebuild failed (exit code $rc, cause above): the ranks fall back to the torch" \
            "reference with a warning, or stop if ops.boostlu=cuda"
    else
        log "BoostLU extension ready on every node"
    fi
    return 0
}
