"""Atomic checkpoint writes and the one checkpoint reader."""
import argparse
import os
from pathlib import Path

import pytest
import torch

from helpers import MALICE, RunsCode, fake_yacs_cfgnode, forget_fake_yacs, write_malicious_checkpoint
from util import checkpoint
from util.checkpoint import UnsafeCheckpoint, load_checkpoint, save_atomic


def test_save_atomic_round_trip_leaves_no_tmp(tmp_path):
    path = tmp_path / "checkpoint-last.pth"
    state = {"model": {"w": torch.arange(6.0).reshape(2, 3)}, "epoch": 3, "args": argparse.Namespace(lr=0.1)}
    save_atomic(state, path)
    assert os.listdir(tmp_path) == ["checkpoint-last.pth"]
    loaded = load_checkpoint(path)
    assert torch.equal(loaded["model"]["w"], state["model"]["w"])
    assert loaded["epoch"] == 3 and loaded["args"].lr == 0.1


def test_interrupted_write_keeps_old_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "checkpoint-last.pth"
    save_atomic({"epoch": 1}, path)
    old_bytes = path.read_bytes()
    real_save = torch.save

    def dies_halfway(obj, f, *args, **kwargs):
        f.write(b"PK\x03\x04 half a zip archive")  # partial bytes hit the disk, then the process "dies"
        raise KeyboardInterrupt

    monkeypatch.setattr(checkpoint.torch, "save", dies_halfway)
    with pytest.raises(KeyboardInterrupt):
        save_atomic({"epoch": 2}, path)
    monkeypatch.setattr(checkpoint.torch, "save", real_save)
    assert path.read_bytes() == old_bytes
    assert load_checkpoint(path)["epoch"] == 1
    assert os.listdir(tmp_path) == ["checkpoint-last.pth"]


def test_safetensors_file_loads_whatever_its_first_byte(tmp_path):
    from safetensors.torch import save_file
    for n in (1, 37, 1000):  # the header length's first byte varies with the keys
        path = tmp_path / f"weights{n}.safetensors"
        save_file({"k" * n: torch.arange(3.0)}, str(path))
        assert torch.equal(load_checkpoint(path)["k" * n], torch.arange(3.0))


