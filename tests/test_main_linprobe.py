"""main_linprobe.py run for real (subprocesses on scikit-learn's digits, CPU): outputs, resume, --eval, torchrun.

The smallest encoder the CLI accepts is vit_tiny_patch16; at --input_size 32 it sees 2x2 patches, so an epoch over
the 1,437 training digits takes about a second. Runs shared by several tests are module-scoped fixtures.
"""
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import main_linprobe
from helpers import DIGITS_BASE as DIGITS
from helpers import ROOT, assert_user_error, cli_env, free_port

HEADS, BLRS, GRID_EPOCHS = ["cls", "pos", "abmilp"], ["0.1", "200"], 4
# The paper's published command (issue 3, item 1), flags verbatim.
PAPER_COMMAND = ["--amp", "bfloat16", "--num_workers", "16", "--dataloader_affinity_hack", "--epochs", "90",
                 "--accum_iter", "2", "--optimizer", "lars", "--batch_size", "2048", "--model", "vit_base_patch16",
                 "--finetune", "vit_base_patch16_224.mae", "--data_path", "/data/imagenet", "--output_dir", "/out",
                 "--cls_features", "abmilp", "--abmilp_act", "relu", "--abmilp_sa", "none", "--abmilp_depth", "1",
                 "--abmilp_cond", "none", "--abmilp_content", "patch"]


def env():
    # One thread per process: on a shared 2-core machine, OpenMP threads spinning against other jobs made these
    # runs ~10x slower (measured 61 s vs 6 s for the same 2 epochs); results are the same.
    return cli_env(OMP_NUM_THREADS=1)


