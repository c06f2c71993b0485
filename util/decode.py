"""The fast input pipeline (--decoder fast | gpu): image files to uint8 crops, normalised on the device.

The paper's pipeline (--decoder pil, util/data.build_transform) decodes and resizes with PIL and normalises in the
data worker, in float32. This one cuts the same crops from the same random draws: OneDrawResizedCrop.get_params
on the size read from the file's header, then the flip's draw, in the PIL path's order, so a seed gives the same
boxes and flips in both; and the same val Resize(S*256/224) + CenterCrop(S). What differs is how:
- JPEGs are decoded by torchvision.io.decode_jpeg (libjpeg-turbo with PIL's settings: the same pixels);
- when the crop is at least 2x (4x, 8x) larger than its output in both sides, the JPEG is decoded at 1/2 (1/4,
  1/8) size inside libjpeg (DCT scaling, PIL's Image.draft) and the crop, in fractional coordinates, resized from
  there: the resize still only shrinks;
- crops are resized as uint8 tensors by torchvision's antialiased bicubic (PIL's filter, with uint8 kernels);
- the loader carries uint8 (a quarter of float32's bytes through worker queues and pinned memory) and
  `device_images` normalises on the device with ToTensor's and Normalize's own ops: the same floats for the
  same pixels.
Anything else (PNG, grayscale/CMYK/16-bit files, a JPEG libjpeg refuses) is read by util.data.load_rgb, so it is
accepted, or named in one line, exactly as in the PIL path.

--decoder gpu: the data workers only read the file and draw the crop (`Encoded`); `decode_batch` decodes the batch
with nvjpeg on the device and cuts the crops there. Every function here also runs with device="cpu", which is how
the tests check it on a machine without a GPU.
"""
import io
from typing import NamedTuple, Optional, Tuple

import numpy as np
import torch
from PIL import Image
from torchvision.io import ImageReadMode, decode_jpeg
from torchvision.transforms import functional as TF
from torchvision.transforms.v2 import functional as F2

from util.data import BICUBIC, IMAGENET_MEAN, IMAGENET_STD, OneDrawResizedCrop, load_rgb

DECODERS = ("pil", "fast", "gpu")
DRAFT_SCALES = (8, 4, 2)  # the reductions libjpeg's DCT scaling gives through PIL's draft
JPEG_MODES = ("RGB", "L")  # YCbCr/RGB and grayscale JPEGs; CMYK ones go through PIL as in the paper's path


class Plan(NamedTuple):
    """What to make of one image, in its full-size pixels: resize `box` (top, left, height, width) to `size`
    (height, width), then cut the centre `crop` x `crop` (val; train: size is already crop x crop), then mirror."""
    box: Tuple[int, int, int, int]
    size: Tuple[int, int]
    crop: int
    flip: bool


class Encoded(NamedTuple):
    """One image as a data worker hands it to --decoder gpu: the file's bytes and its Plan, or, for a file nvjpeg
    is not given (PNG, CMYK...), the finished uint8 crop decoded on the CPU."""
    data: Optional[torch.Tensor]
    plan: Optional[Plan]
    pixels: Optional[torch.Tensor] = None


class FastTransform:
    """The train (one-draw RandomResizedCrop + flip) or val (resize + centre crop) transform of util.data, on
    uint8 tensors: a file path (or an already opened PIL image) -> uint8 [3, S, S]. `reads_files` tells
    util.data.ImageFiles to hand over the path rather than a decoded image."""

    reads_files = True

    def __init__(self, split, input_size, *, draft=True):
        if split not in ("train", "val"):
            raise ValueError(f"split must be 'train' or 'val', got {split!r}")
        self.split, self.input_size, self.draft = split, input_size, draft
        self.crop = OneDrawResizedCrop(input_size, interpolation=BICUBIC)  # scale and ratio as build_transform's

    def plan(self, image) -> Plan:
        """The Plan for a PIL image (opened lazily: only its header is read) or a [C, H, W] tensor. Train draws
        from torch's RNG exactly as the PIL path does (the box, then the flip)."""
        width, height = TF.get_image_size(image)
        s = self.input_size
        if self.split == "train":
            box = OneDrawResizedCrop.get_params(image, self.crop.scale, self.crop.ratio)
            return Plan(box, (s, s), s, bool(torch.rand(1) < 0.5))
        return Plan((0, 0, height, width), resized_size(width, height, int(s * 256 / 224)), s, False)

    def __call__(self, source):
        if isinstance(source, Image.Image):
            return self.finish(pil_pixels(source), self.plan(source))
        data, header = read_jpeg(source)
        if header is None:
            return self._from_pil(source)
        plan = self.plan(header)
        scale = draft_scale(plan) if self.draft else 1
        try:
            if scale > 1:
                return self.finish(_drafted(header, plan, scale), plan, resized=True)
            return self.finish(decode_jpeg(data, mode=ImageReadMode.RGB), plan)
        except (OSError, RuntimeError, ValueError, SyntaxError):  # libjpeg refused it: PIL reads it or names it
            return self._from_pil(source)

    def _from_pil(self, path):
        image = load_rgb(path)
        return self.finish(pil_pixels(image), self.plan(image))

    @staticmethod
    def finish(pixels, plan, *, resized=False):
        """uint8 [3, H, W] of the whole image -> the Plan's crop (`resized`: pixels are the box already resized)."""
        if not resized:
            pixels = F2.resized_crop(pixels, *plan.box, list(plan.size), interpolation=BICUBIC, antialias=True)
        if plan.size != (plan.crop, plan.crop):
            pixels = F2.center_crop(pixels, [plan.crop])
        return pixels.flip(-1) if plan.flip else pixels


