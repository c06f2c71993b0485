"""Datasets, transforms, loaders and their one-line errors, on images made in tmp_path (no downloads)."""
import collections
import urllib.error
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import fake_datasets
from util import data
from util.data import (
    NAMED_SETS,
    DatasetMissing,
    DatasetNotDownloadable,
    DownloadFailed,
    build_dataset,
    build_image_set,
    build_loader,
    build_transform,
)
from util.images import IMAGENET_MEAN, IMAGENET_STD, BadImageError, find_bad_image
from util.subsets import FRACTION, LIST, PER_CLASS, TrainSubset

S = 32


def _save(path, mode="RGB", size=(40, 30), fmt=None, seed=0):
    path.parent.mkdir(parents=True, exist_ok=True)
    rgb = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    image = Image.fromarray(rgb)
    if mode == "P":
        image = image.quantize(colors=16)
        image.info["transparency"] = 0
    elif mode != "RGB":
        image = image.convert(mode)
    image.save(path, format=fmt)
    return path


def _image_folder(root, classes=("cat", "dog"), per_class=3):
    for split in ("train", "val"):
        for c, name in enumerate(classes):
            for i in range(per_class):
                _save(root / split / name / f"{i}.png", seed=10 * c + i)
    return root


def _one_line_bad_image(excinfo):
    err = find_bad_image(excinfo.value)
    assert err is not None and "\n" not in str(err)
    return str(err)


# ------------------------------------------------------------------------------------------- transforms

def test_transforms_give_input_size():
    image = Image.fromarray(np.zeros((50, 100, 3), dtype=np.uint8))
    assert build_transform("train", S)(image).shape == (3, S, S)
    assert build_transform("val", S)(image).shape == (3, S, S)


def test_val_transform_normalises_with_imagenet_stats():
    grey = Image.new("RGB", (64, 64), (124, 116, 104))  # ~ ImageNet mean * 255
    out = build_transform("val", S)(grey)
    expected = (torch.tensor([124, 116, 104]) / 255 - torch.tensor(IMAGENET_MEAN)) / torch.tensor(
        IMAGENET_STD)
    torch.testing.assert_close(out.mean(dim=(1, 2)), expected.float(), atol=1e-4, rtol=0)


# ----------------------------------------------------------------------------------------------- digits

def test_digits_split_is_complete_stratified_and_fixed():
    train, val = build_dataset("digits", "train", S), build_dataset("digits", "val", S)
    assert len(train) + len(val) == 1797 and len(val) == 360
    assert train.classes == [str(d) for d in range(10)] == val.classes
    totals = collections.Counter(train.targets) + collections.Counter(val.targets)
    for label, total in totals.items():
        assert abs(collections.Counter(val.targets)[label] - total * 360 / 1797) <= 1
    image, label = val[0]
    assert image.shape == (3, S, S) and label == val.targets[0]
    pixels = image * torch.tensor(IMAGENET_STD)[:, None, None] + torch.tensor(IMAGENET_MEAN)[:, None, None]
    torch.testing.assert_close(pixels[0], pixels[1], atol=1e-5, rtol=0)  # grey copied into 3 channels
    torch.testing.assert_close(pixels[0], pixels[2], atol=1e-5, rtol=0)
    again = build_dataset("digits", "val", S)
    assert again.targets == val.targets and torch.equal(again[5][0], val[5][0])
    assert build_dataset("digits", "train", S)[0][0].shape == (3, S, S)


def test_digits_pixels_match_sklearn():
    from sklearn.datasets import load_digits

    val = build_dataset("digits", "val", S)
    raw = load_digits().images
    # each stored image is one of sklearn's, scaled 0..16 -> 0..255
    scaled = np.round(raw * 255 / 16)
    assert any(np.array_equal(val.images[0], s) for s in scaled)
    assert val.images.max() == 255


# ------------------------------------------------------------------------------------------- ImageFolder

