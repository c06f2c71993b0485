"""digits_clutter: a small handwritten digit somewhere on a larger canvas cluttered with fragments of other digits.

Plain digits are too easy to tell encoders apart (a random-initialised ViT already separates them); here the
label is one whole digit at a random position and scale among 3 to 6 distractor fragments cut from other digits,
so how an encoder aggregates its tokens matters. Everything comes from scikit-learn's bundled 1,797 8x8 digits.

Generated once, deterministically from the seed, into a cache folder laid out as an ImageFolder
(`<root>/{train,val}/<digit>/<index>.png`, grayscale PNG) plus `manifest.csv` (file, label, the source digit and
the source digits of the fragments). Train and val canvases are drawn from disjoint source digits (a stratified
80/20 split of scikit-learn's digits): no val digit, whole or as a fragment, is ever seen in training.
"""
import csv
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image
from torch.utils.data import Dataset
from torchvision import transforms

from util.images import BICUBIC, normalize

VERSION = 1  # bump when the generator changes: a new cache folder is written, old ones are never reused
SEED = 0
CANVAS = 64
SIZES = {"train": 5000, "val": 1000}
DIGIT_PX = (24, 40)        # side of the labelled digit on the canvas (8x8 source, upscaled 3x-5x)
FRAGMENTS = (3, 6)         # distractor fragments per canvas, inclusive
FRAGMENT_CELLS = (2, 4)    # a fragment is a 2x2..4x4 (of 8x8) window of another digit, upscaled like a digit
POSITION_SPREAD = 1.0      # the digit's top-left is drawn from this central share of the free range (1: anywhere)
FRAGMENT_INK = (0.6, 1.0)  # brightness of a fragment (the labelled digit: DIGIT_INK)
DIGIT_INK = (0.7, 1.0)
MAX_OVERLAP = 0.3          # share of a fragment's box allowed on the digit's box (the digit stays readable)
VAL_FRACTION = 0.2
MANIFEST = "manifest.csv"
CLASSES = [str(d) for d in range(10)]
NAME = "digits_clutter"


def cache_base():
    """Where generated and named datasets live by default: $BEYOND_CLS_CACHE, else ~/.cache/beyond-cls."""
    return Path(os.environ.get("BEYOND_CLS_CACHE", "~/.cache/beyond-cls")).expanduser()


def default_root(seed=SEED):
    return cache_base() / f"{NAME}-v{VERSION}-seed{seed}"


# --------------------------------------------------------------------------------------------- generation

def source_split(targets, seed=SEED, val_fraction=VAL_FRACTION):
    """Indices of scikit-learn's digits for train and val canvases: per class, a seeded val_fraction goes to val."""
    rng = np.random.default_rng([seed, 1])
    train, val = [], []
    for label in range(10):
        idx = np.flatnonzero(targets == label)
        idx = idx[rng.permutation(len(idx))]
        n_val = int(round(len(idx) * val_fraction))
        val += idx[:n_val].tolist()
        train += idx[n_val:].tolist()
    return np.sort(train), np.sort(val)


def _upscale(cells, side_h, side_w):
    """An array of 0..1 intensities resized (bicubic, clipped) to side_h x side_w."""
    image = Image.fromarray((cells * 255).astype(np.uint8)).resize((side_w, side_h), Image.Resampling.BICUBIC)
    return np.asarray(image, dtype=np.float32) / 255


def _overlap(a, b):
    """Intersection area of boxes (top, left, height, width)."""
    h = min(a[0] + a[2], b[0] + b[2]) - max(a[0], b[0])
    w = min(a[1] + a[3], b[1] + b[3]) - max(a[1], b[1])
    return max(h, 0) * max(w, 0)


def draw_canvas(rng, images, targets, sources, label):
    """One canvas: (uint8 [CANVAS, CANVAS], source index of the digit, source indices of the fragments)."""
    canvas = np.zeros((CANVAS, CANVAS), dtype=np.float32)
    same = sources[targets[sources] == label]
    source = int(same[rng.integers(len(same))])
    side = int(rng.integers(DIGIT_PX[0], DIGIT_PX[1] + 1))
    free = CANVAS - side
    low = int(round(free * (1 - POSITION_SPREAD) / 2))
    top, left = (int(v) for v in rng.integers(low, free - low + 1, size=2))
    digit_box = (top, left, side, side)
    fragments = []
    for _ in range(int(rng.integers(FRAGMENTS[0], FRAGMENTS[1] + 1))):
        other = int(sources[rng.integers(len(sources))])
        while other == source:
            other = int(sources[rng.integers(len(sources))])
        ch, cw = (int(v) for v in rng.integers(FRAGMENT_CELLS[0], FRAGMENT_CELLS[1] + 1, size=2))
        r0, c0 = int(rng.integers(0, 9 - ch)), int(rng.integers(0, 9 - cw))
        scale = rng.uniform(DIGIT_PX[0], DIGIT_PX[1]) / 8
        fh, fw = max(2, round(ch * scale)), max(2, round(cw * scale))
        for _attempt in range(20):  # keep the labelled digit readable: fragments may only graze it
            box = (int(rng.integers(0, CANVAS - fh + 1)), int(rng.integers(0, CANVAS - fw + 1)), fh, fw)
            if _overlap(box, digit_box) <= MAX_OVERLAP * fh * fw:
                break
        piece = _upscale(images[other][r0:r0 + ch, c0:c0 + cw], fh, fw) * rng.uniform(*FRAGMENT_INK)
        region = canvas[box[0]:box[0] + fh, box[1]:box[1] + fw]
        np.maximum(region, piece, out=region)
        fragments.append(other)
    digit = _upscale(images[source], side, side) * rng.uniform(*DIGIT_INK)
    region = canvas[top:top + side, left:left + side]
    np.maximum(region, digit, out=region)
    return np.round(canvas * 255).astype(np.uint8), source, fragments


