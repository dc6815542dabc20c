"""``python -m bgtrain.explain overlay|gap|pointing``: CAM heatmap overlays (PNG), the explanation-gap analysis
and the pointing game (does the CAM peak on the object, on synthetic shards).

A CamResNet's logit for class c is the spatial mean of ``BoostLU(cam_c)``, so the boosted CAM is exactly the
map the score averages: overlays show that map, upsampled bilinearly to the image, for the alpha they name.
Each overlay is the image's size and names the class (``+``/``-``/``?``: its full label, when the image comes from
shards), its score sigmoid(logit) at that alpha, and the alpha. Colours are min-max scaled per map.
Drawing uses numpy and PIL only (a jet-like colormap, PIL text), so explanations need no plotting library.

    python -m bgtrain.explain overlay --checkpoint runs/demo/LL-R_BoostLU/checkpoints/best.pt \\
        --shards data/demo --split test --count 4 --classes top3 --out runs/demo/overlays
    python -m bgtrain.explain gap --a runs/full/checkpoints/best.pt --b runs/AN/checkpoints/best.pt \\
        --shards data/demo --out runs/gap
    python -m bgtrain.explain pointing --checkpoint runs/pretrain/checkpoints/best.pt --shards data/pretrain \\
        --split test --out runs/pointing
"""
from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from bgtrain.process_env import prefer_huge_pages


def build_parser() -> argparse.ArgumentParser:
    """The ``overlay``, ``gap`` and ``pointing`` commands."""
    import torch

    from bgtrain.explain.gap import add_gap_arguments
    from bgtrain.explain.pointing import add_pointing_arguments
    parser = argparse.ArgumentParser(prog="python -m bgtrain.explain", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    ov = sub.add_parser("overlay", help="PNG CAM heatmaps for chosen classes, with score and alpha",
                        formatter_class=argparse.RawDescriptionHelpFormatter,
                        epilog="example:\n  python -m bgtrain.explain overlay --checkpoint runs/demo/LL-R_BoostLU/"
                               "checkpoints/best.pt --shards data/demo --split test --count 4 --classes top3 "
                               "--out runs/demo/overlays\n  python -m bgtrain.explain overlay --checkpoint best.pt "
                               "--images a.jpg b.jpg --classes top5 dog --alpha 1 --out overlays")
    ov.add_argument("--checkpoint", required=True, help="a bgtrain checkpoint (e.g. out_dir/checkpoints/best.pt)")
    src = ov.add_mutually_exclusive_group(required=True)
    src.add_argument("--images", nargs="+", help="image files")
    src.add_argument("--shards", help="shard folder (manifest.json); also gives class names")
    ov.add_argument("--split", default="test", help="split of --shards (default test)")
    ov.add_argument("--count", type=int, default=8, help="images from --shards (default 8)")
    ov.add_argument("--classes", nargs="+", default=["top5"], help="topK and/or class names (default top5)")
    ov.add_argument("--alpha", type=float, default=None, help="BoostLU alpha (default: the checkpoint's alpha_eval)")
    ov.add_argument("--size", type=int, default=None, help="input size in px (default: the config's image_size)")
    ov.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ov.add_argument("--out", required=True, help="output folder")

    gap = sub.add_parser("gap", help="explanation gap between two models: Spearman, top/bottom-5%% attributions",
                         formatter_class=argparse.RawDescriptionHelpFormatter,
                         epilog="example:\n  python -m bgtrain.explain gap --a runs/full/checkpoints/best.pt "
                                "--b runs/AN/checkpoints/best.pt --shards data/demo --split test --out runs/gap")
    add_gap_arguments(gap)

    pointing = sub.add_parser(
        "pointing", help="pointing game on synthetic shards: hit rate of the CAM's peak, and its chance level",
        description="The pointing game (Zhang et al. 2016) on shards from `python -m shards synthetic`, whose\n"
                    "<split>/objects.json records where each object was drawn (centre cx, cy and radius r).\n\n"
                    "For each (image, positive class), the raw CAM's maximum cell is mapped to the centre of that\n"
                    "cell in image pixels. It is a hit when\n"
                    "    distance(cell centre, object centre) <= r + half a CAM cell in pixels.\n"
                    "chance: the hit rate a uniformly random cell would get under the same rule on the same\n"
                    "objects. BoostLU is strictly increasing, so alpha never changes a hit.\n"
                    "Prints one line; --out also writes pointing.json (overall, per class, counts).",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="example:\n  python -m bgtrain.explain pointing --checkpoint runs/pretrain/checkpoints/best.pt "
               "--shards data/pretrain --split test --out runs/pointing")
    add_pointing_arguments(pointing)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run one explanation command; 2 and one line on stderr for a bad input."""
    prefer_huge_pages()  # before torch is imported (build_parser imports it)
    args = build_parser().parse_args(argv)
    from bgtrain.config import ConfigError
    from bgtrain.explain.gap import run_gap
    from bgtrain.explain.overlay import run_overlay
    from bgtrain.explain.pointing import run_pointing
    try:
        if args.command == "overlay":
            if args.count < 1:
                raise ValueError("--count must be >= 1")
            index = run_overlay(args)
            print(f"wrote overlays of {len(index['images'])} images to {args.out} "
                  f"(alpha {index['alpha']:g}, {index['size']} px)")
        elif args.command == "pointing":
            r = run_pointing(args)
            print(f"pointing game, {args.split}: {r['hit_rate']:.1f}% hits of {r['pairs']} (image, positive class) "
                  f"pairs in {r['images']} images (chance {r['chance']:.1f}%, CAM {r['cam_size'][0]}x"
                  f"{r['cam_size'][1]})" + (f"; wrote {args.out}/pointing.json" if args.out else ""))
        else:
            summary = run_gap(args)
            p = summary["positive"]
            print(f"{summary['images']} images, {p['pairs']} positive pairs: Spearman {p['spearman']['mean']:.3f}, "
                  f"top-5% a {p['a']['top5']['mean']:.3f} b {p['b']['top5']['mean']:.3f}, "
                  f"bottom-5% a {p['a']['bottom5']['mean']:.3f} b {p['b']['bottom5']['mean']:.3f}; wrote {args.out}")
    except (ConfigError, FileNotFoundError, KeyError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    from bgtrain.cli import run_cli

    sys.exit(run_cli(main, prog="bgtrain.explain"))