def test_image_modes_load_as_rgb(tmp_path):
    root = tmp_path / "data"
    for split in ("train", "val"):
        _save(root / split / "a" / "grey.png", "L")
        _save(root / split / "a" / "rgba.png", "RGBA")
        _save(root / split / "b" / "cmyk.jpg", "CMYK", fmt="JPEG")
        _save(root / split / "b" / "palette.png", "P")
    dataset = build_dataset(root, "train", S)
    assert dataset.classes == ["a", "b"] and sorted(dataset.targets) == [0, 0, 1, 1]
    for i in range(len(dataset)):
        image, _ = dataset[i]
        assert image.shape == (3, S, S) and image.dtype == torch.float32


def test_val_uses_train_class_indices(tmp_path):
    root = _image_folder(tmp_path / "data", classes=("a", "b", "c"), per_class=1)
    for f in (root / "val" / "a").iterdir():
        f.unlink()
    (root / "val" / "a").rmdir()
    val = build_dataset(root, "val", S)
    assert val.classes == ["a", "b", "c"] and val.targets == [1, 2]


def test_missing_data_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        build_dataset(tmp_path / "imagenet", "train", S)


def test_missing_val_folder(tmp_path):
    root = _image_folder(tmp_path / "data")
    for f in (root / "val").rglob("*.png"):
        f.unlink()
    for d in (root / "val").iterdir():
        d.rmdir()
    (root / "val").rmdir()
    with pytest.raises(FileNotFoundError, match="has no val/ folder"):
        build_dataset(root, "train", S)


def test_empty_class_folder_is_named(tmp_path):
    root = _image_folder(tmp_path / "data")
    (root / "train" / "zebra").mkdir()
    (root / "train" / "zebra" / "notes.txt").write_text("not an image")
    with pytest.raises(ValueError, match=r"class folder .*zebra has no images"):
        build_dataset(root, "train", S)


def test_val_class_unknown_to_train(tmp_path):
    root = _image_folder(tmp_path / "data")
    _save(root / "val" / "bird" / "0.png")
    with pytest.raises(ValueError, match="train/ lacks: bird"):
        build_dataset(root, "val", S)


def _with_corrupt_image(tmp_path):
    root = _image_folder(tmp_path / "data")
    bad = root / "train" / "dog" / "1.png"
    bad.write_bytes(bad.read_bytes()[:60])  # truncated PNG
    return root, bad


def test_corrupt_image_names_the_file(tmp_path):
    root, bad = _with_corrupt_image(tmp_path)
    dataset = build_dataset(root, "train", S)
    with pytest.raises(BadImageError, match="cannot read image") as info:
        dataset[dataset.samples.index((str(bad), 1))]
    assert str(bad) in _one_line_bad_image(info)


@pytest.mark.parametrize("num_workers", [0, 2])
def test_corrupt_image_in_loader_is_one_line_error(tmp_path, num_workers):
    root, bad = _with_corrupt_image(tmp_path)
    loader = build_loader(build_dataset(root, "train", S), 2, train=True, num_workers=num_workers)
    with pytest.raises(BadImageError) as info:
        for _ in loader:
            pass
    message = str(info.value)  # what the entry point prints, with no help from the caller
    assert "\n" not in message and str(bad) in message and message.startswith("cannot read image")


def test_find_bad_image_in_wrapped_exceptions():
    worker_text = ("Caught BadImageError in DataLoader worker process 0.\nOriginal Traceback (most recent call "
                   "last):\n  File \"x.py\", line 1, in f\nutil.data.BadImageError: cannot read image a.png: x\n")
    assert str(find_bad_image(RuntimeError(worker_text))) == "cannot read image a.png: x"
    try:
        try:
            raise BadImageError("inner problem")
        except BadImageError as inner:
            raise RuntimeError("outer") from inner
    except RuntimeError as outer:
        assert str(find_bad_image(outer)) == "inner problem"
    assert find_bad_image(ValueError("plain")) is None


