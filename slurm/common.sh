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
