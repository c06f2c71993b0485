"""Low-shot training sets: K images per class, a stratified fraction, or a list of images, chosen reproducibly.

A subset is chosen from the training split's (sample id, label) pairs and `TrainSubset.seed` alone: never from the
run's seed, its heads, its lrs or its number of processes, so every run and every rank that asks for the same
subset trains on the same images. Sample ids are what `train_subset.txt` lists: paths relative to the split's
root for image files, `<dataset>/train/<index>` for datasets held in arrays (util.data gives each dataset its ids).

Library code: a list naming images the training set lacks is `UnknownSampleNames` (a ValueError) with a plain
message; the entry point adds what to do.
"""
import hashlib
from collections import defaultdict
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Optional, Tuple, Union

import numpy as np

PER_CLASS, FRACTION, LIST = "per_class", "fraction", "list"
NAMES_SHOWN = 5  # unknown or ambiguous names quoted in a message


class UnknownSampleNames(ValueError):
    """A list of training images names some the training set does not hold (or cannot tell apart)."""


@dataclass(frozen=True)
class TrainSubset:
    """Which part of the training split to train on: `value` images per class (per_class), a share of each class
    (fraction, 0 < value <= 1), or the images named in the file `value` (list; seed None)."""
    kind: str
    value: Union[int, float, str]
    seed: Optional[int] = 0

    @property
    def label(self):
        """A short name for tables: '5-shot (seed 0)', '1% (seed 0)', 'list:<file stem>'."""
        if self.kind == PER_CLASS:
            return f"{self.value}-shot (seed {self.seed})"
        if self.kind == FRACTION:
            return f"{float(self.value) * 100:g}% (seed {self.seed})"
        return f"list:{Path(str(self.value)).stem}"


@dataclass(frozen=True)
class Selection:
    """The chosen training images: `indices` into the split (ascending), their sample ids (sorted), images per
    class label, for per_class the labels that had fewer than K images (all of theirs are used), and the labels of
    the split of which no image was chosen (a list that names only some classes)."""
    subset: TrainSubset
    indices: Tuple[int, ...]
    ids: Tuple[str, ...]
    per_class: dict
    short_classes: Tuple[int, ...] = ()
    empty_classes: Tuple[int, ...] = ()

    @property
    def listing(self):
        """The text of train_subset.txt: sorted sample ids, one per line."""
        return "".join(f"{sample_id}\n" for sample_id in self.ids)

    @property
    def digest(self):
        """SHA-256 of train_subset.txt (what `sha256sum train_subset.txt` prints), first 16 hex digits."""
        return hashlib.sha256(self.listing.encode()).hexdigest()[:16]

    def describe(self):
        """One line that identifies the subset, e.g. '5-shot (seed 0): 50 images, sha256 0123456789abcdef'."""
        return f"{self.subset.label}: {len(self.indices)} images, sha256 {self.digest}"


def select(ids, labels, subset):
    """The Selection of `subset` from a split whose sample i has id ids[i] and class labels[i].

    Deterministic in (ids, labels, subset) and independent of the order of the samples."""
    ids, labels = [str(i) for i in ids], [int(label) for label in labels]
    if len(ids) != len(labels):
        raise ValueError(f"need one label per sample id, got {len(ids)} ids and {len(labels)} labels")
    if len(set(ids)) != len(ids):
        raise ValueError("sample ids must be unique")
    groups = _by_class(ids, labels)
    short = ()
    if subset.kind == PER_CLASS:
        if int(subset.value) < 1:
            raise ValueError(f"images per class must be at least 1, got {subset.value}")
        counts = {label: min(int(subset.value), len(members)) for label, members in groups.items()}
        short = tuple(sorted(label for label, members in groups.items() if len(members) < int(subset.value)))
        chosen = _draw(groups, counts, subset.seed)
    elif subset.kind == FRACTION:
        chosen = _draw(groups, stratified_counts({k: len(v) for k, v in groups.items()}, subset.value), subset.seed)
    elif subset.kind == LIST:
        chosen = resolve_names(read_list(subset.value), ids, source=subset.value)
    else:
        raise ValueError(f"unknown subset kind {subset.kind!r}; choose from {PER_CLASS}, {FRACTION}, {LIST}")
    chosen = sorted(chosen)
    per_class = defaultdict(int)
    for i in chosen:
        per_class[labels[i]] += 1
    empty = tuple(label for label in groups if label not in per_class)
    return Selection(subset, tuple(chosen), tuple(sorted(ids[i] for i in chosen)), dict(sorted(per_class.items())),
                     short, empty)


