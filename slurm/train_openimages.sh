#!/bin/bash
# slurm/train_openimages.sh - BoostLU training on N Slurm nodes: one task per node, each runs torchrun.
#
# Submit from the repository root, with the venv active (its PATH is exported to the job):
#   sbatch --nodes=4 --gpus-per-node=8 slurm/train_openimages.sh        # or --gres=gpu:8, your site's form
#   BGTRAIN_OVERRIDES="loss.scheme=LL-Cp optim.lr=2e-5" sbatch --nodes=8 --gpus-per-node=8 slurm/train_openimages.sh
#   BGTRAIN_OVERRIDES="device=cuda ops.boostlu=cuda" sbatch --nodes=2 --gpus-per-node=8 slurm/train_openimages.sh
#   BGTRAIN_CONFIG=configs/smoke.yaml sbatch --wait --nodes=2 slurm/train_openimages.sh   # CPU, local cluster
#
# Environment (all optional):
#   BGTRAIN_CONFIG        YAML config                      [configs/openimages_llr_boostlu.yaml]
#   BGTRAIN_OVERRIDES     space-separated key=value overrides of the config
#                         out_dir=runs/slurm/$SLURM_JOB_ID is added unless out_dir is set here;
#                         checkpoint.resume=latest is added unless checkpoint.resume is set here
#   GPUS_PER_NODE         GPUs (= processes) per node when GPUs are present      [8]
#   NPROC                 processes per node; overrides GPUS_PER_NODE / the CPU default of 2
#   BGTRAIN_MAX_RESTARTS  torchrun --max-restarts: worker failures survived in place   [3]
#   BGTRAIN_RDZV_PORT     rendezvous port on the first node    [20000 + job id % 20000]
#   BGTRAIN_REQUEUE       1 = requeue the job after the pre-time-limit SIGUSR1 checkpoint   [1]
#   BGTRAIN_PREFLIGHT     0 = skip `python -m cluster.preflight`   [1]
#   BGTRAIN_PREFLIGHT_ARGS extra preflight flags, e.g. "--min-free-gb 200 --require-gpu" ("--full" walks
#                         every tar header on every node: O(samples); the default is O(shards) per node)
#   BGTRAIN_PREBUILD      BoostLU extension build before torchrun, once per node: auto = on GPU jobs,
#                         1 = also on CPU jobs (--cpu-only), 0 = never   [auto]
#   BGTRAIN_OPS_CACHE     extension build cache, exported to the ranks   [~/.cache/bgtrain/ops]
#   BGTRAIN_PYTHON        python to run                        [python]
#
# Logs: runs/slurm/$SLURM_JOB_ID/ holds batch.log (link to Slurm's --output), node<N>.log per node
# (appended across requeues), prebuild-node<N>.log and job.env (what was run). GPUs: this script does
# not request them (a cluster without GPU gres config rejects --gres), so pass --gpus-per-node=8 or
# --gres=gpu:8 (or your site's form) to sbatch; `python -m bgtrain.reproduce --slurm --gpus-per-node 8`
# does. Without nvidia-smi or without a visible GPU the job runs CPU processes on gloo, unless the
# config has device: cuda: then preflight (and every rank) stops it in one line instead.
# On GPU jobs `python -m bgtrain.ops build` runs once per node before torchrun (BGTRAIN_PREBUILD), so
# no rank compiles the BoostLU extension at its first step.
#
#SBATCH --job-name=bgtrain-openimages
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --time=24:00:00
#SBATCH --requeue
#SBATCH --signal=B:USR1@300
#SBATCH --open-mode=append
#SBATCH --output=%x-%j.out

set -uo pipefail
cd "${SLURM_SUBMIT_DIR:-$PWD}" || exit 1
log() { echo "[train_openimages $(date '+%F %T')] $*"; }

if [ -z "${SLURM_JOB_ID:-}" ]; then
    echo "slurm/train_openimages.sh: run it with sbatch (see the header of this file)" >&2
    exit 2
fi

BGTRAIN_CONFIG=${BGTRAIN_CONFIG:-configs/openimages_llr_boostlu.yaml}
# sbatch runs a spooled copy of this file: find the original (and common.sh beside it) from the job record.
SCRIPT=$(scontrol show job "$SLURM_JOB_ID" 2>/dev/null | sed -n 's/^ *Command=\([^ ]*\).*/\1/p')
source "$(dirname "${SCRIPT:-slurm/x}")/common.sh" || { log "cannot find slurm/common.sh next to $SCRIPT"; exit 2; }
job_folder
detect_devices
gpu_request

# Overrides: word-split on purpose (key=value items); the job folder is the run folder unless set.
read -r -a OVERRIDES <<< "${BGTRAIN_OVERRIDES:-}"
override_value() {  # value of key $1 in OVERRIDES, or nothing
    local o
    for o in "${OVERRIDES[@]}"; do [[ $o == "$1="* ]] && echo "${o#*=}"; done
}
[ -z "$(override_value out_dir)" ] && OVERRIDES+=("out_dir=$JOB_DIR")
[ -z "$(override_value checkpoint.resume)" ] && OVERRIDES+=("checkpoint.resume=latest")
OUT_DIR=$(override_value out_dir | tail -n1)

