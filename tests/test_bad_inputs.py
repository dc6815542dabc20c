"""Bad inputs end as one clear line (exit 1 for data, 2 for usage, no traceback) or as a counted result.

Each CLI's ``main`` runs in-process through the same ``run_cli`` wrapper its ``__main__`` uses; a few cases
run ``python -m`` to prove the wrapper is wired in.
"""
from __future__ import annotations

import csv
import errno
import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from bgtrain import checkpoint as ckpt
from bgtrain.cli import DataError, UsageError, run_cli
from bgtrain.config import load_config
from tests.conftest import REPO

SMOKE = str(REPO / "configs" / "smoke.yaml")


def call(main, argv: list[str], capsys) -> tuple[int, str]:
    """Exit code and stdout+stderr of ``main(argv)`` run as its command line runs it."""
    capsys.readouterr()
    code = run_cli(main, argv, prog="test")
    out = capsys.readouterr()
    return code, out.out + out.err


def one_error_line(text: str) -> str:
    """The single error line of ``text``; fails on a traceback or on more than one error line."""
    assert "Traceback" not in text, text
    errors = [line for line in text.splitlines() if ": error: " in line or line.startswith("config error:")]
    assert len(errors) == 1, text
    return errors[0]


def jpeg(seed: int, size=(40, 30)) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray((rng.random((size[1], size[0], 3)) * 255).astype(np.uint8)).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def zero_scan_data(data: bytes) -> bytes:
    """The same JPEG with every byte of its entropy-coded scan set to zero (headers and EOI kept)."""
    sos = data.index(b"\xff\xda")
    start = sos + 2 + int.from_bytes(data[sos + 2: sos + 4], "big")
    end = data.rindex(b"\xff\xd9")
    return data[:start] + bytes(end - start) + data[end:]


def csv_dataset(root: Path, val_rows: list[list[str]], n_train: int = 6) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "classes.txt").write_text("a\nb\nc\n")
    (root / "img").mkdir(exist_ok=True)
    for i in range(n_train + len(val_rows)):
        (root / "img" / f"{i}.jpg").write_bytes(jpeg(i))
    with open(root / "train.csv", "w", newline="") as f:
        csv.writer(f).writerows([[f"img/{i}.jpg", "abc"[i % 3], ""] for i in range(n_train)])
    with open(root / "val.csv", "w", newline="") as f:
        csv.writer(f).writerows(val_rows)
    return root


# ------------------------------------------------------------------ labels that can score

def test_csv_val_split_without_negatives_is_refused_naming_the_split(tmp_path, capsys):
    from shards.__main__ import main
    src = csv_dataset(tmp_path / "raw", [["img/6.jpg", "a", ""], ["img/7.jpg", "b", ""]])
    code, text = call(main, ["build", "csv", "--src", str(src), "--out", str(tmp_path / "out"), "--workers", "1",
                             "--rest", "train=unknown,val=unknown"], capsys)
    assert code == 2
    assert "split val" in one_error_line(text) and "--rest val=negative" in text
    assert not (tmp_path / "out").exists()


def test_csv_rest_per_split_or_inferred_with_a_note(tmp_path):
    from shards.readers import get_reader
    src = csv_dataset(tmp_path, [["img/6.jpg", "a", ""], ["img/7.jpg", "b", "c"]])
    data = get_reader("csv")(src, rest="train=unknown,val=negative")
    assert data.rest["train"]["observed"] == -1 and data.rest["val"] == {"observed": 0, "full": 0}
    inferred = get_reader("csv")(src)  # val lists a negative itself: its rest stays unknown
    assert inferred.rest["val"]["full"] == -1 and any("val" in n for n in inferred.notes)
    (src / "val.csv").write_text("img/6.jpg,a\nimg/7.jpg,b\n")
    inferred = get_reader("csv")(src)  # positives only: unlisted classes become negatives, with a note
    assert inferred.rest["val"]["full"] == 0 and any("val" in n and "negative" in n for n in inferred.notes)
    with pytest.raises(UsageError, match="--rest"):
        get_reader("csv")(src, rest="val=maybe")