def resized_size(width, height, shorter):
    """(height, width) that transforms.Resize(shorter) gives an image: the shorter side `shorter`, the longer one
    scaled and truncated (torchvision's rule; the drafted path needs it from the full size, before decoding)."""
    if width <= height:
        return int(shorter * height / width), shorter
    return shorter, int(shorter * width / height)


def read_jpeg(path):
    """(the file's bytes as a uint8 tensor, its PIL header) for a JPEG decode_jpeg gives PIL's pixels of;
    (None, None) for anything else, which load_rgb then reads or names."""
    try:
        with open(path, "rb") as f:
            data = bytearray(f.read())
        header = Image.open(io.BytesIO(data))  # reads the header only
    except Exception:  # unreadable or not an image: load_rgb says which, in one line
        return None, None
    if header.format != "JPEG" or header.mode not in JPEG_MODES:
        return None, None
    return torch.frombuffer(data, dtype=torch.uint8), header


def draft_scale(plan):
    """The largest DCT reduction that leaves the crop box at least as large as its output in both sides."""
    _, _, height, width = plan.box
    out_h, out_w = plan.size
    return next((s for s in DRAFT_SCALES if height >= s * out_h and width >= s * out_w), 1)


def _drafted(header, plan, scale):
    """The Plan's box of a JPEG decoded at 1/scale size, resized to the Plan's size: PIL's resize takes the box
    in fractional coordinates of the reduced image, so it covers the same part of the picture as at full size."""
    width, height = header.size
    mode, extent = header.draft("RGB", (width // scale, height // scale))
    reduction = width / extent[2]  # what libjpeg chose; equal to `scale` for every size >= 8 pixels
    top, left, h, w = plan.box
    box = tuple(v / reduction for v in (left, top, left + w, top + h))
    image = header.convert("RGB").resize(plan.size[::-1], Image.Resampling.BICUBIC, box=box)
    return pil_pixels(image)


def pil_pixels(image):
    """An RGB PIL image as a uint8 [3, H, W] tensor (ToTensor's layout, without its float conversion)."""
    return torch.from_numpy(np.array(image.convert("RGB"), dtype=np.uint8)).permute(2, 0, 1).contiguous()


# ------------------------------------------------------------------------------------------- on the device

def device_images(images, device):
    """What the frozen encoder reads: a loader's batch on `device`, float32 and normalised. The one place the
    fast pipeline normalises: ToTensor's x / 255 and Normalize's (x - mean) / std, the same ops in the same order,
    so uint8 pixels give the PIL path's floats bit for bit. Float batches (--decoder pil) pass unchanged."""
    if isinstance(images, EncodedBatch):
        images = decode_batch(images, device)
    images = images.to(device, non_blocking=True)
    if images.dtype != torch.uint8:
        return images
    return TF.normalize(images.float().div(255), IMAGENET_MEAN, IMAGENET_STD, inplace=True)


class DeviceDecodeTransform(FastTransform):
    """--decoder gpu, in the data worker: the bytes and the Plan of a JPEG (same draws as FastTransform), or the
    finished crop, decoded on the CPU, of anything nvjpeg is not given."""

    def __init__(self, split, input_size):
        super().__init__(split, input_size, draft=False)  # nvjpeg has no DCT scaling

    def __call__(self, source):
        if not isinstance(source, Image.Image):
            data, header = read_jpeg(source)
            if header is not None:
                return Encoded(data, self.plan(header))
        return Encoded(None, None, super().__call__(source))


class EncodedBatch:
    """A batch of `Encoded` images; `.shape` is that of the batch decode_batch makes of it."""

    def __init__(self, items, input_size):
        self.items, self.input_size = list(items), input_size

    @property
    def shape(self):
        return torch.Size((len(self.items), 3, self.input_size, self.input_size))

    def pin_memory(self):  # the DataLoader's pin_memory=True calls this in its pinning thread
        self.items = [Encoded(item.data.pin_memory() if item.data is not None else None, item.plan,
                              item.pixels.pin_memory() if item.pixels is not None else None) for item in self.items]
        return self


def collate_encoded(samples):
    """DataLoader collate_fn of --decoder gpu: [(Encoded, label)] -> (EncodedBatch, labels)."""
    images, labels = zip(*samples)
    first = next(e for e in images)
    size = first.plan.crop if first.plan is not None else first.pixels.shape[-1]
    return EncodedBatch(images, size), torch.as_tensor(labels)


def decode_batch(batch, device):
    """An EncodedBatch -> uint8 [B, 3, S, S] on `device`: the JPEGs decoded together (nvjpeg on CUDA, libjpeg on the
    CPU), each crop cut there by FastTransform.finish."""
    jpegs = [i for i, item in enumerate(batch.items) if item.data is not None]
    decoded = decode_jpeg([batch.items[i].data for i in jpegs], mode=ImageReadMode.RGB, device=device) if jpegs else []
    out = [None] * len(batch.items)
    for i, pixels in zip(jpegs, decoded):
        out[i] = FastTransform.finish(pixels, batch.items[i].plan)
    for i, item in enumerate(batch.items):
        if item.data is None:
            out[i] = item.pixels.to(device, non_blocking=True)
    return torch.stack(out)


def build_fast_transform(split, input_size, decoder):
    """The transform of --decoder fast or gpu (util.data.build_transform builds the PIL one)."""
    if decoder == "fast":
        return FastTransform(split, input_size)
    if decoder == "gpu":
        return DeviceDecodeTransform(split, input_size)
    raise ValueError(f"decoder must be one of {', '.join(DECODERS)}, got {decoder!r}")


def collate_fn(decoder):
    """The DataLoader collate_fn a decoder needs (None: torch's default)."""
    return collate_encoded if decoder == "gpu" else None
