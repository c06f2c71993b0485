"""Reading and writing checkpoint files: one reader for every file the project opens, atomic writes.

Library code: problems are plain exceptions (FileNotFoundError, IsADirectoryError, ValueError) whose messages
name the file; the entry points add what the user should do.
"""
import argparse
import copy
import json
import os
import pickle
import struct
import sys
import zipfile
from pathlib import Path

import torch


class NonFiniteWeights(ValueError):
    """The checkpoint holds NaN or inf weights (a diverged run); nothing useful can be probed from it."""


def _looks_like_safetensors(path):
    """A safetensors file starts with a little-endian u64 header length, then a JSON object."""
    with open(path, "rb") as f:
        head = f.read(9)
    if len(head) < 9 or head[8:9] != b"{":
        return False
    size = struct.unpack("<Q", head[:8])[0]
    return 0 < size <= os.path.getsize(path) - 8


def _reason(err):
    # torch puts the cause ("invalid load key ...") on the last line, after a generic preamble
    lines = [line.strip() for line in str(err).splitlines() if line.strip()] or [""]
    return f"{type(err).__name__}: {lines[-1][:160]}"


def load_checkpoint(path):
    """The dict stored in a torch (.pth, zip or legacy pickle) or safetensors file, on CPU.

    Tensors, containers and argparse.Namespace (MAE, DINO and MoCo v3 store their args) load with
    weights_only; a file holding other Python objects (SimMIM's yacs config) is then unpickled fully, with a
    note: the user named the file, so it is trusted as torch < 2.6 trusted it.
    """
    path = Path(path).expanduser()
    if path.is_dir():
        raise IsADirectoryError(f"checkpoint {path} is a folder, not a file")
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    if _looks_like_safetensors(path):
        from safetensors.torch import load_file
        try:
            return load_file(str(path), device="cpu")
        except Exception as err:
            raise ValueError(f"{path} is not a readable safetensors file ({_reason(err)})") from None
    if not (zipfile.is_zipfile(path) or path.read_bytes()[:1] == b"\x80"):
        raise ValueError(f"{path} is not a torch or safetensors checkpoint (neither a zip archive, a pickle nor "
                         "a safetensors header)")
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        if not (isinstance(err, pickle.UnpicklingError) and "Unsupported global" in str(err)):
            raise ValueError(f"{path} is not a readable torch checkpoint ({_reason(err)}); it may be truncated "
                             "or corrupt") from None
        print(f"note: {path} holds Python objects besides tensors; loading it with weights_only=False",
              file=sys.stderr, flush=True)
        try:
            checkpoint = torch.load(path, map_location="cpu", weights_only=False)
        except Exception as err:
            raise ValueError(f"{path} is not a readable torch checkpoint ({_reason(err)})") from None
    if not isinstance(checkpoint, dict):
        raise ValueError(f"{path} holds a {type(checkpoint).__name__}, not a dict of state dicts")
    return checkpoint


def on_cpu(obj):
    """`obj` with every tensor inside (dicts, lists, tuples, nested) moved to the CPU: a file saved from CUDA
    tensors would otherwise need a GPU (or map_location) to be read back."""
    if isinstance(obj, torch.Tensor):
        return obj if obj.device.type == "cpu" else obj.detach().cpu()
    if isinstance(obj, dict):
        moved = copy.copy(obj)  # keeps the type and attributes (a state_dict's _metadata)
        for key, value in obj.items():
            moved[key] = on_cpu(value)
        return moved
    if isinstance(obj, list):
        return [on_cpu(value) for value in obj]
    if isinstance(obj, tuple):
        values = [on_cpu(value) for value in obj]
        return type(obj)(*values) if hasattr(obj, "_fields") else type(obj)(values)  # namedtuples take fields
    return obj


def save_atomic(obj, path):
    """torch.save (every tensor on the CPU) to a temporary file unique to this process, fsync, then rename over
    PATH.

    PATH is old or new, never torn, and two writers never share a temporary file. A full disk raises OSError
    naming PATH and the bytes the checkpoint needed.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    obj = on_cpu(obj)
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as err:
        written = tmp.stat().st_size if tmp.exists() else 0
        tmp.unlink(missing_ok=True)
        if isinstance(err, OSError) and err.errno == 28:  # ENOSPC
            raise OSError(28, f"no space left on the device to write {path} ({written / 2**20:.1f} MiB written "
                              f"before the disk filled; {_free_mib(path.parent):.1f} MiB free)") from None
        raise
    _fsync_folder(path.parent)


def write_text_atomic(path, text):
    """Replace a small text file in one rename (results, logs rewritten whole)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_json_atomic(path, obj):
    write_text_atomic(path, json.dumps(obj, indent=2) + "\n")


def _free_mib(folder):
    try:
        stat = os.statvfs(folder)
        return stat.f_bavail * stat.f_frsize / 2**20
    except OSError:
        return float("nan")


def _fsync_folder(folder):
    try:  # make the rename itself durable; not every filesystem lets a folder be fsynced
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass

