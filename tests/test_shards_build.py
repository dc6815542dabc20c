"""The shard builder end to end: real layouts in, shards read back by webdataset and by DALI."""
from __future__ import annotations

import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from test_shards_readers import HTML, jpeg_bytes, make_coco, make_csv, make_cub, make_nuswide, make_openimages, make_voc

from shards.build import BuildOptions, build
from shards.format import decode_labels, read_manifest, sha256_file
from shards.images import Rejected, prepare
from shards.merge import merge, read_samples
from shards.readers import get_reader
from shards.verify import verify

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable
MAKERS = {"voc": make_voc, "coco": make_coco, "nuswide": make_nuswide, "cub": make_cub,
          "openimages": make_openimages, "csv": make_csv}
# (rejected, missing) planted by each fixture
PLANTED = {"voc": (2, 1), "coco": (1, 1), "nuswide": (1, 0), "cub": (0, 1), "openimages": (1, 3), "csv": (0, 0)}


def _build(dataset: str, tmp: Path, workers: int = 1, shard_size: int = 3, **opts) -> tuple[Path, dict]:
    src, out = tmp / "raw", tmp / "out"
    src.mkdir(parents=True, exist_ok=True)
    MAKERS[dataset](src)
    data = get_reader(dataset)(src)
    m = build(data, out, BuildOptions(max_side=32, shard_size=shard_size, **opts), workers=workers,
              show_progress=False)
    return out, m


def _samples(out: Path, split: str) -> list[tuple[str, bytes, bytes]]:
    m = read_manifest(out)
    return [(k, s["jpg"], s["lbl"]) for sh in m["splits"][split]["shards"]
            for k, s in read_samples(out / split / sh["name"])]


# ---------------------------------------------------------------- images

def test_rgb_jpeg_within_max_side_is_stored_byte_for_byte():
    data = jpeg_bytes(0, (40, 30))
    assert prepare(data, max_side=64) == (data, [])


@pytest.mark.parametrize("mode", ["L", "CMYK"])
def test_grey_and_cmyk_become_rgb_jpeg(mode):
    out, changes = prepare(jpeg_bytes(1, (40, 30), mode=mode), max_side=64)
    im = Image.open(io.BytesIO(out))
    assert (im.format, im.mode, im.size) == ("JPEG", "RGB", (40, 30)) and changes == [f"mode {mode}"]


def test_exif_rotation_is_applied_and_shrink_keeps_aspect():
    out, changes = prepare(jpeg_bytes(2, (80, 40), exif_orientation=6), max_side=20)
    im = Image.open(io.BytesIO(out))
    assert im.size == (10, 20)  # 90 degrees turned, longer side 20
    assert im.getexif().get(0x0112) is None and "exif orientation 6" in changes


def test_png_is_reencoded_and_reencoding_is_deterministic():
    buf = io.BytesIO()
    Image.new("RGBA", (50, 20), (10, 200, 30, 128)).save(buf, format="PNG")
    a, b = prepare(buf.getvalue(), 32, 90), prepare(buf.getvalue(), 32, 90)
    assert a == b and Image.open(io.BytesIO(a[0])).format == "JPEG"


@pytest.mark.parametrize("data,reason", [(jpeg_bytes(3)[:300], "cannot decode"), (HTML, "not an image"),
                                         (b"", "empty")])
def test_bad_files_are_rejected_with_a_reason(data, reason):
    with pytest.raises(Rejected, match=reason):
        prepare(data, 64)


# ---------------------------------------------------------------- builds

@pytest.mark.parametrize("dataset", sorted(MAKERS))
def test_every_dataset_builds_reports_bad_inputs_and_reconciles(dataset, tmp_path):
    out, m = _build(dataset, tmp_path)
    data = get_reader(dataset)(tmp_path / "raw")
    assert (m["rejected"], m["missing"]) == PLANTED[dataset]
    for split, c in m["inputs"].items():
        assert c["inputs"] == len(data.splits[split]) == c["written"] + c["rejected"] + c["missing"]
        assert c["written"] == m["splits"][split]["num_samples"]
    rejected = [json.loads(x) for x in (out / "rejected.jsonl").read_text().splitlines()]
    assert len(rejected) == m["rejected"] and all(r["reason"] for r in rejected)
    assert len((out / "missing.jsonl").read_text().splitlines()) == m["missing"]
    assert m["annotation_problems"] == data.problems.summary()
    assert verify(out) == []


