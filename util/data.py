"""Datasets and loaders for linear probing and attention statistics (MAE linear-probing protocol).

Library code: a problem with the data (missing folder, empty class, unreadable image) is a FileNotFoundError or
ValueError with a one-line message naming the path; the entry points add what to do. The cheap checks run
before any directory walk or image decoding. A training subset (util/subsets.py) is applied in build_dataset.
"""
import math
import multiprocessing
import os
import random
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Tuple, Union

import numpy as np
import torch
from PIL import Image
from torch.utils.data import (
    ConcatDataset,
    DataLoader,
    Dataset,
    Sampler,
    SequentialSampler,
    Subset,
)
from torchvision import datasets, transforms
from torchvision.datasets.folder import IMG_EXTENSIONS, has_file_allowed_extension, make_dataset
from tqdm import tqdm

from util import digits_clutter, dist
from util.decode import build_fast_transform
from util.images import BICUBIC, BadImageError, OneDrawResizedCrop, load_rgb, normalize
from util.subsets import TrainSubset, select

# scikit-image photographs that ship inside the wheel (no pooch download), natural images only.
SAMPLE_PHOTOS = ("astronaut", "camera", "chelsea", "coffee", "coins", "rocket", "hubble_deep_field",
                 "immunohistochemistry", "moon", "retina", "grass", "gravel", "brick")
DIGITS_VAL_FRACTION = 0.2
DIGITS_SPLIT_SEED = 0


# ----------------------------------------------------------------------------------------------- transforms

def build_transform(split: str, input_size: int, decoder: str = "pil") -> Callable:
    """MAE linear probing: one-draw RandomResizedCrop + flip for train, Resize(S*256/224) + CenterCrop for val.
    decoder "fast"/"gpu": the same crops as uint8 tensors (util/decode.py), normalised later on the device."""
    if decoder != "pil":
        return build_fast_transform(split, input_size, decoder)
    if split == "train":
        return transforms.Compose([OneDrawResizedCrop(input_size, interpolation=BICUBIC),
                                   transforms.RandomHorizontalFlip(), *normalize()])
    if split == "val":
        return transforms.Compose([transforms.Resize(int(input_size * 256 / 224), interpolation=BICUBIC),
                                   transforms.CenterCrop(input_size), *normalize()])
    raise ValueError(f"split must be 'train' or 'val', got {split!r}")


class ImageFiles(Dataset):
    """(path, label) samples read with `load_rgb`.

    With skip_bad_images an unreadable file is replaced by the next readable sample (deterministic, keeps
    batch shapes and DDP step counts equal) and warned about once. Which files were bad is kept in a
    shared-memory byte per sample, so the count is exact across DataLoader workers and epochs:
    `bad_images` is the number of distinct bad files met so far by this process and its workers (each DDP
    rank counts its own shard; sum over ranks for a total).
    """

    def __init__(self, samples, classes, transform, *, skip_bad_images=False, root=None):
        self.samples = list(samples)
        self.targets = [label for _, label in self.samples]
        self.classes = list(classes)
        self.transform = transform
        self.skip_bad_images = skip_bad_images
        self.root = root
        self._bad = multiprocessing.RawArray("b", len(self.samples)) if skip_bad_images else None

    def __len__(self):
        return len(self.samples)

    @property
    def sample_ids(self):
        """Each image's path relative to `root` (the split's folder), '/'-separated: what train_subset.txt lists.
        None without a root (images gathered from anywhere): `sample_ids` then numbers them."""
        if self.root is None:
            return None
        prefix = os.path.join(str(self.root), "")  # make_dataset joins root and name: a prefix cut suffices
        return [(path[len(prefix):] if path.startswith(prefix) else os.path.relpath(path, self.root))
                .replace(os.sep, "/") for path, _ in self.samples]

    def select(self, indices):
        """The images at `indices` as ImageFiles: an unreadable one is then replaced from the selection only."""
        return ImageFiles([self.samples[i] for i in indices], self.classes, self.transform,
                          skip_bad_images=self.skip_bad_images, root=self.root)

    @property
    def bad_images(self):
        return 0 if self._bad is None else int(np.frombuffer(self._bad, dtype=np.int8).sum())

    def __getitem__(self, index):
        for offset in range(len(self.samples)):
            i = (index + offset) % len(self.samples)
            path, label = self.samples[i]
            try:
                if getattr(self.transform, "reads_files", False):  # util.decode: decodes the file itself
                    return self.transform(path), label
                image = load_rgb(path)
            except BadImageError as err:
                if not self.skip_bad_images:
                    raise
                self._note_bad(i, err)
                continue
            return (self.transform(image) if self.transform else image), label
        raise BadImageError("no image in the dataset can be read")

    def _note_bad(self, i, err):
        if not self._bad[i]:
            self._bad[i] = 1
            # tqdm.write keeps the warning off an in-process progress bar's line
            tqdm.write(f"warning: skipping {err}", file=sys.stderr)


