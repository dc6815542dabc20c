"""``torchrun -m bgtrain.train --config configs/X.yaml [key.sub=value ...]``: the command line around
:class:`bgtrain.trainer.Trainer`."""
from __future__ import annotations

import argparse
import os
import sys

from bgtrain.checkpoint import prepare_resume
from bgtrain.cli import UsageError
from bgtrain.config import ConfigError, TrainConfig, load_config
from bgtrain.distributed import restart_count, shutdown, world_info_from_env
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
    parser.add_argument("--overwrite", action="store_true",
                        help="out_dir holds another run: move its files into out_dir/replaced-<time>/ and start")
    parser.add_argument("--force-resume", action="store_true",
                        help="resume even though model.depth, loss.scheme or the class count changed")
    args = parser.parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)  # fails before any process group starts
    except (ConfigError, FileNotFoundError) as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    if cfg.engine.engine == "deepspeed" and "RANK" not in os.environ:
        raise UsageError("engine.engine=deepspeed needs a launcher that sets RANK and WORLD_SIZE: run it with "
                         "torchrun (e.g. torchrun --standalone --nproc_per_node=1 -m bgtrain.train ...)")
    world = world_info_from_env()
    cfg, notes = prepare_resume(cfg, world.world_size, world.rank, restart_count(), args.overwrite,
                                args.force_resume)
    if world.is_main:
        for note in notes:
            print(note, file=sys.stderr)
    try:
        run(cfg)
    finally:
        shutdown()
    return 0


if __name__ == "__main__":
    from bgtrain.cli import run_cli

    sys.exit(run_cli(main, prog="bgtrain.train"))
