"""Array builds that scale: a part builds only its slice's records, the merge renumbers tars in place instead of
rewriting them, and ``verify --workers K`` gives the serial report."""
from __future__ import annotations

import csv
import io
import json
import os
import random
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
from reference_openimages import reference_split

import shards.merge as merge_mod
import shards.readers.openimages as oi
from shards.build import BuildOptions, build, id_width, plan_part, shuffled
from shards.format import ShardWriter, decode_labels, read_manifest
from shards.merge import MergeError, merge, part_dir, read_samples
from shards.readers import get_reader
from shards.scale import make_raw
from shards.verify import verify

ROOT = Path(__file__).resolve().parents[1]
OPTS = {"max_side": 32, "shard_size": 4}


def _raw(root: Path, n_train: int = 40) -> Path:
    """An OpenImages layout of tiny images: 7 classes, one train image missing and one truncated."""
    make_raw(root, n_train, 12, 12, classes=7, images=True)
    images = sorted((root / "images" / "train").iterdir())
    images[3].unlink()
    data = images[5].read_bytes()
    images[5].unlink()
    images[5].write_bytes(data[:60])
    return root


def _messy(root: Path, quotes: bool = True, crlf: bool = True) -> None:
    """Append every kind of bad annotation, shuffled among the good rows, and an image list that omits one image.

    Quotes or lone CRs send the file through the csv module; without them it is scanned in numpy.
    """
    path = root / "train" / "annotations-human.csv"
    rows = list(csv.reader(path.open(newline="")))
    head, body = rows[0], rows[1:]
    rng = random.Random(0)
    extra = []
    for i in range(300):
        r = list(rng.choice(body))
        k = rng.random()
        if k < 0.35:
            r[3] = rng.choice("01")                  # duplicate or conflicting annotation
        elif k < 0.5:
            r[2] = f"/m/zz{i}"                       # unknown class
        elif k < 0.6:
            r[3] = "2"                               # bad line
        elif k < 0.7:
            r = r[:2]                                # short line
        elif k < 0.8 and quotes:
            r[1] = "quoted, with a comma"
        elif k < 0.8:
            r = r + ["a fifth field"]
        extra.append(r)
    body += extra
    rng.shuffle(body)
    with path.open("w", newline="") as f:
        csv.writer(f, lineterminator="\r\n" if crlf else "\n").writerows([head] + body[:50] + [[]] + body[50:])
    ids = sorted({r[0] for r in body if r})
    with (root / "train" / "images.csv").open("w", newline="") as f:
        csv.writer(f).writerows([["ImageID", "Subset"]] + [[i, "train"] for i in ids[1:]])
    with (root / "class-descriptions.csv").open("a") as f:
        f.write("/m/untrainable,Not trainable\n")
    with path.open("a", newline="") as f:
        csv.writer(f, lineterminator="\r\n" if crlf else "\n").writerow([ids[2], "verification", "/m/untrainable",
                                                                          "1"])


def _reference(src: Path, monkeypatch: pytest.MonkeyPatch):
    with monkeypatch.context() as m:
        m.setattr(oi, "_split", reference_split)
        return get_reader("openimages")(src)


def _samples(root: Path, split: str) -> list[tuple]:
    """(key, jpg, lbl, parsed json) of every sample of a split, in order."""
    m = read_manifest(root)
    return [(k, s["jpg"], s["lbl"], json.loads(s["json"])) for sh in m["splits"][split]["shards"]
            for k, s in read_samples(root / split / sh["name"])]


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _parts(data, out: Path, parts: int = 3) -> None:
    for part in range(parts):
        build(data, part_dir(out, part), BuildOptions(**OPTS, part=part, parts=parts), show_progress=False)


# ---------------------------------------------------------------- a part reads at scan speed, builds its slice only

@pytest.mark.parametrize("quotes,crlf", [(True, True), (False, False), (False, True)],
                         ids=["csv module", "numpy", "numpy, CRLF"])
