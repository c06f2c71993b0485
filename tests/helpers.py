"""Shared fixtures of the robustness tests: tiny checkpoints and ImageFolders, and running the CLIs for real."""
import hashlib
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
# The smallest setting main_linprobe.py accepts: vit_tiny_patch16 (the only tiny MODELS entry) at 2x2 patches.
TINY = ["--model", "vit_tiny_patch16", "--input_size", "32", "--device", "cpu", "--num_workers", "0",
        "--epochs", "1", "--warmup_epochs", "1", "--blr", "50", "--batch_size", "4"]
DIGITS_BASE = ["--data_path", "digits", "--model", "vit_tiny_patch16", "--input_size", "32", "--num_workers", "0",
               "--device", "cpu"]
DIGITS = [*DIGITS_BASE, "--batch_size", "64", "--warmup_epochs", "1", "--blr", "50"]


def cli_env(**extra):
    """The caller's environment without dashboards or downloads, plus `extra` (a None value removes a name)."""
    env = dict(os.environ)
    env.pop("WANDB_PROJECT", None)  # a developer's dashboard must not start in tests
    env.update(WANDB_MODE="disabled", MPLBACKEND="Agg", HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
    for key, value in extra.items():
        if value is None:
            env.pop(key, None)
        else:
            env[key] = str(value)
    return env


def run_cli(args, cwd=ROOT, env=None, *, script="main_linprobe.py", timeout=300):
    """`python <script> args...` in a fresh process, as a user would run it; returns the CompletedProcess."""
    return subprocess.run([sys.executable, str(ROOT / script), *map(str, args)], cwd=cwd,
                          env=env if env is not None else cli_env(), capture_output=True, text=True,
                          timeout=timeout)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ------------------------------------------------------------------------------------------------ checkpoints

def write_mae_checkpoint(path, *, key="model", seed=0, **arch):
    """A random vit_tiny_patch16 (32 px; `arch` overrides sizes, e.g. depth=2) saved as MAE saves it: {key: state}."""
    from models_vit import build_encoder

    torch.manual_seed(seed)
    state = build_encoder("vit_tiny_patch16", input_size=32, verbose=False, **arch).state_dict()
    torch.save({key: state, "epoch": 0}, path)
    return Path(path)


class RunsCode:
    """Pickles to a call of `function(*args)`: what a malicious checkpoint hides in any entry."""

    def __init__(self, function, *args):
        self.function, self.args = function, args

    def __reduce__(self):
        return self.function, self.args


MALICE = ("subprocess", "os.system", "nested")


def write_malicious_checkpoint(path, marker, how="subprocess", *, base=None, legacy=False):
    """A checkpoint that creates `marker` when fully unpickled: an extra entry reducing to subprocess.call, an
    os.system reducer, or an object nested in the file's first state dict (`model`). `base`: the dict to add it
    to (default: a tiny MAE file's content, so everything else about the file is valid)."""
    import os
    import subprocess

    checkpoint = dict(base) if base is not None else torch.load(write_mae_checkpoint(Path(path)), weights_only=True)
    if how == "subprocess":
        checkpoint["extra"] = RunsCode(subprocess.call, ["touch", str(marker)])
    elif how == "os.system":
        checkpoint["args"] = RunsCode(os.system, f"touch {marker}")
    elif how == "nested":  # inside the first state dict of the file (`model`, or `probes` of our checkpoints)
        entry = next(key for key, value in checkpoint.items() if isinstance(value, dict))
        checkpoint[entry] = {**checkpoint[entry], "note": RunsCode(subprocess.call, ["touch", str(marker)])}
    else:
        raise ValueError(f"unknown kind of malice {how!r}; choose from {MALICE}")
    torch.save(checkpoint, path, _use_new_zipfile_serialization=not legacy)
    return Path(path)


def fake_yacs_cfgnode(folder, monkeypatch):
    """yacs.config.CfgNode as SimMIM pickles its config (a dict subclass carrying state in its __dict__), from a
    module written to `folder` and importable for the test; forget_fake_yacs removes it again."""
    (folder / "yacs").mkdir()
    (folder / "yacs" / "__init__.py").write_text("")
    (folder / "yacs" / "config.py").write_text(
        "class CfgNode(dict):\n"
        "    def __init__(self, init=None):\n"
        "        super().__init__({k: CfgNode(v) if type(v) is dict else v for k, v in (init or {}).items()})\n"
        "        self.__dict__['__immutable__'] = False\n"
        "        self.__dict__['__deprecated_keys__'] = set()\n"
        "        self.__dict__['__new_allowed__'] = False\n")
    monkeypatch.syspath_prepend(str(folder))
    from yacs.config import CfgNode
    return CfgNode


def forget_fake_yacs(folder, monkeypatch):
    """As if yacs were not installed: what reads the file next cannot import it."""
    import sys
    monkeypatch.delitem(sys.modules, "yacs.config")
    monkeypatch.delitem(sys.modules, "yacs")
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p != str(folder)])


# ---------------------------------------------------------------------------------------------- image folders

def make_image(size, seed, label, mode="RGB"):
    """An image whose mean brightness depends on its label (learnable), in any PIL mode."""
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 128, (size, size, 3), dtype=np.uint8) + np.uint8(100 * (label % 2))
    image = Image.fromarray(pixels, "RGB")
    if mode == "P":
        return image.quantize(colors=16)
    return image.convert(mode)