HEAD=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1)
PORT=${BGTRAIN_RDZV_PORT:-$((20000 + SLURM_JOB_ID % 20000))}
NNODES=${SLURM_NNODES:-1}
MAX_RESTARTS=${BGTRAIN_MAX_RESTARTS:-3}
log "job $SLURM_JOB_ID restart ${SLURM_RESTART_COUNT:-0}: $NNODES node(s) [$SLURM_JOB_NODELIST] x $NPROC" \
    "process(es), rendezvous $HEAD:$PORT, config $BGTRAIN_CONFIG, overrides: ${OVERRIDES[*]}"
{
    echo "BGTRAIN_CONFIG=$BGTRAIN_CONFIG"
    echo "BGTRAIN_OVERRIDES=${OVERRIDES[*]}"
    echo "NODES=$SLURM_JOB_NODELIST NNODES=$NNODES NPROC=$NPROC DEVICE=$DEVICE GPUS_REQUESTED=$GPU_REQUEST" \
         "HEAD=$HEAD PORT=$PORT"
    echo "RESTART_COUNT=${SLURM_RESTART_COUNT:-0} GIT=$(git rev-parse --short HEAD 2>/dev/null || echo none)"
} >> "$JOB_DIR/job.env"

SIGNAL=""
on_signal() {
    SIGNAL=$1
    log "SIG$1 received: forwarding to the training step (checkpoint, then exit)"
    [ -n "${SRUN_PID:-}" ] && kill "-$1" "$SRUN_PID" 2>/dev/null
}
trap 'on_signal USR1' USR1
trap 'on_signal TERM' TERM

if [ "${BGTRAIN_PREFLIGHT:-1}" = 1 ]; then
    log "preflight on $NNODES node(s)"
    # shellcheck disable=SC2086  # BGTRAIN_PREFLIGHT_ARGS is a list of flags
    MASTER_ADDR=$HEAD MASTER_PORT=$((PORT + 1)) srun --kill-on-bad-exit=1 --ntasks-per-node=1 \
        "$PYTHON" -m cluster.preflight --config "$BGTRAIN_CONFIG" --checkpoint-dir "$OUT_DIR" \
        --procs-per-node "$NPROC" ${BGTRAIN_PREFLIGHT_ARGS:-} "${OVERRIDES[@]}"
    rc=$?
    if [ $rc -ne 0 ]; then log "preflight failed (exit code $rc); not training"; exit $rc; fi
fi
[ -z "$SIGNAL" ] && prebuild_ops

# One task per node. torchrun ignores SIGUSR1 (its default action would kill it and orphan the
# workers); the node task forwards USR1/TERM to torchrun's children, the training processes, which
# checkpoint and exit 0, so torchrun exits 0 too.
node_main() {
    local is_host=0 tr rc
    [ "${SLURM_NODEID:-0}" = 0 ] && is_host=1  # node 0 is $HEAD; say so, since all fake nodes share one IP
    echo "[node $SLURM_NODEID $SLURMD_NODENAME $(date '+%F %T')] torchrun --nnodes=$NNODES" \
         "--nproc_per_node=$NPROC rendezvous $HEAD:$PORT device $DEVICE restart ${SLURM_RESTART_COUNT:-0}"
    (
        trap '' USR1
        exec "$PYTHON" -m torch.distributed.run --nnodes="$NNODES" --nproc_per_node="$NPROC" \
            --rdzv_backend=c10d --rdzv_endpoint="$HEAD:$PORT" --rdzv_id="$SLURM_JOB_ID" \
            --rdzv_conf="is_host=$is_host" --max-restarts="$MAX_RESTARTS" "$@"
    ) &
    tr=$!
    trap "echo \"[node \$SLURM_NODEID] SIGUSR1: forwarding to the training processes\"; pkill -USR1 -P $tr" USR1
    trap "echo \"[node \$SLURM_NODEID] SIGTERM: forwarding to the training processes\"; pkill -TERM -P $tr" TERM
    while kill -0 "$tr" 2>/dev/null; do wait "$tr"; done  # a trap interrupts wait; wait again
    wait "$tr"; rc=$?
    echo "[node $SLURM_NODEID $SLURMD_NODENAME $(date '+%F %T')] torchrun exited with $rc"
    return $rc
}
export -f node_main
export NNODES NPROC HEAD PORT DEVICE PYTHON MAX_RESTARTS

if [ "$SIGNAL" = USR1 ] && [ "${BGTRAIN_REQUEUE:-1}" = 1 ]; then  # arrived during preflight
    log "SIGUSR1 before training started; requeueing job $SLURM_JOB_ID"
    scontrol requeue "$SLURM_JOB_ID"
    exit 0
elif [ -n "$SIGNAL" ]; then
    log "SIG$SIGNAL before training started; exiting"
    exit 143
fi
log "training; per-node logs in $JOB_DIR/node<N>.log"
srun --kill-on-bad-exit=1 --ntasks-per-node=1 --output="$JOB_DIR/node%n.log" --open-mode=append \
    bash -c 'node_main "$@"' node_main -m bgtrain.train --config "$BGTRAIN_CONFIG" "${OVERRIDES[@]}" &
SRUN_PID=$!
while kill -0 "$SRUN_PID" 2>/dev/null; do wait "$SRUN_PID"; done
wait "$SRUN_PID"; rc=$?

if [ $rc -ne 0 ]; then
    log "training failed (exit code $rc); last lines of each node log:"
    for f in "$JOB_DIR"/node*.log; do echo "--- $f"; tail -n 30 "$f"; done
    exit $rc
fi
if [ "$SIGNAL" = USR1 ] && [ "${BGTRAIN_REQUEUE:-1}" = 1 ]; then
    log "checkpoint written before the time limit; requeueing job $SLURM_JOB_ID (it resumes from $OUT_DIR)"
    scontrol requeue "$SLURM_JOB_ID"
    exit 0
fi
log "training finished (exit code 0); run folder $OUT_DIR"