def test_missing_checkpoint(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_checkpoint(tmp_path / "nope.pth")
    with pytest.raises(IsADirectoryError, match="is a folder"):
        load_checkpoint(tmp_path)


@pytest.mark.parametrize("content", [b"this is a text file\n", b"", b"\x80\x04garbage"])
def test_not_a_checkpoint(tmp_path, content):
    path = tmp_path / "notes.pth"
    path.write_bytes(content)
    with pytest.raises(ValueError, match="is not a (readable )?torch") as info:
        load_checkpoint(path)
    assert "\n" not in str(info.value)


def test_checkpoint_that_is_not_a_dict(tmp_path):
    path = tmp_path / "tensor.pth"
    torch.save(torch.zeros(3), path)
    with pytest.raises(ValueError, match="not a dict of state dicts"):
        load_checkpoint(path)


# ------------------------------------------------------------------------------------------ no code runs

@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
@pytest.mark.parametrize("how", MALICE)
def test_a_file_that_asks_to_run_code_is_refused_without_running_it(tmp_path, how, legacy):
    marker = tmp_path / "code_ran"
    path = write_malicious_checkpoint(tmp_path / "evil.pth", marker, how, legacy=legacy)
    with pytest.raises(UnsafeCheckpoint, match="asks to run") as info:
        load_checkpoint(path)
    assert not marker.exists()
    expected = {"subprocess": "subprocess.call", "os.system": "system", "nested": "subprocess.call"}[how]
    assert expected in str(info.value) and "\n" not in str(info.value)
    # the payload is live: trusting the file runs it (so the refusal above is what kept it from running)
    load_checkpoint(path, trust=True)
    assert marker.exists()


def test_a_zip_file_names_every_global_it_asks_for(tmp_path):
    import os
    import subprocess
    checkpoint = {"model": {"w": torch.zeros(2)}, "a": RunsCode(os.system, "true"),
                  "b": RunsCode(subprocess.call, ["true"]), "args": argparse.Namespace(lr=0.1)}
    torch.save(checkpoint, tmp_path / "two.pth")
    with pytest.raises(UnsafeCheckpoint) as info:
        load_checkpoint(tmp_path / "two.pth")
    message = str(info.value)
    assert "posix.system" in message and "subprocess.call" in message
    assert "argparse.Namespace" not in message  # allowed, so not among what it asks for


def test_simmim_config_loads_as_plain_data_without_yacs(tmp_path, monkeypatch):
    """SimMIM stores its yacs CfgNode next to the weights: it comes back as nested dicts, and yacs itself is never
    imported (it need not be installed), so nothing of it runs."""
    import sys
    CfgNode = fake_yacs_cfgnode(tmp_path, monkeypatch)
    weights = {"encoder.patch_embed.proj.weight": torch.randn(4, 3, 2, 2)}
    torch.save({"model": weights, "config": CfgNode({"MODEL": {"TYPE": "vit", "DEPTH": 12}}), "epoch": 799},
               tmp_path / "simmim.pth")
    forget_fake_yacs(tmp_path, monkeypatch)
    loaded = load_checkpoint(tmp_path / "simmim.pth")
    assert "yacs" not in sys.modules
    assert loaded["config"] == {"MODEL": {"TYPE": "vit", "DEPTH": 12}} and loaded["epoch"] == 799
    assert torch.equal(loaded["model"]["encoder.patch_embed.proj.weight"], weights["encoder.patch_embed.proj.weight"])


def _rename_global(path, old, new):
    """Rewrite a zip checkpoint's pickle so its GLOBAL opcodes name `new` instead of `old` (both 'module\\nname')."""
    import zipfile
    with zipfile.ZipFile(path) as src:
        items = [(info, src.read(info)) for info in src.infolist()]
    with zipfile.ZipFile(path, "w") as dst:
        for info, data in items:
            dst.writestr(info, data.replace(old, new) if info.filename.endswith("data.pkl") else data)


def test_numpy_values_load_also_under_numpy_1_names(tmp_path):
    import numpy as np
    torch.save({"loss": np.float64(0.25), "hist": np.arange(4, dtype=np.int64), "w": torch.ones(2)},
               tmp_path / "np.pth")
    _rename_global(tmp_path / "np.pth", b"numpy._core.multiarray\n", b"numpy.core.multiarray\n")
    loaded = load_checkpoint(tmp_path / "np.pth")
    assert loaded["loss"] == 0.25 and loaded["hist"].tolist() == [0, 1, 2, 3]


def test_shipped_encoders_load_under_the_allow_list():
    for path in sorted((Path(__file__).resolve().parents[1] / "checkpoints").glob("*.pth")):
        assert load_checkpoint(path)  # no trust needed: our releases hold tensors, numbers, strings, containers


def test_safetensors_copy_keeps_the_nesting_and_drops_objects(tmp_path):
    import subprocess
    import sys
    checkpoint = {"model": {"blocks.0.w": torch.randn(3, 2), "norm.bias": torch.zeros(2)}, "epoch": 7,
                  "args": argparse.Namespace(lr=0.5, name="mae"), "seen": {3, 4}}
    torch.save(checkpoint, tmp_path / "in.pth")
    root = Path(__file__).resolve().parents[1]
    done = subprocess.run([sys.executable, "-m", "util.checkpoint", str(tmp_path / "in.pth"),
                           str(tmp_path / "out.safetensors")], cwd=root, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "seen (set)" in done.stdout  # named as left out
    loaded = load_checkpoint(tmp_path / "out.safetensors")
    assert set(loaded) == {"model", "epoch", "args"}
    assert torch.equal(loaded["model"]["blocks.0.w"], checkpoint["model"]["blocks.0.w"])
    assert loaded["epoch"] == 7 and loaded["args"] == {"lr": 0.5, "name": "mae"}
    again = subprocess.run([sys.executable, "-m", "util.checkpoint", str(tmp_path / "in.pth"),
                            str(tmp_path / "out.safetensors")], cwd=root, capture_output=True, text=True)
    assert again.returncode == 2 and again.stderr.startswith("error: ") and "exists" in again.stderr


def test_save_atomic_writes_every_tensor_on_the_cpu(tmp_path, monkeypatch):
    # A meta tensor stands in for a CUDA one (this machine has no GPU): Tensor.cpu materialises it as the
    # device-to-host copy would. What torch.save writes must read back on the CPU without map_location.
    real_cpu = torch.Tensor.cpu
    monkeypatch.setattr(torch.Tensor, "cpu", lambda t: torch.full(t.shape, 7.0) if t.is_meta else real_cpu(t))
    on_device = lambda: torch.empty(2, 3, device="meta")
    probes = torch.nn.Linear(3, 2, device="meta").state_dict()
    optimizer = {"state": {0: {"momentum_buffer": on_device(), "step": torch.tensor(3.0)}}, "param_groups": [{}]}
    state = {"probes": probes, "optimizer": optimizer, "best": [(on_device(), 1)], "epoch": 4, "note": "kept"}
    save_atomic(state, tmp_path / "checkpoint-last.pth")
    loaded = torch.load(tmp_path / "checkpoint-last.pth", weights_only=True)  # no map_location
    tensors = [loaded["probes"]["weight"], loaded["probes"]["bias"], loaded["best"][0][0],
               *loaded["optimizer"]["state"][0].values()]
    assert all(t.device.type == "cpu" for t in tensors)
    assert torch.equal(loaded["optimizer"]["state"][0]["momentum_buffer"], torch.full((2, 3), 7.0))
    assert loaded["optimizer"]["state"][0]["step"] == 3.0 and loaded["best"][0][1] == 1
    assert loaded["epoch"] == 4 and loaded["note"] == "kept"
    assert loaded["probes"]._metadata == probes._metadata  # a state_dict keeps its version records
    assert state["probes"]["weight"].is_meta  # the caller's objects are left as they were