def test_skip_bad_images_replaces_and_counts(tmp_path, capsys):
    root, bad = _with_corrupt_image(tmp_path)
    (root / "train" / "cat" / "0.png").write_bytes(b"not an image at all")
    dataset = build_dataset(root, "train", S, skip_bad_images=True)
    assert len(dataset) == 6 and dataset.bad_images == 0
    for _ in range(2):  # two epochs: each bad file is counted and warned about once
        for i in range(len(dataset)):
            assert dataset[i][0].shape == (3, S, S)
    assert dataset.bad_images == 2
    assert capsys.readouterr().err.count("warning: skipping") == 2


def test_skip_bad_images_count_is_shared_with_workers(tmp_path):
    root, bad = _with_corrupt_image(tmp_path)
    dataset = build_dataset(root, "train", S, skip_bad_images=True)
    loader = build_loader(dataset, 2, train=False, num_workers=2)
    assert sum(len(labels) for _, labels in loader) == 6
    assert dataset.bad_images == 1


# --------------------------------------------------------------------------------- torchvision datasets

def test_torchvision_set_absent_offline(tmp_path):
    with pytest.raises(DatasetMissing, match=f"cifar10 not found under {tmp_path}"):
        build_dataset(f"cifar10:{tmp_path}", "train", S)
    with pytest.raises(DatasetMissing, match="stl10 not found under"):
        build_dataset(f"stl10:{tmp_path}", "val", S)


def test_torchvision_download_failure(tmp_path, monkeypatch):
    def offline(*args, **kwargs):
        raise urllib.error.URLError("Temporary failure in name resolution")

    monkeypatch.setattr(data.datasets, "CIFAR100", offline)
    with pytest.raises(DownloadFailed, match="could not be downloaded"):
        build_dataset(f"cifar100:{tmp_path}", "train", S, download=True)


@pytest.mark.parametrize("name", list(fake_datasets.WRITERS))
def test_named_dataset_is_read_from_its_official_layout(name, tmp_path, monkeypatch):
    fake_datasets.without_checksums(monkeypatch)
    expected = fake_datasets.WRITERS[name](tmp_path)
    train = build_dataset(f"{name}:{tmp_path}", "train", S)
    val = build_dataset(f"{name}:{tmp_path}", "val", S)
    assert len(train.classes) == expected["classes"] and val.classes == train.classes
    assert (len(train), len(val)) == (expected["train"], expected["val"])
    assert val.targets == expected["val_labels"]
    assert all(isinstance(label, int) for label in train.targets)
    image_id, label = expected["example"]
    assert len(set(train.sample_ids)) == len(train)
    assert train.targets[train.sample_ids.index(image_id)] == label
    image, first_label = train[0]
    assert image.shape == (3, S, S) and first_label == train.targets[0]
    assert val[len(val) - 1][0].shape == (3, S, S)
    one_each = build_dataset(f"{name}:{tmp_path}", "train", S, subset=TrainSubset(PER_CLASS, 1, 0))
    assert sorted(one_each.targets) == sorted(set(train.targets))
    assert set(one_each.selection.ids) <= set(train.sample_ids)


@pytest.mark.parametrize("name", list(NAMED_SETS))
def test_named_dataset_absent_offline_names_the_folder_looked_in(name, tmp_path):
    missing = DatasetMissing if NAMED_SETS[name].downloadable else DatasetNotDownloadable
    with pytest.raises(missing) as info:
        build_dataset(f"{name}:{tmp_path}", "train", S)
    assert str(tmp_path / NAMED_SETS[name].folder) in str(info.value)


def test_stanford_cars_is_never_downloaded(tmp_path, monkeypatch):
    def network(*args, **kwargs):
        raise AssertionError("torchvision was asked to download Stanford Cars")

    monkeypatch.setattr(data.datasets, "StanfordCars", network)
    with pytest.raises(DatasetNotDownloadable, match="stanford_cars"):
        build_dataset(f"cars:{tmp_path}", "train", S, download=True)


