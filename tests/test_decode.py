"""util/decode.py (--decoder fast | gpu) against the paper's PIL pipeline (util/data.build_transform) on JPEGs made
here from scikit-image's photographs: the same crop boxes and flips from the same seed, the same pixels within
the resampling tolerance, the same floats from the same pixels, the same fallbacks and one-line errors.

Tolerance of the full-size path (stated once, PIXEL_*): both decode with libjpeg-turbo at PIL's settings (the
same bytes, asserted) and resize with the same antialiased bicubic filter; torch's uint8 kernel rounds its
fixed-point sums where PIL's rounds and clips between its two passes, which moves a value by one level, and by a
few where the filter's overshoot meets the 0/255 clip. A wrong box, flip, size or filter moves every pixel.
The DCT-scaled path (a crop 2x its output or more): within JPEG's own error, PSNR against the PIL path above the
PSNR of the JPEG file against the picture it was encoded from.
"""
import math

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.io import ImageReadMode, decode_jpeg

from util.data import build_dataset, build_loader, build_transform
from util.decode import (
    DeviceDecodeTransform,
    FastTransform,
    collate_encoded,
    decode_batch,
    device_images,
    draft_scale,
    jpeg_size,
    pad_batch,
    resized_size,
)
from util.images import IMAGENET_STD, BadImageError, OneDrawResizedCrop
from util.images import load_rgb as pil_load

S = 64
PIXEL_MEAN = 0.05     # mean |fast - PIL| in 8-bit levels, over every value of every crop
PIXEL_WITHIN_1 = 0.999  # share of values within one level
QUALITY = 90


def photo(name, size):
    import skimage.data

    return Image.fromarray(getattr(skimage.data, name)()).convert("RGB").resize(size, Image.Resampling.BICUBIC)


@pytest.fixture(scope="module")
def jpegs(tmp_path_factory):
    """JPEGs of ImageNet-like sizes (landscape, portrait, square, small, grayscale, progressive)."""
    folder = tmp_path_factory.mktemp("jpegs")
    paths = []
    for i, (name, size) in enumerate([("astronaut", (200, 150)), ("chelsea", (150, 200)), ("coffee", (160, 160)),
                                      ("rocket", (90, 70)), ("immunohistochemistry", (220, 130))]):
        path = folder / f"{i}.jpg"
        photo(name, size).save(path, quality=QUALITY)
        paths.append(path)
    photo("camera", (180, 140)).convert("L").save(folder / "gray.jpg", quality=QUALITY)
    photo("coins", (170, 120)).save(folder / "progressive.jpg", quality=QUALITY, progressive=True)
    return paths + [folder / "gray.jpg", folder / "progressive.jpg"]


def pil_path(split, path, seed, size=S):
    torch.manual_seed(seed)
    return build_transform(split, size)(pil_load(path))


def fast_path(split, path, seed, size=S, **kw):
    torch.manual_seed(seed)
    return device_images(FastTransform(split, size, **kw)(path)[None], "cpu")[0]


def levels(a, b):
    """|a - b| of two normalised [3, H, W] images in 8-bit levels."""
    return (a - b).abs() * torch.tensor(IMAGENET_STD)[:, None, None] * 255


# ----------------------------------------------------------------------------------------------- geometry

def test_crop_boxes_and_flips_are_the_pil_paths_draws():
    # The fast path draws the box with the function OneDrawResizedCrop.get_params calls, then the flip, in the
    # PIL path's order: the same seed gives the same box and flip, image after image.
    transform = FastTransform("train", S)
    ours, theirs = [], []
    torch.manual_seed(0)
    for i in range(500):
        plan = transform.plan(200 + i, 150)
        ours.append((*plan.box, plan.flip))
    torch.manual_seed(0)
    crop = OneDrawResizedCrop(S)
    for i in range(500):
        box = OneDrawResizedCrop.get_params(Image.new("RGB", (200 + i, 150)), crop.scale, crop.ratio)
        theirs.append((*box, bool(torch.rand(1) < 0.5)))
    assert ours == theirs


