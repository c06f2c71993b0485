"""collect_results.py: one table over run folders written here by hand (the layout main_linprobe.py writes, see
tests/test_main_linprobe.py for real runs), expected tables spelled out."""
import json
from argparse import Namespace

import pytest

import collect_results
from helpers import run_cli
from util.errors import UserError


def write_run(folder, *, finetune, encoder, data_path, subset, epochs, results, logged=None, **identity):
    """A main_linprobe.py output folder: run.json, log.txt with `logged` epochs (default all), results.json.
    `identity`: more of what main_linprobe records (checkpoint_key, input_size, return_block, final_norm)."""
    folder.mkdir(parents=True)
    config = {"encoder": {"model": "vit_base_patch16", "finetune": finetune, **identity}, "data_path": data_path,
              "train_subset": subset, "schedule": {"epochs": epochs, "warmup_epochs": 0, "min_lr": 0.0}}
    (folder / "run.json").write_text(json.dumps({"version": 1, "config": config,
                                                 "identity": {"encoder": encoder, **identity}}))
    logged = epochs if logged is None else logged
    (folder / "log.txt").write_text("".join(json.dumps({"epoch": e, "test_acc1": 1.0}) + "\n" for e in range(logged)))
    if results is not None:
        # heads as main_linprobe names them: the probe's head, knn-<kind> for k-NN rows
        rows = [{"probe": probe, "head": "-".join(probe.split("_")[:2]) if probe.startswith("knn") else
                 probe.split("_")[0], "lr": lr, "best_acc1": acc1, "best_epoch": epoch}
                for probe, lr, acc1, epoch in results]
        (folder / "results.json").write_text(json.dumps(rows))
    return folder


MAE = dict(finetune="/ckpt/mae_pretrain_vit_base.pth", encoder="mae_pretrain_vit_base.pth (1234 bytes, sha256 "
           "0123456789abcdef)")
TIMM = dict(finetune="vit_base_patch16_224.mae", encoder="vit_base_patch16_224.mae")


@pytest.fixture
def four_runs(tmp_path):
    full = write_run(tmp_path / "flowers-full", **MAE, data_path="flowers102:/data", subset=None, epochs=2,
                     results=[("cls_blr0.1", 0.4, 70.0, 1), ("cls_blr1", 4.0, 72.5, 0),
                              ("abmilp_blr0.1", 0.4, 75.25, 1), ("abmilp_blr1", 4.0, 74.0, 1)])
    shot = write_run(tmp_path / "flowers-5shot", **MAE, data_path="flowers102:/data", epochs=2,
                     subset={"kind": "per_class", "value": 5, "seed": 0},
                     results=[("cls", 0.4, 40.0, 1), ("abmilp", 0.4, 45.5, 0)])
    one_percent = write_run(tmp_path / "in1k-1pct", **TIMM, data_path="/data/imagenet/", epochs=4,
                            subset={"kind": "fraction", "value": 0.01, "seed": 0},
                            results=[("cls", 0.4, 50.0, 3), ("knn_cls_k20_T0.07", None, 61.0, None),
                                     ("knn_cls_k10_T0.07", None, 60.5, None)])
    unfinished = write_run(tmp_path / "in1k-10pct", **TIMM, data_path="/data/imagenet", epochs=3, logged=1,
                           subset={"kind": "fraction", "value": 0.1, "seed": 0}, results=None)
    return [full, shot, one_percent, unfinished, tmp_path / "never-started"]


def test_three_finished_runs_one_unfinished_and_a_missing_folder(four_runs):
    done = run_cli(four_runs, script="collect_results.py", timeout=120)
    assert done.returncode == 0, done.stderr
    full, shot, one_percent, unfinished, missing = four_runs
    assert done.stdout == f"""\
| encoder | dataset | train subset | cls | abmilp | knn-cls | runs |
|---|---|---|---|---|---|---|
| mae_pretrain_vit_base | flowers102 | full | 72.50 | 75.25 | - | {full} |
| mae_pretrain_vit_base | flowers102 | 5-shot (seed 0) | 40.00 | 45.50 | - | {shot} |
| vit_base_patch16_224.mae | imagenet | 1% (seed 0) | 50.00 | - | 61.00 | {one_percent} |

Not in the table:
- {unfinished}: unfinished (1 of 3 epochs logged, no results.json)
- {missing}: missing (no such folder)
"""


