"""The fast input pipeline (--decoder fast | gpu): image files to uint8 crops, normalised on the device.

The paper's pipeline (--decoder pil, util/data.build_transform) decodes and resizes with PIL and normalises in the
data worker, in float32. This one cuts the same crops from the same random draws: util.images.one_draw_box (what
OneDrawResizedCrop.get_params calls) on the size read from the file's header, then the flip's draw, in the PIL
path's order, so a seed gives the same boxes and flips in both; and the same val Resize(S*256/224) +
CenterCrop(S). What differs is how:
- JPEGs are decoded by torchvision.io.decode_jpeg (libjpeg-turbo with PIL's settings: the same pixels);
- when the crop is at least 2x (4x, 8x) larger than its output in both sides, the JPEG is decoded at 1/2 (1/4,
  1/8) size inside libjpeg (DCT scaling, PIL's Image.draft) and the crop, in fractional coordinates, resized from
  there: the resize still only shrinks;
- crops are resized as uint8 tensors by torchvision's antialiased bicubic (PIL's filter, with uint8 kernels);
- the loader carries uint8 (a quarter of float32's bytes through worker queues and pinned memory) and
  `device_images` normalises on the device with ToTensor's and Normalize's own ops: the same floats for the
  same pixels.
Anything else (PNG, grayscale/CMYK/16-bit files, a JPEG libjpeg refuses) is read by util.images.load_rgb, so it is
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

from util.images import BICUBIC, IMAGENET_MEAN, IMAGENET_STD, OneDrawResizedCrop, load_rgb, one_draw_box

DECODERS = ("pil", "fast", "gpu")
DRAFT_SCALES = (8, 4, 2)  # the reductions libjpeg's DCT scaling gives through PIL's draft
# Frame headers of the JPEGs decode_jpeg is given: baseline, extended, progressive Huffman; with 1 (grayscale) or 3
# (YCbCr/RGB) components. CMYK/YCCK, lossless and arithmetic-coded files go through PIL, as in the paper's path.
DECODED_FRAMES = (0xC0, 0xC1, 0xC2)
DECODED_COMPONENTS = (1, 3)


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
    uint8 tensors: a file path (or an already opened PIL image) -> uint8 [S, S, 3]. `reads_files` tells
    util.data.ImageFiles to hand over the path rather than a decoded image."""

    reads_files = True

    def __init__(self, split, input_size, *, draft=True):
        if split not in ("train", "val"):
            raise ValueError(f"split must be 'train' or 'val', got {split!r}")
        self.split, self.input_size, self.draft = split, input_size, draft
        self.crop = OneDrawResizedCrop(input_size, interpolation=BICUBIC)  # scale and ratio as build_transform's

    def plan(self, width, height) -> Plan:
        """The Plan for an image of that size. Train draws from torch's RNG exactly as the PIL path does (the
        box, by the same function, then the flip)."""
        s = self.input_size
        if self.split == "train":
            box = one_draw_box(width, height, self.crop.scale, self.crop.ratio)
            return Plan(box, (s, s), s, bool(torch.rand(1) < 0.5))
        return Plan((0, 0, height, width), resized_size(width, height, int(s * 256 / 224)), s, False)

    def __call__(self, source):
        if isinstance(source, Image.Image):
            return self.finish(pil_pixels(source), self.plan(*source.size))
        data, size = read_jpeg(source)
        if size is None:
            return self._from_pil(source)
        plan = self.plan(*size)
        scale = draft_scale(plan) if self.draft else 1
        try:  # only the decoding: an error of ours after it must not hide behind load_rgb's full-size path
            decoded = _drafted(data, plan, scale) if scale > 1 else decode_rgb(data)
        except (OSError, RuntimeError):  # libjpeg refused the data (PIL's OSError, torchvision's RuntimeError)
            return self.finish(pil_pixels(load_rgb(source)), plan)
        if scale > 1:
            return self.finish(pil_pixels(decoded), plan, resized=True)
        return self.finish(decoded, plan)

    def _from_pil(self, path):
        image = load_rgb(path)
        return self.finish(pil_pixels(image), self.plan(*image.size))

    @staticmethod
    def finish(pixels, plan, *, resized=False):
        """uint8 [3, H, W] of the whole image (any strides) -> the Plan's crop, uint8 [S, S, 3] (`resized`:
        pixels are the box already resized). Height x width x channel is what the loader carries: libjpeg's and
        the resize's own layout, so neither the crop nor the collate transposes bytes (device_images does, on
        the device)."""
        if not resized:
            top, left, height, width = plan.box
            pixels = resize(pixels[:, top:top + height, left:left + width], plan.size)
        if plan.size != (plan.crop, plan.crop):
            pixels = F2.center_crop(pixels, [plan.crop])
        pixels = pixels.permute(1, 2, 0)
        return pixels.flip(1) if plan.flip else pixels


