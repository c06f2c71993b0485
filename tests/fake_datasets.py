"""Tiny copies of the named datasets, in the layout and file formats torchvision's classes read (checked against
torchvision 0.29's sources): the same folder names, split and label files (.mat, .txt, .json, pickled batches,
raw .bin arrays), with a few 8x8 JPEGs instead of the real images.

Each writer returns what a reader must find, worked out by hand from what it wrote: the class count, the sizes of
our train and val sides (train+val joined for training where the protocol says so, see util.data.NAMED_SETS), one
training image's sample id with its label, and the val labels in order.

What cannot be faked: CIFAR, STL10 and Flowers102's readers compare their files' MD5 with the real release's;
`without_checksums` blanks those constants (torchvision then checks only that the files exist).
"""
import json
import pickle
from pathlib import Path

import numpy as np
from PIL import Image


def _jpeg(path, seed=0):
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(path, format="JPEG")


def _lines(path, lines):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(f"{line}\n" for line in lines))


def without_checksums(monkeypatch):
    from torchvision import datasets

    for cls in (datasets.CIFAR10, datasets.CIFAR100, datasets.STL10):
        monkeypatch.setattr(cls, "train_list", [[name, None] for name, _ in cls.train_list])
        monkeypatch.setattr(cls, "test_list", [[name, None] for name, _ in cls.test_list])
    for cls in (datasets.CIFAR10, datasets.CIFAR100):
        monkeypatch.setattr(cls, "meta", {**cls.meta, "md5": None})
    monkeypatch.setattr(datasets.Flowers102, "_file_dict",
                        {key: (name, None) for key, (name, _) in datasets.Flowers102._file_dict.items()})


def flowers102(root):
    from scipy.io import savemat

    base = Path(root) / "flowers-102"
    labels = [1, 1, 2, 2, 3, 50, 102, 102, 7, 9, 1, 3]  # 1-based class of image_00001 .. image_00012
    for i in range(1, len(labels) + 1):
        _jpeg(base / "jpg" / f"image_{i:05d}.jpg", i)
    savemat(base / "imagelabels.mat", {"labels": np.array(labels, dtype=np.uint8)})
    savemat(base / "setid.mat", {"trnid": np.array([1, 3, 5]), "valid": np.array([2, 4]),
                                 "tstid": np.array([6, 7, 8, 9, 10, 11, 12])})
    return dict(classes=102, train=5, val=7, example=("jpg/image_00005.jpg", 2), val_labels=[49, 101, 101, 6, 8, 0, 2])


def pets(root):
    base = Path(root) / "oxford-iiit-pet"
    breeds = [("Abyssinian", 1, 1), ("american_bulldog", 2, 2), ("Bengal", 3, 1)]  # name, class id, species
    lines = {"trainval": [], "test": []}
    for name, class_id, species in breeds:
        for n in range(1, 4):
            split = "test" if n == 3 else "trainval"
            lines[split].append(f"{name}_{n} {class_id} {species} {class_id}")
            _jpeg(base / "images" / f"{name}_{n}.jpg", class_id * 10 + n)
    for split, split_lines in lines.items():
        _lines(base / "annotations" / f"{split}.txt", split_lines)
    return dict(classes=3, train=6, val=3, example=("images/american_bulldog_2.jpg", 1), val_labels=[0, 1, 2])


def cars(root):
    from scipy.io import savemat

    base = Path(root) / "stanford_cars"
    names = np.array(["AM General Hummer SUV 2000", "Acura RL Sedan 2012", "Audi TTS Coupe 2012"], dtype=object)
    (base / "devkit").mkdir(parents=True)
    savemat(base / "devkit" / "cars_meta.mat", {"class_names": names})  # a cell array of strings

    def annotations(path, folder, classes):
        fields = ["bbox_x1", "bbox_y1", "bbox_x2", "bbox_y2", "class", "fname"]
        records = np.zeros((1, len(classes)), dtype=[(f, "O") for f in fields])
        for i, label in enumerate(classes):
            fname = f"{i + 1:05d}.jpg"
            records[0, i] = (np.uint8(0), np.uint8(0), np.uint8(7), np.uint8(7), np.uint8(label), fname)
            _jpeg(base / folder / fname, i)
        savemat(path, {"annotations": records})

    annotations(base / "devkit" / "cars_train_annos.mat", "cars_train", [1, 2, 3, 3])
    annotations(base / "cars_test_annos_withlabels.mat", "cars_test", [3, 1, 2])
    return dict(classes=3, train=4, val=3, example=("cars_train/00004.jpg", 2), val_labels=[2, 0, 1])


