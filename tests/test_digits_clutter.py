"""The generated digits_clutter dataset: deterministic bytes, disjoint train/val source digits, labels from the
file list, and the hooks into util/data.py. Small sets are generated in tmp_path; one test reads the full cache."""
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.datasets import load_digits
from torchvision.datasets import ImageFolder

from util import digits_clutter as dc
from util.data import build_dataset, build_image_set

SMALL = {"train": 120, "val": 40}


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    return dc.generate(tmp_path_factory.mktemp("clutter") / "set", seed=0, sizes=SMALL)


def _files(root):
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(Path(root).rglob("*")) if p.is_file()}


def test_same_seed_gives_the_same_bytes_and_another_seed_other_ones(small, tmp_path):
    again = _files(dc.generate(tmp_path / "again", seed=0, sizes=SMALL))
    assert again == _files(small)
    assert len(again) == sum(SMALL.values()) + 1  # the PNGs and manifest.csv
    other = _files(dc.generate(tmp_path / "other", seed=1, sizes=SMALL))
    by_index = lambda files: {(k.split("/")[0], k[-9:]): v for k, v in files.items() if k.endswith(".png")}
    again, other = by_index(again), by_index(other)
    assert again.keys() == other.keys()  # image i of a split exists for any seed...
    assert sum(other[k] != again[k] for k in again) > 0.9 * len(again)  # ...but shows another canvas


def test_train_and_val_use_disjoint_source_digits(small):
    targets = load_digits().target
    train_src, val_src = dc.source_split(targets)
    assert not set(train_src) & set(val_src) and len(train_src) + len(val_src) == len(targets)
    used = {"train": set(), "val": set()}
    for row in dc.read_manifest(small):
        split = row["file"].split("/")[0]
        used[split] |= {row["source"], *row["fragments"]}
        assert targets[row["source"]] == row["label"]  # the labelled digit is a real digit of that class
        assert row["source"] not in row["fragments"] and 3 <= len(row["fragments"]) <= 6
    assert used["train"] <= set(train_src) and used["val"] <= set(val_src)
    assert not used["train"] & used["val"]


def test_every_label_is_recoverable_from_the_file_list(small):
    rows = dc.read_manifest(small)
    for row in rows:
        split, folder, _ = row["file"].split("/")
        assert int(folder) == row["label"]
    for split, count in SMALL.items():
        folder = ImageFolder(str(small / split))  # the cache is a plain ImageFolder: labels from paths alone
        assert folder.classes == dc.CLASSES and len(folder) == count
        dataset = dc.DigitsClutter(split, None, root=small)
        by_path = dict(dataset.samples)
        assert sorted(by_path.items()) == sorted((p, label) for p, label in folder.samples)
        assert np.bincount(dataset.targets, minlength=10).tolist() == [count // 10] * 10  # balanced


def test_the_default_dataset_has_its_documented_size():
    root = dc.ensure()  # generated on first use under ~/.cache/beyond-cls, reused afterwards
    rows = dc.read_manifest(root)
    counts = {split: sum(r["file"].startswith(split + "/") for r in rows) for split in ("train", "val")}
    assert counts == {"train": 5000, "val": 1000}
    with Image.open(root / rows[0]["file"]) as image:
        assert image.size == (64, 64) and image.mode == "L"


def test_build_dataset_and_build_image_set_accept_digits_clutter(small):
    train = build_dataset(f"digits_clutter:{small}", "train", 32)
    image, label = train[0]
    assert image.shape == (3, 32, 32) and label == train.targets[0] and train.classes == dc.CLASSES
    val = build_dataset(f"digits_clutter:{small}", "val", 64)
    # the val transform shows the whole canvas: no centre crop that could cut a digit at the border off
    canvas = torch.from_numpy(np.asarray(val.images[3], dtype=np.float32)[..., 0] / 255)
    from util.images import IMAGENET_MEAN, IMAGENET_STD
    torch.testing.assert_close(val[3][0][0], (canvas - IMAGENET_MEAN[0]) / IMAGENET_STD[0], atol=1e-5, rtol=0)
    stats_set = build_image_set(f"digits_clutter:{small}", 64, max_images=10)
    assert len(stats_set) == 10 and stats_set[0][0].shape == (3, 64, 64)


def test_a_folder_without_manifest_is_refused_not_overwritten(tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    with pytest.raises(ValueError, match="no complete digits_clutter folder"):
        dc.ensure(tmp_path / "mine")
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep"