def resize(pixels, size):
    """uint8 [3, H, W] -> [3, *size], antialiased bicubic (PIL's filter). On the CPU torch's uint8 kernel, which
    wants channels-last (decode_jpeg's own layout): torchvision's resize would take it through float32, for the
    same pixels in 1.5x the time (measured: benchmarks/bench_loader.py, BENCHMARKS.md)."""
    if pixels.device.type != "cpu":
        return F2.resize(pixels, list(size), interpolation=BICUBIC, antialias=True)
    batch = pixels[None].contiguous(memory_format=torch.channels_last)
    return torch.nn.functional.interpolate(batch, size=tuple(size), mode="bicubic", antialias=True,
                                           align_corners=False)[0]


def resized_size(width, height, shorter):
    """(height, width) that transforms.Resize(shorter) gives an image: the shorter side `shorter`, the longer one
    scaled and truncated (torchvision's rule; the drafted path needs it from the full size, before decoding)."""
    if width <= height:
        return int(shorter * height / width), shorter
    return shorter, int(shorter * width / height)


def read_jpeg(path):
    """(the file's bytes as a uint8 tensor, (width, height)) of a JPEG that decode_jpeg decodes to PIL's pixels;
    (None, None) for anything else, which load_rgb then reads or names."""
    try:
        with open(path, "rb") as f:
            data = bytearray(f.read())
    except OSError:  # load_rgb names the file and the reason, in one line
        return None, None
    size = jpeg_size(data)
    return (torch.frombuffer(data, dtype=torch.uint8), size) if size is not None else (None, None)


def jpeg_size(data):
    """(width, height) from a JPEG's frame header when it is one of DECODED_FRAMES with DECODED_COMPONENTS, else
    None. Hand-written: PIL's Image.open parses every marker in Python, a sixth of the decode's own time."""
    if data[:2] != b"\xff\xd8":
        return None
    i = 2
    while i + 4 <= len(data):
        if data[i] != 0xFF:
            return None
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if marker == 0xDA:  # a scan before any frame header
            return None
        if marker in DECODED_FRAMES and i + 10 <= len(data):
            height, width = int.from_bytes(data[i + 5:i + 7], "big"), int.from_bytes(data[i + 7:i + 9], "big")
            ok = data[i + 9] in DECODED_COMPONENTS and width > 0 and height > 0
            return (width, height) if ok else None
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):  # another frame type
            return None
        i += 2 + int.from_bytes(data[i + 2:i + 4], "big")
    return None


def decode_rgb(data):
    """A JPEG's bytes (uint8 tensor) -> uint8 [3, H, W] in channels-last strides (libjpeg's own layout).
    torchvision's decode_jpeg: 0.7x the CPU time of PIL's decode + convert; simplejpeg (libjpeg-turbo's own
    binding) measured 5 % faster again, too little for a dependency (BENCHMARKS.md)."""
    return decode_jpeg(data, mode=ImageReadMode.RGB)


def draft_scale(plan):
    """The largest DCT reduction that leaves the crop box at least as large as its output in both sides."""
    _, _, height, width = plan.box
    out_h, out_w = plan.size
    return next((s for s in DRAFT_SCALES if height >= s * out_h and width >= s * out_w), 1)