def test_csv_gives_the_best_probe_lr_and_epoch_and_every_key_column(four_runs, capsys):
    collect_results.main(Namespace(output_dirs=[str(p) for p in four_runs[:3]], format="csv"))
    full, shot, one_percent = four_runs[:3]
    assert capsys.readouterr().out == f"""\
encoder,encoder sha256,sub-model,input size,block,final norm,dataset,train subset,cls acc1,cls lr,cls epoch,\
abmilp acc1,abmilp lr,abmilp epoch,knn-cls acc1,knn-cls lr,knn-cls epoch,runs
mae_pretrain_vit_base,0123456789abcdef,default,,last,off,flowers102,full,72.5,4.0,0,75.25,0.4,1,,,,{full}
mae_pretrain_vit_base,0123456789abcdef,default,,last,off,flowers102,5-shot (seed 0),40.0,0.4,1,45.5,0.4,0,,,,{shot}
vit_base_patch16_224.mae,,default,,last,off,imagenet,1% (seed 0),50.0,0.4,3,,,,61.0,,,{one_percent}
"""


def test_runs_of_one_row_share_it_until_a_head_repeats(tmp_path, capsys):
    flags = dict(finetune="", encoder="random init", data_path="digits", subset=None, epochs=1)
    cls = write_run(tmp_path / "cls", **flags, results=[("cls", 12.5, 60.0, 0)])
    abmilp = write_run(tmp_path / "abmilp", **flags, results=[("abmilp", 12.5, 65.0, 0)])
    again = write_run(tmp_path / "cls-again", **flags, results=[("cls", 12.5, 61.0, 0)])
    collect_results.main(Namespace(output_dirs=[str(cls), str(abmilp), str(again)], format="md"))
    lines = capsys.readouterr().out.splitlines()
    assert lines[2] == f"| random vit_base_patch16 | digits | full | 60.00 | 65.00 | {cls}, {abmilp} |"
    assert lines[3] == f"| random vit_base_patch16 | digits | full | 61.00 | - | {again} |"


def test_a_run_with_fewer_logged_epochs_than_configured_is_unfinished(tmp_path, capsys):
    finished = write_run(tmp_path / "done", **TIMM, data_path="digits", subset=None, epochs=1,
                         results=[("cls", 1.0, 50.0, 0)])
    resumed = write_run(tmp_path / "resumed-longer", **TIMM, data_path="digits", subset=None, epochs=5, logged=2,
                        results=[("cls", 1.0, 55.0, 1)])  # results.json of the first 2 epochs, resumed for 5
    collect_results.main(Namespace(output_dirs=[str(finished), str(resumed)], format="csv"))
    captured = capsys.readouterr()
    assert str(resumed) not in captured.out
    assert captured.err == f"note: not in the table: {resumed}: unfinished (2 of 5 epochs logged)\n"


def test_no_finished_run_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="none of the 2 folder"):
        collect_results.main(Namespace(output_dirs=[str(tmp_path / "a"), str(tmp_path)], format="md"))


@pytest.mark.parametrize("data_path, name", [("digits", "digits"), ("cifar100:/data/cifar", "cifar100"),
                                             ("/data/imagenet/", "imagenet"), ("imagenet", "imagenet"),
                                             ("~/datasets/fgvc/cub_200", "cub_200")])
def test_dataset_name(data_path, name):
    assert collect_results.dataset_name(data_path) == name