def test_named_dataset_folder_that_cannot_be_read(tmp_path, monkeypatch):
    fake_datasets.without_checksums(monkeypatch)
    fake_datasets.flowers102(tmp_path)
    (tmp_path / "flowers-102" / "setid.mat").unlink()
    with pytest.raises(DatasetMissing, match="flowers-102 cannot be read"):
        build_dataset(f"flowers102:{tmp_path}", "val", S)


# ----------------------------------------------------------------------------------------- train subsets

def _unbalanced_folder(root, sizes):
    for c, n in enumerate(sizes):
        for i in range(n):
            _save(root / "train" / f"class_{c}" / f"{i}.png", size=(8, 8), seed=c * 100 + i)
        _save(root / "val" / f"class_{c}" / "0.png", size=(8, 8), seed=c)
    return root


def test_fraction_of_an_unbalanced_folder_keeps_each_class_share(tmp_path):
    sizes = [1, 4, 7, 10, 13]
    root = _unbalanced_folder(tmp_path / "data", sizes)
    half = build_dataset(root, "train", S, subset=TrainSubset(FRACTION, 0.5, 0))
    counts = collections.Counter(half.targets)
    for label, n in enumerate(sizes):
        assert abs(counts[label] - 0.5 * n) < 1, (label, counts[label], n)  # within one image of its share
    assert half.selection.per_class == dict(counts)
    assert half.selection.ids == tuple(sorted(half.selection.ids))
    assert all(i.startswith(f"class_{label}/") for i, label in zip(sorted(half.selection.ids), sorted(half.targets)))
    assert len(build_dataset(root, "val", S)) == len(sizes)  # validation is never subsampled
    with pytest.raises(ValueError, match="train split only"):
        build_dataset(root, "val", S, subset=TrainSubset(FRACTION, 0.5, 0))


def test_subset_of_an_image_folder_reads_only_its_images(tmp_path):
    root = _unbalanced_folder(tmp_path / "data", [3, 3])
    listed = tmp_path / "list.txt"
    listed.write_text("class_0/2.png\n1.png\n")  # a relative path, and a bare name found in two classes
    with pytest.raises(ValueError, match="1.png"):
        build_dataset(root, "train", S, subset=TrainSubset(LIST, str(listed), None))
    listed.write_text("class_0/2.png\nclass_1/1.png\n")
    chosen = build_dataset(root, "train", S, subset=TrainSubset(LIST, str(listed), None))
    assert [Path(path).relative_to(root / "train").as_posix() for path, _ in chosen.samples] == \
        ["class_0/2.png", "class_1/1.png"]
    assert chosen.targets == [0, 1] and chosen[1][0].shape == (3, S, S)


def test_digits_subset_ids_name_the_train_split_index():
    three = build_dataset("digits", "train", S, augment=False, subset=TrainSubset(PER_CLASS, 3, 0))
    whole = build_dataset("digits", "train", S, augment=False)
    assert len(three) == 30 and collections.Counter(three.targets) == {d: 3 for d in range(10)}
    assert all(i.startswith("digits/train/") for i in three.selection.ids)
    indices = sorted(int(i.rsplit("/", 1)[1]) for i in three.selection.ids)
    assert [whole.targets[i] for i in indices] == three.targets  # the subset keeps the split's order
    assert torch.equal(three[0][0], whole[indices[0]][0])


def test_sample_ids_number_images_without_a_root(tmp_path):
    from util.data import ImageFiles, sample_ids

    loose = ImageFiles([(str(tmp_path / "a.png"), 0), (str(tmp_path / "b" / "c.png"), 1)], ["x", "y"], None)
    assert sample_ids(loose, f"generated:{tmp_path}", "train") == ["generated/train/0", "generated/train/1"]
    rooted = ImageFiles(loose.samples, loose.classes, None, root=tmp_path)
    assert sample_ids(rooted, tmp_path, "train") == ["a.png", "b/c.png"]