# -------------------------------------------------------------------------------------------- ImageFolder

def _class_folders(split_dir):
    return sorted(entry.name for entry in os.scandir(split_dir) if entry.is_dir())


def _image_folder(split_dir, classes, transform, skip_bad_images):
    """ImageFolder layout read with train/'s class indices; an existing class folder must hold images."""
    class_to_idx = {name: i for i, name in enumerate(classes)}
    samples = make_dataset(str(split_dir), class_to_idx, extensions=IMG_EXTENSIONS, allow_empty=True)
    present = {label for _, label in samples}
    for name in _class_folders(split_dir):
        if class_to_idx[name] not in present:
            raise ValueError(f"class folder {split_dir / name} has no images ({'/'.join(IMG_EXTENSIONS)} files)")
    return ImageFiles(samples, classes, transform, skip_bad_images=skip_bad_images, root=split_dir)


def _check_data_root(root):
    if not root.exists():
        raise FileNotFoundError(f"data path {root} does not exist")
    if not root.is_dir():
        raise NotADirectoryError(f"data path {root} is not a folder")


def _imagefolder_split(root, split, transform, skip_bad_images):
    _check_data_root(root)
    for name in ("train", "val"):  # both, so a missing val/ is named before train/ is walked
        if not (root / name).is_dir():
            raise FileNotFoundError(f"{root} has no {name}/ folder")
    classes = _class_folders(root / "train")
    if not classes:
        raise ValueError(f"{root / 'train'} has no class folders")
    unknown = sorted(set(_class_folders(root / "val")) - set(classes))
    if unknown:
        raise ValueError(f"{root / 'val'} has class folders that train/ lacks: {', '.join(unknown[:5])}")
    return _image_folder(root / split, classes, transform, skip_bad_images)


# ------------------------------------------------------------------------------------------------- digits

class Digits(Dataset):
    """scikit-learn's 1,797 real 8x8 handwritten digits, upsampled to input_size (bicubic), 3 channels.

    Fixed stratified split: 20% val (360 images), random_state 0. Pixels 0..16 are scaled to 0..255.
    """

    def __init__(self, split, input_size, transform):
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split

        digits = load_digits()
        train_idx, val_idx = train_test_split(np.arange(len(digits.target)), test_size=DIGITS_VAL_FRACTION,
                                              stratify=digits.target, random_state=DIGITS_SPLIT_SEED)
        idx = train_idx if split == "train" else val_idx
        self.images = np.round(digits.images[idx] * (255 / 16)).astype(np.uint8)
        self.targets = digits.target[idx].tolist()
        self.classes = [str(d) for d in range(10)]
        self.input_size = input_size
        self.transform = transform

    def __len__(self):
        return len(self.targets)

    def __getitem__(self, index):
        image = Image.fromarray(self.images[index]).resize((self.input_size,) * 2, Image.Resampling.BICUBIC)
        return self.transform(image.convert("RGB")), self.targets[index]


def _digits_transform(split, input_size):
    if split == "val":
        return build_transform("val", input_size)
    # Milder than the protocol's crop (a 8% crop can remove the digit) and no flip (a mirrored 2 is no 2).
    return transforms.Compose([OneDrawResizedCrop(input_size, scale=(0.6, 1.0), interpolation=BICUBIC),
                               *normalize()])


# ------------------------------------------------------------------------------------ torchvision datasets

@dataclass(frozen=True)
class NamedSet:
    """A dataset read through its torchvision class with the official splits.

    folder: what torchvision reads under the root. train: the official split(s) joined for training; val: the
    split evaluated on (the linear-probing protocol of Kornblith et al. 2019: train on train+val, report test).
    open(root, split, transform, download) builds one official split. downloadable: torchvision can fetch it.
    """
    folder: str
    train: Tuple[str, ...]
    val: str
    open: Callable
    downloadable: bool = True