def test_openimages_reader_equals_the_reference_reader(tmp_path, monkeypatch, quotes, crlf):
    src = _raw(tmp_path / "raw")
    _messy(src, quotes, crlf)
    scans = []
    monkeypatch.setattr(oi, "_scan_rows", lambda *a, _scan=oi._scan_rows: scans.append("csv") or _scan(*a))
    new, ref = get_reader("openimages")(src), _reference(src, monkeypatch)
    assert ("csv" in scans) == quotes
    for split in ref.splits:
        assert list(new.splits[split]) == ref.splits[split]
    assert new.problems.summary() == ref.problems.summary() and new.problems.examples == ref.problems.examples
    assert new.problems.summary()["duplicate_annotation"] > new.problems.max_examples  # more than the examples kept
    assert {"conflicting_annotation", "unknown_class", "bad_line", "not_in_image_list",
            "untrainable_class"} <= set(new.problems.counts)


@pytest.mark.parametrize("text", ["ImageID,Source,LabelName,Confidence\n", "ImageID,Source,LabelName,Confidence",
                                  "", "\n", "ImageID,Source,LabelName,Confidence\r\nx\u00e9,v,/m/0x,1\r\n,,,\r\n",
                                  "ImageID,Source,LabelName,Confidence\nab,v,/m/00000,1\na,v,/m/00001,0\nab,v,/m/00000,0"],
                         ids=["header", "header without newline", "empty", "blank", "non-ASCII, CRLF", "unsorted"])
def test_openimages_reader_equals_the_reference_reader_on_small_files(tmp_path, monkeypatch, text):
    src = _raw(tmp_path / "raw", n_train=8)
    (src / "test" / "annotations-human.csv").write_text(text, encoding="utf-8", newline="")
    try:
        ref = _reference(src, monkeypatch)
    except ValueError as e:
        with pytest.raises(ValueError, match="header"):
            get_reader("openimages")(src)
        assert "header" in str(e)
        return
    new = get_reader("openimages")(src)
    assert list(new.splits["test"]) == ref.splits["test"]
    assert new.problems.examples == ref.problems.examples and new.problems.summary() == ref.problems.summary()


def test_a_part_builds_the_records_of_its_slice_only(tmp_path, monkeypatch):
    data = get_reader("openimages")(_raw(tmp_path / "raw"))
    built = []
    original = oi.LabelledImages.__getitem__
    monkeypatch.setattr(oi.LabelledImages, "__getitem__", lambda self, k: built.append(k) or original(self, k))
    for part in range(3):
        built.clear()
        plan, ranges = plan_part(data, BuildOptions(part=part, parts=3))
        assert len(built) == sum(len(r) for r in plan.values())
        for split, records in data.splits.items():
            a, b = ranges[split]
            assert plan[split] == shuffled(list(records), split, 1200)[a:b]


def test_a_build_from_lazy_records_is_byte_identical_to_one_from_the_reference_reader(tmp_path, monkeypatch):
    src = _raw(tmp_path / "raw")
    _messy(src)
    for name, data in (("new", get_reader("openimages")(src)), ("ref", _reference(src, monkeypatch))):
        build(data, tmp_path / name, BuildOptions(**OPTS), show_progress=False)
        build(data, part_dir(tmp_path / f"{name}-parts", 1), BuildOptions(**OPTS, part=1, parts=3),
              show_progress=False)
    assert _files(tmp_path / "new") == _files(tmp_path / "ref")
    assert _files(tmp_path / "new-parts") == _files(tmp_path / "ref-parts")


# ---------------------------------------------------------------- merge: link and renumber, never copy an image