# ----------------------------------------------------------------------------------------- image sets

def test_samples_are_bundled_photos():
    photos = build_image_set("samples", S)
    assert len(photos) >= 5 and len(photos.classes) == len(photos)
    assert photos.targets == list(range(len(photos)))
    assert all(photos[i][0].shape == (3, S, S) for i in range(len(photos)))
    assert len(build_image_set("samples", S, max_images=3)) == 3


def test_flat_folder_is_unlabelled(tmp_path):
    for i in range(4):
        _save(tmp_path / f"{i}.jpg", fmt="JPEG", seed=i)
    images = build_image_set(tmp_path, S)
    assert images.classes == ["unlabelled"] and images.targets == [0, 0, 0, 0]
    assert images[3][0].shape == (3, S, S)


def test_image_set_from_image_folder_keeps_classes(tmp_path):
    root = _image_folder(tmp_path / "data", classes=("a", "b", "c"), per_class=4)
    images = build_image_set(root / "train", S, max_images=3)
    assert images.classes == ["a", "b", "c"] and images.targets == [0, 1, 2]
    assert build_image_set(root, S).targets == build_dataset(root, "val", S).targets


def test_image_set_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        build_image_set(tmp_path / "missing", S)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="has no images"):
        build_image_set(tmp_path / "empty", S)


# --------------------------------------------------------------------------------------------- loaders

def _epoch_batches(loader, epoch):
    loader.set_epoch(epoch)
    return [(images.clone(), labels.clone()) for images, labels in loader]


def test_loader_is_reproducible_per_epoch():
    dataset = build_dataset("digits", "train", 16)
    make = lambda: build_loader(dataset, 256, train=True, num_workers=0, seed=3)  # noqa: E731
    first = make()
    e0, e1 = _epoch_batches(first, 0), _epoch_batches(first, 1)
    resumed = _epoch_batches(make(), 1)  # a fresh loader that starts at epoch 1, as after a resume
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(e1, resumed))
    assert not torch.equal(e0[0][1], e1[0][1])  # each epoch reshuffles
    assert len(e0) == len(dataset) // 256  # train drops the last partial batch
    assert all(len(labels) == 256 for _, labels in e0)


def test_val_loader_is_sequential_and_complete():
    dataset = build_dataset("digits", "val", 16)
    labels = torch.cat([batch_labels for _, batch_labels in build_loader(dataset, 100, train=False)])
    assert labels.tolist() == dataset.targets


def test_batch_larger_than_dataset_still_yields_a_batch(tmp_path):
    root = _image_folder(tmp_path / "data")
    batches = list(build_loader(build_dataset(root, "train", S), 64, train=True))
    assert len(batches) == 1 and len(batches[0][1]) == 6


def test_zero_batch_size():
    with pytest.raises(ValueError, match="batch size must be at least 1, got 0"):
        build_loader(build_dataset("digits", "val", 16), 0, train=False)


# ------------------------------------------------------------------------------------ issues 10 and 15

def test_sixteen_bit_png_is_scaled_not_clipped(tmp_path):
    from util.images import load_rgb
    path = tmp_path / "sixteen.png"
    Image.fromarray(np.full((8, 8), 32768, dtype=np.uint16)).save(path)  # mid-grey in 16 bits
    assert Image.open(path).mode.startswith("I")
    pixels = np.asarray(load_rgb(path))
    assert pixels.shape == (8, 8, 3) and pixels.dtype == np.uint8
    assert abs(pixels.mean() - 32768 / 257) <= 0.5  # 127.5, where PIL's own conversion gives 255


