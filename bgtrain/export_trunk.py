"""``python -m bgtrain.export_trunk``: a training checkpoint as a torchvision ResNet state dict.

This is how a user brings their own pretraining: train any run (e.g. full labels on a large single-label set),
export its best checkpoint, and point ``model.pretrained`` of the fine-tuning runs at the file. The file holds
torchvision's keys (``conv1.weight``, ``layer4.1.bn2.running_var``, ..., ``fc.weight``), so it also loads into
``torchvision.models.resnetN(num_classes=C)``. ``--no-head`` leaves ``fc`` out: the fine-tuning run then starts
from a fresh classifier even when its class count equals the pretraining one.

    python -m bgtrain.export_trunk --checkpoint runs/pretrain/checkpoints/best.pt --out weights/trunk.pt
"""
from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

import torch

from bgtrain.checkpoint import atomic_save, load_model_for_eval
from bgtrain.config import ConfigError


def export_trunk(checkpoint: str | Path, out: str | Path, head: bool = True) -> dict[str, torch.Tensor]:
    """Write the checkpoint's model as a torchvision ResNet state dict to ``out``; returns that state dict."""
    model, _ = load_model_for_eval(checkpoint)
    state = model.torchvision_state_dict(head=head)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_save(state, out)
    return state


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry; returns the exit code (2 with one line on stderr for a bad checkpoint)."""
    parser = argparse.ArgumentParser(
        prog="python -m bgtrain.export_trunk",
        description="Turn a bgtrain checkpoint into a torchvision ResNet state dict that model.pretrained loads.",
        epilog="example: python -m bgtrain.export_trunk --checkpoint runs/pretrain/checkpoints/best.pt "
               "--out weights/trunk.pt   (then: model.pretrained=weights/trunk.pt)")
    parser.add_argument("--checkpoint", required=True, type=Path, help="checkpoint written by bgtrain.train")
    parser.add_argument("--out", required=True, type=Path, help="state-dict file to write (torch.save)")
    parser.add_argument("--no-head", action="store_true",
                        help="leave fc out, so that fine-tuning always starts from a fresh classifier")
    args = parser.parse_args(argv)
    try:
        state = export_trunk(args.checkpoint, args.out, head=not args.no_head)
    except (FileNotFoundError, KeyError, ConfigError, RuntimeError) as e:
        message = e.args[0] if isinstance(e, KeyError) and e.args else e
        print(f"export_trunk: {args.checkpoint}: {message}", file=sys.stderr)
        return 2
    head = f", fc {tuple(state['fc.weight'].shape)}" if "fc.weight" in state else ", no fc"
    print(f"wrote {args.out}: {len(state)} tensors (torchvision ResNet keys{head})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