NAMED_SETS = {
    "flowers102": NamedSet("flowers-102", ("train", "val"), "test",
                           lambda root, split, **kw: datasets.Flowers102(root, split=split, **kw)),
    "pets": NamedSet("oxford-iiit-pet", ("trainval",), "test",
                     lambda root, split, **kw: datasets.OxfordIIITPet(root, split=split, **kw)),
    "cars": NamedSet("stanford_cars", ("train",), "test",
                     lambda root, split, **kw: datasets.StanfordCars(root, split=split, **kw), downloadable=False),
    "aircraft": NamedSet("fgvc-aircraft-2013b", ("trainval",), "test",
                         lambda root, split, **kw: datasets.FGVCAircraft(root, split=split,
                                                                         annotation_level="variant", **kw)),
    "dtd": NamedSet("dtd/dtd", ("train", "val"), "test",
                    lambda root, split, **kw: datasets.DTD(root, split=split, partition=1, **kw)),
    "food101": NamedSet("food-101", ("train",), "test",
                        lambda root, split, **kw: datasets.Food101(root, split=split, **kw)),
    "cifar10": NamedSet("cifar-10-batches-py", ("train",), "test",
                        lambda root, split, **kw: datasets.CIFAR10(root, train=split == "train", **kw)),
    "cifar100": NamedSet("cifar-100-python", ("train",), "test",
                         lambda root, split, **kw: datasets.CIFAR100(root, train=split == "train", **kw)),
    "stl10": NamedSet("stl10_binary", ("train",), "test",
                      lambda root, split, **kw: datasets.STL10(root, split=split, **kw)),
}
TORCHVISION_SETS = tuple(NAMED_SETS)


def default_cache_root(name):
    return digits_clutter.cache_base() / name


class DatasetMissing(FileNotFoundError):
    """A named dataset is not on disk (or not readable there), and downloading it was not allowed."""


class DatasetNotDownloadable(DatasetMissing):
    """A named dataset is not on disk and torchvision cannot download it (Stanford Cars' link is gone)."""


class DownloadFailed(OSError):
    """A named dataset could not be downloaded."""


def _contents(dataset):
    """(labels, image files or None) of one torchvision split. The file-backed classes keep them in private
    attributes under different names (torchvision 0.29; tests/test_named_datasets.py reads each one)."""
    if hasattr(dataset, "_samples"):  # StanfordCars: (path, label) pairs
        return [int(label) for _, label in dataset._samples], [path for path, _ in dataset._samples]
    for labels in ("targets", "labels", "_labels"):  # CIFAR, STL10, the file-backed ones
        if getattr(dataset, labels, None) is not None:
            break
    files = getattr(dataset, "_image_files", None) or getattr(dataset, "_images", None)  # _images: Pets
    return [int(label) for label in getattr(dataset, labels)], files


class NamedSplit(ConcatDataset):
    """The training or evaluation side of a named dataset: one official split, or two joined (Flowers', DTD's
    train+val), with `.classes`, `.targets` and `.sample_ids` (image paths under the dataset's folder, or
    `<name>/<official split>/<index>` for datasets held in arrays)."""

    def __init__(self, name, parts, base):
        super().__init__([part for _, part in parts])
        self.classes = list(parts[0][1].classes)
        self.targets, self.sample_ids = [], []
        for split, part in parts:
            if list(part.classes) != self.classes:
                raise ValueError(f"{name}'s {split} split has other classes than its {parts[0][0]} split")
            labels, files = _contents(part)
            self.targets += labels
            self.sample_ids += ([Path(os.path.relpath(f, base)).as_posix() for f in files] if files
                                else [f"{name}/{split}/{i}" for i in range(len(labels))])


def _named_split(name, root, split, transform, download):
    spec = NAMED_SETS[name]
    root = Path(root).expanduser() if root else default_cache_root(name)
    base = root / spec.folder
    download = download and spec.downloadable
    if not download and not base.is_dir():
        missing = DatasetMissing if spec.downloadable else DatasetNotDownloadable
        raise missing(f"{name} not found under {root}: torchvision reads it from {base}")
    parts = []
    for official in (spec.train if split == "train" else (spec.val,)):
        try:
            parts.append((official, spec.open(root, official, transform=transform, download=download)))
        except Exception as err:
            reason = " ".join(f"{type(err).__name__}: {err}".split())
            if not download:
                raise DatasetMissing(f"{name} under {base} cannot be read ({official} split): {reason}") from None
            raise DownloadFailed(f"{name} could not be downloaded to {root}: {reason}") from None
    return NamedSplit(name, parts, base)


# ------------------------------------------------------------------------------------------- entry points