def test_one_draw_crop_follows_maes_rule(tmp_path):
    # MAE's util/crop.py rule, computed here independently with numpy: one scale and one log-uniform aspect
    # ratio, the side lengths rounded and clipped to the image.
    width, height, draws = 100, 60, 20000
    rng = np.random.default_rng(0)
    area = width * height * rng.uniform(0.08, 1.0, 200000)
    ratio = np.exp(rng.uniform(np.log(3 / 4), np.log(4 / 3), 200000))
    w = np.minimum(np.round(np.sqrt(area * ratio)), width)
    h = np.minimum(np.round(np.sqrt(area / ratio)), height)
    expected = (w * h).mean() / (width * height)
    from torchvision import transforms

    from util.images import OneDrawResizedCrop
    image = Image.new("RGB", (width, height))
    torch.manual_seed(0)
    ours = [OneDrawResizedCrop.get_params(image, (0.08, 1.0), (3 / 4, 4 / 3)) for _ in range(draws)]
    assert all(0 <= i and 0 <= j and i + h_ <= height and j + w_ <= width for i, j, h_, w_ in ours)
    fractions = np.array([h_ * w_ for _, _, h_, w_ in ours]) / (width * height)
    sigma = fractions.std() / np.sqrt(draws)
    assert abs(fractions.mean() - expected) < 4 * sigma
    torchvision_mean = np.mean([h_ * w_ for _, _, h_, w_ in (
        transforms.RandomResizedCrop.get_params(image, (0.08, 1.0), (3 / 4, 4 / 3)) for _ in range(draws))])
    assert abs(torchvision_mean / (width * height) - expected) > 10 * sigma  # the rule torchvision does not follow


def test_distributed_eval_shards_cover_each_image_once():
    from util.data import ShardSampler
    dataset = list(range(27))
    shards = [list(ShardSampler(dataset, 2, rank)) for rank in range(2)]
    assert sorted(shards[0] + shards[1]) == dataset and len(shards[0]) == 14 and len(shards[1]) == 13


# ------------------------------------------------------------------------------------------------ issue 24

class _Indices(torch.utils.data.Dataset):
    """Item i is i: a loader's batches show the epoch's order."""

    def __init__(self, n):
        self.n = n

    def __len__(self):
        return self.n

    def __getitem__(self, index):
        return index


def _order(seed, epoch, *, n=40, world=1, rank=0):
    from util.data import EpochShuffle
    sampler = EpochShuffle(_Indices(n), num_replicas=world, rank=rank, seed=seed)
    sampler.set_epoch(epoch)
    return list(sampler)


def test_seeds_share_no_epoch_order():
    # torch's DistributedSampler seeds with seed + epoch: --seed 1 epoch 0 was --seed 0 epoch 1
    orders = {(seed, epoch): tuple(_order(seed, epoch)) for seed in range(3) for epoch in range(4)}
    assert len(set(orders.values())) == len(orders), "two (seed, epoch) pairs share an order"
    for order in orders.values():
        assert sorted(order) == list(range(40))


@pytest.mark.parametrize("n, world", [(40, 2), (27, 2), (10, 3), (5, 8)])
def test_ddp_shards_partition_each_epoch(n, world):
    for epoch in range(3):
        shards = [_order(0, epoch, n=n, world=world, rank=rank) for rank in range(world)]
        assert len({len(shard) for shard in shards}) == 1  # equal steps on every rank
        padding = len(shards[0]) * world - n
        together = [i for shard in shards for i in shard]
        assert sorted(set(together)) == list(range(n))  # every image, each once but for the padding
        assert len(together) == n + padding and padding < world
        # one process with world x the batch sees the ranks' batches interleaved: the same order
        single = _order(0, epoch, n=n)
        assert [i for step in zip(*shards) for i in step][:n] == single


def test_loader_order_replays_on_resume_and_differs_between_seeds():
    dataset = _Indices(64)

    def epoch(seed, e, loader=None):
        loader = loader or build_loader(dataset, 8, train=True, seed=seed)
        loader.set_epoch(e)
        return torch.cat(list(loader)).tolist()

    run = build_loader(dataset, 8, train=True, seed=0)
    orders = [epoch(0, e, run) for e in range(4)]
    assert epoch(0, 2) == orders[2]  # a fresh loader at epoch 2, as after a resume
    assert all(epoch(1, e) not in orders for e in range(4))