def test_shards_hold_what_the_index_says_and_train_counts_match(tmp_path):
    out, m = _build("voc", tmp_path)
    data = get_reader("voc")(tmp_path / "raw")
    by_ref = {r.ref: r for recs in data.splits.values() for r in recs}
    full = []
    for split in m["splits"]:
        index = [json.loads(x) for x in (out / "index" / f"{split}.jsonl").read_text().splitlines()]
        samples = _samples(out, split)
        assert [i["id"] for i in index] == list(range(len(samples))) == [decode_labels(s[2]).sample_id for s in samples]
        for entry, (_, jpg, lbl) in zip(index, samples):
            lab, rec = decode_labels(lbl), by_ref[entry["ref"]]
            assert (tuple(lab.obs_pos), tuple(lab.full_pos)) == (rec.obs_pos, rec.full_pos)
            assert jpg == Path(rec.path).read_bytes() or max(Image.open(io.BytesIO(jpg)).size) <= 32
            if split == "train":
                full.append(lab.full_pos)
    pos = np.bincount([c for p in full for c in p], minlength=20)
    assert m["train_counts"]["full_pos"] == pos.tolist()
    assert m["train_counts"]["full_neg"] == (len(full) - pos).tolist()
    observed = [c for s in _samples(out, "train") for c in decode_labels(s[2]).obs_pos]
    assert len(observed) == len(full)  # one single positive per training image
    assert m["train_counts"]["obs_pos"] == np.bincount(observed, minlength=20).tolist()


def test_dali_index_is_what_wds2idx_writes(tmp_path):
    out, m = _build("csv", tmp_path)
    wds2idx = shutil.which("wds2idx", path=str(Path(PY).parent))
    assert wds2idx, "wds2idx ships with nvidia-dali; it should be next to the venv python"
    for sh in m["splits"]["train"]["shards"]:
        tar = out / "train" / sh["name"]
        subprocess.run([wds2idx, str(tar), str(tmp_path / "ref.idx")], check=True, capture_output=True)
        assert tar.with_suffix(".idx").read_text() == (tmp_path / "ref.idx").read_text()


def test_webdataset_reads_back_the_labels(tmp_path):
    import webdataset as wds
    out, m = _build("openimages", tmp_path)
    for split, info in m["splits"].items():
        urls = [str(out / split / s["name"]) for s in info["shards"]]
        got = [(s["__key__"], decode_labels(s["lbl"]), Image.open(io.BytesIO(s["jpg"])).mode)
               for s in wds.WebDataset(urls, shardshuffle=False)]
        expected = [(k, decode_labels(lbl)) for k, _, lbl in _samples(out, split)]
        assert [(k, lab) for k, lab, _ in got] == expected and {mode for *_, mode in got} == {"RGB"}
        assert len(got) == info["num_samples"]


def test_dali_cpu_pipeline_reads_back_images_and_labels(tmp_path):
    from nvidia.dali import fn, pipeline_def, types
    out, m = _build("voc", tmp_path)
    shards = m["splits"]["train"]["shards"]
    paths = [str(out / "train" / s["name"]) for s in shards]
    expected = _samples(out, "train")

    @pipeline_def(batch_size=len(expected), num_threads=1, device_id=None)
    def pipe():
        jpg, lbl = fn.readers.webdataset(paths=paths, index_paths=[p[:-4] + ".idx" for p in paths],
                                         ext=["jpg", "lbl"], dtypes=[types.UINT8, types.INT32],
                                         missing_component_behavior="skip", name="reader")
        return fn.decoders.image(jpg, device="cpu", output_type=types.RGB), lbl

    p = pipe()
    p.build()
    images, labels = p.run()
    for i, (_, jpg, lbl) in enumerate(expected):
        assert decode_labels(np.array(labels[i])) == decode_labels(lbl)
        w, h = Image.open(io.BytesIO(jpg)).size
        assert np.array(images[i]).shape == (h, w, 3)


def test_output_does_not_depend_on_worker_count(tmp_path):
    a, ma = _build("coco", tmp_path / "a", workers=1)
    b, mb = _build("coco", tmp_path / "b", workers=2)
    assert ma["splits"] == mb["splits"]  # same sha256 for every tar