def build_dataset(data_path: Union[str, os.PathLike], split: str, input_size: int, *, download: bool = False,
                  skip_bad_images: bool = False, augment: bool = True, subset: Optional[TrainSubset] = None,
                  decoder: str = "pil") -> Dataset:
    """Dataset for linear probing with `.classes` and `.targets`.

    data_path: ImageFolder root (train/, val/) | "digits" | a name of NAMED_SETS, optionally as "name:/root"
    (default root $BEYOND_CLS_CACHE/<name>, else ~/.cache/beyond-cls/<name>) | "digits_clutter[:root]". A folder
    of a built-in name in the current directory wins over the built-in dataset (`data_source` says which is read).
    augment=False gives the train split the deterministic val
    transform. subset (a util.subsets.TrainSubset, train split only): keep the images it selects; the result's
    `.selection` says which. decoder: build_transform's, for image files and named sets (digits keep PIL's).
    """
    if split not in ("train", "val"):
        raise ValueError(f"split must be 'train' or 'val', got {split!r}")
    if subset is not None and split != "train":
        raise ValueError("a subset applies to the train split only (evaluation uses the whole val split)")
    dataset = _open_dataset(str(data_path), split, input_size, download, skip_bad_images, augment, decoder)
    if subset is None:
        return dataset
    selection = select(sample_ids(dataset, data_path, split), dataset.targets, subset)
    chosen = _subset(dataset, selection.indices)
    chosen.selection = selection
    return chosen


def _open_dataset(data_path, split, input_size, download, skip_bad_images, augment, decoder="pil"):
    """One split of the dataset `data_path` names, whole."""
    look = split if augment else "val"
    folder = _shadowing_folder(data_path)
    if folder is not None:
        try:
            return _imagefolder_split(folder, split, build_transform(look, input_size), skip_bad_images)
        except (FileNotFoundError, ValueError) as err:
            raise type(err)(f"{err}; the folder {folder.resolve()} here is read, not the built-in {data_path}") \
                from None
    if data_path == "digits":
        return Digits(split, input_size, _digits_transform(look, input_size))
    name, _, root = data_path.partition(":")
    if name == "digits_clutter":  # generated on first use (util/digits_clutter.py), optionally "digits_clutter:/root"
        return digits_clutter.build(split, input_size, root=root or None, augment=augment)
    if name in NAMED_SETS:
        return _named_split(name, root, split, build_transform(look, input_size, decoder), download)
    return _imagefolder_split(Path(data_path).expanduser(), split, build_transform(look, input_size, decoder),
                              skip_bad_images)


BUILT_IN = ("digits", "digits_clutter", "samples", *NAMED_SETS)


def _shadowing_folder(data_path):
    """The folder a built-in dataset name also names here (./digits), or None. The folder wins: a user who has
    one and passes its name means it, and the data root a run's identity records is that folder too
    (util.run_state.data_root)."""
    folder = Path(str(data_path))
    return folder if str(data_path) in BUILT_IN and folder.is_dir() else None


def data_source(data_path: Union[str, os.PathLike]) -> str:
    """What `data_path` reads, in words for a run's summary line."""
    data_path = str(data_path)
    if _shadowing_folder(data_path) is not None:
        return f"the folder {Path(data_path).resolve()} (not the built-in {data_path})"
    name, _, root = data_path.partition(":")
    if data_path == "digits":
        return "the built-in digits (scikit-learn)"
    if data_path == "samples":
        return "the built-in samples (scikit-image)"
    if name == "digits_clutter":
        return f"digits_clutter in {Path(root).expanduser() if root else digits_clutter.default_root()}"
    if name in NAMED_SETS:
        return f"{name} in {Path(root).expanduser() if root else default_cache_root(name)}"
    return f"the folder {Path(data_path).expanduser().resolve()}"


def sample_ids(dataset, data_path, split):
    """What names each sample of a built split in train_subset.txt: the dataset's own `.sample_ids` (relative
    image paths), else `<dataset name>/<split>/<index>` for datasets without files (digits)."""
    own = getattr(dataset, "sample_ids", None)
    if own is not None:
        return list(own)
    return [f"{str(data_path).partition(':')[0]}/{split}/{i}" for i in range(len(dataset))]


class SamplePhotos(Dataset):
    """scikit-image's bundled photographs; label i = photo i (classes are the photo names)."""

    def __init__(self, transform):
        import skimage.data

        self.images, self.classes = [], []
        for name in SAMPLE_PHOTOS:
            try:
                array = getattr(skimage.data, name)()
            except Exception:  # a later scikit-image may move a photo to an online-only download
                continue
            self.images.append(Image.fromarray(array).convert("RGB"))
            self.classes.append(name)
        self.targets = list(range(len(self.images)))
        self.transform = transform

    def __len__(self):
        return len(self.images)

    def __getitem__(self, index):
        return self.transform(self.images[index]), self.targets[index]