def test_merge_links_the_part_tars_and_writes_no_image(tmp_path, monkeypatch):
    data = get_reader("openimages")(_raw(tmp_path / "raw"))
    build(data, tmp_path / "one", BuildOptions(**OPTS), show_progress=False)
    out = tmp_path / "out"
    _parts(data, out)
    inodes = {p.stat().st_ino for p in (out / "parts").rglob("*.tar")}
    assert max(len(read_manifest(d)["splits"]["train"]["shards"]) for d in (out / "parts").iterdir()) > 1

    def no_rewrite(*a, **k):
        raise AssertionError("the merge wrote a tar")
    monkeypatch.setattr(merge_mod, "ShardWriter", no_rewrite)
    m = merge(out, workers=2, show_progress=False)
    assert not (out / "parts").exists() and not (out / ".done" / "merge.jsonl").exists()
    tars = [out / s / sh["name"] for s, i in m["splits"].items() for sh in i["shards"]]
    assert {t.stat().st_ino for t in tars} == inodes  # the same files, renamed
    one = read_manifest(tmp_path / "one")
    for split in one["splits"]:  # the same samples, ids and order as one build, and the same index
        assert _samples(out, split) == _samples(tmp_path / "one", split)
        assert (out / "index" / f"{split}.jsonl").read_bytes() == (tmp_path / "one" / "index" / f"{split}.jsonl"
                                                                   ).read_bytes()
    for name in ("rejected.jsonl", "missing.jsonl", "problems.jsonl"):
        assert (out / name).read_bytes() == (tmp_path / "one" / name).read_bytes()
    assert {k: m[k] for k in ("train_counts", "inputs", "rejected", "missing", "classes", "class_mids")} == \
        {k: one[k] for k in ("train_counts", "inputs", "rejected", "missing", "classes", "class_mids")}
    assert verify(out, show_progress=False) == []


def test_a_renumbered_tar_is_what_the_writer_writes_with_the_global_ids(tmp_path):
    data = get_reader("openimages")(_raw(tmp_path / "raw"))
    out = tmp_path / "out"
    _parts(data, out)
    m = merge(out, show_progress=False)
    for split, info in m["splits"].items():
        width = id_width(len(data.splits[split]))
        for sh in info["shards"]:
            tar = out / split / sh["name"]
            writer = ShardWriter(tmp_path / "ref.tar", id_width=width)
            for key, s in read_samples(tar):
                writer.write(key, s["jpg"], decode_labels(s["lbl"]), data.classes)
            writer.close()
            assert tar.read_bytes() == (tmp_path / "ref.tar").read_bytes()
            assert tar.with_suffix(".idx").read_bytes() == (tmp_path / "ref.idx").read_bytes()