def test_crop_boxes_follow_maes_one_draw_rule():
    # MAE's rule computed with numpy (as tests/test_data.py does for the PIL path): mean crop area, the aspect
    # ratios' range, boxes inside the image, and half the crops mirrored.
    width, height, draws = 500, 375, 20000
    rng = np.random.default_rng(0)
    area = width * height * rng.uniform(0.08, 1.0, 200000)
    ratio = np.exp(rng.uniform(np.log(3 / 4), np.log(4 / 3), 200000))
    expected = (np.minimum(np.round(np.sqrt(area * ratio)), width)
                * np.minimum(np.round(np.sqrt(area / ratio)), height)).mean() / (width * height)
    transform = FastTransform("train", 224)
    torch.manual_seed(1)
    plans = [transform.plan(width, height) for _ in range(draws)]
    boxes = np.array([p.box for p in plans])
    assert (boxes[:, 0] >= 0).all() and (boxes[:, 1] >= 0).all()
    assert (boxes[:, 0] + boxes[:, 2] <= height).all() and (boxes[:, 1] + boxes[:, 3] <= width).all()
    fractions = boxes[:, 2] * boxes[:, 3] / (width * height)
    assert abs(fractions.mean() - expected) < 4 * fractions.std() / math.sqrt(draws)
    unclipped = (boxes[:, 2] < height) & (boxes[:, 3] < width)
    aspects = boxes[unclipped, 3] / boxes[unclipped, 2]
    assert aspects.min() > 3 / 4 * 0.9 and aspects.max() < 4 / 3 * 1.1
    assert abs(np.mean([p.flip for p in plans]) - 0.5) < 4 * 0.5 / math.sqrt(draws)
    assert all(p.size == (224, 224) and p.crop == 224 for p in plans)


@pytest.mark.parametrize("size", [(500, 375), (375, 500), (333, 500), (257, 256), (640, 427), (100, 100)])
def test_val_resize_is_torchvisions(size):
    # The size torchvision's Resize(256) gives a PIL image, then the centre 224 of it.
    resized = build_transform("val", 224).transforms[0](Image.new("RGB", size))
    assert resized_size(*size, 256) == resized.size[::-1]
    plan = FastTransform("val", 224).plan(*size)
    assert plan.box == (0, 0, size[1], size[0]) and plan.size == resized.size[::-1] and plan.crop == 224
    assert not plan.flip


# -------------------------------------------------------------------------------------------------- pixels

def test_jpeg_decode_is_pils(jpegs):
    for path in jpegs:
        data = torch.frombuffer(bytearray(path.read_bytes()), dtype=torch.uint8)
        ours = decode_jpeg(data, mode=ImageReadMode.RGB).permute(1, 2, 0).numpy()
        assert np.array_equal(ours, np.asarray(pil_load(path))), path.name


@pytest.mark.parametrize("split", ["train", "val"])
def test_fast_crops_are_the_pil_paths_within_resampling_tolerance(jpegs, split):
    # Full-size decoding here (these small pictures' crops are often 2x the 64-pixel output, which the next
    # tests give to DCT scaling); ImageNet's 500x375 crops to 224 are never 2x, so this is their path.
    diffs = []
    for seed, path in enumerate(jpegs * 3):
        ours, theirs = fast_path(split, path, seed, draft=False), pil_path(split, path, seed)
        assert ours.shape == theirs.shape == (3, S, S) and ours.dtype == torch.float32
        diffs.append(levels(ours, theirs).flatten())
    diffs = torch.cat(diffs)
    assert diffs.mean() < PIXEL_MEAN, diffs.mean()
    assert (diffs < 1.01).float().mean() > PIXEL_WITHIN_1


def test_a_mirrored_or_shifted_crop_is_outside_the_tolerance(jpegs):
    # The tolerance tells a right crop from a wrong one: the same crop mirrored, or cut one pixel to the side.
    image = pil_load(jpegs[0])
    to_tensor, normalize = build_transform("val", S).transforms[2:]
    crop = lambda left: normalize(to_tensor(image.resize((S, S), Image.Resampling.BICUBIC,  # noqa: E731
                                                         box=(left, 20, left + 120, 140))))
    right = crop(30)
    assert levels(right.flip(-1), right).mean() > 20 * PIXEL_MEAN
    assert levels(crop(31), right).mean() > 5 * PIXEL_MEAN


def psnr(a, b):
    mse = ((a.astype(np.float64) - b.astype(np.float64)) ** 2).mean()
    return 10 * math.log10(255 ** 2 / mse)


