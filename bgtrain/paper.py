"""Published test mAP of the BoostLU paper (Kim et al., CVPR 2023), for side-by-side tables."""
from __future__ import annotations

SINGLE_POSITIVE = {
    # row: {dataset: mAP}
    "full": {"voc": 89.42, "coco": 76.78, "nuswide": 52.08, "cub": 30.90},
    "AN": {"voc": 85.89, "coco": 64.92, "nuswide": 42.27, "cub": 18.31},
    "LL-R": {"voc": 88.27, "coco": 70.70, "nuswide": 48.76, "cub": 19.56},
    "LL-R_BoostLU": {"voc": 89.29, "coco": 72.89, "nuswide": 49.59, "cub": 19.80},
    "LL-Ct_BoostLU": {"voc": 88.61, "coco": 71.78, "nuswide": 48.37, "cub": 19.25},
    "LL-Cp_BoostLU": {"voc": 87.81, "coco": 71.41, "nuswide": 48.61, "cub": 19.34},
}

# BoostLU in inference only (train alpha 1, evaluate alpha 5), against the same AN model at alpha 1.
INFERENCE_ONLY = {
    "AN_alpha1": {"voc": 86.10, "coco": 64.58},
    "AN_BoostLU_inference": {"voc": 87.31, "coco": 66.27},
}

OPENIMAGES = {  # G1 (rarest) .. G5, All
    "LL-R": [77.76, 79.07, 81.94, 84.51, 89.36, 82.53],
    "LL-R_BoostLU": [79.28, 80.81, 83.32, 85.63, 90.27, 83.86],
    "LL-Cp_BoostLU": [79.53, 81.04, 83.40, 85.85, 90.39, 84.04],
}


def published(table: str, row: str, dataset: str) -> float | None:
    """The paper's number for a row, or None where the paper has none."""
    if table == "openimages":
        values = OPENIMAGES.get(row)
        return values[-1] if values else None
    source = INFERENCE_ONLY if table == "inference_only" else SINGLE_POSITIVE
    return source.get(row, {}).get(dataset)