def _has_images(folder):
    return any(entry.is_file() and has_file_allowed_extension(entry.name, IMG_EXTENSIONS)
               for entry in os.scandir(folder))


def build_image_set(data_path: Union[str, os.PathLike], input_size: int, *, max_images: Optional[int] = None,
                    skip_bad_images: bool = False) -> Dataset:
    """Images for attention statistics, with the val transform and `.classes` / `.targets`.

    "samples" = scikit-image's photos; a folder with image files directly inside = unlabelled (class 0,
    'unlabelled'); a folder of class folders = ImageFolder; a linear-probing root (train/ + val/) = its val/.
    max_images keeps that many, evenly spaced so every class stays represented.
    """
    transform = build_transform("val", input_size)
    shadowed = _shadowing_folder(data_path) is not None  # a folder here named like a built-in set wins
    if str(data_path) == "samples" and not shadowed:
        dataset = SamplePhotos(transform)
    elif str(data_path).partition(":")[0] == "digits_clutter" and not shadowed:
        dataset = digits_clutter.build("val", input_size, root=str(data_path).partition(":")[2] or None)
    else:
        root = Path(data_path).expanduser()
        if not root.exists() or not root.is_dir():
            raise FileNotFoundError(f"image folder {root} does not exist")
        if (root / "train").is_dir() and (root / "val").is_dir():
            root = root / "val"
        if _has_images(root):
            files = sorted(entry.path for entry in os.scandir(root)
                           if entry.is_file() and has_file_allowed_extension(entry.name, IMG_EXTENSIONS))
            dataset = ImageFiles([(f, 0) for f in files], ["unlabelled"], transform,
                                 skip_bad_images=skip_bad_images)
        else:
            classes = _class_folders(root)
            if not classes:
                raise ValueError(f"{root} has no images ({'/'.join(IMG_EXTENSIONS)}) and no class folders")
            dataset = _image_folder(root, classes, transform, skip_bad_images)
    if max_images is not None and max_images < len(dataset):
        if max_images < 1:
            raise ValueError(f"max_images must be at least 1, got {max_images}")
        keep = np.linspace(0, len(dataset) - 1, max_images).round().astype(int)
        dataset = _subset(dataset, keep)
    return dataset


class LabelledSubset(Subset):
    """torch's Subset keeping the `.classes` and `.targets` the rest of the code reads."""

    def __init__(self, dataset, indices):
        super().__init__(dataset, list(indices))
        self.classes = list(dataset.classes)
        self.targets = [dataset.targets[i] for i in self.indices]


def _subset(dataset, keep):
    """The samples at indices `keep`, labels and class names kept."""
    if isinstance(dataset, ImageFiles):
        return dataset.select(keep)
    return LabelledSubset(dataset, keep)


# ------------------------------------------------------------------------------------------------ loaders

class ShardSampler(Sampler):
    """Every rank-th index from `rank` on: the shards cover the dataset exactly once. DistributedSampler pads the
    last shard with repeated images, which evaluation would count twice."""

    def __init__(self, dataset, num_replicas, rank):
        self.indices = range(rank, len(dataset), num_replicas)

    def __iter__(self):
        return iter(self.indices)

    def __len__(self):
        return len(self.indices)


# The purposes of a run's random streams. Every stream is drawn from (seed, epoch, purpose[, rank, worker]) through
# numpy's SeedSequence, so no two seeds, epochs or purposes share one (torch's DistributedSampler seeds its shuffle
# with seed + epoch: --seed 1 would replay --seed 0's next epoch).
SHUFFLE, AUGMENT, HEAD_INIT = 1, 2, 3


def derive_seed(seed: int, epoch: int, purpose: int, *more: int) -> int:
    """A 64-bit seed for one random stream of a run: (seed, epoch, purpose, *more) through numpy's SeedSequence."""
    return int(np.random.SeedSequence([seed, epoch, purpose, *more]).generate_state(1, np.uint64)[0])