def generate(root, seed=SEED, sizes=None):
    """Write the dataset under root (which must not exist yet): PNGs per split and class, then manifest.csv."""
    from sklearn.datasets import load_digits

    sizes = dict(SIZES if sizes is None else sizes)
    digits = load_digits()
    images = digits.images.astype(np.float32) / 16
    targets = digits.target
    splits = dict(zip(("train", "val"), source_split(targets, seed)))
    root = Path(root)
    rows = []
    for split_id, (split, count) in enumerate(sizes.items()):
        rng = np.random.default_rng([seed, 2, split_id])
        labels = rng.permutation(np.arange(count) % 10)  # balanced classes, shuffled order
        for c in CLASSES:
            (root / split / c).mkdir(parents=True, exist_ok=True)
        for i, label in enumerate(labels):
            pixels, source, fragments = draw_canvas(rng, images, targets, splits[split], int(label))
            rel = f"{split}/{label}/{i:05d}.png"
            Image.fromarray(pixels, "L").save(root / rel, optimize=False)
            rows.append((rel, int(label), source, ";".join(map(str, fragments))))
    with open(root / MANIFEST, "w", newline="") as f:  # written last: its presence marks a complete folder
        writer = csv.writer(f)
        writer.writerow(["file", "label", "source", "fragments"])
        writer.writerows(rows)
    return root


def ensure(root=None, seed=SEED):
    """The cache folder, generated on first use. Concurrent first uses each generate into a private temporary
    folder and rename it into place; the first rename wins and the others discard theirs, so a reader never sees
    a half-written folder."""
    root = Path(root).expanduser() if root else default_root(seed)
    if (root / MANIFEST).is_file():
        return root
    if root.exists() and any(root.iterdir()):
        raise ValueError(f"{root} exists but holds no {MANIFEST}, so it is no complete {NAME} folder; remove it, "
                         "or name an empty or new folder as digits_clutter:<folder>")
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}.", dir=root.parent))
    try:
        generate(tmp, seed)
        if root.exists():
            root.rmdir()  # an empty folder (checked above) may be replaced
        os.rename(tmp, root)
    except OSError:
        if not (root / MANIFEST).is_file():
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return root


def read_manifest(root):
    with open(Path(root) / MANIFEST, newline="") as f:
        return [dict(file=r["file"], label=int(r["label"]), source=int(r["source"]),
                     fragments=[int(v) for v in r["fragments"].split(";") if v]) for r in csv.DictReader(f)]


# ------------------------------------------------------------------------------------------------ dataset

def build_transform(split, input_size):
    """val: the whole canvas (resized only when input_size differs: a centre crop could cut the digit off).
    train: the same plus a small random shift and zoom (no flip: a mirrored 2 is no 2)."""
    resize = [] if input_size == CANVAS else [transforms.Resize(input_size, interpolation=BICUBIC)]
    if split == "val":
        return transforms.Compose([*resize, *normalize()])
    return transforms.Compose([transforms.RandomAffine(0, translate=(0.06, 0.06), scale=(0.9, 1.1)), *resize,
                               *normalize()])


class DigitsClutter(Dataset):
    """One split of digits_clutter, held in memory; `.classes`, `.targets`, `.samples` (path, label), `.images`."""

    def __init__(self, split, transform, root=None, seed=SEED):
        if split not in ("train", "val"):
            raise ValueError(f"split must be 'train' or 'val', got {split!r}")
        self.root = ensure(root, seed)
        rows = [r for r in read_manifest(self.root) if r["file"].startswith(split + "/")]
        self.samples = [(str(self.root / r["file"]), r["label"]) for r in rows]
        self.sample_ids = [r["file"].split("/", 1)[1] for r in rows]  # "<digit>/<index>.png" for --train_list
        self.targets = [r["label"] for r in rows]
        self.images = [Image.open(path).convert("RGB") for path, _ in self.samples]
        for image in self.images:
            image.load()
        self.classes = list(CLASSES)
        self.transform = transform

    def __len__(self):
        return len(self.targets)

    def __getitem__(self, index):
        image = self.images[index]
        return (self.transform(image) if self.transform else image), self.targets[index]


def build(split, input_size, *, root=None, augment=True):
    """The split with its transform (augment=False: the deterministic val transform for the train split too)."""
    return DigitsClutter(split, build_transform(split if augment else "val", input_size), root=root)
