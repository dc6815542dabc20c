"""The papers' default settings for every loss, in one place: large-loss deltas, expected positives,
EM+APL per dataset, and ROLE's constants. Configs override them; a ``None`` config value means "the paper's"."""
from __future__ import annotations

from bgtrain.config import LossConfig

# Large-loss rejection / correction rates per epoch (Kim et al., CVPR 2022).
LARGE_LOSS_DEFAULT_DELTA = {"LL-R": 0.005, "LL-Ct": 0.002, "LL-Cp": 0.001}
# Expected positives per image (EPR, ROLE), from the single-positive paper.
EXPECTED_POSITIVES = {"voc": 1.5, "coco": 2.9, "nuswide": 1.9, "cub": 31.4}
PAPER_EPOCHS = 10  # both ROLE's and EM+APL's references train for 10 epochs end to end

# ROLE, from COLE's models.py (LabelEstimator) and train.py.
ROLE_INIT_UNKNOWN = 0.1   # unknown entries start uniform in logit(0.5 +- 0.1)
ROLE_INIT_POSITIVE = 0.995
ROLE_INIT_NEGATIVE = 0.005
ROLE_LR = 1e-4            # the table learns at lr_mult (10) x the model lr; the paper's recipe has lr 1e-5
ROLE_ADAM_COPIES = 4      # table, its gradient, Adam's two moments

# EM+APL, from SPML-AckTheUnknown main.py (keys renamed: "pascal" -> "voc"). The reference also uses
# batch 8 on VOC and CUB, and lr 1e-4 on CUB; bgtrain's configs keep the shared recipe for those.
# Datasets the paper did not cover (synthetic, OpenImages, CSV) use these unless the config says otherwise.
GENERIC_EM_APL = {"alpha": 0.1, "beta": 0.1, "warmup": 1}
EM_APL_PAPER = {
    "voc": {"alpha": 0.2, "beta": 0.02, "warmup": 5},
    "coco": {"alpha": 0.1, "beta": 0.9, "warmup": 5},
    "nuswide": {"alpha": 0.1, "beta": 0.2, "warmup": 4},
    "cub": {"alpha": 0.01, "beta": 0.4, "warmup": 3},
}
APL_NEG_PROPORTION = 0.9  # share of each class's unknowns that becomes soft negatives over all passes


def expected_positives(cfg: LossConfig, dataset: str) -> float:
    """The config's expected positives per image, else the paper's for this dataset (EPR, ROLE)."""
    expected = cfg.expected_positives or EXPECTED_POSITIVES.get(dataset)
    if expected is None:
        raise ValueError(f"loss.expected_positives: no default for dataset {dataset!r}; set it in the config")
    return expected


def em_apl_params(cfg: LossConfig, dataset: str) -> tuple[float, float, int]:
    """(alpha_EM, beta, warm-up): the config's value, or the paper's for this dataset where it is null."""
    paper = EM_APL_PAPER.get(dataset, GENERIC_EM_APL)

    def pick(value: float | int | None, key: str) -> float | int:
        return paper[key] if value is None else value

    return (float(pick(cfg.em_alpha, "alpha")), float(pick(cfg.apl_beta, "beta")),
            int(pick(cfg.apl_warmup_epochs, "warmup")))
