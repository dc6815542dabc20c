"""bgtrain.claims: the five claims from seed folders, checked against numpy on hand-made results."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from bgtrain import claims
from bgtrain.report.paper_page import markdown

ROWS = ("full", "AN", "LL-R", "LL-R_BoostLU", "AN_BoostLU_inference")


def gap_summary(full_top: float, an_top: float, an_boosted: float, rho: float) -> dict:
    return {"positive": {"spearman": {"median": rho}, "a": {"top5": {"mean": full_top}},
                         "b": {"top5": {"mean": an_top}, "top5_boosted": {"mean": an_boosted}},
                         "top5_b_lower_fraction": 0.9, "top5_boosted_b_lower_fraction": 0.4}}


def write_seed(root: Path, seed: int, test: dict[str, float], gap: dict | None, epochs: int = 3) -> Path:
    folder = root / f"seed{seed}"
    for row, value in test.items():
        (folder / row).mkdir(parents=True)
        (folder / row / "results.json").write_text(json.dumps({"name": row, "test_map": value}))
        if row != "AN_BoostLU_inference":
            lines = [record for e in range(1, epochs + 1)
                     for record in ({"kind": "val", "epoch": e, "step": 10 * e, "val_map": value - epochs + e},
                                    {"kind": "epoch", "epoch": e, "step": 10 * e, "epoch_s": 20.0})]
            (folder / row / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    for row in ("AN", "LL-R_BoostLU"):
        if gap is not None:
            (folder / "gap" / f"full_vs_{row}").mkdir(parents=True)
            (folder / "gap" / f"full_vs_{row}" / "summary.json").write_text(json.dumps(gap))
    # A later reproduce call that only tested the finished rows again: its wall time is not the training time.
    (folder / "paper.json").write_text(json.dumps([{"row": r, "wall_s": 5.0} for r in test]))
    return folder


TABLES = [{"full": 90.0, "AN": 80.0, "LL-R": 82.0, "LL-R_BoostLU": 85.0, "AN_BoostLU_inference": 81.0},
          {"full": 91.0, "AN": 79.5, "LL-R": 83.0, "LL-R_BoostLU": 84.0, "AN_BoostLU_inference": 80.0},
          {"full": 89.0, "AN": 81.0, "LL-R": 82.5, "LL-R_BoostLU": 82.0, "AN_BoostLU_inference": 81.5}]
GAP = gap_summary(full_top=7.0, an_top=1.0, an_boosted=6.0, rho=0.7)


def by_id(summary: dict) -> dict[str, dict]:
    return {c["claim"]: c for c in summary["claims"]}


def test_margins_are_paired_per_seed_and_a_claim_holds_only_when_every_seed_agrees(tmp_path):
    for seed, table in enumerate(TABLES):
        write_seed(tmp_path, seed, table, GAP)
    pretrain = tmp_path / "seed0" / "pretrain"
    pretrain.mkdir()
    (pretrain / "results.json").write_text(json.dumps({"best_epoch": 4, "val_map": 99.0, "test_map": 98.5}))
    (pretrain / "pointing.json").write_text(json.dumps({"hit_rate": 81.0, "chance": 34.4, "pairs": 300,
                                                        "cam_size": [3, 3], "per_class": {}}))
    summary = claims.summarise(tmp_path)
    assert summary["trunk"]["val_map"] == 99.0 and summary["trunk"]["pointing"]["hit_rate"] == 81.0
    found = by_id(summary)
    expected = {"1": [t["LL-R_BoostLU"] - t["LL-R"] for t in TABLES], "2": [t["LL-R"] - t["AN"] for t in TABLES],
                "3": [t["AN_BoostLU_inference"] - t["AN"] for t in TABLES],
                "4": [t["full"] - max(v for k, v in t.items() if k != "full") for t in TABLES]}
    for number, margins in expected.items():
        margin = found[number]["margin"]
        assert margin["values"] == pytest.approx(margins)
        assert margin["mean"] == pytest.approx(np.mean(margins))
        assert margin["std"] == pytest.approx(np.std(margins, ddof=1))
        assert found[number]["holds"] == all(m > 0 for m in margins)
    # Seed 2 has LL-R + BoostLU below LL-R: claim 1 fails although its mean margin is positive.
    assert found["1"]["margin"]["mean"] > 0 and found["1"]["holds"] is False
    assert found["2"]["holds"] and found["3"]["holds"] and found["4"]["holds"]
    rows = summary["rows"]
    for row in ROWS:
        values = [t[row] for t in TABLES]
        assert rows[row]["mean"] == pytest.approx(np.mean(values))
        assert (rows[row]["min"], rows[row]["max"]) == (min(values), max(values))
    assert summary["wall_s"]["per_seed"] == [4 * 3 * 20.0] * 3  # 4 trained rows x 3 epochs; no pretrain/metrics
    assert summary["missing"] == []
    assert summary["curves"]["0"]["AN"] == [(1, 78.0), (2, 79.0), (3, 80.0)]


@pytest.mark.parametrize("gap, failing", [
    (GAP, None),
    (gap_summary(full_top=7.0, an_top=7.5, an_boosted=9.0, rho=0.7), "5a"),   # AN's attributions are not smaller
    (gap_summary(full_top=7.0, an_top=1.0, an_boosted=6.0, rho=0.3), "5b"),   # the maps moved
    (gap_summary(full_top=7.0, an_top=1.0, an_boosted=3.0, rho=0.7), "5c"),   # BoostLU closes a third of the gap
])
def test_the_explanation_claim_holds_only_with_all_three_parts(tmp_path, gap, failing):
    write_seed(tmp_path, 0, TABLES[0], gap)
    five = by_id(claims.summarise(tmp_path))["5"]
    parts = {p["claim"]: p for p in five["parts"]}
    pos = gap["positive"]
    full_top, an_top, boosted = pos["a"]["top5"]["mean"], pos["b"]["top5"]["mean"], pos["b"]["top5_boosted"]["mean"]
    assert parts["5a"]["margin"]["mean"] == pytest.approx(full_top - an_top)
    assert parts["5b"]["margin"]["mean"] == pytest.approx(pos["spearman"]["median"] - claims.SPEARMAN_FLOOR)
    assert parts["5c"]["margin"]["mean"] == pytest.approx(boosted - an_top - claims.GAP_CLOSED * (full_top - an_top))
    assert five["holds"] is (failing is None)
    assert [k for k, p in parts.items() if not p["holds"]] == ([failing] if failing else [])
    assert parts["5a"]["margin"]["std"] is None  # one seed: no spread, never a made-up one


def test_a_missing_row_is_not_measured_and_named(tmp_path):
    table = {k: v for k, v in TABLES[0].items() if k != "LL-R"}
    write_seed(tmp_path, 0, TABLES[1], GAP)
    write_seed(tmp_path, 1, table, None)
    summary = claims.summarise(tmp_path)
    found = by_id(summary)
    assert found["1"]["holds"] is None and found["2"]["holds"] is None and found["5"]["holds"] is None
    assert found["3"]["holds"] is True
    assert f"{tmp_path / 'seed1' / 'LL-R'}: no results.json" in summary["missing"]
    assert any("seed1/gap/full_vs_AN" in m for m in summary["missing"])
    assert any("the trunk's quality is not shown" in m for m in summary["missing"])
    text = markdown(summary)
    assert "| 1. LL-R + BoostLU beats LL-R | **not measured** |" in text
    assert "(1 of 2 seeds)" in text


def test_the_command_writes_claims_json_markdown_and_a_report(tmp_path, capsys):
    for seed, table in enumerate(TABLES[:2]):
        write_seed(tmp_path, seed, table, GAP)
    assert claims.main([str(tmp_path), "--cam-images", "0"]) == 0
    written = json.loads((tmp_path / "claims.json").read_text())
    assert [c["claim"] for c in written["claims"]] == ["1", "2", "3", "4", "5"]
    html = (tmp_path / "report.html").read_text()
    assert "The paper&#x27;s claims" in html or "The paper's claims" in html
    assert "does not hold" in html or "holds" in html
    assert "holds" in capsys.readouterr().out


def test_no_seed_folders_is_one_line(tmp_path):
    with pytest.raises(FileNotFoundError, match="no seed0"):
        claims.summarise(tmp_path)