def _by_class(ids, labels):
    """{label: indices sorted by sample id}: the draw then does not depend on the order files were listed in."""
    groups = defaultdict(list)
    for i in sorted(range(len(ids)), key=ids.__getitem__):
        groups[labels[i]].append(i)
    return dict(sorted(groups.items()))


def _draw(groups, counts, seed):
    """counts[label] indices of each class, uniformly without replacement. Each class draws from its own stream
    (seed, label), so a class's images do not change when another class gains or loses images."""
    chosen = []
    for label, members in groups.items():
        rng = np.random.default_rng([int(seed), label])
        chosen += [members[j] for j in rng.permutation(len(members))[:counts[label]]]
    return chosen


def stratified_counts(class_sizes, fraction):
    """Images to keep per class for `fraction` of the data: each class's share P*n rounded down, the remaining
    images of round(P*N) given to the largest remainders (ties: lower label), and at least one per class.
    So every class keeps floor(P*n) or ceil(P*n) images (or 1 where P*n < 1)."""
    fraction = Fraction(str(fraction))  # exact decimal: 0.29 * 100 must be 29, not 28.999...
    if not 0 < fraction <= 1:
        raise ValueError(f"fraction must be in (0, 1], got {float(fraction)}")
    exact = {label: fraction * n for label, n in class_sizes.items()}
    counts = {label: int(share) for label, share in exact.items()}  # floor of a non-negative Fraction
    total = round(fraction * sum(class_sizes.values()))
    by_remainder = sorted(exact, key=lambda label: (-(exact[label] - counts[label]), label))
    for label in by_remainder[:max(0, total - sum(counts.values()))]:
        counts[label] += 1
    return {label: max(count, 1) if class_sizes[label] else 0 for label, count in counts.items()}


# ------------------------------------------------------------------------------------------------ lists

def read_list(path):
    """{image name: its first line number} of a list file: one name per line, blank lines and surrounding spaces
    ignored. UTF-8, with or without a byte-order mark (Windows editors write one; it would stick to the first name
    as an invisible character)."""
    try:
        with open(Path(path).expanduser(), encoding="utf-8-sig") as f:
            lines = [(number, line.strip()) for number, line in enumerate(f, 1)]
    except UnicodeDecodeError as err:
        raise UnknownSampleNames(f"{path} is not UTF-8 text ({err.reason} at byte {err.start})") from None
    names = {}
    for number, name in lines:
        if name:
            names.setdefault(name, number)
    if not names:
        raise UnknownSampleNames(f"{path} names no images")
    return names


def resolve_names(names, ids, *, source):
    """Indices of the samples `names` refers to: a sample id (a path relative to the training root), or a bare
    file name found once in the training set (the public ImageNet 1%/10% files list `n01440764_10026.JPEG`,
    which lives at `n01440764/n01440764_10026.JPEG`). Repeated names count once. `names`: a list, or the
    {name: line number} of read_list (messages then name the lines)."""
    lines = names if isinstance(names, dict) else {}
    by_id = {sample_id: i for i, sample_id in enumerate(ids)}
    by_name = defaultdict(list)
    for i, sample_id in enumerate(ids):
        by_name[sample_id.rsplit("/", 1)[-1]].append(i)
    chosen, unknown, ambiguous = set(), [], []
    for name in dict.fromkeys(names):
        if name in by_id:
            chosen.add(by_id[name])
        elif len(by_name.get(name, ())) == 1:
            chosen.add(by_name[name][0])
        elif name in by_name:
            ambiguous.append(name)
        else:
            unknown.append(name)
    if unknown:
        raise UnknownSampleNames(f"{len(unknown)} of the {len(names)} images listed in {source} are not in the "
                                 f"training set: {_quote(unknown, lines)}")
    if ambiguous:
        raise UnknownSampleNames(f"{len(ambiguous)} file name(s) listed in {source} occur in several class "
                                 f"folders: {_quote(ambiguous, lines)}; list them as class/file")
    return chosen


def _quote(names, lines):
    """The first names as Python writes them (an invisible character shows: '\\u200bn0144.JPEG'), with their line."""
    shown = ", ".join(f"{name!r}" + (f" (line {lines[name]})" if name in lines else "") for name in names[:NAMES_SHOWN])
    return shown + (f" and {len(names) - NAMES_SHOWN} more" if len(names) > NAMES_SHOWN else "")
