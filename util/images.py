"""Reading an image file as 8-bit RGB, and the pixel transforms every pipeline shares (ImageNet normalisation,
MAE's one-draw random crop). A leaf: util/data.py, util/decode.py, util/digits_clutter.py and util/plots.py build
on it, so none of them needs another.
"""
import math
import os
import re
from typing import Optional, Tuple, Union

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torchvision import transforms
from torchvision.transforms import functional as TF

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
BICUBIC = transforms.InterpolationMode.BICUBIC


def normalize() -> list:
    return [transforms.ToTensor(), transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)]


class OneDrawResizedCrop(transforms.RandomResizedCrop):
    """RandomResizedCrop as MAE's util/crop.py (which the paper's code uses) draws it: one scale and one aspect
    ratio, the crop clipped to the image. torchvision's tries up to 10 draws before a fallback, which shifts the
    distribution of crop sizes (measured mean crop area 0.53 vs 0.49 of the image), hence this override."""

    @staticmethod
    def get_params(img: Image.Image, scale: Tuple[float, float],
                   ratio: Tuple[float, float]) -> Tuple[int, int, int, int]:
        return one_draw_box(*TF.get_image_size(img), scale, ratio)


def one_draw_box(width: int, height: int, scale: Tuple[float, float],
                 ratio: Tuple[float, float]) -> Tuple[int, int, int, int]:
    """(top, left, height, width) of OneDrawResizedCrop in an image of that size (util/decode.py draws it from
    a JPEG's header, before decoding)."""
    area = width * height * torch.empty(1).uniform_(scale[0], scale[1]).item()
    log_ratio = torch.log(torch.tensor(ratio))
    aspect = math.exp(torch.empty(1).uniform_(log_ratio[0].item(), log_ratio[1].item()).item())
    w = min(width, int(round(math.sqrt(area * aspect))))
    h = min(height, int(round(math.sqrt(area / aspect))))
    top = torch.randint(0, height - h + 1, size=(1,)).item()
    left = torch.randint(0, width - w + 1, size=(1,)).item()
    return top, left, h, w


# ------------------------------------------------------------------------------------------ reading images

class BadImageError(ValueError):
    """An image file that cannot be decoded.

    A DataLoader worker's exception is re-raised in the main process as `type(exc)(text)`, where text is
    "Caught ... Original Traceback ...". The constructor recovers the original one-line message from the last
    traceback line, so `error: ...` stays one line whether or not workers are used.
    """

    def __init__(self, message):
        super().__init__(one_line_message(message))


def one_line_message(text: object) -> str:
    """The original message of a BadImageError re-raised by a DataLoader worker; other text unchanged."""
    text = str(text)
    if "Traceback" not in text:
        return text
    last = text.rstrip().splitlines()[-1]
    match = re.match(r"^[\w.]*BadImageError: (.*)$", last)
    return match.group(1) if match else text


def find_bad_image(exc: Optional[BaseException]) -> Optional[BadImageError]:
    """The BadImageError behind `exc` (itself, its cause/context, or a worker's re-raise as another type), with
    its one-line message; else None."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, BadImageError):
            return exc
        message = one_line_message(exc)
        if message != str(exc):  # e.g. a RuntimeError carrying a worker's BadImageError traceback
            return BadImageError(message)
        exc = exc.__cause__ or exc.__context__
    return None


def _to_8bit(image):
    """High-bit-depth grayscale (PIL modes I;16*, I, F) scaled to 8 bits: PIL's own conversion clips at 255,
    which turns a 16-bit image white. Integer modes are read as 16-bit (PNG/TIFF's 0..65535), float as 0..1."""
    array = np.asarray(image)
    if image.mode == "F":
        scaled = array * 255.0 if array.max(initial=0) <= 1.0 else array / 257.0
    else:
        scaled = array.astype(np.float64) / 257.0
    return Image.fromarray(np.clip(np.round(scaled), 0, 255).astype(np.uint8), "L")


def load_rgb(path: Union[str, os.PathLike]) -> Image.Image:
    """Open any image (grayscale, 16-bit, RGBA, CMYK, palette...) as 8-bit RGB; BadImageError naming the file."""
    try:
        with open(path, "rb") as f:
            image = Image.open(f)
            if image.mode == "P" and "transparency" in image.info:
                image = image.convert("RGBA")  # PIL warns when a palette with transparency goes straight to RGB
            if image.mode.startswith("I") or image.mode == "F":
                image = _to_8bit(image)
            return image.convert("RGB")
    except Exception as err:  # PIL raises many types (OSError, SyntaxError, ValueError, DecompressionBomb...)
        reason = ("not an image format PIL can decode" if isinstance(err, UnidentifiedImageError)
                  else " ".join(f"{type(err).__name__}: {err}".split()))
        raise BadImageError(f"cannot read image {path}: {reason}") from None