def test_non_utf8_csv_names_the_file_and_line(tmp_path, capsys):
    from shards.__main__ import main
    src = csv_dataset(tmp_path / "raw", [["img/6.jpg", "a", "b"]])
    (src / "train.csv").write_bytes(b"img/0.jpg,a\nimg/1.jpg,b\nimg/\xe9t\xe9.jpg,c\n")
    code, text = call(main, ["build", "csv", "--src", str(src), "--out", str(tmp_path / "out"), "--workers", "1"],
                      capsys)
    assert code == 1
    assert f"{src / 'train.csv'}:3: not UTF-8" in one_error_line(text)


def test_metrics_count_known_negatives_and_name_classes_without_one():
    from sklearn.metrics import average_precision_score

    from bgtrain.evaluate import report
    from bgtrain.metrics import ap_with_counts
    labels = torch.tensor([[1, 1, 0], [0, 1, -1], [1, 1, 0], [-1, 1, 1]], dtype=torch.int8)
    scores = torch.tensor([[0.9, 0.1, 0.3], [0.2, 0.8, 0.5], [0.4, 0.3, 0.2], [0.7, 0.6, 0.9]])
    res = ap_with_counts(scores, labels)
    manifest = {"classes": ["cat", "dog", "car"], "train_counts": {"obs_pos": [1, 2, 3]}, "dataset": "t"}
    out = report(res.ap, manifest, 1, "zero", res.n_pos, "obs_pos", res.n_known - res.n_pos)
    assert out["all"]["n_negatives"] == 3 and out["groups"][0]["n_negatives"] == 3
    assert out["all"]["n_no_negative"] == 1 and out["no_negative_classes"] == ["dog"]
    assert [c["n_neg"] for c in out["per_class"]] == [1, 0, 2]
    # the class without a negative scores AP 1 whatever the model: exactly why it is named
    assert out["per_class"][1]["ap"] == 1.0
    assert out["per_class"][0]["ap"] == pytest.approx(average_precision_score([1, 0, 1], [0.9, 0.2, 0.4]))


# ------------------------------------------------------------------ damaged images and tars

def test_jpeg_with_zeroed_scan_data_is_rejected_by_build_and_verify(tmp_path):
    from shards.build import BuildOptions, build
    from shards.images import Rejected, check_jpeg, prepare
    from shards.readers import get_reader
    good = jpeg(0)
    bad = zero_scan_data(good)
    Image.open(io.BytesIO(bad)).load()  # PIL alone decodes it without a word: the reason for the check
    with pytest.raises(Rejected, match="Corrupt JPEG data"):
        prepare(bad)
    with pytest.raises(Rejected, match="Corrupt JPEG data"):
        check_jpeg(bad)
    assert check_jpeg(good) == (40, 30) and prepare(good)[1] == []
    src = csv_dataset(tmp_path / "raw", [["img/6.jpg", "a", "b"]])
    (src / "img" / "2.jpg").write_bytes(bad)
    m = build(get_reader("csv")(src), tmp_path / "out", BuildOptions(shard_size=4), show_progress=False)
    assert m["inputs"]["train"]["rejected"] == 1 and m["inputs"]["train"]["written"] == 5
    rejected = [json.loads(x) for x in (tmp_path / "out" / "rejected.jsonl").read_text().splitlines()]
    assert rejected[0]["ref"] == "img/2.jpg" and "Corrupt JPEG data" in rejected[0]["reason"]


@pytest.fixture(scope="module")
def tiny_shards(tmp_path_factory) -> Path:
    from shards.synthetic import build
    out = tmp_path_factory.mktemp("tiny") / "shards"
    build(out, num_classes=5, n_train=40, n_val=10, n_test=10, size=32, seed=0, shard_size=20)
    return out


