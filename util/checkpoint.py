"""Reading and writing checkpoint files: one reader for every file the project opens, atomic writes.

Library code: problems are plain exceptions (FileNotFoundError, IsADirectoryError, ValueError) whose messages
name the file; the entry points add what the user should do.
"""
import argparse
import copy
import json
import os
import pickle
import re
import struct
import sys
import zipfile
from collections import OrderedDict
from pathlib import Path
from typing import Union

import torch

# The file endings a checkpoint is written with (torch, safetensors, Lightning, old tar archives).
CHECKPOINT_SUFFIXES = (".pth", ".pt", ".tar", ".bin", ".safetensors", ".ckpt")

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


class UnsafeCheckpoint(ValueError):
    """The file asks to run code when unpickled: it names Python objects beyond tensors and plain data."""


# What torch's weights-only unpickler may build besides tensors and containers: the few non-tensor objects that
# real releases store next to their weights. Each only holds data; none runs anything when built.
class _CfgNodeAsDict:
    """Stand-in for SimMIM's yacs `CfgNode` (a dict subclass, which torch's unpickler cannot fill): the config
    comes back as a nested OrderedDict of its values, and yacs need not be installed."""

    def __new__(cls, *args, **kwargs):
        return OrderedDict()


def _numpy_globals():
    """numpy scalars and arrays (a metric or loss saved as np.float64); numpy 1.x files name numpy.core."""
    import numpy as np
    from numpy._core.multiarray import _reconstruct, scalar

    dtypes = [getattr(np.dtypes, name) for name in dir(np.dtypes)
              if name.endswith("DType") and name not in ("ObjectDType", "VoidDType")]
    return [np.ndarray, np.dtype, scalar, _reconstruct, *dtypes,
            (scalar, "numpy.core.multiarray.scalar"), (_reconstruct, "numpy.core.multiarray._reconstruct")]


def safe_globals():
    """The allow-list: argparse.Namespace (MAE, DINO, iBOT, BEiT, EVA store their args), SimMIM's CfgNode as
    plain data, numpy scalars and arrays. Anything else a file names is refused (UnsafeCheckpoint)."""
    return [argparse.Namespace, (_CfgNodeAsDict, "yacs.config.CfgNode"), *_numpy_globals()]


def _requested_globals(path, err):
    """The globals outside the allow-list that the file names: all of them for a zip file (read from its pickle
    without running it), else the one torch stopped at."""
    allowed = {entry[1] if isinstance(entry, tuple) else f"{entry.__module__}.{entry.__qualname__}"
               for entry in safe_globals()}
    names = []
    if zipfile.is_zipfile(path):
        try:
            names = [n for n in torch.serialization.get_unsafe_globals_in_checkpoint(path) if n not in allowed]
        except Exception:  # noqa: BLE001 - the message below still names what torch stopped at
            names = []
    if not names:
        names = re.findall(r"GLOBAL ([\w.]+)", str(err))[:1] or ["(an object torch cannot build)"]
    return [_python3_name(name) for name in names]


def _python3_name(name):
    """Protocol-2 pickles name some globals as Python 2 did ('commands.call' is subprocess.call): say what runs."""
    import _compat_pickle

    module, _, attr = name.rpartition(".")
    module, attr = _compat_pickle.NAME_MAPPING.get((module, attr), (module, attr))
    return f"{_compat_pickle.IMPORT_MAPPING.get(module, module)}.{attr}"


