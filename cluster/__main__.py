"""``python -m cluster``: list the cluster tools."""
import sys

USAGE = """cluster tools (each has --help):
  python -m cluster.local_slurm up|down|status|env [--nodes 2] [--dir /tmp/bgtrain-slurm]
      a real Slurm cluster on this machine, for tests and demos
  python -m cluster.preflight [--config YAML] [--shards DIR] [--checkpoint-dir DIR] [--min-free-gb 10] [--timeout 60]
      devices, an all-reduce over every rank, shards readable, free disk: run at the top of sbatch scripts

example:
  eval "$(python -m cluster.local_slurm up --nodes 2)"
  BGTRAIN_CONFIG=configs/smoke.yaml sbatch --wait --nodes=2 slurm/train_openimages.sh
  python -m cluster.local_slurm down
"""

if __name__ == "__main__":
    print(USAGE, end="")
    sys.exit(0 if sys.argv[1:] in ([], ["-h"], ["--help"]) else 2)
