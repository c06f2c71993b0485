"""util/subsets: which training images a low-shot run uses, checked against counts worked out by hand."""
import collections
import hashlib
import random

import pytest

from util.subsets import (
    FRACTION,
    LIST,
    PER_CLASS,
    TrainSubset,
    UnknownSampleNames,
    select,
    stratified_counts,
)


def _split(sizes):
    """ids 'c<label>/<i>.jpg' and labels of a split with sizes[label] images per class."""
    pairs = [(f"c{label}/{i}.jpg", label) for label, n in enumerate(sizes) for i in range(n)]
    return [p[0] for p in pairs], [p[1] for p in pairs]


def _chosen(ids, labels, subset):
    return set(select(ids, labels, subset).ids)


def test_k_per_class_takes_exactly_k_and_all_of_a_short_class():
    ids, labels = _split([10, 7, 2, 3])
    selection = select(ids, labels, TrainSubset(PER_CLASS, 3, 0))
    assert selection.per_class == {0: 3, 1: 3, 2: 2, 3: 3}
    assert selection.short_classes == (2,)
    assert {"c2/0.jpg", "c2/1.jpg"} <= set(selection.ids)
    assert collections.Counter(labels[i] for i in selection.indices) == selection.per_class
    assert list(selection.indices) == sorted(selection.indices)
    assert [ids[i] for i in selection.indices] == sorted(selection.ids, key=ids.index)


def test_the_draw_depends_on_the_subset_seed_only_not_on_the_listing_order():
    ids, labels = _split([20, 20, 20])
    subset = TrainSubset(PER_CLASS, 5, 0)
    reference = _chosen(ids, labels, subset)
    shuffled = list(zip(ids, labels))
    random.Random(1).shuffle(shuffled)
    assert _chosen([i for i, _ in shuffled], [label for _, label in shuffled], subset) == reference
    assert _chosen(ids, labels, TrainSubset(PER_CLASS, 5, 1)) != reference
    # Adding images to one class leaves the other classes' draws as they were.
    more_ids, more_labels = _split([20, 20, 30])
    again = _chosen(more_ids, more_labels, subset)
    assert {i for i in again if not i.startswith("c2/")} == {i for i in reference if not i.startswith("c2/")}


def test_fraction_counts_are_each_class_share_rounded_and_sum_to_the_total():
    sizes = {0: 13, 1: 7, 2: 5, 3: 100}
    counts = stratified_counts(sizes, 0.3)
    # shares 3.9, 2.1, 1.5, 30: floors 3+2+1+30 = 36 of round(37.5) = 38, the two largest remainders get one more
    assert counts == {0: 4, 1: 2, 2: 2, 3: 30}
    assert stratified_counts({0: 100}, 0.29) == {0: 29}  # 0.29 * 100 in floats is 28.999...
    assert stratified_counts({0: 1000, 1: 50, 2: 3}, 0.01) == {0: 10, 1: 1, 2: 1}  # at least one image per class
    assert stratified_counts({0: 4, 1: 9}, 1.0) == {0: 4, 1: 9}
    with pytest.raises(ValueError, match="fraction"):
        stratified_counts({0: 4}, 0)


def test_fraction_subset_has_those_counts():
    ids, labels = _split([13, 7, 5, 100])
    selection = select(ids, labels, TrainSubset(FRACTION, 0.3, 4))
    assert selection.per_class == {0: 4, 1: 2, 2: 2, 3: 30}
    assert selection.subset.label == "30% (seed 4)"


def test_list_takes_relative_paths_and_unique_bare_names(tmp_path):
    ids, labels = _split([3, 3])
    listed = tmp_path / "1percent.txt"
    listed.write_text("c0/2.jpg\n\n  c1/0.jpg \nc0/2.jpg\n")
    assert _chosen(ids, labels, TrainSubset(LIST, str(listed), None)) == {"c0/2.jpg", "c1/0.jpg"}
    ids.append("c1/n01440764_10026.JPEG")
    labels.append(1)
    listed.write_text("n01440764_10026.JPEG\n")  # ImageNet's 1% files name images without their class folder
    assert _chosen(ids, labels, TrainSubset(LIST, str(listed), None)) == {"c1/n01440764_10026.JPEG"}


