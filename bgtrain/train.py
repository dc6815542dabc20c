"""``torchrun -m bgtrain.train --config configs/X.yaml [key.sub=value ...]``: the command line around
:class:`bgtrain.trainer.Trainer`.

torch is imported only inside :func:`main`, after :func:`bgtrain.process_env.prefer_huge_pages`.
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import TYPE_CHECKING

from bgtrain.cli import UsageError
from bgtrain.process_env import prefer_huge_pages

if TYPE_CHECKING:
    from bgtrain.config import TrainConfig


def run(cfg: TrainConfig) -> dict:
    """Train, select the best epoch on validation, evaluate it on test; returns the final results."""
    from bgtrain.trainer import Trainer
    return Trainer(cfg).fit()


def check_devices(cfg: TrainConfig, local_rank: int) -> str | None:
    """Start-up checks of what the config asks of this machine; one line naming the cause, or None.

    ``device: cuda`` (or $BGTRAIN_DEVICE=cuda) needs a GPU for this rank, and ``ops.boostlu: cuda`` (or
    $BGTRAIN_BOOSTLU=cuda) a loadable CUDA extension: neither falls back to CPU / the reference silently. The BoostLU
    implementation is resolved here, so a build (when nothing was prebuilt) happens before the process group.
    """
    import torch

    from bgtrain.distributed import DeviceError, check_device, requested_device
    from bgtrain.ops import dispatch

    try:
        check_device(requested_device(cfg.device), local_rank)
        dispatch.configure(cfg.ops.boostlu)
        device = "cuda" if torch.cuda.is_available() else "cpu"
        dispatch.require(device)
    except (DeviceError, dispatch.BoostLUUnavailable) as e:
        return str(e)
    return None


def main(argv: list[str] | None = None) -> int:
    """Parse the command line, load the config, train; 2 and one line on stderr for a config error."""
    prefer_huge_pages()
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
    from bgtrain.config import ConfigError, load_config
    try:
        cfg = load_config(args.config, args.overrides)  # fails before any process group starts
    except (ConfigError, FileNotFoundError) as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    if cfg.engine.engine == "deepspeed" and "RANK" not in os.environ:
        raise UsageError("engine.engine=deepspeed needs a launcher that sets RANK and WORLD_SIZE: run it with "
                         "torchrun (e.g. torchrun --standalone --nproc_per_node=1 -m bgtrain.train ...)")
    from bgtrain.checkpoint import prepare_resume
    from bgtrain.distributed import restart_count, shutdown, world_info_from_env
    world = world_info_from_env()
    problem = check_devices(cfg, world.local_rank)
    if problem:
        print(f"bgtrain.train: {problem}", file=sys.stderr)
        return 2
    cfg, notes = prepare_resume(cfg, world.world_size, world.rank, restart_count(), args.overwrite,
                                args.force_resume)
    if world.is_main:
        for note in notes:
            print(note, file=sys.stderr)
    try:
        run(cfg)
    except ConfigError as e:  # a setting this machine cannot run (e.g. fp16 on a CPU device)
        print(f"config error: {e}", file=sys.stderr)
        return 2
    finally:
        shutdown()
    return 0


if __name__ == "__main__":
    from bgtrain.cli import run_cli

    sys.exit(run_cli(main, prog="bgtrain.train"))