@pytest.mark.parametrize("mode", ["RGB", "L"])
def test_dct_scaled_decode_is_within_jpegs_own_error(tmp_path, mode):
    # A 1600x1200 photo (colour, or grayscale: libjpeg hands that one over as L, which the fast path must
    # expand to RGB as load_rgb does): its crops are 2-8x their 64-pixel output, so libjpeg decodes at 1/2..1/8.
    # The bar: the error JPEG itself makes of the colour picture at this quality (a grayscale file, with no
    # chroma subsampling, is closer to its picture than that).
    colour = photo("astronaut", (1600, 1200))
    colour.save(tmp_path / "colour.jpg", quality=QUALITY)
    jpeg_psnr = psnr(np.asarray(pil_load(tmp_path / "colour.jpg")), np.asarray(colour))
    path = tmp_path / "large.jpg"
    colour.convert(mode).save(path, quality=QUALITY)
    scales = set()
    for split in ("train", "val"):
        transform = FastTransform(split, S)
        for seed in range(6):
            torch.manual_seed(seed)
            scales.add(draft_scale(transform.plan(1600, 1200)))
            to_uint8 = lambda x: (x * torch.tensor([0.229, 0.224, 0.225])[:, None, None]  # noqa: E731
                                  + torch.tensor([0.485, 0.456, 0.406])[:, None, None]).mul(255).round().numpy()
            ours, theirs = to_uint8(fast_path(split, path, seed)), to_uint8(pil_path(split, path, seed))
            assert psnr(ours, theirs) > jpeg_psnr, (split, seed)
    assert scales - {1}, "no crop was decoded at reduced size"
    # without DCT scaling the same crops are the full-size path's
    torch.manual_seed(0)
    assert levels(fast_path("train", path, 0, draft=False), pil_path("train", path, 0)).mean() < PIXEL_MEAN


def test_device_normalisation_is_totensor_and_normalize_bit_for_bit(jpegs):
    # The same uint8 crop through device_images and through the PIL path's ToTensor + Normalize.
    image = pil_load(jpegs[0]).resize((S, S))
    pixels = torch.from_numpy(np.asarray(image).copy())[None]  # [1, S, S, 3], as the fast loader carries it
    to_tensor, normalize = build_transform("val", S).transforms[2:]
    assert torch.equal(device_images(pixels, "cpu")[0], normalize(to_tensor(image)))
    floats = torch.randn(2, 3, S, S)
    assert device_images(floats, "cpu") is floats  # the PIL path's batches pass unchanged


# ---------------------------------------------------------------------------------------- files and errors

def test_jpeg_size_reads_the_frame_header(jpegs, tmp_path):
    for path in jpegs:
        assert jpeg_size(path.read_bytes()) == Image.open(path).size, path.name
    exif = Image.Exif()
    exif[0x010F] = "camera maker"
    photo("chelsea", (120, 90)).save(tmp_path / "exif.jpg", exif=exif, quality=80)
    assert jpeg_size((tmp_path / "exif.jpg").read_bytes()) == (120, 90)
    photo("chelsea", (120, 90)).convert("CMYK").save(tmp_path / "cmyk.jpg")
    photo("chelsea", (120, 90)).save(tmp_path / "a.png")
    for name in ("cmyk.jpg", "a.png"):
        assert jpeg_size((tmp_path / name).read_bytes()) is None, name
    data = (tmp_path / "exif.jpg").read_bytes()
    assert jpeg_size(data[:40]) is None and jpeg_size(b"") is None and jpeg_size(b"\xff\xd8garbage") is None


@pytest.mark.parametrize("kind", ["png", "cmyk", "16-bit", "palette"])
def test_other_files_go_through_pils_reader(tmp_path, kind):
    # What PIL reads, the fast path reads through the same load_rgb: the same pixels, so the crop is within
    # the resize's tolerance (16-bit: scaled to 8 bits by load_rgb, not clipped).
    image = photo("coffee", (120, 100))
    path = tmp_path / f"image.{'jpg' if kind == 'cmyk' else 'png'}"
    if kind == "cmyk":
        image.convert("CMYK").save(path, quality=QUALITY)
    elif kind == "16-bit":
        wide = (np.asarray(image.convert("L"), dtype=np.uint16) * 257)
        Image.fromarray(wide).save(path)
        assert Image.open(path).mode.startswith("I")
    elif kind == "palette":
        image.quantize(colors=32).save(path)
    else:
        image.save(path)
    for split in ("train", "val"):
        diff = levels(fast_path(split, path, 3), pil_path(split, path, 3))
        assert diff.mean() < PIXEL_MEAN and diff.max() < 10, (kind, split)