def run(*args, launcher=(), timeout=300):
    done = subprocess.run([sys.executable, *launcher, "main_linprobe.py", *map(str, args)], cwd=ROOT, env=env(),
                          capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"exit {done.returncode}\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done


def log_lines(folder):
    return [json.loads(line) for line in (Path(folder) / "log.txt").read_text().splitlines() if line.strip()]


def last_probes(folder):
    return torch.load(Path(folder) / "checkpoint-last.pth", map_location="cpu", weights_only=False)["probes"]


# ------------------------------------------------------------------------------------ a 3 heads x 2 lrs grid

@pytest.fixture(scope="module")
def grid_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("grid")
    done = run(*DIGITS, "--cls_features", ",".join(HEADS), "--blr", ",".join(BLRS), "--epochs", str(GRID_EPOCHS),
               "--warmup_epochs", "1", "--batch_size", "128", "--output_dir", out, "--knn", "--knn_k", "5,20")
    return out, done


def test_results_table_lists_every_head_and_lr(grid_run):
    out, done = grid_run
    names = {f"{h}_blr{b}" for h in HEADS for b in BLRS}
    rows = [r for r in json.loads((out / "results.json").read_text()) if not r["probe"].startswith("knn")]
    assert {r["probe"] for r in rows} == names and len(rows) == len(names)
    for r in rows:
        head, blr = r["probe"].rsplit("_blr", 1)
        assert r["head"] == head
        assert r["lr"] == pytest.approx(float(blr) * 128 / 256)  # one process, accum 1
        assert 0 <= r["best_acc1"] <= 100 and 0 <= r["best_epoch"] < GRID_EPOCHS
    table = (out / "results.md").read_text()
    for name in names:
        assert re.search(rf"^\| {re.escape(name)} \|", table, re.M), f"{name} missing from results.md"
    # per-probe curves: every epoch logs every probe
    lines = log_lines(out)
    assert [line["epoch"] for line in lines] == list(range(GRID_EPOCHS))
    for line in lines:
        assert set(line["probes"]) == names
        for stats in line["probes"].values():
            assert {"train_loss", "test_acc1", "test_acc5", "test_loss", "lr"} <= set(stats)
    # the best-heads checkpoint keeps a head for every combination
    best = torch.load(out / "checkpoint-best.pth", map_location="cpu", weights_only=False)
    assert set(best["best"]) == names


def test_digits_are_learned_well_above_chance(grid_run):
    out, _ = grid_run
    best = {r["probe"]: r["best_acc1"] for r in json.loads((out / "results.json").read_text())}
    # Random-init ViT-Tiny, 4 epochs, blr 200 (lr 100): measured cls 62.50%, pos 58.61% (chance is 10%).
    assert best["cls_blr200"] > 30, best
    assert best["pos_blr200"] > 30, best


def test_progress_bar_and_final_line(grid_run):
    out, done = grid_run
    text = done.stdout + done.stderr
    assert "img_s=" in text  # tqdm postfix
    final = [line for line in done.stdout.splitlines() if "best acc1" in line]
    assert final, done.stdout[-2000:]
    assert "checkpoint-best.pth" in final[-1]


def test_knn_rows_join_the_results_table(grid_run):
    out, done = grid_run
    knn = [r for r in json.loads((out / "results.json").read_text()) if r["probe"].startswith("knn")]
    assert knn, "no k-NN rows in results.json"
    assert {r["head"] for r in knn} >= {"knn-cls", "knn-mean"}
    assert all(0 <= r["best_acc1"] <= 100 for r in knn)
    assert any(r["best_acc1"] > 20 for r in knn), knn  # the digits are far from random for k-NN too
    md = (out / "results.md").read_text()
    assert all(r["probe"] in md for r in knn)


# ---------------------------------------------------------- one head: lr rule, flat log, resume, cache, --eval

SINGLE = [*DIGITS, "--cls_features", "cls", "--blr", "0.1", "--batch_size", "64", "--accum_iter", "2",
          "--warmup_epochs", "10", "--seed", "3"]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    out = tmp_path_factory.mktemp("straight")
    done = run(*SINGLE, "--epochs", "2", "--output_dir", out, "--cache_eval_features", "1")
    return out, done


@pytest.fixture(scope="module")
def resumed(tmp_path_factory):
    out = tmp_path_factory.mktemp("resumed")
    run(*SINGLE, "--epochs", "1", "--output_dir", out)
    # Another --epochs is another experiment: auto-resume refuses it, an explicit --resume continues it. Both
    # epochs are inside the 10-epoch warmup, so the lrs are those of an uninterrupted 2-epoch run.
    done = run(*SINGLE, "--epochs", "2", "--output_dir", out, "--resume", out / "checkpoint-last.pth")
    return out, done


def test_single_head_keeps_mae_flat_log_keys(uninterrupted):
    out, _ = uninterrupted
    lines = log_lines(out)
    assert len(lines) == 2
    for line in lines:
        assert {"epoch", "train_loss", "test_acc1", "test_acc5", "test_loss", "lr"} <= set(line)
        assert "probes" not in line
    rows = json.loads((out / "results.json").read_text())
    assert [r["probe"] for r in rows] == ["cls"]


def test_lr_is_blr_times_effective_batch_over_256_with_warmup(uninterrupted):
    out, done = uninterrupted
    peak = 0.1 * 64 * 2 / 256  # 0.05
    assert re.search(r"lr = .*0\.05\b", done.stdout), done.stdout[:500]
    # 1,437 images / 64 = 22 full batches; with accum 2 the lr is set at iterations 0, 2, ..., 20, so the
    # last lr of epoch e is peak * (e + 20/22) / warmup_epochs.
    lines = log_lines(out)
    assert lines[0]["lr"] == pytest.approx(peak * (20 / 22) / 10)
    assert lines[1]["lr"] == pytest.approx(peak * (1 + 20 / 22) / 10)


def test_resume_reproduces_the_uninterrupted_head_exactly(uninterrupted, resumed):
    straight, resumed_out = uninterrupted[0], resumed[0]
    assert "resumed" in resumed[1].stdout and "resuming with changed settings: epochs" in resumed[1].stderr
    a, b = last_probes(straight), last_probes(resumed_out)
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), f"{key}: max abs diff {(a[key] - b[key]).abs().max().item()}"
    assert [line["epoch"] for line in log_lines(resumed_out)] == [0, 1]


def test_cached_eval_tokens_give_the_same_accuracy(uninterrupted, resumed):
    straight, _ = uninterrupted
    # the uninterrupted run evaluated from its cache in epoch 1; the resumed one ran the encoder every time
    for with_cache, fresh in zip(log_lines(straight), log_lines(resumed[0])):
        for key in ("test_acc1", "test_acc5", "test_loss"):
            assert with_cache[key] == fresh[key], (key, with_cache[key], fresh[key])


def test_eval_cache_states_its_size_per_process(uninterrupted):
    # --cls_features cls reads [cls] alone: one token of 192 float32 channels per validation image
    _, done = uninterrupted
    images = int(re.search(r"validating on (\d+)", done.stdout).group(1))
    size = images * 192 * 4 / 2 ** 30
    assert f"eval cache: {images} validation images per process x (1 token(s) x 192 channels), float32 in host " \
           f"memory = {size:.3g} GiB per process" in done.stdout, done.stdout[:2000]