def _drafted(data, plan, scale):
    """The Plan's box of a JPEG decoded at 1/scale size, resized to the Plan's size (a PIL image): PIL's resize
    takes the box in fractional coordinates of the reduced image, so it covers the same part of the picture as at
    full size."""
    header = Image.open(io.BytesIO(data.numpy()))
    width, height = header.size
    mode, extent = header.draft("RGB", (width // scale, height // scale))
    reduction = width / extent[2]  # what libjpeg chose; equal to `scale` for every size >= 8 pixels
    top, left, h, w = plan.box
    box = tuple(v / reduction for v in (left, top, left + w, top + h))
    return rgb(header).resize(plan.size[::-1], Image.Resampling.BICUBIC, box=box)


def rgb(image):
    """The image in mode RGB; an RGB image itself (convert would copy it: a tenth of a drafted decode)."""
    return image if image.mode == "RGB" else image.convert("RGB")


def pil_pixels(image):
    """A PIL image as uint8 [3, H, W] RGB in channels-last strides (decode_rgb's layout)."""
    return torch.from_numpy(np.array(rgb(image), dtype=np.uint8)).permute(2, 0, 1)


# ------------------------------------------------------------------------------------------- on the device

def device_images(images, device):
    """What the frozen encoder reads: a loader's batch on `device`, float32 [B, 3, S, S], normalised. The one
    place the fast pipeline normalises: its uint8 [B, S, S, 3] batch is transposed, then ToTensor's x / 255 and
    Normalize's (x - mean) / std, the same ops in the same order, so the same pixels give the PIL path's floats
    bit for bit. Float batches (--decoder pil) pass unchanged."""
    if isinstance(images, EncodedBatch):
        images = decode_batch(images, device)
    images = images.to(device, non_blocking=True)
    if images.dtype != torch.uint8:
        return images
    images = images.permute(0, 3, 1, 2).contiguous()
    return TF.normalize(images.float().div(255), IMAGENET_MEAN, IMAGENET_STD, inplace=True)


class DeviceDecodeTransform(FastTransform):
    """--decoder gpu, in the data worker: the bytes and the Plan of a JPEG (same draws as FastTransform), or the
    finished crop, decoded on the CPU, of anything nvjpeg is not given."""

    def __init__(self, split, input_size):
        super().__init__(split, input_size, draft=False)  # nvjpeg has no DCT scaling

    def __call__(self, source):
        if not isinstance(source, Image.Image):
            data, size = read_jpeg(source)
            if size is not None:
                return Encoded(data, self.plan(*size))
        return Encoded(None, None, super().__call__(source))


class EncodedBatch:
    """A batch of `Encoded` images; `.shape` is that of the batch decode_batch makes of it."""

    def __init__(self, items, input_size):
        self.items, self.input_size = list(items), input_size

    @property
    def shape(self):
        return torch.Size((len(self.items), self.input_size, self.input_size, 3))

    def pin_memory(self):  # the DataLoader's pin_memory=True calls this in its pinning thread
        self.items = [Encoded(item.data.pin_memory() if item.data is not None else None, item.plan,
                              item.pixels.pin_memory() if item.pixels is not None else None) for item in self.items]
        return self


def collate_encoded(samples):
    """DataLoader collate_fn of --decoder gpu: [(Encoded, label)] -> (EncodedBatch, labels)."""
    images, labels = zip(*samples)
    first = images[0]
    size = first.plan.crop if first.plan is not None else first.pixels.shape[0]
    return EncodedBatch(images, size), torch.as_tensor(labels)


def pad_batch(images, size):
    """A loader's batch of fewer than `size` images padded to `size` with copies of its last image (tensors of
    either pipeline, or an EncodedBatch)."""
    n = len(images.items) if isinstance(images, EncodedBatch) else len(images)
    if n >= size:
        return images
    if isinstance(images, EncodedBatch):
        return EncodedBatch(images.items + [images.items[-1]] * (size - n), images.input_size)
    return torch.cat([images, images[-1:].expand(size - n, *images.shape[1:])])


def decode_batch(batch, device):
    """An EncodedBatch -> uint8 [B, S, S, 3] on `device`: the JPEGs decoded together (nvjpeg on CUDA, libjpeg on the
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