def test_corrupt_file_is_named_in_one_line(tmp_path):
    good = photo("rocket", (80, 60))
    good.save(tmp_path / "good.jpg")
    data = (tmp_path / "good.jpg").read_bytes()
    (tmp_path / "truncated.jpg").write_bytes(data[:len(data) // 2])  # a valid header, then nothing
    (tmp_path / "text.jpg").write_bytes(b"not an image at all")
    for name in ("truncated.jpg", "text.jpg"):
        with pytest.raises(BadImageError) as info:
            FastTransform("train", S)(tmp_path / name)
        with pytest.raises(BadImageError) as pil:
            pil_load(tmp_path / name)
        assert str(info.value) == str(pil.value) and "\n" not in str(info.value)
        assert str(tmp_path / name) in str(info.value)


@pytest.mark.parametrize("num_workers", [0, 2])
def test_fast_loader_on_an_image_folder(tmp_path, num_workers):
    # build_dataset/build_loader with --decoder fast: uint8 [B, S, S, 3] batches, the labels of the PIL path,
    # and an unreadable file still named in one line through the workers.
    for split in ("train", "val"):
        for c, name in enumerate(("astronaut", "chelsea")):
            (tmp_path / split / f"c{c}").mkdir(parents=True)
            for i in range(3):
                photo(name, (90 + 10 * i, 70)).save(tmp_path / split / f"c{c}" / f"{i}.jpg")
    dataset = build_dataset(tmp_path, "train", S, decoder="fast")
    images, labels = next(iter(build_loader(dataset, 6, train=False, num_workers=num_workers)))
    assert images.dtype == torch.uint8 and images.shape == (6, S, S, 3)
    assert labels.tolist() == build_dataset(tmp_path, "train", S).targets
    (tmp_path / "train" / "c0" / "1.jpg").write_bytes(b"broken")
    with pytest.raises(Exception) as info:
        list(build_loader(build_dataset(tmp_path, "train", S, decoder="fast"), 6, train=False,
                          num_workers=num_workers))
    from util.images import find_bad_image
    bad = find_bad_image(info.value)
    assert bad is not None and "1.jpg" in str(bad) and "\n" not in str(bad)


# ------------------------------------------------------------------------------- --decoder gpu, run on the CPU

def test_device_decode_gives_the_fast_paths_crops(jpegs, tmp_path):
    # The workers' share (bytes + plan) then decode_batch on device "cpu": the crops of FastTransform without
    # DCT scaling, bit for bit, from the same seed; a PNG in the batch comes finished from its worker.
    photo("coffee", (120, 100)).save(tmp_path / "x.png")
    files = [*jpegs, tmp_path / "x.png"]
    for split in ("train", "val"):
        torch.manual_seed(5)
        encoded = [(DeviceDecodeTransform(split, S)(path), i) for i, path in enumerate(files)]
        assert [e.data is None for e, _ in encoded] == [False] * len(jpegs) + [True]
        batch, labels = collate_encoded(encoded)
        assert batch.shape == (len(files), S, S, 3) and labels.tolist() == list(range(len(files)))
        decoded = decode_batch(batch, "cpu")
        torch.manual_seed(5)
        fast = torch.stack([FastTransform(split, S, draft=False)(path) for path in files])
        assert torch.equal(decoded, fast), split
        assert torch.equal(device_images(batch, "cpu"), device_images(fast, "cpu"))
        # padded to a training batch's size (TokenCache.fill): copies of the last image after the batch's own
        size = len(files) + 2
        for padded in (device_images(pad_batch(batch, size), "cpu"), device_images(pad_batch(fast, size), "cpu")):
            assert len(padded) == len(files) + 2 and torch.equal(padded[:len(files)], device_images(fast, "cpu"))
            assert torch.equal(padded[-1], padded[len(files) - 1]) and torch.equal(padded[-2], padded[-1])