def test_eval_cache_that_needs_more_than_allowed_is_refused_before_work_starts(tmp_path):
    out = tmp_path / "out"
    done = subprocess.run([sys.executable, "main_linprobe.py", *SINGLE, "--cls_features", "cls,pos",
                           "--cache_eval_features", "0.0001", "--output_dir", out], cwd=ROOT, env=env(),
                          capture_output=True, text=True, timeout=300)
    assert_user_error(done, "the eval cache needs", "GiB per process", "(5 token(s) x 192 channels)",
                      "more than --cache_eval_features 0.0001", "pass --cache_eval_features 0.01 or more")
    assert not list(out.glob("*.json")) and not list(out.glob("*.pth"))  # nothing written, nothing trained


def test_compile_with_an_attention_head_says_it_is_not_applied(tmp_path):
    done = run(*DIGITS, "--cls_features", "cls,attn-mn", "--compile", "--epochs", "1", "--warmup_epochs", "1",
               "--batch_size", "256", "--output_dir", tmp_path / "out")
    notes = [line for line in done.stderr.splitlines() if line.startswith("note: --compile")]
    assert notes == ["note: --compile is not applied: attn-mn read attention probabilities or several blocks' "
                     "tokens, which a compiled forward cannot capture; the encoder runs uncompiled"], \
        done.stderr[-2000:]


def printed_acc1(stdout, name):
    match = re.search(rf"^{re.escape(name)}: acc1 ([0-9.]+)", stdout, re.M)
    assert match, stdout[-2000:]
    return float(match.group(1))


def test_eval_of_the_best_checkpoint_prints_the_logged_best_accuracy(resumed, tmp_path):
    out, _ = resumed
    lines = log_lines(out)
    best = max(lines, key=lambda line: line["test_acc1"])
    done = run(*SINGLE, "--eval", "--resume", out / "checkpoint-best.pth", "--output_dir", tmp_path / "eval")
    assert printed_acc1(done.stdout, "cls") == pytest.approx(best["test_acc1"], abs=0.005)


def test_eval_in_the_output_dir_evaluates_the_last_heads(resumed):
    out, _ = resumed
    before = (out / "log.txt").read_text()
    done = run(*SINGLE, "--eval", "--output_dir", out)
    assert printed_acc1(done.stdout, "cls") == pytest.approx(log_lines(out)[-1]["test_acc1"], abs=0.005)
    assert (out / "log.txt").read_text() == before  # evaluating logs no epoch


# ------------------------------------------------------------------------------------------ torchrun, paper