def test_encoder_name_strips_checkpoint_suffixes():
    recorded = {"name": "vit-s-300ep.pth.tar", "bytes": 9, "sha256": "00ff"}
    assert collect_results.encoder_name("/w/vit-s-300ep.pth.tar", "vit_small_patch16", recorded) == \
        ("vit-s-300ep", "00ff")
    assert collect_results.encoder_name("", "vit_tiny_patch16", "random init") == ("random vit_tiny_patch16", "")


# ------------------------------------------------------------------------------ experiments never merged (issue 24)

DINO = dict(finetune="/ckpt/dino/checkpoint.pth", data_path="digits", subset=None, epochs=1, input_size=224,
            return_block=None, checkpoint_key=None, final_norm=False)


def _dino(sha256):
    return {"name": "checkpoint.pth", "bytes": 1000, "sha256": sha256}


def _table(folders, capsys, fmt="md"):
    collect_results.main(Namespace(output_dirs=[str(f) for f in folders], format=fmt))
    return capsys.readouterr()


@pytest.mark.parametrize("setting, value, column, shown", [
    ("final_norm", True, "final norm", ("off", "on")),
    ("checkpoint_key", "student", "sub-model", ("default", "student")),
    ("return_block", 5, "block", ("last", "5")),
    ("input_size", 448, "input size", ("224", "448"))])
def test_runs_that_differ_in_the_tokens_read_get_rows_of_their_own(tmp_path, capsys, setting, value, column,
                                                                    shown):
    # e.g. the teacher and the student of one DINO file, or one run with --final_norm and one without
    a = write_run(tmp_path / "a", **DINO, encoder=_dino("aa"), results=[("cls", 1.0, 60.0, 0)])
    b = write_run(tmp_path / "b", **{**DINO, setting: value}, encoder=_dino("aa"), results=[("abmilp", 1.0, 70.0, 0)])
    lines = _table([a, b], capsys).out.splitlines()
    assert lines[0] == f"| encoder | {column} | dataset | train subset | cls | abmilp | runs |"
    assert lines[2] == f"| checkpoint | {shown[0]} | digits | full | 60.00 | - | {a} |"
    assert lines[3] == f"| checkpoint | {shown[1]} | digits | full | - | 70.00 | {b} |"
    assert len(lines) == 4


def test_two_files_of_one_name_are_two_encoders(tmp_path, capsys):
    a = write_run(tmp_path / "a", **DINO, encoder=_dino("aaaaaaaaaaaaaaaa"), results=[("cls", 1.0, 60.0, 0)])
    b = write_run(tmp_path / "b", **DINO, encoder=_dino("bbbbbbbbbbbbbbbb"), results=[("abmilp", 1.0, 70.0, 0)])
    lines = _table([a, b], capsys).out.splitlines()
    assert lines[2] == f"| checkpoint (sha256 aaaaaaaa) | digits | full | 60.00 | - | {a} |"
    assert lines[3] == f"| checkpoint (sha256 bbbbbbbb) | digits | full | - | 70.00 | {b} |"
    c = write_run(tmp_path / "c", **DINO, encoder=_dino("aaaaaaaaaaaaaaaa"), results=[("abmilp", 1.0, 65.0, 0)])
    lines = _table([a, c], capsys).out.splitlines()  # the same file under another folder: one experiment, one row
    assert lines[2] == f"| checkpoint | digits | full | 60.00 | 65.00 | {a}, {c} |" and len(lines) == 3


def test_the_older_prose_fingerprint_is_the_same_encoder_as_the_dict(tmp_path, capsys):
    old = write_run(tmp_path / "old", **DINO, encoder="checkpoint.pth (1000 bytes, sha256 aaaaaaaaaaaaaaaa)",
                    results=[("cls", 1.0, 60.0, 0)])
    new = write_run(tmp_path / "new", **DINO, encoder=_dino("aaaaaaaaaaaaaaaa"), results=[("abmilp", 1.0, 70.0, 0)])
    lines = _table([old, new], capsys).out.splitlines()
    assert lines[2] == f"| checkpoint | digits | full | 60.00 | 70.00 | {old}, {new} |"


