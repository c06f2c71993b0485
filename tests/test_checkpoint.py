"""Atomic checkpoint writes and the one checkpoint reader."""
import argparse
import os

import pytest
import torch

from util import checkpoint
from util.checkpoint import load_checkpoint, save_atomic


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