def aircraft(root):
    data = Path(root) / "fgvc-aircraft-2013b" / "data"
    variants = ["707-320", "A300B4", "Cessna 172", "F-16A/B"]  # names with spaces and slashes, as in the release
    _lines(data / "variants.txt", variants)
    splits = {"trainval": [("1025794", "707-320"), ("1340192", "Cessna 172"), ("0056978", "F-16A/B"),
                           ("2034568", "A300B4"), ("0062781", "Cessna 172")],
              "test": [("1514522", "F-16A/B"), ("0209554", "707-320")]}
    for split, rows in splits.items():
        _lines(data / f"images_variant_{split}.txt", [f"{image} {variant}" for image, variant in rows])
        for image, _ in rows:
            _jpeg(data / "images" / f"{image}.jpg", int(image))
    return dict(classes=4, train=5, val=2, example=("data/images/1340192.jpg", 2), val_labels=[3, 0])


def dtd(root):
    data = Path(root) / "dtd" / "dtd"
    classes = ["banded", "dotted", "zigzagged"]
    splits = {"train1": [0, 1], "val1": [2], "test1": [3, 4]}  # image numbers per class
    for split, numbers in splits.items():
        rows = [f"{c}/{c}_{n:04d}.jpg" for c in classes for n in numbers]
        _lines(data / "labels" / f"{split}.txt", rows)
        for row in rows:
            _jpeg(data / "images" / row, len(row))
    return dict(classes=3, train=9, val=6, example=("images/dotted/dotted_0002.jpg", 1), val_labels=[0, 0, 1, 1, 2, 2])


def food101(root):
    base = Path(root) / "food-101"
    meta = {"train": {"apple_pie": ["apple_pie/1005649", "apple_pie/1011328"],
                      "baby_back_ribs": ["baby_back_ribs/1005293"],
                      "beignets": ["beignets/1000", "beignets/2000", "beignets/3000"]},
            "test": {"apple_pie": ["apple_pie/1011059"], "baby_back_ribs": ["baby_back_ribs/1007102"],
                     "beignets": ["beignets/4000"]}}
    for split, classes in meta.items():
        (base / "meta").mkdir(parents=True, exist_ok=True)
        (base / "meta" / f"{split}.json").write_text(json.dumps(classes))
        for images in classes.values():
            for image in images:
                _jpeg(base / "images" / f"{image}.jpg", len(image))
    return dict(classes=3, train=6, val=3, example=("images/baby_back_ribs/1005293.jpg", 1), val_labels=[0, 1, 2])


def _pickle(path, obj):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        pickle.dump(obj, f)


def _cifar_batch(labels, key):
    data = np.random.default_rng(len(labels)).integers(0, 256, (len(labels), 3 * 32 * 32), dtype=np.uint8)
    return {"data": data, key: list(labels)}


def cifar10(root):
    base = Path(root) / "cifar-10-batches-py"
    for b in range(1, 6):
        _pickle(base / f"data_batch_{b}", _cifar_batch([b, b + 1], "labels"))  # 2 images each
    _pickle(base / "test_batch", _cifar_batch([0, 9, 5], "labels"))
    _pickle(base / "batches.meta", {"label_names": ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog",
                                                    "horse", "ship", "truck"]})
    # cifar10/train/3: data_batch_2's second image
    return dict(classes=10, train=10, val=3, example=("cifar10/train/3", 3), val_labels=[0, 9, 5])


def cifar100(root):
    base = Path(root) / "cifar-100-python"
    _pickle(base / "train", _cifar_batch([0, 99, 42, 42], "fine_labels"))
    _pickle(base / "test", _cifar_batch([7, 8], "fine_labels"))
    _pickle(base / "meta", {"fine_label_names": [f"class_{i}" for i in range(100)]})
    return dict(classes=100, train=4, val=2, example=("cifar100/train/2", 42), val_labels=[7, 8])


def stl10(root):
    base = Path(root) / "stl10_binary"
    base.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for split, labels in (("train", [1, 2, 10]), ("test", [4, 4])):  # 1-based on disk
        rng.integers(0, 256, len(labels) * 3 * 96 * 96, dtype=np.uint8).tofile(base / f"{split}_X.bin")
        np.array(labels, dtype=np.uint8).tofile(base / f"{split}_y.bin")
    (base / "unlabeled_X.bin").write_bytes(b"")  # checked to exist, read only for the unlabeled split
    _lines(base / "class_names.txt", ["airplane", "bird", "car", "cat", "deer", "dog", "horse", "monkey", "ship",
                                      "truck"])
    return dict(classes=10, train=3, val=2, example=("stl10/train/2", 9), val_labels=[3, 3])


WRITERS = {"flowers102": flowers102, "pets": pets, "cars": cars, "aircraft": aircraft, "dtd": dtd,
           "food101": food101, "cifar10": cifar10, "cifar100": cifar100, "stl10": stl10}