def load_checkpoint(path: Union[str, os.PathLike], *, trust: bool = False) -> dict:
    """The dict stored in a torch (.pth, zip or legacy pickle) or safetensors file, on CPU.

    A torch file is a pickle, and unpickling can call any function the file names. So it is read with torch's
    weights-only unpickler: tensors, containers and `safe_globals()` only; a file that names anything else is
    refused (UnsafeCheckpoint, naming what it asked for) without running it. `trust=True` (the user's explicit
    --trust_checkpoint) unpickles it fully, as torch < 2.6 did: that runs whatever code the file holds.
    """
    path = Path(path).expanduser()
    if path.is_dir():
        raise IsADirectoryError(f"checkpoint {path} is a folder, not a file")
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    if _looks_like_safetensors(path):
        return _load_safetensors(path)
    if not (zipfile.is_zipfile(path) or path.read_bytes()[:1] == b"\x80"):
        raise ValueError(f"{path} is not a torch or safetensors checkpoint (neither a zip archive, a pickle nor "
                         "a safetensors header)")
    try:
        if trust:
            print(f"warning: unpickling {path} fully (--trust_checkpoint): any code it holds runs now",
                  file=sys.stderr, flush=True)
            checkpoint = torch.load(path, map_location="cpu", weights_only=False)
        else:
            with torch.serialization.safe_globals(safe_globals()):
                checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        if trust or "GLOBAL" not in str(err) and "global" not in str(err):
            raise ValueError(f"{path} is not a readable torch checkpoint ({_reason(err)}); it may be truncated "
                             "or corrupt") from None
        names = _requested_globals(path, err)
        raise UnsafeCheckpoint(f"{path} asks to run {', '.join(names)} when loaded; a checkpoint of weights needs "
                               "no code, so it was not unpickled") from None
    except Exception as err:
        raise ValueError(f"{path} is not a readable torch checkpoint ({_reason(err)}); it may be truncated "
                         "or corrupt") from None
    if not isinstance(checkpoint, dict):
        raise ValueError(f"{path} holds a {type(checkpoint).__name__}, not a dict of state dicts")
    return checkpoint


NESTED = "beyond-cls nested"  # safetensors metadata key: the file holds a nested checkpoint, keys joined by "/"


def _load_safetensors(path):
    """A safetensors file as a dict of tensors; one written by `to_safetensors` comes back nested as it was."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            tensors = {key: f.get_tensor(key) for key in f.keys()}
            metadata = f.metadata() or {}
    except Exception as err:
        raise ValueError(f"{path} is not a readable safetensors file ({_reason(err)})") from None
    if NESTED not in metadata:
        return tensors
    flat = {**json.loads(metadata[NESTED]), **tensors}
    nested = {}
    for key, value in flat.items():
        *parents, leaf = key.split("/")
        node = nested
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return nested


def _flatten(value, prefix, tensors, values, dropped):
    if isinstance(value, argparse.Namespace):
        value = vars(value)
    if torch.is_tensor(value):
        tensors[prefix] = value.detach().cpu().contiguous().clone()  # safetensors refuses shared storage
    elif isinstance(value, dict):
        for key, item in value.items():
            if "/" in str(key):
                raise ValueError(f"key {key!r} holds a '/', which the safetensors copy uses between nested keys")
            _flatten(item, f"{prefix}/{key}" if prefix else str(key), tensors, values, dropped)
    else:
        try:
            json.dumps(value)
            values[prefix] = value
        except (TypeError, ValueError):
            dropped.append(f"{prefix} ({type(value).__name__})")


def to_safetensors(checkpoint, path):
    """Write a loaded checkpoint (nested dicts of tensors and plain values) as a safetensors file that
    `load_checkpoint` reads back with the same nesting; returns the entries left out (objects that are neither
    tensors nor JSON values)."""
    from safetensors.torch import save_file

    tensors, values, dropped = {}, {}, []
    _flatten(checkpoint, "", tensors, values, dropped)
    save_file(tensors, str(path), metadata={NESTED: json.dumps(values)})
    return dropped


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


def save_atomic(obj: object, path: Union[str, os.PathLike]) -> None:
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



def main(argv=None):
    """python -m util.checkpoint IN OUT.safetensors: a safe copy of a checkpoint that needs more than tensors."""
    import argparse as _argparse

    parser = _argparse.ArgumentParser(
        prog="python -m util.checkpoint",
        description="Copy a torch checkpoint into a safetensors file that loads without running any code. This "
                    "unpickles IN fully once, so it runs whatever code IN holds: do it only for a file you trust.")
    parser.add_argument("source", metavar="IN")
    parser.add_argument("target", metavar="OUT")
    args = parser.parse_args(argv)
    try:
        if Path(args.target).exists():
            raise FileExistsError(f"{args.target} exists (name a new file: nothing is overwritten)")
        dropped = to_safetensors(load_checkpoint(args.source, trust=True), args.target)
    except (OSError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {args.target}" + (f"; left out {', '.join(dropped)}" if dropped else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
