"""Every timm ViT-family name through `--model`, as a user would try it: built, refused with one line, or crashed.

For each name in timm.list_models of the patterns below: models_vit.architecture (what config.py validates),
then build_encoder with random weights, forward_tokens of the last block and a middle block, and attention
capture of the last block. Everything runs on the meta device (shapes only: no memory, no weights, no download),
at the smallest input the family accepts near 64 px. A ValueError whose message is one line is a refusal; any
other exception (or a multi-line message) is a crash, and the script exits 1 when there is one.

    python benchmarks/timm_census.py                 # counts, then one line per refusal and crash
    python benchmarks/timm_census.py --verbose       # also one line per built name (tokens, attention shape)
"""
import argparse
import collections
import sys
import traceback
from pathlib import Path

import timm
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import models_vit  # noqa: E402

PATTERNS = ["vit_*", "eva*", "aimv2*", "hiera*", "naflexvit*", "beit*", "deit*", "flexivit*", "samvit*"]


def names():
    return sorted({n for pattern in PATTERNS for n in timm.list_models(pattern)})


def input_size(spec):
    """A small input the architecture accepts: a multiple of its patch (Hiera: of its last stage's 32 px)."""
    step = spec["patch_size"]
    return step * max(1, -(-64 // step))


def try_one(name):
    """('built', details) | ('refused', message) | ('crashed', message)."""
    try:
        spec = models_vit.architecture(name)
        size = input_size(spec)
        with torch.device("meta"):
            encoder = models_vit.build_encoder(name, input_size=size, verbose=False)
            images = torch.empty(2, 3, size, size)
            tokens = encoder.forward_tokens(images)
            middle = encoder.forward_tokens(images, block=encoder.first_grid_block)
            with models_vit.capture_attention(encoder, blocks=[-1]) as cap:
                encoder.forward_tokens(images)
        attn = cap.records[-1]["attn"]
        grid = encoder.grid_size
        expected = (2, encoder.num_prefix_tokens + grid[0] * grid[1], encoder.embed_dim)
        if tuple(tokens.shape) != expected or tuple(middle.shape) != expected:
            return "crashed", f"tokens {tuple(tokens.shape)} / {tuple(middle.shape)}, expected {expected}"
        if tuple(attn.shape) != (2, encoder.blocks[-1].attn.num_heads, expected[1], expected[1]):
            return "crashed", f"attention {tuple(attn.shape)} for {expected[1]} tokens"
        return "built", f"{size}px tokens {tuple(tokens.shape)} attention {tuple(attn.shape)}"
    except ValueError as err:
        message = str(err)
        if "\n" in message or not message:
            return "crashed", f"ValueError over several lines: {message[:300]!r}"
        return "refused", message
    except Exception as err:  # noqa: BLE001 (the census counts every kind of failure)
        frame = traceback.extract_tb(err.__traceback__)[-1]
        return "crashed", f"{type(err).__name__}: {str(err)[:200]} ({Path(frame.filename).name}:{frame.lineno})"


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--verbose", action="store_true")
    parser.add_argument("--only", default="", help="a substring: try only the names that contain it")
    args = parser.parse_args()
    results = {name: try_one(name) for name in names() if args.only in name}
    counts = collections.Counter(kind for kind, _ in results.values())
    print(f"{len(results)} timm names ({', '.join(PATTERNS)}), timm {timm.__version__}: "
          f"{counts['built']} built, {counts['refused']} refused with one line, {counts['crashed']} crashed")
    for kind in ("refused", "crashed") + (("built",) if args.verbose else ()):
        for name, (got, detail) in results.items():
            if got == kind:
                print(f"{kind:8s} {name}: {detail}")
    sys.exit(1 if counts["crashed"] else 0)


if __name__ == "__main__":
    main()