def make_image_folder(root, *, classes=2, per_class=4, val_per_class=None, size=32, modes=("RGB",)):
    """root/{train,val}/class_i/img_j.<ext>; image j of a class uses modes[j % len(modes)] (CMYK as JPEG)."""
    root = Path(root)
    val_per_class = per_class if val_per_class is None else val_per_class
    for split, count in (("train", per_class), ("val", val_per_class)):
        for c in range(classes):
            folder = root / split / f"class_{c}"
            folder.mkdir(parents=True, exist_ok=True)
            for j in range(count):
                mode = modes[j % len(modes)]
                ext = "jpg" if mode == "CMYK" else "png"  # PNG cannot hold CMYK
                seed = int(hashlib.sha256(f"{split}/{c}/{j}".encode()).hexdigest()[:8], 16)
                make_image(size, seed, c, mode).save(folder / f"img_{j}.{ext}")
    return root


def snapshot(folder):
    """{relative path: bytes (None for a folder)} of everything under folder, to prove a failed run touched nothing."""
    folder = Path(folder)
    return {str(p.relative_to(folder)): p.read_bytes() if p.is_file() else None for p in sorted(folder.rglob("*"))}


def output_dir_with_sentinel(path):
    """An existing --output_dir holding a user's file that no failing run may change or remove."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    (path / "notes.txt").write_text("results of an earlier experiment, keep me\n")
    return path


PROGRESS_BAR = re.compile(r"^\s*(epoch \d+|eval|attention stats)\S*:.*\|")  # tqdm lines of a run that had started


def error_lines(completed, *, progress_allowed=False):
    """Non-empty stderr lines (split on newlines only: an error glued to a progress bar does not count)."""
    lines = [line for line in completed.stderr.split("\n") if line.strip()]
    if progress_allowed:
        lines = [line for line in lines if not PROGRESS_BAR.match(line.split("\r")[-1])]
    return lines


def assert_user_error(completed, *fragments, progress_allowed=False, allowed_lines=()):
    """Exit code 2, no traceback, stderr exactly one line `error: <problem> (<what to do>)` holding `fragments`.

    progress_allowed: the error comes mid-epoch, so progress-bar lines may precede it (on lines of their own).
    """
    report = f"exit {completed.returncode}\nstdout:\n{completed.stdout[-2000:]}\nstderr:\n{completed.stderr[-4000:]}"
    assert completed.returncode == 2, report
    assert "Traceback" not in completed.stderr + completed.stdout, report
    lines = [line for line in error_lines(completed, progress_allowed=progress_allowed)
             if not any(line.startswith(allowed) for allowed in allowed_lines)]
    assert len(lines) == 1, report
    message = lines[0]
    assert message.startswith("error: ") and len(message) > len("error: ") + 10, report
    assert message.rstrip().endswith(")") and " (" in message, f"no '(<what to do>)' part:\n{report}"
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in the message\n{report}"
    if os.environ.get("BEYOND_CLS_MESSAGE_LOG"):  # collects every message for the docs' list of cases
        with open(os.environ["BEYOND_CLS_MESSAGE_LOG"], "a") as f:
            f.write(message + "\n")
    return message


# ---------------------------------------------------------------------------------------------- dashboards

def read_wandb_offline(folder):
    """Every record of the offline wandb runs under `folder` (wandb/offline-run-*/run-*.wandb, oldest first) as
    [(run directory name, wandb_internal_pb2.Record)]. wandb has no public reader of these files: each starts
    with a 7-byte header, then LevelDB's log format (32 KiB blocks; a record header is crc32c u32, length u16 LE,
    type u8: 1 FULL, 2 FIRST, 3 MIDDLE, 4 LAST; a block tail under 7 bytes is padding)."""
    import struct

    from wandb.proto import wandb_internal_pb2

    records = []
    for path in sorted(Path(folder).glob("**/wandb/offline-run-*/run-*.wandb")):
        data = path.read_bytes()
        block, payload, pos = 32768, b"", 7  # blocks count from the file's start, header included
        while pos + 7 <= len(data):
            left = block - pos % block
            if left < 7:  # padding at the block's end
                pos += left
                continue
            _crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
            if pos + 7 + length > len(data):  # the tail a killed run left half written
                break
            chunk = data[pos + 7:pos + 7 + length]
            pos += 7 + length
            if kind == 0 and length == 0:  # zero fill
                continue
            payload = chunk if kind in (1, 2) else payload + chunk
            if kind in (1, 4):
                record = wandb_internal_pb2.Record()
                record.ParseFromString(payload)
                records.append((path.parent.name, record))
                payload = b""
    return records


def wandb_history(records):
    """[(step, {key: value})] of the history records (nested keys joined with '/')."""
    import json

    rows = []
    for _, record in records:
        if record.WhichOneof("record_type") == "history":
            items = {(item.key or "/".join(item.nested_key)): json.loads(item.value_json)
                     for item in record.history.item}
            rows.append((record.history.step.num, items))
    return rows


def wandb_record(records, kind):
    """The records of one type ('run', 'summary', 'config', ...)."""
    return [record for _, record in records if record.WhichOneof("record_type") == kind]