class EpochShuffle(Sampler):
    """One random order of the dataset per epoch, the same on every rank, drawn from (seed, epoch, SHUFFLE); this
    rank takes every num_replicas-th index of it from `rank` on. As in torch's DistributedSampler (hand-written
    only for the seed: it seeds with seed + epoch), the order is padded with its own first indices to a multiple
    of num_replicas: the ranks are disjoint but for that padding, together they cover every image, and N processes
    with batch b see the batches one process sees with batch N*b."""

    def __init__(self, dataset, num_replicas=1, rank=0, seed=0):
        self.size, self.num_replicas, self.rank, self.seed, self.epoch = len(dataset), num_replicas, rank, seed, 0
        self.num_samples = math.ceil(self.size / num_replicas)

    def set_epoch(self, epoch):
        self.epoch = epoch

    def epoch_order(self):
        """The whole epoch's order (every rank's indices), padded."""
        order = np.random.default_rng(np.random.SeedSequence([self.seed, self.epoch, SHUFFLE])).permutation(self.size)
        padding = self.num_samples * self.num_replicas - self.size
        order = order.tolist()
        return order + (order * math.ceil(padding / max(self.size, 1)))[:padding]

    def __iter__(self):
        return iter(self.epoch_order()[self.rank::self.num_replicas])

    def __len__(self):
        return self.num_samples


class WorkerSeeds:
    """A DataLoader's worker_init_fn: worker w of this rank draws its augmentation from (seed, epoch, AUGMENT, rank,
    w), in torch, numpy and Python's random alike. With no workers the main process's torch RNG takes worker 0's
    seed, so 0 and 1 workers give the same crops."""

    def __init__(self, seed, rank):
        self.seed, self.rank, self.epoch = seed, rank, 0

    def torch_seed(self, worker_id):
        return derive_seed(self.seed, self.epoch, AUGMENT, self.rank, worker_id)

    def __call__(self, worker_id):
        torch.manual_seed(self.torch_seed(worker_id))
        random.seed(self.torch_seed(worker_id))
        np.random.seed(np.random.SeedSequence([self.seed, self.epoch, AUGMENT, self.rank, worker_id])
                       .generate_state(4))


class EpochLoader(DataLoader):
    """A DataLoader whose shuffling and augmentation depend only on (seed, epoch, rank), each its own stream.

    Call `set_epoch(epoch)` before each epoch: a resumed run then sees exactly the batches and crops the
    uninterrupted run saw. Workers are seeded by WorkerSeeds; with num_workers=0 the transforms draw from the
    global torch RNG, so set_epoch reseeds that.
    """

    def __init__(self, dataset, *, seed, rank, **kwargs):
        self.seed, self.rank = seed, rank
        self.worker_seeds = WorkerSeeds(seed, rank)
        # The generator only draws the base seed torch gives workers before WorkerSeeds reseeds them; an own,
        # seeded one keeps the loader from drawing on the global RNG.
        super().__init__(dataset, generator=torch.Generator().manual_seed(derive_seed(seed, 0, AUGMENT, rank)),
                         worker_init_fn=self.worker_seeds, **kwargs)

    def set_epoch(self, epoch):
        if hasattr(self.sampler, "set_epoch"):
            self.sampler.set_epoch(epoch)
        self.worker_seeds.epoch = epoch
        self.generator.manual_seed(derive_seed(self.seed, epoch, AUGMENT, self.rank))
        if self.num_workers == 0:
            torch.manual_seed(self.worker_seeds.torch_seed(0))


def build_loader(dataset: Dataset, batch_size: int, *, train: bool, num_workers: int = 0, pin_mem: bool = False,
                 distributed: bool = False, seed: int = 0, collate_fn: Optional[Callable] = None) -> "EpochLoader":
    """Loader for one split. train shuffles (seeded, per epoch via loader.set_epoch); distributed shards.

    A training loader drops the last partial batch (MAE), unless the data holds less than one full batch, so a
    large --batch_size on a small dataset still trains on one partial batch.
    """
    if batch_size < 1:
        raise ValueError(f"batch size must be at least 1, got {batch_size}")
    world, rank = dist.world_size(), dist.rank()
    if train:  # one epoch-indexed order for single-process runs too
        sampler = EpochShuffle(dataset, num_replicas=world if distributed else 1, rank=rank if distributed else 0,
                               seed=seed)
    elif distributed:
        sampler = ShardSampler(dataset, world, rank)
    else:
        sampler = SequentialSampler(dataset)
    drop_last = train and len(sampler) >= batch_size
    return EpochLoader(dataset, seed=seed, rank=rank, batch_size=batch_size, sampler=sampler,
                       num_workers=num_workers, pin_memory=pin_mem, drop_last=drop_last, collate_fn=collate_fn)
