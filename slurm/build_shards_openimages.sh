#!/bin/bash
# slurm/build_shards_openimages.sh - OpenImages v3 -> WebDataset shards as a Slurm array job.
#
# Each array task builds one part (`python -m shards build openimages ... --part I --parts N`);
# the task with the lowest index also submits the merge job (`python -m shards merge OUT`), which
# runs once every part succeeded (afterok on the whole array) and writes the one manifest.json.
#
# Submit from the repository root, with the venv active:
#   OI_ROOT=/data/oi-v3 OI_IMAGES=/scratch/oi/images SHARDS_OUT=/data/oi-shards \
#       sbatch --array=0-31 --cpus-per-task=32 slurm/build_shards_openimages.sh
#
# Environment:
#   OI_ROOT           raw OpenImages v3 folder in its published layout (annotations-human.csv per
#                     split, classes-trainable.txt): `shards build --src` (required)
#   OI_IMAGES         image root if not under OI_ROOT: `shards build --images`
#   SHARDS_OUT        output shard folder (required; on a file system every node sees)
#   SHARDS_MERGE_CPUS CPUs of the merge job   [the array task's --cpus-per-task]
#   SHARDS_ARGS       extra `python -m shards build openimages` flags
#   SHARDS_MERGE_ARGS extra `python -m shards merge` flags
#   BGTRAIN_PYTHON    python to run   [python]
# The number of parts is the array size (SLURM_ARRAY_TASK_COUNT); a failed part can be rerun with
# `sbatch --array=<I> ...` as long as --array keeps the same size, then the merge step rerun by hand:
#   python -m shards merge $SHARDS_OUT
# Re-running a part resumes it (the builder skips finished tars).
#
#SBATCH --job-name=bgtrain-shards-openimages
#SBATCH --array=0-15
#SBATCH --nodes=1
#SBATCH --ntasks=1
#SBATCH --cpus-per-task=16
#SBATCH --time=12:00:00
#SBATCH --output=%x-%A_%a.out

set -uo pipefail
cd "${SLURM_SUBMIT_DIR:-$PWD}" || exit 1
log() { echo "[build_shards_openimages $(date '+%F %T')] $*"; }

for v in OI_ROOT SHARDS_OUT; do
    if [ -z "${!v:-}" ]; then log "set $v (see the header of slurm/build_shards_openimages.sh)"; exit 2; fi
done
PYTHON=${BGTRAIN_PYTHON:-python}
PART=${SLURM_ARRAY_TASK_ID:-0}
PARTS=${SLURM_ARRAY_TASK_COUNT:-1}
read -r -a BUILD_ARGS <<< "${SHARDS_ARGS:-}"
read -r -a MERGE_ARGS <<< "${SHARDS_MERGE_ARGS:-}"

if [ -n "${SLURM_ARRAY_JOB_ID:-}" ] && [ "$PART" = "${SLURM_ARRAY_TASK_MIN:-0}" ]; then
    # One merge job per array; it waits for every task (afterok on the array id) and is cancelled
    # by Slurm if any part fails.
    CPUS=${SHARDS_MERGE_CPUS:-${SLURM_CPUS_PER_TASK:-1}}
    MERGE_CMD="cd $(printf %q "$PWD") && $PYTHON -m shards merge $(printf %q "$SHARDS_OUT") --workers $CPUS"
    [ ${#MERGE_ARGS[@]} -gt 0 ] && MERGE_CMD+=" $(printf '%q ' "${MERGE_ARGS[@]}")"
    if MERGE_ID=$(sbatch --parsable --job-name=bgtrain-shards-merge --dependency="afterok:$SLURM_ARRAY_JOB_ID" \
            --kill-on-invalid-dep=yes --ntasks=1 --cpus-per-task="$CPUS" --output="%x-%j.out" \
            --wrap="$MERGE_CMD"); then
        log "submitted merge job $MERGE_ID (runs after array $SLURM_ARRAY_JOB_ID succeeds): $MERGE_CMD"
    else
        log "could not submit the merge job; run it by hand after the array: $MERGE_CMD"
    fi
fi

log "part $PART of $PARTS: $OI_ROOT -> $SHARDS_OUT on $(hostname) with ${SLURM_CPUS_PER_TASK:-?} CPUs"
"$PYTHON" -m shards build openimages --src "$OI_ROOT" ${OI_IMAGES:+--images "$OI_IMAGES"} --out "$SHARDS_OUT" \
    --part "$PART" --parts "$PARTS" ${SLURM_CPUS_PER_TASK:+--workers "$SLURM_CPUS_PER_TASK"} "${BUILD_ARGS[@]}"
rc=$?
log "part $PART of $PARTS finished with exit code $rc"
exit $rc