def test_verify_names_a_truncated_tar_in_one_line(tiny_shards, tmp_path, capsys):
    from shards.__main__ import main
    out = tmp_path / "shards"
    shutil.copytree(tiny_shards, out)
    tar = out / "train" / "train-000001.tar"
    os.truncate(tar, tar.stat().st_size // 2)
    code, text = call(main, ["verify", str(out)], capsys)
    assert code == 1 and "Traceback" not in text
    lines = [line for line in text.splitlines() if "unreadable tar" in line]
    assert len(lines) == 1 and str(tar) in lines[0]


def test_preflight_fails_a_half_truncated_tar_naming_it(tiny_shards, tmp_path, capsys):
    from cluster.preflight import main
    out = tmp_path / "shards"
    shutil.copytree(tiny_shards, out)
    tar = out / "val" / "val-000000.tar"
    os.truncate(tar, tar.stat().st_size // 2)
    code, text = call(main, ["--shards", str(out), "--timeout", "30"], capsys)
    text = text.replace("\n", "")  # rich wraps the table and the summary at the terminal width
    assert code == 1 and "Traceback" not in text
    assert "val-000000.tar: " in text and "truncated" in text
    (out / "val" / "val-000000.idx").unlink()  # without an index, walking the headers still finds the cut
    code, text = call(main, ["--shards", str(out), "--timeout", "30"], capsys)
    text = text.replace("\n", "")
    assert code == 1 and "val-000000.tar: " in text and "truncated" in text
    code, text = call(main, ["--shards", str(out), "--timeout", "30", "--quick"], capsys)
    assert code == 0  # --quick only reads the first member, which is still there


def test_synthetic_refuses_an_existing_out_and_a_negative_shard_size(tiny_shards, tmp_path, capsys):
    from shards.__main__ import main
    args = ["synthetic", "--classes", "3", "--train", "8", "--val", "2", "--test", "2", "--size", "16"]
    code, text = call(main, args + ["--out", str(tmp_path / "new"), "--shard-size", "-3"], capsys)
    assert code == 2 and "--shard-size" in one_error_line(text) and not (tmp_path / "new").exists()
    out = tmp_path / "old"
    shutil.copytree(tiny_shards, out)
    code, text = call(main, args + ["--out", str(out)], capsys)
    assert code == 2 and str(out) in one_error_line(text) and "--overwrite" in text
    assert (out / "train" / "train-000001.tar").exists()
    code, text = call(main, args + ["--out", str(out), "--shard-size", "4", "--overwrite"], capsys)
    assert code == 0
    assert sorted(p.name for p in (out / "train").glob("*.tar")) == ["train-000000.tar", "train-000001.tar"]


# ------------------------------------------------------------------ checkpoints

def train_args(shards: Path, out: Path, *extra: str) -> list[str]:
    return ["--config", SMOKE, f"data.shards={shards}", f"out_dir={out}", "data.image_size=32", "data.workers=0",
            "data.batch_size=8", "data.max_batches=2", "optim.epochs=2", "checkpoint.every_steps=1",
            "checkpoint.keep_last=10", "log_every=1", *extra]


@pytest.fixture(scope="module")
def trained(tiny_shards, tmp_path_factory) -> Path:
    """A finished 2-epoch run with a checkpoint after every step: steps 1 and 3 mid-epoch, 2 and 4 at epoch ends."""
    from bgtrain.train import main
    out = tmp_path_factory.mktemp("trained") / "run"
    assert run_cli(main, train_args(tiny_shards, out)) == 0
    return out


def copy_run(run: Path, dst: Path) -> Path:
    shutil.copytree(run, dst)
    return dst


def test_fresh_run_refuses_an_out_dir_with_another_run(trained, tiny_shards, tmp_path, capsys):
    from bgtrain.train import main
    run = copy_run(trained, tmp_path / "run")
    code, text = call(main, train_args(tiny_shards, run), capsys)
    assert code == 2 and f"out_dir {run} holds another run" in one_error_line(text) and "--overwrite" in text
    old_lines = (run / "metrics.jsonl").read_text()
    code, text = call(main, train_args(tiny_shards, run, "optim.epochs=1", "data.max_batches=1") + ["--overwrite"],
                      capsys)
    assert code == 0, text
    replaced = list(run.glob("replaced-*"))
    assert len(replaced) == 1 and (replaced[0] / "metrics.jsonl").read_text() == old_lines
    kinds = [json.loads(line)["kind"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    # only the new run's lines (one epoch; a checkpoint after its one step and at its end)
    assert kinds == ["train", "checkpoint", "data", "val", "checkpoint", "epoch", "test"]
    assert sorted(p.name for p in (run / "checkpoints").glob("step-*.pt")) == ["step-000000001.pt"]


def test_resume_latest_skips_truncated_and_empty_checkpoints_and_says_why(trained, tiny_shards, tmp_path):
    run = copy_run(trained, tmp_path / "run")
    folder = run / "checkpoints"
    newest, second = folder / "step-000000004.pt", folder / "step-000000003.pt"
    os.truncate(newest, newest.stat().st_size // 3)
    second.write_bytes(b"")
    cfg = load_config(SMOKE, train_args(tiny_shards, run, "checkpoint.resume=latest")[2:])
    cfg, notes = ckpt.prepare_resume(cfg, world_size=1)
    assert cfg.checkpoint.resume == str(folder / "step-000000002.pt")
    assert f"skipped checkpoint {newest}: truncated" in "\n".join(notes)
    assert f"skipped checkpoint {second}: zero bytes" in "\n".join(notes)


def test_pruning_keeps_this_runs_history_not_the_highest_steps(tmp_path):
    saver = ckpt.CheckpointSaver(tmp_path, keep_last=2)
    foreign = tmp_path / "step-000000900.pt"
    torch.save({"other": 1}, foreign)  # another run's higher step, in the folder before this run's history
    for step in (1, 2, 3):
        saver.save({"step": step}, step)
    saver.wait()
    assert foreign.exists()
    assert sorted(p.name for p in saver.steps()) == ["step-000000002.pt", "step-000000003.pt", "step-000000900.pt"]
    assert ckpt.CheckpointSaver(tmp_path).latest() == tmp_path / "step-000000003.pt"


def test_a_failed_save_leaves_no_temporary_file(tmp_path, monkeypatch):
    def disk_full(obj, f):
        f.write(b"x" * 1000)
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(torch, "save", disk_full)
    saver = ckpt.CheckpointSaver(tmp_path)
    saver.save({"a": 1}, 5)
    with pytest.raises(DataError, match=f"^checkpoint {tmp_path / 'step-000000005.pt'} was not written: No space"):
        saver.wait()
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_resume_from_a_path_into_a_new_out_dir_brings_best_along(trained, tiny_shards, tmp_path, capsys):
    from bgtrain.train import main
    src = trained / "checkpoints" / "step-000000004.pt"
    new = tmp_path / "new"
    code, text = call(main, train_args(tiny_shards, new, f"checkpoint.resume={src}"), capsys)
    assert code == 0, text
    assert (new / "checkpoints" / "best.pt").is_file() and f"copied {trained / 'checkpoints' / 'best.pt'}" in text
    assert json.loads((new / "results.json").read_text())["test_map"] == pytest.approx(
        json.loads((trained / "results.json").read_text())["test_map"], abs=1e-9)


def test_config_change_on_resume_is_printed_and_breaking_keys_refused(trained, tiny_shards, tmp_path, capsys):
    from bgtrain.train import main
    run = copy_run(trained, tmp_path / "run")
    code, text = call(main, train_args(tiny_shards, run, "checkpoint.resume=latest", "loss.scheme=AN"), capsys)
    assert code == 2 and "loss.scheme ('LL-R' -> 'AN')" in one_error_line(text) and "--force-resume" in text
    cfg = load_config(SMOKE, train_args(tiny_shards, run, "checkpoint.resume=latest", "loss.scheme=AN",
                                        "optim.lr=0.001")[2:])
    cfg, notes = ckpt.prepare_resume(cfg, world_size=1, force=True)
    assert "config changed on resume: loss.scheme: 'LL-R' -> 'AN'" in notes
    assert "config changed on resume: optim.lr: 0.0001 -> 0.001" in notes


def test_mid_epoch_resume_with_another_world_or_batch_refuses_epoch_end_works(trained, tiny_shards, tmp_path):
    run = copy_run(trained, tmp_path / "run")
    mid = run / "checkpoints" / "step-000000003.pt"
    cfg = load_config(SMOKE, train_args(tiny_shards, run, f"checkpoint.resume={mid}", "data.batch_size=4")[2:])
    with pytest.raises(UsageError) as e:
        ckpt.prepare_resume(cfg, world_size=1)
    msg = str(e.value)
    assert "mid-epoch (epoch 2, batch 1)" in msg and "data.batch_size 8" in msg and "data.batch_size 4" in msg
    assert f"end-of-epoch checkpoint {run / 'checkpoints' / 'step-000000004.pt'}" in msg  # the newest one kept
    cfg = load_config(SMOKE, train_args(tiny_shards, run, f"checkpoint.resume={mid}")[2:])
    with pytest.raises(UsageError, match="world size 1; this run has world size 2"):
        ckpt.prepare_resume(cfg, world_size=2)
    end = run / "checkpoints" / "step-000000002.pt"
    cfg = load_config(SMOKE, train_args(tiny_shards, run, f"checkpoint.resume={end}", "data.batch_size=4")[2:])
    cfg, _ = ckpt.prepare_resume(cfg, world_size=2)
    assert cfg.checkpoint.resume == str(end)


# ------------------------------------------------------------------ one line per expected error

def test_deepspeed_without_torchrun_is_one_line(tiny_shards, tmp_path, capsys, monkeypatch):
    from bgtrain.train import main
    monkeypatch.delenv("RANK", raising=False)
    code, text = call(main, train_args(tiny_shards, tmp_path / "ds", "engine.engine=deepspeed"), capsys)
    assert code == 2 and "engine.engine=deepspeed" in one_error_line(text) and "torchrun" in text


def test_missing_shard_folder_is_one_line(tmp_path, capsys):
    from bgtrain.train import main
    code, text = call(main, train_args(tmp_path / "nowhere", tmp_path / "run"), capsys)
    assert code == 1 and str(tmp_path / "nowhere" / "manifest.json") in one_error_line(text)
    assert len([line for line in text.splitlines() if line.strip()]) == 1


def test_evaluate_checks_groups_before_anything_else(tmp_path, capsys, tiny_shards, monkeypatch):
    from bgtrain.evaluate import main
    # The checkpoint does not even exist: the groups are refused before it would be loaded or scored.
    code, text = call(main, ["--checkpoint", str(tmp_path / "none.pt"), "--shards", str(tiny_shards),
                             "--groups", "-2"], capsys)
    assert code == 2 and "--groups -2" in one_error_line(text)
    monkeypatch.setenv("BGTRAIN_DEBUG", "1")
    code, text = call(main, ["--checkpoint", str(tmp_path / "none.pt"), "--shards", str(tiny_shards),
                             "--groups", "-2"], capsys)
    assert code == 2 and "Traceback" in text


def test_evaluate_on_shards_with_another_class_count_names_both(trained, tmp_path, capsys):
    from bgtrain.evaluate import main
    from shards.synthetic import build
    other = tmp_path / "other"
    build(other, num_classes=3, n_train=8, n_val=2, n_test=4, size=32, seed=0, shard_size=8)
    best = trained / "checkpoints" / "best.pt"
    code, text = call(main, ["--checkpoint", str(best), "--shards", str(other), "--groups", "1"], capsys)
    line = one_error_line(text)
    assert code == 1 and "5 classes" in line and f"{other} has 3" in line


def test_evaluate_names_a_class_mismatch_before_any_other_check(tmp_path):
    """A 6-class checkpoint on 4-class shards: one line naming the mismatch, both counts and which is which, before
    the --groups check (5 groups, more than the shards' 4 classes), which would hide it."""
    from bgtrain.config import to_dict
    from bgtrain.model import build_model
    from shards.synthetic import build
    cfg = load_config(SMOKE, ["model.pretrained=null"])
    six, four = tmp_path / "six.pt", tmp_path / "four"
    ckpt.atomic_save({"engine": {"model": build_model(cfg.model, 6).state_dict()}, "config": to_dict(cfg)}, six)
    build(four, num_classes=4, n_train=8, n_val=2, n_test=4, size=32, seed=0, shard_size=8)
    proc = subprocess.run([sys.executable, "-m", "bgtrain.evaluate", "--checkpoint", str(six), "--shards", str(four),
                           "--groups", "5"], cwd=REPO, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "BGTRAIN_DEBUG": "0"})
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert [line for line in proc.stderr.splitlines() if line.strip()] == [
        f"bgtrain.evaluate: error: class mismatch: --checkpoint {six} was trained on 6 classes but --shards {four} "
        "has 4; evaluate it on its own dataset (BGTRAIN_DEBUG=1 shows the traceback)"]


def test_explain_on_a_non_image_is_one_line(trained, tmp_path, capsys):
    from bgtrain.explain.__main__ import main
    fake = tmp_path / "notes.jpg"
    fake.write_text("not a picture")
    code, text = call(main, ["overlay", "--checkpoint", str(trained / "checkpoints" / "best.pt"),
                             "--images", str(fake), "--out", str(tmp_path / "ov")], capsys)
    assert code in (1, 2) and "Traceback" not in text
    assert [line for line in text.splitlines() if "error" in line] == [f"error: --images: {fake} is not an image PIL "
                                                                       "can read (UnidentifiedImageError)"]


@pytest.mark.parametrize("argv, code, culprit", [
    (["shards", "verify", "/nonexistent/shards"], 1, "/nonexistent/shards/manifest.json"),
    (["bgtrain.train", "--config", "/nonexistent.yaml"], 2, "/nonexistent.yaml"),
    (["bgtrain.evaluate", "--checkpoint", "/nonexistent.pt", "--shards", "/nonexistent/s"], 1,
     "/nonexistent/s/manifest.json"),
    (["bgtrain.reproduce", "--table", "demo", "--shards", "x", "--out", "{tmp}", "optim.nope=1"], 2, "optim.nope"),
    (["cluster.preflight", "--config", "/nonexistent.yaml"], 1, "/nonexistent.yaml"),
])
def test_every_cli_module_prints_one_line_and_its_exit_code(argv, code, culprit, tmp_path):
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    proc = subprocess.run([sys.executable, "-m", *argv], cwd=REPO, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "BGTRAIN_DEBUG": "0"})
    assert proc.returncode == code, proc.stderr
    assert "Traceback" not in proc.stderr and culprit in proc.stderr


def test_data_and_usage_errors_have_their_exit_codes():
    def boom(error):
        def main():
            raise error
        return main
    assert run_cli(boom(DataError("x"))) == 1 and run_cli(boom(UsageError("x"))) == 2
    assert run_cli(boom(FileNotFoundError(2, "No such file", "/a/b"))) == 1


# ------------------------------------------------------------------ skipped samples are counted end to end

def with_one_corrupt_test_sample(shards: Path, dst: Path) -> Path:
    """A copy of ``shards`` whose first test shard has one JPEG replaced by garbage (its manifest entry rewritten)."""
    import tarfile

    from shards.format import SampleLabels, ShardWriter, decode_labels, sample_key, write_json_atomic
    out = Path(shutil.copytree(shards, dst))
    manifest = json.loads((out / "manifest.json").read_text())
    entry = manifest["splits"]["test"]["shards"][0]
    tar = out / "test" / entry["name"]
    with tarfile.open(tar) as t:
        members = {m.name: t.extractfile(m).read() for m in t.getmembers() if m.isfile()}
    keys = sorted({name.rsplit(".", 1)[0] for name in members})
    writer = ShardWriter(tar)
    for i, key in enumerate(keys):
        labels: SampleLabels = decode_labels(members[f"{key}.lbl"])
        assert sample_key("test", labels.sample_id) == key
        jpeg = b"<html>not a jpeg</html>" if i == 0 else members[f"{key}.jpg"]
        writer.write(key, jpeg, labels, manifest["classes"])
    manifest["splits"]["test"]["shards"][0] = writer.close()
    write_json_atomic(out / "manifest.json", manifest)
    return out


def test_a_corrupt_test_sample_is_counted_in_results_metrics_and_map_json(tiny_shards, tmp_path, capsys):
    from bgtrain.evaluate import main as evaluate
    from bgtrain.train import main as train
    shards = with_one_corrupt_test_sample(tiny_shards, tmp_path / "shards")
    out = tmp_path / "run"
    assert run_cli(train, train_args(shards, out, "optim.epochs=1", "data.max_corrupt_fraction=0.5")) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["data"] == {"samples": 10, "corrupt": 1, "padding": results["data"]["padding"], "retries": 0}
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["corrupt"] for r in records if r["kind"] == "data" and r["split"] == "train"] == [0]
    assert [r["data"]["corrupt"] for r in records if r["kind"] == "test"] == [1]
    assert "computed on 9 of 10 samples" in " ".join(capsys.readouterr().err.split())  # rich wraps lines
    code, text = call(evaluate, ["--checkpoint", str(out / "checkpoints" / "best.pt"), "--shards", str(shards),
                                 "--groups", "1", "--out", str(tmp_path / "eval")], capsys)
    assert code == 0 and "scored 9 of 10 samples" in text
    assert json.loads((tmp_path / "eval" / "map_test.json").read_text())["data"]["corrupt"] == 1