class _RandomDraw(torch.utils.data.Dataset):
    """Item i is one draw of torch's global RNG: what a random crop sees in the process that reads item i."""

    def __len__(self):
        return 8

    def __getitem__(self, index):
        return torch.rand(1).item()


def _draws(seed, epoch, num_workers):
    loader = build_loader(_RandomDraw(), 4, train=True, seed=seed, num_workers=num_workers)
    loader.set_epoch(epoch)
    return torch.cat(list(loader)).tolist()


def test_augmentation_streams_replay_and_are_independent_across_seeds_and_epochs():
    draws = {(seed, epoch): _draws(seed, epoch, 0) for seed in range(2) for epoch in range(3)}
    assert _draws(0, 1, 0) == draws[0, 1]  # a resumed epoch draws the same crops
    assert len({tuple(d) for d in draws.values()}) == len(draws)
    assert _draws(1, 0, 1) == draws[1, 0]  # one worker draws from the stream the main process does
    two = _draws(1, 0, 2)
    assert _draws(1, 0, 2) == two and len(set(two)) == 8  # two workers: reproducible, and not one stream twice
    assert set(two).isdisjoint(_draws(0, 1, 2))


def test_a_folder_named_like_a_built_in_dataset_is_read(tmp_path, monkeypatch):
    from util.data import data_source
    monkeypatch.chdir(tmp_path)
    assert data_source("digits") == "the built-in digits (scikit-learn)"
    _image_folder(tmp_path / "digits", classes=("left", "right"), per_class=2)
    train = build_dataset("digits", "train", S)
    assert train.classes == ["left", "right"] and len(train) == 4  # not scikit-learn's 1,437 digits
    assert data_source("digits") == f"the folder {tmp_path / 'digits'} (not the built-in digits)"
    for i in range(2):
        _save(tmp_path / "samples" / f"{i}.png", seed=i)
    assert build_image_set("samples", S).classes == ["unlabelled"]  # not scikit-image's photographs
    (tmp_path / "cifar10" / "cifar-10-batches-py").mkdir(parents=True)  # torchvision's root, not an ImageFolder
    with pytest.raises(FileNotFoundError, match=f"has no train/ folder; the folder {tmp_path / 'cifar10'} here is "
                                                "read, not the built-in cifar10"):
        build_dataset("cifar10", "train", S)


def test_named_datasets_honour_the_cache_variable(tmp_path, monkeypatch):
    monkeypatch.setenv("BEYOND_CLS_CACHE", str(tmp_path / "cache"))
    with pytest.raises(DatasetMissing, match=f"flowers102 not found under {tmp_path / 'cache' / 'flowers102'}"):
        build_dataset("flowers102", "train", S)


def test_head_initialisation_does_not_restart_the_random_encoders_stream():
    import engine_linprobe as engine
    from config import ProbeSpec
    from heads import HeadOptions
    from models_vit import build_encoder

    torch.manual_seed(0)  # what main_linprobe does before building a random-initialised encoder for --seed 0
    encoder = build_encoder("vit_tiny_patch16", input_size=32, verbose=False)
    probes = engine.build_probe_set([ProbeSpec("cls", "cls", 0.1, "blr0.1")], encoder, 10, HeadOptions(), seed=0)
    weight = probes.probes["cls"].state_dict()["classifier.weight"]
    bound = 1 / weight.shape[1] ** 0.5  # nn.Linear's U(-1/sqrt(fan_in), 1/sqrt(fan_in))
    torch.manual_seed(0)
    stream_start = torch.empty_like(weight).uniform_(-1, 1)  # the draws the encoder's first weights were made of
    assert weight.abs().max() <= bound
    assert not torch.allclose(weight / bound, stream_start, atol=1e-5)