def test_two_process_torchrun_on_cpu_completes_and_logs_once(tmp_path):
    out = tmp_path / "ddp"
    launcher = ["-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port())]
    done = run(*DIGITS, "--cls_features", "cls,pos", "--blr", "50", "--epochs", "2", "--warmup_epochs", "1",
               "--batch_size", "128", "--output_dir", out, launcher=launcher)
    lines = log_lines(out)
    assert [line["epoch"] for line in lines] == [0, 1]  # one line per epoch, not one per process
    assert set(lines[0]["probes"]) == {"cls_blr50", "pos_blr50"}
    # effective batch = 128 per process x 2 processes
    assert json.loads((out / "results.json").read_text())[0]["lr"] == pytest.approx(50 * 256 / 256)
    assert done.stdout.count("| probe |") == 1  # the table is printed (and written) by one process only
    assert (out / "results.md").read_text().count("| probe |") == 1
    assert (out / "checkpoint-last.pth").exists()


def test_the_peers_heads_and_dinov2s_protocol_train_in_one_bf16_run(tmp_path):
    out = tmp_path / "peer"
    heads = ["dinov2_n1", "dinov2_n4_avgpool", "ep_all", "siglip", "cbam", "dolg"]
    run(*DIGITS, "--cls_features", ",".join(heads), "--blr", "50", "--epochs", "1", "--warmup_epochs", "0",
        "--train_per_class", "20", "--batch_size", "64", "--amp", "bfloat16", "--ep_d_out", "2",
        "--output_dir", out)
    rows = json.loads((out / "results.json").read_text())
    assert {r["probe"] for r in rows} == {f"{h}_blr50" for h in heads}
    assert all(0 <= r["best_acc1"] <= 100 for r in rows)
    probes = last_probes(out)
    assert probes["heads.2.classifier.weight"].shape == (10, 96)  # ep_all, --ep_d_out 2 on the width 192
    assert probes["heads.1.classifier.weight"].shape == (10, 5 * 192)  # four blocks' [cls] + the patch mean


def test_paper_command_line_parses():
    args = main_linprobe.get_args_parser().parse_args(PAPER_COMMAND)
    assert args.amp == "bfloat16" and args.num_workers == 16 and args.dataloader_affinity_hack is True
    assert args.epochs == 90 and args.accum_iter == 2 and args.optimizer == "lars" and args.batch_size == 2048
    assert args.model == "vit_base_patch16" and args.finetune == "vit_base_patch16_224.mae"
    assert args.data_path == "/data/imagenet" and args.output_dir == "/out"
    assert args.cls_features == "abmilp"
    assert (args.abmilp_act, args.abmilp_sa, args.abmilp_depth, args.abmilp_cond, args.abmilp_content) == \
        ("relu", "none", 1, "none", "patch")
    # issue 3's defaults for what the command leaves out
    assert float(args.blr) == 0.1 and args.warmup_epochs == 10 and args.weight_decay == 0


def test_paper_command_runs_on_digits_on_cpu(tmp_path):
    """The published command with only data, checkpoint, size, epochs and device swapped for a CPU-sized run."""
    flags = list(PAPER_COMMAND)

    def swap(flag, value):
        flags[flags.index(flag) + 1] = str(value)

    swap("--data_path", "digits")
    swap("--output_dir", tmp_path / "paper")
    swap("--epochs", 1)
    swap("--num_workers", 0)
    swap("--model", "vit_tiny_patch16")
    swap("--batch_size", 512)  # 1,437 digits make one batch of 2048: with --accum_iter 2 no step (refused)
    i = flags.index("--finetune")
    del flags[i:i + 2]  # random init: no download in tests
    done = run(*flags, "--input_size", "32", "--device", "cpu")
    lines = log_lines(tmp_path / "paper")
    assert len(lines) == 1 and 0 <= lines[0]["test_acc1"] <= 100
    assert "lr = blr * 1024 / 256" in done.stdout  # 512 x accum 2 x 1 process


def test_eval_without_a_checkpoint_is_a_user_error(tmp_path):
    done = subprocess.run([sys.executable, "main_linprobe.py", *DIGITS, "--eval", "--output_dir", tmp_path / "none"],
                          cwd=ROOT, env=env(), capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stdout[-1000:] + done.stderr[-1000:]
    assert "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines()[-1].startswith("error: ") and "--eval" in done.stderr


# ------------------------------------------------------------------------------------------- low-shot subsets

SHOT_SIZES = {"class_0": 5, "class_1": 4, "class_2": 6, "class_3": 2}  # class_3 has fewer than 3
SHOT = ["--model", "vit_tiny_patch16", "--input_size", "32", "--device", "cpu", "--num_workers", "0",
        "--batch_size", "4", "--warmup_epochs", "1", "--train_per_class", "3"]


def _shot_folder(root):
    from helpers import make_image

    for split in ("train", "val"):
        for c, (name, n) in enumerate(SHOT_SIZES.items()):
            for j in range(n if split == "train" else 1):
                (root / split / name).mkdir(parents=True, exist_ok=True)
                make_image(16, c * 100 + j, c).save(root / split / name / f"img_{j}.png")
    return root


@pytest.fixture(scope="module")
def shot_runs(tmp_path_factory):
    """The same --train_per_class 3 drawn by runs that differ in everything but the subset seed, and another seed."""
    from concurrent.futures import ThreadPoolExecutor

    root = tmp_path_factory.mktemp("shots")
    data = _shot_folder(root / "data")
    torchrun = ["-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port())]
    runs = {"one": ([*SHOT, "--cls_features", "cls", "--blr", "50", "--epochs", "1"], ()),
            "ddp": ([*SHOT, "--cls_features", "pos,abmilp", "--blr", "10,20", "--seed", "7", "--epochs", "1",
                     "--subset_seed", "0"], torchrun),
            "seed1": ([*SHOT, "--subset_seed", "1", "--epochs", "0", "--knn", "--knn_k", "2"], ())}
    with ThreadPoolExecutor(max_workers=2) as pool:
        futures = {name: pool.submit(run, *flags, "--data_path", data, "--output_dir", root / name, launcher=launcher)
                   for name, (flags, launcher) in runs.items()}
        done = {name: future.result() for name, future in futures.items()}
    return data, root, done


def subset_listing(folder):
    return (Path(folder) / "train_subset.txt").read_text().splitlines()


def test_k_per_class_trains_on_k_images_of_each_class(shot_runs):
    data, root, done = shot_runs
    listed = subset_listing(root / "one")
    assert listed == sorted(listed) and len(listed) == len(set(listed))
    per_class = {name: sum(line.startswith(f"{name}/") for line in listed) for name in SHOT_SIZES}
    assert per_class == {"class_0": 3, "class_1": 3, "class_2": 3, "class_3": 2}
    assert all((data / "train" / line).is_file() for line in listed)
    assert "training 1 probe(s) on 11 images, validating on 4" in done["one"].stdout
    assert re.search(r"^training subset 3-shot \(seed 0\): 11 images, sha256 [0-9a-f]{16}; images per class: "
                     r"class_0=3, class_1=3, class_2=3, class_3=2$", done["one"].stdout, re.M), done["one"].stdout
    warnings = [line for line in done["one"].stderr.splitlines() if line.startswith("warning:")]
    assert warnings == ["warning: 1 class(es) have fewer than 3 training images, all of theirs are used: "
                        "class_3 (2)"]
    info = json.loads((root / "one" / "run.json").read_text())
    assert info["train_subset"]["per_class"] == per_class and info["train_subset"]["images"] == 11


def test_the_subset_is_the_same_whatever_the_heads_lrs_seed_and_processes(shot_runs):
    _, root, _ = shot_runs
    assert subset_listing(root / "ddp") == subset_listing(root / "one")
    assert subset_listing(root / "seed1") != subset_listing(root / "one")
    identities = [json.loads((root / name / "run.json").read_text())["identity"]["train_subset"]
                  for name in ("one", "ddp", "seed1")]
    assert identities[0] == identities[1] != identities[2]
    assert identities[0].startswith("3-shot (seed 0): 11 images, sha256 ")


def test_knn_uses_the_training_subset(shot_runs):
    _, root, done = shot_runs
    assert len(subset_listing(root / "seed1")) == 11
    rows = json.loads((root / "seed1" / "results.json").read_text())
    assert {r["probe"] for r in rows} == {"knn_cls_k2_T0.07", "knn_mean_k2_T0.07"}


def test_collect_results_tables_the_real_runs(shot_runs, tmp_path):
    import shutil

    _, root, _ = shot_runs
    unfinished = Path(shutil.copytree(root / "one", tmp_path / "unfinished", ignore=shutil.ignore_patterns(".lock")))
    (unfinished / "results.json").unlink()
    folders = [root / "one", root / "ddp", root / "seed1", unfinished]
    done = subprocess.run([sys.executable, "collect_results.py", *map(str, folders)], cwd=ROOT, env=env(),
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr

    def best(folder, head):
        return max(r["best_acc1"] for r in json.loads((folder / "results.json").read_text()) if r["head"] == head)

    # the 1- and 2-process runs share a row (same encoder, data and subset; different heads)
    assert done.stdout.splitlines()[:4] == [
        "| encoder | dataset | train subset | cls | pos | abmilp | knn-cls | knn-mean | runs |",
        "|---|---|---|---|---|---|---|---|---|",
        f"| random vit_tiny_patch16 | data | 3-shot (seed 0) | {best(root / 'one', 'cls'):.2f} | "
        f"{best(root / 'ddp', 'pos'):.2f} | {best(root / 'ddp', 'abmilp'):.2f} | - | - | "
        f"{root / 'one'}, {root / 'ddp'} |",
        f"| random vit_tiny_patch16 | data | 3-shot (seed 1) | - | - | - | {best(root / 'seed1', 'knn-cls'):.2f} | "
        f"{best(root / 'seed1', 'knn-mean'):.2f} | {root / 'seed1'} |"]
    assert done.stdout.splitlines()[-1] == f"- {unfinished}: unfinished (1 of 1 epochs logged, no results.json)"


# ------------------------------------------------------------------ --decoder fast and the --no_augment cache

def test_cached_no_augment_run_trains_the_heads_of_an_uncached_one(tmp_path):
    # JPEGs through --decoder fast, 2 workers; the second run keeps the training and validation tokens after one
    # encoder pass (--cache_train_features, --cache_eval_features) and must end with the same heads and scores.
    from helpers import make_image
    for split, count in (("train", 10), ("val", 4)):
        for c in range(2):
            (tmp_path / "data" / split / f"c{c}").mkdir(parents=True)
            for j in range(count):
                make_image(48, 100 * c + j + (0 if split == "train" else 50), c).save(
                    tmp_path / "data" / split / f"c{c}" / f"{j}.jpg", quality=90)
    common = ["--data_path", tmp_path / "data", "--model", "vit_tiny_patch16", "--input_size", "32", "--device", "cpu",
              "--num_workers", "2", "--cls_features", "cls,pos", "--blr", "1", "--batch_size", "8", "--epochs", "3",
              "--warmup_epochs", "1", "--decoder", "fast", "--no_augment", "--knn", "--knn_k", "3"]
    run(*common, "--output_dir", tmp_path / "plain")
    done = run(*common, "--output_dir", tmp_path / "cached", "--cache_train_features", "1",
               "--cache_eval_features", "1")
    assert "train cache: 20 training images per process x (5 token(s) x 192 channels)" in done.stdout
    plain, cached = last_probes(tmp_path / "plain"), last_probes(tmp_path / "cached")
    assert plain.keys() == cached.keys() and all(torch.equal(plain[k], cached[k]) for k in plain)
    # k-NN read its features from the caches there: the same rows
    knn = lambda folder: [r for r in json.loads((folder / "results.json").read_text())  # noqa: E731
                          if r["head"].startswith("knn")]
    assert knn(tmp_path / "plain") == knn(tmp_path / "cached") and knn(tmp_path / "plain")
    drop_speed = lambda line: {k: v for k, v in line.items() if k != "img/s"}  # noqa: E731
    assert ([drop_speed(line) for line in log_lines(tmp_path / "plain")]
            == [drop_speed(line) for line in log_lines(tmp_path / "cached")])


# ------------------------------------------------------------------------------------------------ dashboards

def test_dashboards_tell_one_run_per_step_across_a_kill_and_two_resumes(tmp_path):
    """A run killed (-9) mid-run, resumed by the same command, then continued by an explicit --resume with one
    more epoch: one wandb run (the same id in each process's offline files), every iteration once and in order in
    wandb and TensorBoard, per-iteration loss and lr of each probe, the summary, the results table and the config,
    read back with wandb's records and TensorBoard's EventAccumulator."""
    import os
    import signal
    import time

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from helpers import read_wandb_offline, wandb_history, wandb_record

    out = tmp_path / "run"
    args = [*DIGITS, "--cls_features", "cls,abmilp", "--blr", "20,50", "--train_per_class", "8", "--batch_size", "8",
            "--warmup_epochs", "1", "--knn", "--knn_k", "5", "--wandb", "--wandb_tags", "t1,t2",
            "--log_images_every", "2", "--output_dir", out]
    dash_env = cli_env(OMP_NUM_THREADS=1, WANDB_MODE="offline", WANDB_SILENT="true", WANDB_DIR=tmp_path)
    iters = 10  # 80 images, batch 8
    killed = subprocess.Popen([sys.executable, "main_linprobe.py", *map(str, args), "--epochs", "3"], cwd=ROOT,
                              env=dash_env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while time.time() < deadline and killed.poll() is None and not (
            (out / "log.txt").exists() and len((out / "log.txt").read_text().splitlines()) >= 1):
        time.sleep(0.05)
    time.sleep(0.5)  # into epoch 1
    os.kill(killed.pid, signal.SIGKILL)
    killed.wait()
    assert (out / "checkpoint-last.pth").exists() and killed.returncode == -signal.SIGKILL
    for extra in (["--epochs", "3"], ["--epochs", "4", "--resume", out / "checkpoint-last.pth"]):
        done = subprocess.run([sys.executable, "main_linprobe.py", *map(str, args), *extra], cwd=ROOT, env=dash_env,
                              capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
        assert "resumed 4 probe(s)" in done.stdout and "warning" not in done.stderr

    records = read_wandb_offline(out)
    runs = [r.run for r in wandb_record(records, "run")]
    # the killed process's wandb service dies with it, before writing its offline file (wandb's own buffering)
    assert len(list(out.glob("wandb/offline-run-*"))) == 3 and len(runs) >= 2
    assert {r.run_id for r in runs} == {json.loads((out / "dashboard.json").read_text())["wandb_id"]}
    assert {(r.job_type, r.run_group, tuple(r.tags)) for r in runs} == {("linprobe", "run", ("t1", "t2"))}
    history = wandb_history(records)
    steps = [step for step, _ in history]
    assert steps == sorted(set(steps)), steps  # rising, none twice
    rows = dict(history)
    assert set(range(iters, 4 * iters)) <= set(steps)  # epochs 1..3 (epoch 0 unless the kill cut its sending)
    for step in range(iters, 4 * iters):
        assert rows[step]["epoch"] == pytest.approx(step / iters)
        assert {"train/loss/cls_blr20", "train/lr/abmilp_blr50"} <= set(rows[step])
    assert rows[4 * iters - 1]["epoch_index"] == 3 and "test_acc1/abmilp_blr50" in rows[4 * iters - 1]
    # attention pictures every 2 epochs and after each run's last: epochs 1, 2 (the end of --epochs 3) and 3
    assert [step for step in steps if "attention/probes/_type" in rows[step]] == [2 * iters - 1, 3 * iters - 1,
                                                                                    4 * iters - 1]
    config = {item.key: json.loads(item.value_json) for item in runs[-1].config.update}
    assert config["probes"][0]["name"] == "cls_blr20" and config["run.identity.nb_classes"] == 10
    assert config["run.train_images"] == 80 and config["run.val_images"] == 360 and config["schedule.epochs"] == 4
    assert isinstance(config["run.identity.classes"], list) and config["dashboard.tags"] == ["t1", "t2"]
    summary = {item.key: json.loads(item.value_json) for s in wandb_record(records, "summary")
               for item in s.summary.update if item.key}
    results = json.loads((out / "results.json").read_text())
    assert summary["best_acc1/abmilp_blr50"] == pytest.approx(results[3]["best_acc1"], abs=1e-3)
    assert summary["best_epoch/abmilp_blr50"] == results[3]["best_epoch"] and "knn_acc1/knn_cls_k5_T0.07" in summary

    events = EventAccumulator(str(out / "tensorboard"), size_guidance={"scalars": 0, "tensors": 0, "images": 0})
    events.Reload()
    tb_steps = [e.step for e in events.Scalars("train/loss/abmilp_blr20")]
    assert tb_steps == [int((it / iters + epoch) * 1000) for epoch in range(4) for it in range(iters)]
    assert [e.step for e in events.Scalars("test_acc1/cls_blr50")] == [0, 1000, 2000, 3000]
    pictures = events.Images("attention/probes")
    assert [p.step for p in pictures] == [1000, 2000, 3000]
    # rows: the images, then abmilp_blr20 and abmilp_blr50 ([cls] has no weights); 4 images of 32 px, x4
    assert pictures[0].height > 3 * 4 * 32 and pictures[0].width > 4 * 4 * 32
    text = events.Tensors("results/text_summary")[-1].tensor_proto.string_val[0].decode()
    assert "| knn_cls_k5_T0.07 | knn-cls |" in text


def test_a_knn_only_run_has_job_type_knn_and_its_rows_in_the_summary_and_table(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from helpers import read_wandb_offline, wandb_record

    out = tmp_path / "knn"
    done = subprocess.run([sys.executable, "main_linprobe.py", *map(str, DIGITS), "--epochs", "0", "--knn",
                           "--knn_k", "5,10", "--train_per_class", "8", "--wandb", "--output_dir", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env=cli_env(OMP_NUM_THREADS=1, WANDB_MODE="offline", WANDB_SILENT="true",
                                      WANDB_DIR=tmp_path))
    assert done.returncode == 0, done.stderr[-3000:]
    records = read_wandb_offline(out)
    assert [r.run.job_type for r in wandb_record(records, "run")] == ["knn"]
    summary = {item.key: json.loads(item.value_json) for s in wandb_record(records, "summary")
               for item in s.summary.update if item.key}
    rows = json.loads((out / "results.json").read_text())
    assert len(rows) == 4 and {f"knn_acc1/{r['probe']}": r["best_acc1"] for r in rows}.items() <= summary.items()
    events = EventAccumulator(str(out / "tensorboard"), size_guidance={"tensors": 0})
    events.Reload()
    text = events.Tensors("results/text_summary")[0].tensor_proto.string_val[0].decode()
    assert all(f"| {r['probe']} | {r['head']} |" in text for r in rows)
