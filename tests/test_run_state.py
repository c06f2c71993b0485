"""util/run_state: the output folder's lock, the experiment identity, resume rules, log consistency."""
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from helpers import ROOT
from util.run_state import (
    IdentityMismatch,
    OutputDirBusy,
    OutputLock,
    RunState,
    fingerprint,
    first_difference,
    prepare_output_dir,
    truncate_log,
)


def test_output_dir_created_and_existing_content_kept(tmp_path):
    out = tmp_path / "a" / "b"
    assert prepare_output_dir(out) == out and out.is_dir()
    (out / "log.txt").write_text("epoch 1\n")
    prepare_output_dir(out)
    assert os.listdir(out) == ["log.txt"] and (out / "log.txt").read_text() == "epoch 1\n"


def test_output_dir_that_is_a_file(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(OSError, match="cannot be written"):
        prepare_output_dir(blocker / "out")
    with pytest.raises(OSError, match="is a file"):
        prepare_output_dir(blocker)


def test_output_dir_that_cannot_be_created(tmp_path):
    with pytest.raises(PermissionError, match="cannot be written"):  # even for root: /proc holds no folders
        prepare_output_dir("/proc/beyond-cls-test/out")


HOLDER = textwrap.dedent("""
    import sys, time
    from util.run_state import OutputLock
    OutputLock(sys.argv[1]).acquire()
    print("locked", flush=True)
    time.sleep(60)
""")


def test_lock_refuses_a_second_run_naming_the_holder_and_dies_with_it(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(tmp_path)], cwd=ROOT, stdout=subprocess.PIPE,
                              text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(OutputDirBusy, match=f"in use by another run \\(PID {holder.pid}\\)"):
            OutputLock(tmp_path).acquire()
    finally:
        holder.kill()
        holder.wait()
    lock = OutputLock(tmp_path).acquire()  # a killed holder's lock is gone with it
    assert (tmp_path / ".lock").read_text().strip() == str(os.getpid())
    lock.release()
    assert os.listdir(tmp_path) == []  # release removes the PID file, the holder's stale one included


def test_fingerprint_follows_content_not_path(tmp_path):
    a, b = tmp_path / "a" / "mae.pth", tmp_path / "b" / "mae.pth"
    for path in (a, b):
        path.parent.mkdir()
        path.write_bytes(b"weights")
    assert fingerprint(a) == fingerprint(b) and "sha256" in fingerprint(a)
    b.write_bytes(b"other weights")
    assert fingerprint(a) != fingerprint(b)
    assert fingerprint("") == "random init" and fingerprint("vit_base_patch16_224.mae") == "vit_base_patch16_224.mae"


IDENTITY = {"model": "vit_tiny_patch16", "encoder": "mae.pth (10 bytes)", "classes": ["a", "b"], "nb_classes": 2,
            "probes": {"cls": "cls"}, "lrs": {"cls": 0.5}, "head_options": {}, "return_block": None,
            "final_norm": False, "seed": 0}


def _saved(tmp_path, identity=IDENTITY, **extra):
    path = tmp_path / "checkpoint-last.pth"
    torch.save({"identity": identity, "probes": {}, "epoch": 3, **extra}, path)
    return path


def test_auto_resume_needs_the_same_experiment(tmp_path):
    path = _saved(tmp_path)
    state = RunState(tmp_path, {**IDENTITY, "lrs": {"cls": 0.25}}, ["cls"])
    with pytest.raises(IdentityMismatch, match=r"lrs=\{'cls': 0.5\}, this run has lrs=\{'cls': 0.25\}"):
        state.read(path, explicit=False)
    checkpoint, changed = state.read(path, explicit=True)  # asked for by name: allowed, and reported
    assert changed == ["lrs"] and checkpoint["epoch"] == 3
    assert RunState(tmp_path, dict(IDENTITY), ["cls"]).read(path, explicit=False)[1] == []


@pytest.mark.parametrize("key, value", [("classes", ["b", "a"]), ("probes", {"pos": "pos"}), ("nb_classes", 3)])
def test_no_resume_changes_what_the_heads_are(tmp_path, key, value):
    path = _saved(tmp_path)
    with pytest.raises(IdentityMismatch, match=key):
        RunState(tmp_path, {**IDENTITY, key: value}, ["cls"]).read(path, explicit=True)


def test_first_difference_ignores_settings_a_checkpoint_does_not_record():
    assert first_difference({"a": 1}, {"a": 1, "b": 2}, ["a", "b"]) is None
    assert first_difference({"a": 1, "b": 3}, {"a": 1, "b": 2}, ["a", "b"]) == "b"


def test_head_options_added_since_a_checkpoint_do_not_make_it_another_experiment():
    older = {"head_options": {"ep_queries": 32, "map_heads": 8}}
    now = {"head_options": {"ep_queries": 32, "map_heads": 8, "ep_d_out": 1, "esimpool_heads": 12}}
    assert first_difference(older, now, ["head_options"]) is None
    changed = {"head_options": {**now["head_options"], "ep_queries": 16}}
    assert first_difference(older, changed, ["head_options"]) == "head_options"


def test_log_drops_epochs_after_the_checkpoint(tmp_path):
    log = tmp_path / "log.txt"
    log.write_text("".join(json.dumps({"epoch": e, "x": e}) + "\n" for e in range(5)))
    truncate_log(log, 2)
    assert [json.loads(line)["epoch"] for line in log.read_text().splitlines()] == [0, 1, 2]


def test_log_drops_a_line_cut_short(tmp_path):
    log = tmp_path / "log.txt"
    log.write_text(json.dumps({"epoch": 0}) + "\n" + json.dumps({"epoch": 1}) + "\n" + '{"epoch": 2, "tr')
    truncate_log(log, 5)
    assert [json.loads(line)["epoch"] for line in log.read_text().splitlines()] == [0, 1]


def test_resume_into_another_folder_keeps_the_best_heads_of_the_run_resumed(tmp_path):
    heads = torch.nn.Linear(2, 2)
    optimizer = torch.optim.SGD(heads.parameters(), lr=0.1, momentum=0.9)
    first, second = tmp_path / "first", tmp_path / "second"
    first.mkdir(), second.mkdir()
    best_heads = {"weight": torch.full((2, 2), 7.0), "bias": torch.zeros(2)}
    torch.save({"probes": best_heads}, first / "checkpoint-best.pth")
    torch.save({"probes": heads.state_dict(), "optimizer": optimizer.state_dict(), "epoch": 1,
                "best": {"cls": {"acc1": 60.0, "epoch": 0}}}, first / "checkpoint-last.pth")
    (second / "log.txt").write_text(json.dumps({"epoch": 4}) + "\n")
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    state = RunState(second, dict(IDENTITY), ["cls"])
    checkpoint = torch.load(first / "checkpoint-last.pth")
    state.resume(checkpoint, first / "checkpoint-last.pth", heads, optimizer, scaler)
    assert state.start_epoch == 2 and state.best == {"cls": {"acc1": 60.0, "epoch": 0}}
    assert torch.equal(state.best_states["weight"], best_heads["weight"])  # not only what improves from here on
    assert (second / "log.txt").read_text() == ""  # epochs past the checkpoint's are dropped
    other_rank = RunState(second, dict(IDENTITY), ["cls"])
    (second / "log.txt").write_text(json.dumps({"epoch": 4}) + "\n")
    other_rank.resume(checkpoint, first / "checkpoint-last.pth", heads, optimizer, scaler, main=False)
    assert other_rank.best_states == {} and other_rank.start_epoch == 2
    assert (second / "log.txt").read_text() == json.dumps({"epoch": 4}) + "\n"  # only the main process writes


def test_run_info_lists_the_subset_and_removes_a_stale_list(tmp_path):
    from util.run_state import write_run_info
    from util.subsets import PER_CLASS, TrainSubset, select

    selection = select(["b/2.png", "a/1.png", "b/1.png"], [1, 0, 1], TrainSubset(PER_CLASS, 1, 0))
    write_run_info(tmp_path, config={"epochs": 1}, identity={"train_subset": selection.describe()},
                   classes=["a", "b"], selection=selection)
    listed = (tmp_path / "train_subset.txt").read_text().splitlines()
    assert len(listed) == 2 and listed[0] == "a/1.png" and listed[1] in ("b/1.png", "b/2.png")
    info = json.loads((tmp_path / "run.json").read_text())
    assert info["train_subset"]["per_class"] == {"a": 1, "b": 1} and info["train_subset"]["images"] == 2
    assert info["config"] == {"epochs": 1}
    write_run_info(tmp_path, config={"epochs": 2}, identity={"train_subset": "full"}, classes=["a", "b"])
    assert not (tmp_path / "train_subset.txt").exists()
    assert json.loads((tmp_path / "run.json").read_text())["train_subset"] is None


# ---------------------------------------------------------------------------------- issue 24: fingerprints as data

def test_fingerprint_is_data_and_the_older_prose_is_read_as_the_same(tmp_path):
    import hashlib

    from util.run_state import as_fingerprint
    path = tmp_path / "mae.pth"
    path.write_bytes(b"weights")
    expected = {"name": "mae.pth", "bytes": 7, "sha256": hashlib.sha256(b"weights").hexdigest()[:16]}
    assert fingerprint(path) == expected
    assert as_fingerprint(f"mae.pth (7 bytes, sha256 {expected['sha256']})") == expected  # what run.json held
    assert as_fingerprint("vit_base_patch16_224.mae") == "vit_base_patch16_224.mae"


def test_a_checkpoint_with_the_older_prose_fingerprint_still_auto_resumes(tmp_path):
    encoder = tmp_path / "mae.pth"
    encoder.write_bytes(b"weights")
    current = fingerprint(encoder)
    prose = f"mae.pth (7 bytes, sha256 {current['sha256']})"
    path = _saved(tmp_path, {**IDENTITY, "encoder": prose})
    checkpoint, changed = RunState(tmp_path, {**IDENTITY, "encoder": current}, ["cls"]).read(path, explicit=False)
    assert changed == [] and checkpoint["epoch"] == 3
    encoder.write_bytes(b"other weights")
    with pytest.raises(IdentityMismatch, match=r"encoder='mae.pth \(7 bytes, sha256 [0-9a-f]{16}\)', this run has "
                                               r"encoder='mae.pth \(13 bytes, sha256 [0-9a-f]{16}\)'"):
        RunState(tmp_path, {**IDENTITY, "encoder": fingerprint(encoder)}, ["cls"]).read(path, explicit=False)


# ----------------------------------------------------------------------------------- issue 24: --eval's identity

EVAL = {**IDENTITY, "checkpoint_key": None, "input_size": 32, "oracle": None}


def _eval_setup(tmp_path):
    """Heads saved on the encoder file enc.pth; returns (heads path, encoder path)."""
    encoder = tmp_path / "enc.pth"
    encoder.write_bytes(b"0123456789")
    return _saved(tmp_path, {**EVAL, "encoder": fingerprint(encoder)}), encoder


@pytest.mark.parametrize("key, value", [("checkpoint_key", "student"), ("input_size", 64), ("return_block", 2),
                                        ("final_norm", True)])
def test_eval_refuses_other_tokens_than_the_heads_were_trained_on(tmp_path, key, value):
    from util.run_state import read_heads_for_eval
    heads, encoder = _eval_setup(tmp_path)
    assert read_heads_for_eval(heads, {**EVAL, "encoder": str(encoder)})["epoch"] == 3
    with pytest.raises(IdentityMismatch, match=f"{key}=") as info:
        read_heads_for_eval(heads, {**EVAL, "encoder": str(encoder), key: value})
    assert info.value.setting == key


def test_eval_refuses_another_encoder_by_size_then_content(tmp_path, monkeypatch):
    from util import run_state
    heads, encoder = _eval_setup(tmp_path)
    hashed, real = [], run_state.file_sha256
    monkeypatch.setattr(run_state, "file_sha256", lambda path: hashed.append(path) or real(path))
    renamed = tmp_path / "copy-of-enc.pth"
    renamed.write_bytes(encoder.read_bytes())
    assert run_state.read_heads_for_eval(heads, {**EVAL, "encoder": str(renamed)})  # the same weights
    bigger = tmp_path / "bigger.pth"
    bigger.write_bytes(b"01234567890")
    hashed.clear()
    with pytest.raises(IdentityMismatch, match=r"encoder='enc.pth \(10 bytes, sha256 [0-9a-f]{16}\)', this run has "
                                               r"encoder='bigger.pth \(11 bytes\)'"):
        run_state.read_heads_for_eval(heads, {**EVAL, "encoder": str(bigger)})
    assert hashed == []  # another size: refused without reading the file
    same_size = tmp_path / "enc-epoch-2.pth"
    same_size.write_bytes(b"9876543210")
    with pytest.raises(IdentityMismatch, match=r"this run has encoder='enc-epoch-2.pth \(10 bytes, sha256"):
        run_state.read_heads_for_eval(heads, {**EVAL, "encoder": str(same_size)})
    for other in ("", "vit_base_patch16_224.mae"):  # random init, a timm name
        with pytest.raises(IdentityMismatch, match="encoder="):
            run_state.read_heads_for_eval(heads, {**EVAL, "encoder": other})


def test_eval_of_a_random_encoder_needs_its_seed(tmp_path):
    from util.run_state import read_heads_for_eval
    heads = _saved(tmp_path, {**EVAL, "encoder": "random init", "seed": 0})
    assert read_heads_for_eval(heads, {**EVAL, "encoder": "", "seed": 0})
    with pytest.raises(IdentityMismatch, match="seed=0, this run has seed=1"):
        read_heads_for_eval(heads, {**EVAL, "encoder": "", "seed": 1})


# ------------------------------------------------------------------------- issue 24: a fresh start keeps old logs

def test_a_fresh_start_sets_the_old_log_aside_and_never_deletes_it(tmp_path):
    from util.run_state import set_aside_old_log
    assert set_aside_old_log(tmp_path) is None  # no log: nothing to do
    (tmp_path / "log.txt").write_text("")
    assert set_aside_old_log(tmp_path) is None  # an empty one is not an experiment
    (tmp_path / "log.txt").write_text('{"epoch": 0}\n')
    (tmp_path / "tensorboard").mkdir()
    (tmp_path / "tensorboard" / "events.1").write_text("old")
    (tmp_path / "log.1.txt").write_text("a user's file")
    assert set_aside_old_log(tmp_path) == tmp_path / "log.2.txt"
    assert (tmp_path / "log.2.txt").read_text() == '{"epoch": 0}\n'
    assert (tmp_path / "tensorboard.2" / "events.1").read_text() == "old"
    assert (tmp_path / "log.1.txt").read_text() == "a user's file"
    assert not (tmp_path / "log.txt").exists() and not (tmp_path / "tensorboard").exists()