def test_a_merge_stopped_midway_loses_nothing_and_resumes_to_the_same_result(tmp_path, monkeypatch):
    data = get_reader("openimages")(_raw(tmp_path / "raw"))
    clean, stopped = tmp_path / "clean", tmp_path / "stopped"
    _parts(data, clean)
    _parts(data, stopped)
    calls = []
    place = merge_mod.place

    def stop_at_the_sixth(p):
        calls.append(p)
        if len(calls) >= 6 and p.first_id != p.local_first:  # stops half-renumbered: some writes done, not all
            fd = os.open(p.src, os.O_RDWR)
            writes = merge_mod.renumber_writes(fd, merge_mod.read_dali_index(Path(p.src).with_suffix(".idx")), p)
            for off, b in writes[: len(writes) // 2]:
                os.pwrite(fd, b, off)
            os.close(fd)
            raise KeyboardInterrupt
        return place(p)
    monkeypatch.setattr(merge_mod, "place", stop_at_the_sixth)
    with pytest.raises(KeyboardInterrupt):
        merge(stopped, show_progress=False)
    assert not (stopped / "manifest.json").exists()
    for d in (stopped / "parts").iterdir():  # every part tar still there
        assert all((d / s / sh["name"]).is_file() for s, i in read_manifest(d)["splits"].items() for sh in i["shards"])
    monkeypatch.setattr(merge_mod, "place", place)
    resumed = merge(stopped, show_progress=False)
    assert resumed == merge(clean, show_progress=False)
    assert _files(stopped) == _files(clean)


def test_a_merge_that_fails_verification_keeps_the_parts(tmp_path):
    data = get_reader("openimages")(_raw(tmp_path / "raw"))
    out = tmp_path / "out"
    _parts(data, out)
    tar = next((out / "parts" / "part-0001" / "train").glob("*.tar"))
    with tarfile.open(tar) as t:  # a label the parts' counts do not have: a class id changed
        lbl = next(m for m in t.getmembers() if m.name.endswith(".lbl"))
    raw = bytearray(tar.read_bytes())
    raw[lbl.offset_data + 20] = (raw[lbl.offset_data + 20] + 1) % 7
    tar.write_bytes(bytes(raw))
    with pytest.raises(MergeError, match="train_counts"):
        merge(out, show_progress=False)
    assert (out / "parts").is_dir() and (out / "manifest.unverified.json").is_file()
    assert not (out / "manifest.json").exists()


def test_parts_without_padded_ids_are_rewritten_to_the_same_samples(tmp_path, monkeypatch):
    import shards.build as build_mod
    data = get_reader("openimages")(_raw(tmp_path / "raw"))
    build(data, tmp_path / "one", BuildOptions(**OPTS), show_progress=False)
    monkeypatch.setattr(build_mod, "id_width", lambda n: 0)  # parts as builds before this change wrote them
    out = tmp_path / "out"
    _parts(data, out)
    merge(out, show_progress=False)
    for split in ("train", "val", "test"):
        assert _samples(out, split) == _samples(tmp_path / "one", split)
    assert verify(out, show_progress=False) == []


# ---------------------------------------------------------------- verify --workers

def _break(root: Path) -> None:
    """A missing tar, a truncated one, a changed JPEG byte, and a sample without its .json (ids shift after it)."""
    m = read_manifest(root)
    train = [root / "train" / sh["name"] for sh in m["splits"]["train"]["shards"]]
    with tarfile.open(train[1]) as t:
        members = [(mi, t.extractfile(mi).read()) for mi in t.getmembers()]  # type: ignore[union-attr]
    train[1].chmod(0o644)
    with tarfile.open(train[1], "w", format=tarfile.USTAR_FORMAT) as t:
        for mi, b in members:
            if mi.name != members[5][0].name:
                t.addfile(mi, io.BytesIO(b))
    train[3].unlink()
    raw = train[5].read_bytes()
    train[5].write_bytes(raw[: len(raw) // 2])
    raw = bytearray(train[7].read_bytes())
    raw[700] ^= 0xFF
    train[7].write_bytes(bytes(raw))
    with tarfile.open(train[8]) as t:  # a .lbl whose header no longer matches its length
        lbl = next(m for m in t.getmembers() if m.name.endswith(".lbl"))
    raw = bytearray(train[8].read_bytes())
    raw[lbl.offset_data + 4] += 1
    train[8].write_bytes(bytes(raw))


@pytest.mark.parametrize("decode", [True, False])
def test_verify_with_workers_gives_the_serial_report(tmp_path, decode):
    data = get_reader("openimages")(_raw(tmp_path / "raw"))
    build(data, tmp_path / "one", BuildOptions(**OPTS), show_progress=False)
    assert verify(tmp_path / "one", workers=2, show_progress=False) == []
    _break(tmp_path / "one")
    serial = verify(tmp_path / "one", decode=decode, show_progress=False)
    assert verify(tmp_path / "one", decode=decode, workers=2, show_progress=False) == serial
    assert any("missing" in e for e in serial) and any("unreadable" in e for e in serial)
    assert any("expected" in e for e in serial) and any("train_counts" in e for e in serial)
    assert any("bad .lbl: label member length" in e for e in serial)


@pytest.mark.slow  # three CLI runs
def test_cli_merge_keeps_parts_on_request_and_verify_takes_workers(tmp_path):
    data = get_reader("openimages")(_raw(tmp_path / "raw"))
    out = tmp_path / "out"
    _parts(data, out)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}

    def run(*args):
        return subprocess.run([sys.executable, "-m", "shards", *args], env=env, cwd=ROOT, capture_output=True,
                              text=True, check=True).stdout
    assert json.loads(run("merge", str(out), "--workers", "2", "--keep-parts"))["train"] == 38
    assert (out / "parts").is_dir()
    assert "OK" in run("verify", str(out), "--workers", "2")
    shutil.rmtree(out / "parts")
    assert "--workers" in run("verify", "--help")


def test_fabricated_parts_merge_and_verify_like_built_ones(tmp_path):
    from shards.scale import fabricate_parts
    sizes = {"train": 23, "val": 5, "test": 5}
    assert fabricate_parts(tmp_path, sizes, parts=3, classes=11, shard_size=4) == 33
    m = merge(tmp_path, show_progress=False)
    assert {s: i["num_samples"] for s, i in m["splits"].items()} == sizes
    assert verify(tmp_path, show_progress=False) == []
