"""``torchrun -m bgtrain.train --config configs/X.yaml [key.sub=value ...]``: the command line around
:class:`bgtrain.trainer.Trainer`."""
from __future__ import annotations

import argparse
import sys

from bgtrain.config import ConfigError, TrainConfig, load_config
from bgtrain.distributed import shutdown
from bgtrain.trainer import Trainer


def run(cfg: TrainConfig) -> dict:
    """Train, select the best epoch on validation, evaluate it on test; returns the final results."""
    return Trainer(cfg).fit()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="torchrun -m bgtrain.train",
        description="Train a CAM ResNet with BoostLU / large-loss schemes on WebDataset shards.",
        epilog="example: torchrun --standalone --nproc_per_node=2 -m bgtrain.train "
               "--config configs/smoke.yaml loss.scheme=LL-R optim.epochs=2")
    parser.add_argument("--config", required=True, help="YAML config (see configs/ and the README)")
    parser.add_argument("overrides", nargs="*", help="key.sub=value overrides, e.g. model.alpha_eval=5")
    args = parser.parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)  # fails before any process group starts
    except (ConfigError, FileNotFoundError) as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    try:
        run(cfg)
    finally:
        shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