def _break(folder, edit):
    info = json.loads((folder / "run.json").read_text())
    edit(info)
    (folder / "run.json").write_text(json.dumps(info))


@pytest.mark.parametrize("edit, reason", [
    (lambda info: info["config"].update(encoder="vit_base_patch16"), "config.encoder is str 'vit_base_patch16'"),
    (lambda info: info.update(identity=["x"]), "identity is list"),
    (lambda info: info["config"]["schedule"].update(epochs="2"), "schedule.epochs is str '2'"),
    (lambda info: info["config"].update(data_path=None), "config.data_path is NoneType"),
    (lambda info: info["config"].update(train_subset="5-shot"), "train_subset is str"),
    (lambda info: info["identity"].update(final_norm="yes"), "final_norm is str 'yes'"),
    (lambda info: info.update(config=3), "config is int 3")])
def test_a_malformed_run_json_is_listed_and_the_table_kept(tmp_path, capsys, edit, reason):
    good = write_run(tmp_path / "good", **TIMM, data_path="digits", subset=None, epochs=1,
                     results=[("cls", 1.0, 50.0, 0)])
    bad = write_run(tmp_path / "bad", **TIMM, data_path="digits", subset=None, epochs=1,
                    results=[("cls", 1.0, 55.0, 0)])
    _break(bad, edit)
    out = _table([bad, good], capsys).out
    assert f"| vit_base_patch16_224.mae | digits | full | 50.00 | {good} |" in out
    skipped = [line for line in out.splitlines() if line.startswith(f"- {bad}: ")]
    assert len(skipped) == 1 and reason in skipped[0], out


def test_malformed_results_rows_are_listed(tmp_path, capsys):
    bad = write_run(tmp_path / "bad", **TIMM, data_path="digits", subset=None, epochs=1, results=[])
    (bad / "results.json").write_text(json.dumps([["cls", 50.0]]))
    good = write_run(tmp_path / "good", **TIMM, data_path="digits", subset=None, epochs=1,
                     results=[("cls", 1.0, 50.0, 0)])
    out = _table([bad, good], capsys).out
    assert f"- {bad}: results.json row 0 cannot be read" in out


def test_a_result_that_is_not_a_number_is_left_out_with_a_note(tmp_path, capsys):
    run = write_run(tmp_path / "nan", **TIMM, data_path="digits", subset=None, epochs=1,
                    results=[("cls_blr1", 1.0, float("nan"), 0), ("cls_blr2", 2.0, 40.0, 0)])
    out = _table([run], capsys).out
    assert f"| vit_base_patch16_224.mae | digits | full | 40.00 | {run} |" in out  # not NaN, which compares false
    assert f"- {run}: results.json: probe cls_blr1 has best acc1 nan, left out" in out
    only_nan = write_run(tmp_path / "only-nan", **TIMM, data_path="digits", subset=None, epochs=1,
                         results=[("cls", 1.0, float("nan"), 0)])
    out = _table([run, only_nan], capsys).out
    assert f"- {only_nan}: results.json holds no accuracy that is a number" in out


def test_duplicates_are_noted(tmp_path, capsys):
    run = write_run(tmp_path / "run", **TIMM, data_path="digits", subset=None, epochs=1,
                    results=[("cls", 1.0, 50.0, 0), ("cls", 1.0, 50.0, 0)])
    copy = tmp_path / "copy"
    copy.mkdir()
    for name in ("run.json", "log.txt", "results.json"):
        (copy / name).write_bytes((run / name).read_bytes())
    captured = _table([run, f"{run}/", copy], capsys, fmt="csv")
    assert len(captured.out.splitlines()) == 3  # the header, the run, its copy: the folder given twice counts once
    assert captured.err.splitlines() == [
        f"note: {run}: results.json: probe cls is listed more than once",
        f"note: {run}/: the same folder as {run}, collected once",
        f"note: {copy}: results.json: probe cls is listed more than once",
        f"note: rows 1 and 2 hold the same experiment and the same numbers (one run copied?): {run} and {copy}"]
