#!/bin/bash
# slurm/evaluate.sh - mAP and group-wise mAP of one checkpoint on N Slurm nodes (torchrun per node).
#
# Submit from the repository root, with the venv active:
#   BGTRAIN_CHECKPOINT=runs/slurm/1234/checkpoints/best.pt BGTRAIN_SHARDS=/data/openimages-shards \
#       sbatch --nodes=1 --gpus-per-node=8 slurm/evaluate.sh
#   BGTRAIN_CHECKPOINT=... BGTRAIN_SHARDS=... BGTRAIN_EVAL_ARGS="--split val --alpha-eval 1" sbatch slurm/evaluate.sh
#
# Environment:
#   BGTRAIN_CHECKPOINT    checkpoint written by bgtrain.train (required)
#   BGTRAIN_SHARDS        shard folder with manifest.json (required)
#   BGTRAIN_EVAL_ARGS     extra `bgtrain.evaluate` flags (--split, --alpha-eval, --no-positive, --groups, ...);
#                         --out runs/slurm/$SLURM_JOB_ID is added unless --out is given here
#   GPUS_PER_NODE, NPROC, BGTRAIN_RDZV_PORT, BGTRAIN_PREFLIGHT, BGTRAIN_PREFLIGHT_ARGS, BGTRAIN_PREBUILD,
#   BGTRAIN_OPS_CACHE, BGTRAIN_PYTHON:
#                         as in slurm/train_openimages.sh (the BoostLU extension is built once per node
#                         before torchrun on GPU jobs)
#
# Logs: runs/slurm/$SLURM_JOB_ID/ holds batch.log (link to Slurm's --output) and node<N>.log per node;
# map.json goes there too unless --out says otherwise.
#
#SBATCH --job-name=bgtrain-evaluate
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --time=04:00:00
#SBATCH --output=%x-%j.out

set -uo pipefail
cd "${SLURM_SUBMIT_DIR:-$PWD}" || exit 1
log() { echo "[evaluate $(date '+%F %T')] $*"; }

if [ -z "${SLURM_JOB_ID:-}" ]; then
    echo "slurm/evaluate.sh: run it with sbatch (see the header of this file)" >&2
    exit 2
fi
for v in BGTRAIN_CHECKPOINT BGTRAIN_SHARDS; do
    if [ -z "${!v:-}" ]; then log "set $v (see the header of slurm/evaluate.sh)"; exit 2; fi
done
if [ ! -f "$BGTRAIN_CHECKPOINT" ]; then log "BGTRAIN_CHECKPOINT=$BGTRAIN_CHECKPOINT: no such file"; exit 2; fi

# sbatch runs a spooled copy of this file: find the original (and common.sh beside it) from the job record.
SCRIPT=$(scontrol show job "$SLURM_JOB_ID" 2>/dev/null | sed -n 's/^ *Command=\([^ ]*\).*/\1/p')
source "$(dirname "${SCRIPT:-slurm/x}")/common.sh" || { log "cannot find slurm/common.sh next to $SCRIPT"; exit 2; }
job_folder
detect_devices
gpu_request

read -r -a EVAL_ARGS <<< "${BGTRAIN_EVAL_ARGS:-}"
[[ " ${EVAL_ARGS[*]} " == *" --out"* ]] || EVAL_ARGS+=(--out "$JOB_DIR")

HEAD=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1)
PORT=${BGTRAIN_RDZV_PORT:-$((20000 + SLURM_JOB_ID % 20000))}
NNODES=${SLURM_NNODES:-1}
log "job $SLURM_JOB_ID: $NNODES node(s) [$SLURM_JOB_NODELIST] x $NPROC process(es), rendezvous $HEAD:$PORT," \
    "checkpoint $BGTRAIN_CHECKPOINT, shards $BGTRAIN_SHARDS, args: ${EVAL_ARGS[*]}"

if [ "${BGTRAIN_PREFLIGHT:-1}" = 1 ]; then
    # shellcheck disable=SC2086  # BGTRAIN_PREFLIGHT_ARGS is a list of flags
    MASTER_ADDR=$HEAD MASTER_PORT=$((PORT + 1)) srun --kill-on-bad-exit=1 --ntasks-per-node=1 \
        "$PYTHON" -m cluster.preflight --shards "$BGTRAIN_SHARDS" --checkpoint-dir "$JOB_DIR" --min-free-gb 1 \
        --procs-per-node "$NPROC" ${BGTRAIN_PREFLIGHT_ARGS:-}
    rc=$?
    if [ $rc -ne 0 ]; then log "preflight failed (exit code $rc); not evaluating"; exit $rc; fi
fi
prebuild_ops

node_main() {
    local is_host=0
    [ "${SLURM_NODEID:-0}" = 0 ] && is_host=1  # node 0 is $HEAD; say so, since fake nodes share one IP
    echo "[node $SLURM_NODEID $SLURMD_NODENAME $(date '+%F %T')] torchrun --nnodes=$NNODES" \
         "--nproc_per_node=$NPROC rendezvous $HEAD:$PORT"
    exec "$PYTHON" -m torch.distributed.run --nnodes="$NNODES" --nproc_per_node="$NPROC" \
        --rdzv_backend=c10d --rdzv_endpoint="$HEAD:$PORT" --rdzv_id="$SLURM_JOB_ID" \
        --rdzv_conf="is_host=$is_host" "$@"
}
export -f node_main
export NNODES NPROC HEAD PORT PYTHON

srun --kill-on-bad-exit=1 --ntasks-per-node=1 --output="$JOB_DIR/node%n.log" \
    bash -c 'node_main "$@"' node_main -m bgtrain.evaluate --checkpoint "$BGTRAIN_CHECKPOINT" \
    --shards "$BGTRAIN_SHARDS" "${EVAL_ARGS[@]}"
rc=$?
if [ $rc -ne 0 ]; then
    log "evaluation failed (exit code $rc); last lines of each node log:"
    for f in "$JOB_DIR"/node*.log; do echo "--- $f"; tail -n 30 "$f"; done
    exit $rc
fi
log "evaluation finished; results in $JOB_DIR"
