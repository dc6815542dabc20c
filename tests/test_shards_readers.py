"""Readers of the raw datasets: tiny fixtures in each published layout, with planted bad inputs."""
from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from bgtrain.labels import single_positive, split_train_val
from shards.readers import get_reader
from shards.readers.voc import CLASSES as VOC_CLASSES

# ---------------------------------------------------------------- image makers (shared with test_shards_build)

def jpeg_bytes(seed: int, size: tuple[int, int] = (40, 30), mode: str = "RGB", exif_orientation: int = 1) -> bytes:
    """A small textured picture, unique per seed."""
    rng = np.random.default_rng(seed)
    w, h = size
    arr = (np.linspace(0, 255, w)[None, :, None] * rng.uniform(0.2, 1, 3) + rng.normal(0, 20, (h, w, 3)))
    img = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8)).convert(mode)
    buf = io.BytesIO()
    kwargs = {}
    if exif_orientation != 1:
        exif = Image.Exif()
        exif[0x0112] = exif_orientation
        kwargs["exif"] = exif.tobytes()
    img.save(buf, format="JPEG", quality=85, **kwargs)
    return buf.getvalue()


HTML = b"<!DOCTYPE html><html><body>404 Not Found</body></html>\n"


def write_image(path: Path, kind: str, seed: int) -> None:
    """kind: good | truncated | html | missing."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if kind == "good":
        path.write_bytes(jpeg_bytes(seed))
    elif kind == "truncated":
        path.write_bytes(jpeg_bytes(seed)[:300])
    elif kind == "html":
        path.write_bytes(HTML)
    elif kind != "missing":
        raise ValueError(kind)


# ---------------------------------------------------------------- dataset fixtures in their published layouts

def make_voc(root: Path) -> dict:
    """VOCdevkit/VOC2012 with 8 train-phase and 4 val-phase images; returns the truth."""
    main = root / "VOCdevkit/VOC2012/ImageSets/Main"
    main.mkdir(parents=True)
    rng = np.random.default_rng(0)
    truth = {}
    kinds = {"2008_000003": "truncated", "2008_000005": "html", "2009_000002": "missing"}
    for phase, ids in (("train", [f"2008_{i:06d}" for i in range(1, 10)]),
                       ("val", [f"2009_{i:06d}" for i in range(1, 6)])):
        labels = {i: rng.choice([-1, -1, -1, 0, 1], size=20) for i in ids}
        labels[ids[-1]] = np.full(20, -1)  # no positive: not used
        for i in ids[:-1]:
            labels[i][rng.integers(20)] = 1
        for c, cls in enumerate(VOC_CLASSES):
            lines = [f"{i} {'' if labels[i][c] < 0 else ' '}{labels[i][c]}" for i in ids]
            if phase == "train" and cls == "dog":
                lines.append(lines[0])  # duplicated line
                lines.append("2010_999999  1")  # annotation for an image not in train.txt
            (main / f"{cls}_{phase}.txt").write_text("\n".join(lines) + "\n")
        (main / f"{phase}.txt").write_text("\n".join(ids) + "\n")
        for n, i in enumerate(ids):
            write_image(root / "VOCdevkit/VOC2012/JPEGImages" / f"{i}.jpg", kinds.get(i, "good"), n)
        truth[phase] = {i: sorted(np.nonzero(labels[i] == 1)[0].tolist()) for i in ids if (labels[i] == 1).any()}
    (main / "unicorn_train.txt").write_text("2008_000001  1\n")  # a class VOC does not have
    return truth


def make_coco(root: Path) -> dict:
    cats = [{"id": 1, "name": "person"}, {"id": 3, "name": "car"}, {"id": 18, "name": "dog"}]
    truth = {}
    for phase, ids in (("train", [9, 10, 11, 100, 101, 102, 103]), ("val", [5, 50, 500])):
        images = [{"id": i, "file_name": f"COCO_{phase}2014_{i:012d}.jpg"} for i in ids]
        images.append(dict(images[0]))  # duplicated image id
        anns, truth[phase] = [], {}
        for n, i in enumerate(ids[:-1] if phase == "train" else ids):  # last train image: no annotation
            cs = [cats[n % 3]["id"]] + ([cats[(n + 1) % 3]["id"]] if n % 2 else [])
            anns += [{"image_id": i, "category_id": c} for c in cs]
            truth[phase][i] = sorted({[c["id"] for c in cats].index(c) for c in cs})
        anns.append({"image_id": 77777, "category_id": 1})  # image not in the image list
        anns.append({"image_id": ids[0], "category_id": 99})  # unknown class
        (root / "annotations").mkdir(parents=True, exist_ok=True)
        (root / "annotations" / f"instances_{phase}2014.json").write_text(
            json.dumps({"images": images, "annotations": anns, "categories": cats}))
        for n, i in enumerate(ids):
            kind = "truncated" if (phase, i) == ("train", 10) else "missing" if (phase, i) == ("val", 50) else "good"
            write_image(root / f"{phase}2014" / f"COCO_{phase}2014_{i:012d}.jpg", kind, n)
    return truth


def make_nuswide(root: Path) -> dict:
    rng = np.random.default_rng(1)
    truth = {}
    for phase, n in (("train", 10), ("val", 4)):
        names = [f"Flickr/actor/{phase}_{i:04d}.jpg" for i in range(n)]
        labels = (rng.random((n, 5)) < 0.3).astype(np.float64)
        labels[2] = 0  # an image with no label: kept, no observed positive
        if phase == "train":
            names[5] = names[4]  # duplicated image
        np.save(root / f"formatted_{phase}_images.npy", np.array(names))
        np.save(root / f"formatted_{phase}_labels.npy", labels)
        for i, name in enumerate(names):
            write_image(root / name, "html" if (phase, i) == ("train", 7) else "good", i)
        truth[phase] = (names, labels)
    (root / "Concepts81.txt").write_text("\n".join(["sky", "water", "person", "animal", "car"]) + "\n")
    return truth


def make_cub(root: Path) -> dict:
    cub = root / "CUB_200_2011"
    (cub / "attributes").mkdir(parents=True)
    attrs = ["has_bill_shape::curved", "has_wing_color::blue", "has_size::small", "has_eye_color::black"]
    (root / "attributes.txt").write_text("".join(f"{i + 1} {a}\n" for i, a in enumerate(attrs)))
    files = [f"001.Black_footed_Albatross/img_{i}.jpg" for i in range(1, 11)]
    (cub / "images.txt").write_text("".join(f"{i + 1} {f}\n" for i, f in enumerate(files)) + "3 duplicate.jpg\n")
    is_train = [1, 1, 0, 1, 1, 0, 1, 1, 1, 0]
    (cub / "train_test_split.txt").write_text("".join(f"{i + 1} {t}\n" for i, t in enumerate(is_train)))
    rng = np.random.default_rng(2)
    labels = (rng.random((10, 4)) < 0.5).astype(int)
    labels[:, 0] = 1
    lines = [f"{i + 1} {j + 1} {labels[i, j]} 3 2.5" + (" 0" if (i, j) == (1, 1) else "")  # extra column, as published
             for i in range(10) for j in range(4)]
    lines += ["99 1 1 3 1.0", "1 17 1 3 1.0"]  # image not in images.txt; unknown attribute
    (cub / "attributes" / "image_attribute_labels.txt").write_text("\n".join(lines) + "\n")
    for i, f in enumerate(files):
        write_image(cub / "images" / f, "missing" if i == 3 else "good", i)
    return {"files": files, "is_train": is_train, "labels": labels, "attrs": attrs}


def make_openimages(root: Path) -> dict:
    mids = ["/m/01", "/m/02", "/m/03"]
    (root / "classes-trainable.txt").write_text("\n".join(mids) + "\n")
    (root / "class-descriptions.csv").write_text('/m/01,Cat\n/m/02,"Dog, domestic"\n/m/03,Car\n/m/99,Rare thing\n')
    truth = {}
    for split, n in (("train", 6), ("validation", 3), ("test", 3)):
        rows, truth[split] = [], {}
        for i in range(n):
            image_id = f"{split[:2]}{i:014x}"
            pos, neg = [i % 3], [(i + 1) % 3]
            rows += [[image_id, "verification", mids[c], "1"] for c in pos]
            rows += [[image_id, "verification", mids[c], "0"] for c in neg]
            truth[split][image_id] = (pos, neg)
            kind = "missing" if i == 2 else "truncated" if (split, i) == ("train", 4) else "good"
            write_image(root / "images" / split / f"{image_id}.jpg", kind, i)
        if split == "train":
            first = next(iter(truth[split]))
            rows.append([first, "verification", "/m/99", "1"])  # trainable list does not have it
            rows.append([first, "verification", "/m/zz", "1"])  # unknown anywhere
            rows.append([first, "verification", mids[0], "1"])  # duplicated ImageID/label row
            rows.append(["notlisted00000", "verification", mids[0], "1"])  # not in images.csv
            (root / split).mkdir(parents=True, exist_ok=True)
            with open(root / split / "images.csv", "w", newline="") as f:
                csv.writer(f).writerows([["ImageID", "Subset"]] + [[k, split] for k in truth[split]])
        (root / split).mkdir(parents=True, exist_ok=True)
        with open(root / split / "annotations-human.csv", "w", newline="") as f:
            csv.writer(f).writerows([["ImageID", "Source", "LabelName", "Confidence"]] + rows)
    return truth


def make_csv(root: Path, n_train: int = 8, size: tuple[int, int] = (40, 30)) -> dict:
    root.mkdir(parents=True, exist_ok=True)
    classes = ["a", "b", "c", "d"]
    (root / "classes.txt").write_text("\n".join(classes) + "\n")
    rows = [["path", "positives", "negatives"]]
    truth = {}
    for i in range(n_train):
        p = f"img/{i:04d}.jpg"
        pos, neg = [classes[i % 4]], [classes[(i + 2) % 4]]
        rows.append([p, ";".join(pos), ";".join(neg)])
        truth[p] = ([i % 4], [(i + 2) % 4])
        (root / "img").mkdir(exist_ok=True)
        (root / p).write_bytes(jpeg_bytes(i, size))
    with open(root / "train.csv", "w", newline="") as f:
        csv.writer(f).writerows(rows)
    return truth


# ---------------------------------------------------------------- tests

def test_voc_reader_follows_cole_format_pascal(tmp_path):
    truth = make_voc(tmp_path)
    data = get_reader("voc")(tmp_path)
    assert data.classes == VOC_CLASSES
    names = sorted(truth["train"])  # COLE: image file names sorted, images without a 1 dropped
    full = np.zeros((len(names), 20), np.int8)
    for r, n in enumerate(names):
        full[r, truth["train"][n]] = 1
    obs = single_positive(full, 1200)
    tr, va = split_train_val(len(names), 0.2, 1200)
    for split, rows in (("train", tr), ("val", va)):
        assert [r.ref for r in data.splits[split]] == [names[i] for i in rows]
        for rec, i in zip(data.splits[split], rows):
            assert list(rec.full_pos) == truth["train"][names[i]]
            assert list(rec.obs_pos) == np.nonzero(obs[i] == 1)[0].tolist() and len(rec.obs_pos) == 1
    assert {r.ref: list(r.full_pos) for r in data.splits["test"]} == truth["val"]
    assert all(r.obs_pos == r.full_pos for r in data.splits["test"])
    assert data.rest["train"] == {"observed": -1, "full": 0}
    kinds = data.problems.summary()
    assert kinds["unknown_class"] == 1 and kinds["not_in_image_list"] == 1 and kinds["duplicate_image_id"] == 1


def test_coco_reader_sorts_ids_as_strings_and_reports_bad_annotations(tmp_path):
    truth = make_coco(tmp_path)
    data = get_reader("coco")(tmp_path)
    assert data.classes == ["person", "car", "dog"]
    pool = sorted(truth["train"], key=str)  # "10" < "100" < "101" < ... < "9"
    tr, va = split_train_val(len(pool), 0.2, 1200)
    assert [r.ref for r in data.splits["train"]] == [str(pool[i]) for i in tr]
    assert [r.ref for r in data.splits["val"]] == [str(pool[i]) for i in va]
    assert {r.ref: list(r.full_pos) for r in data.splits["test"]} == {str(k): v for k, v in truth["val"].items()}
    assert data.splits["test"][0].path.endswith("val2014/COCO_val2014_000000000005.jpg")
    kinds = data.problems.summary()
    assert kinds == {"duplicate_image_id": 2, "not_in_image_list": 2, "unknown_class": 2}


def test_nuswide_reader_keeps_unlabelled_images(tmp_path):
    truth = make_nuswide(tmp_path)
    data = get_reader("nuswide")(tmp_path)
    names, labels = truth["train"]
    obs = single_positive(labels.astype(np.int8), 1200)
    tr, _ = split_train_val(len(names), 0.2, 1200)
    assert [r.ref for r in data.splits["train"]] == [names[i] for i in tr]
    for rec, i in zip(data.splits["train"], tr):
        assert list(rec.full_pos) == np.nonzero(labels[i] == 1)[0].tolist()
        assert list(rec.obs_pos) == np.nonzero(obs[i] == 1)[0].tolist()
    assert len(data.splits["train"]) + len(data.splits["val"]) == 10 and len(data.splits["test"]) == 4
    assert data.classes == ["sky", "water", "person", "animal", "car"]
    assert data.problems.summary() == {"duplicate_image_id": 1}


def test_cub_reader_uses_is_present_in_images_txt_order(tmp_path):
    t = make_cub(tmp_path)
    data = get_reader("cub")(tmp_path)
    assert data.classes == t["attrs"]
    train_rows = [i for i, f in enumerate(t["is_train"]) if f == 1]
    tr, va = split_train_val(len(train_rows), 0.2, 1200)
    assert [r.ref for r in data.splits["train"]] == [t["files"][train_rows[i]] for i in tr]
    test_rows = [i for i, f in enumerate(t["is_train"]) if f == 0]
    assert [list(r.full_pos) for r in data.splits["test"]] == \
        [np.nonzero(t["labels"][i])[0].tolist() for i in test_rows]
    assert data.problems.summary() == {"duplicate_image_id": 1, "not_in_image_list": 1, "unknown_class": 1}


def test_openimages_reader_keeps_verified_negatives(tmp_path):
    truth = make_openimages(tmp_path)
    data = get_reader("openimages")(tmp_path)
    assert data.classes == ["Cat", "Dog, domestic", "Car"]
    assert data.meta["class_mids"] == ["/m/01", "/m/02", "/m/03"]
    assert set(data.splits) == {"train", "val", "test"}
    got = {r.ref: (list(r.full_pos), list(r.full_neg)) for r in data.splits["val"]}
    assert got == {k: (p, n) for k, (p, n) in truth["validation"].items()}
    assert all(r.obs_pos == r.full_pos and r.obs_neg == r.full_neg for s in data.splits.values() for r in s)
    assert data.rest["train"] == {"observed": -1, "full": -1}
    assert data.problems.summary() == {"duplicate_annotation": 1, "not_in_image_list": 1, "unknown_class": 1,
                                       "untrainable_class": 1}


def test_csv_reader_reports_unknown_class_duplicate_and_empty_file(tmp_path):
    truth = make_csv(tmp_path)
    with open(tmp_path / "train.csv", "a", newline="") as f:
        csv.writer(f).writerows([["img/0000.jpg", "a", ""], ["img/0001.jpg", "a;unicorn", ""]])
    (tmp_path / "val.csv").write_text("")  # empty CSV
    (tmp_path / "test.jsonl").write_text(json.dumps({"path": "img/0002.jpg", "positives": ["c"]}) + "\n")
    data = get_reader("csv")(tmp_path)
    assert {r.ref: (list(r.full_pos), list(r.full_neg)) for r in data.splits["train"]} == truth
    assert data.splits["val"] == [] and [list(r.full_pos) for r in data.splits["test"]] == [[2]]
    assert data.problems.summary() == {"duplicate_image_id": 2, "empty_file": 1}
    (tmp_path / "train.csv").write_text("img/0000.jpg,a;unicorn\n")
    assert get_reader("csv")(tmp_path).problems.summary()["unknown_class"] == 1


def test_missing_annotation_file_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="instances_train2014.json"):
        get_reader("coco")(tmp_path)
