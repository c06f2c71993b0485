"""collect_results.py: one table over run folders written here by hand (the layout main_linprobe.py writes, see
tests/test_main_linprobe.py for real runs), expected tables spelled out."""
import json
from argparse import Namespace

import pytest

import collect_results
from helpers import run_cli
from util.errors import UserError


def write_run(folder, *, finetune, encoder, data_path, subset, epochs, results, logged=None):
    """A main_linprobe.py output folder: run.json, log.txt with `logged` epochs (default all), results.json."""
    folder.mkdir(parents=True)
    config = {"encoder": {"model": "vit_base_patch16", "finetune": finetune}, "data_path": data_path,
              "train_subset": subset, "schedule": {"epochs": epochs, "warmup_epochs": 0, "min_lr": 0.0}}
    (folder / "run.json").write_text(json.dumps({"version": 1, "config": config, "identity": {"encoder": encoder}}))
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


def test_csv_gives_the_best_probe_lr_and_epoch(four_runs, capsys):
    collect_results.main(Namespace(output_dirs=[str(p) for p in four_runs[:3]], format="csv"))
    full, shot, one_percent = four_runs[:3]
    assert capsys.readouterr().out == f"""\
encoder,dataset,train subset,cls acc1,cls lr,cls epoch,abmilp acc1,abmilp lr,abmilp epoch,knn-cls acc1,knn-cls lr,\
knn-cls epoch,runs
mae_pretrain_vit_base,flowers102,full,72.5,4.0,0,75.25,0.4,1,,,,{full}
mae_pretrain_vit_base,flowers102,5-shot (seed 0),40.0,0.4,1,45.5,0.4,0,,,,{shot}
vit_base_patch16_224.mae,imagenet,1% (seed 0),50.0,0.4,3,,,,61.0,,,{one_percent}
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
    config = {"encoder": {"model": "vit_small_patch16", "finetune": "/w/vit-s-300ep.pth.tar"}}
    assert collect_results.encoder_name(config, {"encoder": "vit-s-300ep.pth.tar (9 bytes, sha256 00ff)"}) == \
        "vit-s-300ep"
    assert collect_results.encoder_name({"encoder": {"model": "vit_tiny_patch16", "finetune": ""}}, {}) == \
        "random vit_tiny_patch16"