def test_resume_skips_done_shards(tmp_path):
    out, m = _build("csv", tmp_path)
    first = out / "train" / m["splits"]["train"]["shards"][0]["name"]
    stamp = first.stat().st_mtime_ns
    (out / "train" / m["splits"]["train"]["shards"][-1]["name"]).unlink()  # as if killed before the last shard
    m2 = build(get_reader("csv")(tmp_path / "raw"), out, BuildOptions(max_side=32, shard_size=3), show_progress=False)
    assert first.stat().st_mtime_ns == stamp and m2["splits"] == m["splits"]
    with pytest.raises(RuntimeError, match="other inputs or settings"):
        build(get_reader("csv")(tmp_path / "raw"), out, BuildOptions(max_side=64, shard_size=3), show_progress=False)


@pytest.mark.slow  # two CLI builds and a kill
def test_kill_mid_build_then_rerun_equals_clean_build(tmp_path):
    src = tmp_path / "raw"
    make_csv(src, n_train=120, size=(320, 240))
    cmd = [PY, "-m", "shards", "build", "csv", "--src", str(src), "--max-side", "100", "--shard-size", "6",
           "--workers", "1"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    clean, crashed = tmp_path / "clean", tmp_path / "crashed"
    subprocess.run(cmd + ["--out", str(clean)], check=True, env=env, cwd=ROOT, capture_output=True)
    proc = subprocess.Popen(cmd + ["--out", str(crashed)], env=env, cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 60
    while not (crashed / ".done" / "train-000002.json").exists() and time.time() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (crashed / "manifest.json").exists(), "the build finished before it could be killed"
    subprocess.run(cmd + ["--out", str(crashed)], check=True, env=env, cwd=ROOT, capture_output=True)
    tars = sorted(p.relative_to(clean) for p in clean.rglob("*.tar"))
    assert tars and tars == sorted(p.relative_to(crashed) for p in crashed.rglob("*.tar"))
    for rel in tars:
        assert sha256_file(clean / rel) == sha256_file(crashed / rel)
        assert (clean / rel).with_suffix(".idx").read_bytes() == (crashed / rel).with_suffix(".idx").read_bytes()
    assert not list(crashed.rglob("*.partial"))


def test_parts_merge_to_the_same_samples_as_one_build(tmp_path):
    one, m1 = _build("openimages", tmp_path / "one")
    data = get_reader("openimages")(tmp_path / "one" / "raw")
    out = tmp_path / "parts"
    from shards.merge import part_dir
    for part in range(3):
        build(data, part_dir(out, part), BuildOptions(max_side=32, shard_size=3, part=part, parts=3),
              show_progress=False)
    m = merge(out, workers=2)
    for split in m1["splits"]:
        assert _samples(out, split) == _samples(one, split)
        assert (out / "index" / f"{split}.jsonl").read_text() == (one / "index" / f"{split}.jsonl").read_text()
    assert m["train_counts"] == m1["train_counts"] and (m["rejected"], m["missing"]) == (m1["rejected"], m1["missing"])
    assert verify(out) == []


def test_verify_catches_a_changed_byte(tmp_path):
    out, m = _build("csv", tmp_path)
    tar = out / "train" / m["splits"]["train"]["shards"][0]["name"]
    data = bytearray(tar.read_bytes())
    data[700] ^= 0xFF  # inside the first JPEG
    tar.chmod(0o644)
    tar.write_bytes(bytes(data))
    assert any("sha256" in e for e in verify(out))


@pytest.mark.slow  # five CLI runs
def test_cli_dry_run_stats_verify_and_bench(tmp_path):
    src = tmp_path / "raw"
    make_cub(src)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}

    def run(*args):
        return subprocess.run([PY, "-m", "shards", *args], env=env, cwd=ROOT, capture_output=True, text=True,
                              check=True).stdout
    dry = json.loads(run("build", "cub", "--src", str(src), "--out", str(tmp_path / "o"), "--dry-run"))
    assert dry["splits"]["test"]["inputs"] == 3 and sum(s["missing"] for s in dry["splits"].values()) == 1
    assert not (tmp_path / "o").exists()
    run("build", "cub", "--src", str(src), "--out", str(tmp_path / "o"), "--workers", "2")
    assert "has_bill_shape::curved" in run("stats", str(tmp_path / "o"))
    assert "OK" in run("verify", str(tmp_path / "o"))
    last = json.loads(run("bench", "--images", str(src), "--max-side", "16").strip().splitlines()[-1])
    assert last["speedup_vs_pil"] > 0