def test_list_names_the_first_unknown_images(tmp_path):
    ids, labels = _split([3])
    listed = tmp_path / "10percent.txt"
    listed.write_text("c0/0.jpg\n" + "".join(f"c9/missing_{i}.jpg\n" for i in range(7)))
    with pytest.raises(UnknownSampleNames) as info:
        select(ids, labels, TrainSubset(LIST, str(listed), None))
    message = str(info.value)
    assert "7 of the 8 images listed" in message and str(listed) in message
    assert "'c9/missing_0.jpg' (line 2), 'c9/missing_1.jpg' (line 3)" in message
    assert "missing_4.jpg' (line 6) and 2 more" in message
    assert "missing_5" not in message


def test_list_refuses_a_bare_name_found_in_two_classes(tmp_path):
    ids, labels = _split([2, 2])
    listed = tmp_path / "list.txt"
    listed.write_text("1.jpg\n")
    with pytest.raises(UnknownSampleNames, match="several class folders: '1.jpg' \\(line 1\\)"):
        select(ids, labels, TrainSubset(LIST, str(listed), None))


def test_listing_digest_and_labels():
    ids, labels = _split([4, 4])
    selection = select(ids, labels, TrainSubset(PER_CLASS, 2, 0))
    assert selection.listing == "".join(f"{i}\n" for i in sorted(selection.ids))
    assert selection.digest == hashlib.sha256(selection.listing.encode()).hexdigest()[:16]
    assert selection.describe() == f"2-shot (seed 0): 4 images, sha256 {selection.digest}"
    assert TrainSubset(FRACTION, 0.01, 0).label == "1% (seed 0)"
    assert TrainSubset(LIST, "/data/imagenet_subsets/1percent.txt", None).label == "list:1percent"


# ------------------------------------------------------------------------------------------------ issue 24

def test_a_list_saved_with_a_byte_order_mark_reads_its_first_name(tmp_path):
    ids, labels = _split([3, 3])
    listed = tmp_path / "windows.txt"
    listed.write_bytes("c0/2.jpg\r\nc1/0.jpg\r\n".encode("utf-8-sig"))  # Notepad's UTF-8: BOM and CRLF
    assert _chosen(ids, labels, TrainSubset(LIST, str(listed), None)) == {"c0/2.jpg", "c1/0.jpg"}


def test_an_invisible_character_in_a_name_is_shown(tmp_path):
    ids, labels = _split([3])
    listed = tmp_path / "list.txt"
    listed.write_text("c0/1.jpg\n\u200bc0/2.jpg\n")  # a zero-width space pasted in front of a name
    with pytest.raises(UnknownSampleNames, match=r"not in the training set: '\\u200bc0/2.jpg' \(line 2\)$"):
        select(ids, labels, TrainSubset(LIST, str(listed), None))
    listed.write_bytes(b"c0/1.jpg\n\xe9t\xe9.jpg\n")  # Latin-1
    with pytest.raises(UnknownSampleNames, match="is not UTF-8 text"):
        select(ids, labels, TrainSubset(LIST, str(listed), None))


def test_classes_a_list_leaves_out_are_named(tmp_path):
    ids, labels = _split([2, 2, 2, 2])
    listed = tmp_path / "list.txt"
    listed.write_text("c1/0.jpg\nc3/1.jpg\n")
    selection = select(ids, labels, TrainSubset(LIST, str(listed), None))
    assert selection.per_class == {1: 1, 3: 1} and selection.empty_classes == (0, 2)
    assert select(ids, labels, TrainSubset(PER_CLASS, 1, 0)).empty_classes == ()
