"""Interrupted runs lose at most one epoch, a checkpoint is never torn, 2-process DDP equals one process with
twice the batch, and a non-finite loss stops the run with its epoch and iteration named."""
import json
import re
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch

import engine_linprobe as engine
from heads import HeadOptions, TokenBatch, build_probe
from helpers import (
    DIGITS,
    ROOT,
    TINY,
    assert_user_error,
    cli_env,
    free_port,
    make_image_folder,
    run_cli,
    write_mae_checkpoint,
)
from util.checkpoint import load_checkpoint
from util.lr_sched import WarmupCosine

# One thread everywhere: fp32 CPU sums are only bit-reproducible run to run with the same thread split.
ONE_THREAD = dict(OMP_NUM_THREADS=1, MKL_NUM_THREADS=1)
NO_SCALING = torch.amp.GradScaler("cpu", enabled=False)


def probes_of(path):
    return torch.load(path, map_location="cpu", weights_only=False)["probes"]


def max_abs_diff(a, b):
    assert a.keys() == b.keys()
    return max((a[k].double() - b[k].double()).abs().max().item() for k in a if a[k].is_floating_point())


def logged_epochs(out):
    path = out / "log.txt"
    return [json.loads(line)["epoch"] for line in path.read_text().splitlines()] if path.exists() else []


# ------------------------------------------------------------------------------------------ kill -9, resume

def test_kill_during_an_epoch_then_same_command_resumes_to_the_same_heads(tmp_path):
    env = cli_env(**ONE_THREAD)
    command = lambda out: [sys.executable, str(ROOT / "main_linprobe.py"), *DIGITS, "--epochs", "3",
                           "--cls_features", "cls,abmilp", "--output_dir", str(out)]
    reference_log = open(tmp_path / "uninterrupted.stderr", "w")
    reference = subprocess.Popen(command(tmp_path / "uninterrupted"), cwd=ROOT, env=env,
                                 stdout=subprocess.DEVNULL, stderr=reference_log)
    out = tmp_path / "interrupted"
    victim = subprocess.Popen(command(out), cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while logged_epochs(out) != [0]:
        assert victim.poll() is None and time.time() < deadline, "the run ended before logging epoch 0"
        time.sleep(0.05)
    time.sleep(0.5)  # inside epoch 1: its 22 batches take seconds even on a fast machine
    assert victim.poll() is None
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    assert torch.load(out / "checkpoint-last.pth", weights_only=False)["epoch"] == 0, "not killed mid epoch 1"

    resumed = subprocess.run(command(out), cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "(epoch 0)" in resumed.stdout and "resumed 2 probe(s)" in resumed.stdout, resumed.stdout[-2000:]
    assert logged_epochs(out) == [0, 1, 2]  # nothing lost, nothing done twice
    assert reference.wait(timeout=300) == 0, (tmp_path / "uninterrupted.stderr").read_text()[-3000:]
    reference_log.close()

    got, want = probes_of(out / "checkpoint-last.pth"), probes_of(tmp_path / "uninterrupted" / "checkpoint-last.pth")
    diff = max_abs_diff(got, want)
    print(f"resumed vs uninterrupted heads: max abs diff {diff:.3g}")
    assert all(torch.equal(got[k], want[k]) for k in want), f"heads differ (max abs diff {diff:.3g})"
    assert not list(out.glob("*.tmp"))


# ------------------------------------------------------------------------------ kill during a checkpoint write

WRITER = textwrap.dedent("""
    import sys, torch
    from util.checkpoint import save_atomic
    big = torch.empty(16 * 2**20)  # 64 MiB: most of the loop's time is spent writing it
    for version in range(1, 10**6):
        big.fill_(version)
        save_atomic({"version": version, "big": big}, sys.argv[1])
        print(version, flush=True)
""")


def test_kill_during_checkpoint_write_keeps_a_whole_checkpoint(tmp_path):
    path = tmp_path / "checkpoint-last.pth"
    for attempt in range(5):
        writer = subprocess.Popen([sys.executable, "-c", WRITER, str(path)], cwd=ROOT, env=cli_env(),
                                  stdout=subprocess.PIPE, text=True)
        writer.stdout.readline()  # one whole checkpoint exists
        time.sleep(0.05 + 0.07 * attempt)
        writer.send_signal(signal.SIGKILL)
        writer.wait()
        tmps = list(tmp_path.glob(f".{path.name}.*.tmp"))  # the writer's own temporary file (one per process)
        if tmps:  # the kill came while the next version was being written
            break
    assert tmps, "never killed during a write"
    tmp = tmps[0]
    checkpoint = torch.load(path, weights_only=True)
    assert checkpoint["version"] >= 1
    assert torch.equal(checkpoint["big"], torch.full((16 * 2**20,), float(checkpoint["version"])))
    if tmp.stat().st_size < path.stat().st_size:  # what a plain torch.save would have left behind
        with pytest.raises(ValueError, match="is not a (readable )?torch"):  # our reader names it as torn
            load_checkpoint(tmp)


# ---------------------------------------------------------------------------------------------- DDP parity

PARITY_TOL = 1e-5  # fp32 (measured ~3e-7): gloo's all-reduce sums in another order than one process does
RELATIVE_TOL = 1e-4  # relative L2 of each head's classifier, for features of mean 1000 and spread 0.1


def relative_l2(a, b, suffix):
    return max((a[k].double() - b[k].double()).norm().item() / b[k].double().norm().item() for k in a
               if k.endswith(suffix))


def cls_of_mean_1000(path):
    """A random MAE-format encoder whose [cls] token is 1000 in every channel: its pre-norm [cls] output has a
    mean near 1000 and a tiny spread across images, as MAE's real [cls] (it attends mostly to itself)."""
    write_mae_checkpoint(path, seed=0)
    checkpoint = torch.load(path, weights_only=False)
    checkpoint["model"]["cls_token"].fill_(1000.0)
    torch.save(checkpoint, path)
    return path


@pytest.mark.parametrize("features", ["random", "mean_1000"])
def test_two_process_ddp_matches_one_process_with_twice_the_batch(tmp_path, features):
    # --no_augment: both runs see the same pixels; BatchNorm statistics must span both ranks' halves of a batch.
    # "random": no --finetune, so a random-initialised encoder must also be the same network on every rank.
    data = make_image_folder(tmp_path / "data", classes=2, per_class=24, val_per_class=2)
    encoder = [] if features == "random" else ["--finetune", cls_of_mean_1000(tmp_path / "mae.pth")]
    heads = "cls,pos,abmilp,aim,dolg" if features == "random" else "cls"  # aim, dolg: BatchNorms inside
    common = [*TINY, "--data_path", str(data), "--epochs", "2", "--no_augment", "--cls_features", heads,
              "--head_init", "mae", *encoder]
    env = cli_env(**ONE_THREAD)
    single = run_cli([*common, "--batch_size", "16", "--output_dir", tmp_path / "single"], env=env)
    assert single.returncode == 0, single.stderr[-3000:]
    ddp = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                          "--master_port", str(free_port()), "main_linprobe.py", *common, "--batch_size", "8",
                          "--output_dir", str(tmp_path / "ddp")], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=300)
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    assert "effective batch size 16" in ddp.stdout and "effective batch size 16" in single.stdout
    a, b = probes_of(tmp_path / "single" / "checkpoint-last.pth"), probes_of(tmp_path / "ddp" / "checkpoint-last.pth")
    if features == "mean_1000":
        relative = relative_l2(b, a, "classifier.weight")
        print(f"DDP vs single process on [cls] of mean 1000: classifier relative L2 {relative:.3g}")
        assert relative < RELATIVE_TOL
        return
    diff = max_abs_diff(a, b)
    print(f"DDP vs single process: max abs diff {diff:.3g} over {len(a)} tensors")
    assert diff < PARITY_TOL
    # Far below what training moved the heads: the classifier biases start at exactly 0 (MAE's init).
    moved = max(a[k].abs().max().item() for k in a if k.endswith("classifier.bias"))
    assert moved > 100 * PARITY_TOL


# ------------------------------------------------------------------------------------------ non-finite loss

def test_train_one_epoch_names_epoch_and_iteration_of_a_nan_loss():
    torch.manual_seed(0)
    probe = build_probe("pos", 8, 3, (2, 2), 1, HeadOptions())
    probes = engine.ProbeSet({"pos": probe})
    optimizer = torch.optim.SGD([{"params": list(probe.parameters()), "probe": "pos", "peak_lr": 0.1}], lr=0.1)
    calls = []

    def tokens_fn(images):  # the third batch's tokens hold a NaN, as an overflowing encoder would give
        calls.append(1)
        tokens = torch.randn(images.shape[0], 5, 8)
        if len(calls) == 3:
            tokens[1, 2, 3] = float("nan")
        return TokenBatch(tokens=tokens, num_prefix=1, grid=(2, 2), attn=None, oracle_attn=None)

    loader = [(torch.zeros(4, 3, 32, 32), torch.tensor([0, 1, 2, 0])) for _ in range(5)]
    steps = []
    step = optimizer.step
    optimizer.step = lambda *a, **k: (steps.append(1), step(*a, **k))[1]
    with pytest.raises(engine.NonFiniteLoss, match=r"probe pos at epoch 7 iteration 2"):
        engine.train_one_epoch(tokens_fn, probes, loader, optimizer, NO_SCALING, 7, schedule=WarmupCosine(9, 0),
                               device="cpu")
    # The check runs one step late, once the next forward is queued (so a GPU never waits for it): the 4th
    # forward ran, but no optimizer step after the poisoned one.
    assert len(calls) == 4
    assert len(steps) == 3


POISONED_RUN = textwrap.dedent("""
    # main_linprobe.py as its CLI runs, except that one token of epoch 1's second batch is NaN: an encoder that
    # overflowed (fp16, a broken checkpoint) on one image. Only the tokens are changed, never the engine.
    import runpy, sys
    import engine_linprobe as engine

    real_train_one_epoch = engine.train_one_epoch

    def train_one_epoch(tokens_fn, probes, loader, optimizer, scaler, epoch, **settings):
        calls = []

        def poisoned(images):
            batch = tokens_fn(images)
            calls.append(1)
            if epoch == 1 and len(calls) == 2:
                batch.tokens[0, 0, 0] = float("nan")
            return batch
        return real_train_one_epoch(poisoned, probes, loader, optimizer, scaler, epoch, **settings)

    engine.train_one_epoch = train_one_epoch
    sys.argv = ["main_linprobe.py", *sys.argv[1:]]
    runpy.run_path("main_linprobe.py", run_name="__main__")
""")


def test_non_finite_loss_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path):
    data = make_image_folder(tmp_path / "data", per_class=8)  # 16 images in batches of 4: 4 iterations an epoch
    out = tmp_path / "out"
    done = subprocess.run([sys.executable, "-c", POISONED_RUN, *TINY, "--data_path", str(data), "--epochs", "3",
                           "--output_dir", str(out)], cwd=ROOT, env=cli_env(), capture_output=True, text=True,
                          timeout=300)
    assert_user_error(done, "non-finite loss", "cls", "epoch 1 iteration 1", progress_allowed=True)
    checkpoint = torch.load(out / "checkpoint-last.pth", weights_only=False)
    assert checkpoint["epoch"] == 0  # the last good one, not overwritten by the NaN epoch
    assert all(v.isfinite().all() for v in checkpoint["probes"].values() if v.is_floating_point())
    assert logged_epochs(out) == [0]
    assert not list(out.glob("*.tmp"))


# ----------------------------------------------------------------------------- processes, disks, Ctrl-C, torchrun

def test_a_second_run_on_a_locked_output_dir_is_refused_naming_the_holder(tmp_path):
    out = tmp_path / "out"
    slow = subprocess.Popen([sys.executable, str(ROOT / "main_linprobe.py"), *DIGITS, "--epochs", "50",
                             "--output_dir", str(out)], cwd=ROOT, env=cli_env(**ONE_THREAD),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        while not (out / ".lock").exists():
            assert slow.poll() is None and time.time() < deadline
            time.sleep(0.05)
        second = run_cli([*DIGITS, "--epochs", "1", "--output_dir", out], env=cli_env(**ONE_THREAD))
        assert_user_error(second, f"in use by another run (PID {slow.pid})", "another --output_dir")
    finally:
        slow.kill()
        slow.wait()


FULL_DISK = textwrap.dedent("""
    # main_linprobe.py as its CLI runs, except that the disk is full once the first checkpoint is written.
    import errno, runpy, sys
    import util.checkpoint as checkpoint

    def full(obj, f, *args, **kwargs):
        f.write(b"PK half a checkpoint")
        raise OSError(errno.ENOSPC, "No space left on device")

    checkpoint.torch.save = full
    sys.argv = ["main_linprobe.py", *sys.argv[1:]]
    runpy.run_path("main_linprobe.py", run_name="__main__")
""")


def test_a_full_disk_is_one_line_naming_the_file_and_the_free_space(tmp_path):
    data = make_image_folder(tmp_path / "data")
    out = tmp_path / "out"
    done = subprocess.run([sys.executable, "-c", FULL_DISK, *TINY, "--data_path", str(data), "--output_dir",
                           str(out)], cwd=ROOT, env=cli_env(), capture_output=True, text=True, timeout=300)
    assert_user_error(done, f"no space left on the device to write {out}", "MiB free", "free some disk space",
                      progress_allowed=True)
    assert not list(out.glob("*.tmp")) and not list(out.glob(".*.tmp"))


def test_ctrl_c_is_one_line_and_the_same_command_resumes(tmp_path):
    out = tmp_path / "out"
    command = [sys.executable, str(ROOT / "main_linprobe.py"), *DIGITS, "--epochs", "3", "--output_dir", str(out)]
    # SIGINT back to its default in the child: a test session started in the background (`make test &`) ignores
    # it, and Python then never raises KeyboardInterrupt.
    run = subprocess.Popen(command, cwd=ROOT, env=cli_env(**ONE_THREAD), stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True,
                           preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.time() + 240
    while logged_epochs(out) != [0]:
        assert run.poll() is None and time.time() < deadline, "the run ended before logging epoch 0"
        time.sleep(0.05)
    time.sleep(0.3)
    run.send_signal(signal.SIGINT)
    _, stderr = run.communicate(timeout=120)
    assert run.returncode == 130, stderr[-2000:]
    assert "Traceback" not in stderr
    last = [line for line in stderr.split("\n") if line.strip()][-1]
    assert last.startswith("interrupted: ") and "holds epoch 0" in last and "rerun the same command" in last, last
    resumed = subprocess.run(command, cwd=ROOT, env=cli_env(**ONE_THREAD), capture_output=True, text=True,
                             timeout=300)
    assert resumed.returncode == 0 and "(epoch 0)" in resumed.stdout, resumed.stderr[-2000:]
    assert logged_epochs(out) == [0, 1, 2]


def torchrun(args, env, timeout=300):
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                           str(free_port()), "main_linprobe.py", *map(str, args)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


def test_under_torchrun_an_error_is_printed_once_and_named_as_the_root_cause(tmp_path):
    done = torchrun([*DIGITS, "--blr", "nan", "--output_dir", tmp_path / "out"], cli_env(**ONE_THREAD))
    assert done.returncode != 0
    ours = [line for line in done.stderr.splitlines() if line.startswith("error: ")]
    assert ours == ["error: --blr nan is not a finite number (pass a real number)"], done.stderr[-3000:]
    # torchrun's own failure summary cannot be silenced from a worker; it names our line as the root cause
    assert "--blr nan is not a finite number" in done.stderr.split(ours[0], 1)[1], done.stderr[-3000:]


def test_ddp_evaluates_and_caches_each_shard_and_counts_every_validation_image_once(tmp_path):
    # 27 validation images over 2 processes, without --dist_eval: each process evaluates (and caches) its own 14
    # or 13; DistributedSampler would pad one duplicate into the count. Epoch 1 is evaluated from the cache.
    data = make_image_folder(tmp_path / "data", classes=3, per_class=4, val_per_class=9)
    out = tmp_path / "ddp"
    common = [*TINY, "--data_path", data, "--cls_features", "cls,pos", "--batch_size", "4"]
    done = torchrun([*common, "--epochs", "2", "--cache_eval_features", "1", "--output_dir", out],
                    cli_env(**ONE_THREAD))
    assert done.returncode == 0, done.stderr[-3000:]
    assert "eval cache: 14 validation images per process x (5 token(s) x 192 channels)" in done.stdout, done.stdout
    logged = json.loads((out / "log.txt").read_text().splitlines()[1])["probes"]
    single = run_cli([*common, "--eval", "--resume", out / "checkpoint-last.pth", "--output_dir", tmp_path / "e"],
                     env=cli_env(**ONE_THREAD))
    assert single.returncode == 0, single.stderr[-2000:]
    for name in ("cls_blr50", "pos_blr50"):
        printed = float(single.stdout.split(f"{name}: acc1 ")[1].split()[0])
        hits = logged[name]["test_acc1"] * 27 / 100  # a whole number of the 27 images, none counted twice
        assert abs(logged[name]["test_acc1"] - printed) < 0.005 and abs(hits - round(hits)) < 1e-6, (name, printed)


# --------------------------------------------------------------- one process fails, the others stop quietly

def torchrun_script(script, args, env, timeout=300):
    """`script` (a file) under torchrun with 2 processes; their own lines carry torchrun's [defaultN]: prefix."""
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--tee", "3",
                           "--master_port", str(free_port()), str(script), *map(str, args)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


def worker_lines(text):
    """What the worker processes printed (torchrun's prefix removed); torchrun's own summary is left out."""
    return [line.split(":", 1)[1] for line in text.splitlines() if re.match(r"\[default\d+\]:", line)]


def assert_one_error_from_the_workers(done, *fragments):
    lines = worker_lines(done.stderr) + worker_lines(done.stdout)
    report = "\n".join(lines[-60:])
    assert done.returncode != 0, report
    assert not any("Traceback" in line for line in lines), report
    errors = [line for line in lines if line.startswith("error: ")]
    assert len(errors) == 1, report
    assert all(fragment in errors[0] for fragment in fragments), report
    return errors[0]


RANK_0_DISK_FULL = textwrap.dedent("""
    # main_linprobe.py under torchrun, except that the disk is full: the main process's first checkpoint fails.
    import errno, os, runpy, sys
    sys.path.insert(0, os.getcwd())
    import util.checkpoint as checkpoint

    def full(obj, f, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    checkpoint.torch.save = full
    sys.argv = ["main_linprobe.py", *sys.argv[1:]]
    runpy.run_path("main_linprobe.py", run_name="__main__")
""")


def test_a_failed_save_on_rank_0_stops_every_process_with_one_line(tmp_path):
    # Only rank 0 saves; rank 1 used to go on into the next epoch's collective and die there with gloo's traceback.
    data = make_image_folder(tmp_path / "data", per_class=8)
    script = tmp_path / "disk_full.py"
    script.write_text(RANK_0_DISK_FULL)
    out = tmp_path / "out"
    start = time.time()
    done = torchrun_script(script, [*TINY, "--data_path", data, "--epochs", "3", "--output_dir", out],
                           cli_env(**ONE_THREAD))
    assert_one_error_from_the_workers(done, f"no space left on the device to write {out}", "free some disk space")
    assert time.time() - start < 240
    assert logged_epochs(out) == [0] and not (out / "checkpoint-last.pth").exists()


def test_an_unreadable_image_in_one_shard_is_one_line_and_the_other_process_stops_quietly(tmp_path):
    data = make_image_folder(tmp_path / "data", per_class=8)
    bad = data / "train" / "class_1" / "img_5.png"
    bad.write_bytes(b"")  # zero bytes: in one of the two processes' shards
    done = torchrun_script(ROOT / "main_linprobe.py", [*TINY, "--data_path", data, "--batch_size", "2",
                                                       "--output_dir", tmp_path / "out"], cli_env(**ONE_THREAD))
    line = assert_one_error_from_the_workers(done, str(bad), "--skip_bad_images")
    assert re.match(r"error: rank [01]: ", line), line


def test_a_refused_download_on_rank_0_stops_every_process_with_one_line(tmp_path):
    # The main process downloads first while the others wait; Stanford Cars cannot be downloaded at all.
    done = torchrun_script(ROOT / "main_linprobe.py", [*TINY, "--data_path", f"cars:{tmp_path}", "--download",
                                                       "--output_dir", tmp_path / "out"], cli_env(**ONE_THREAD))
    line = assert_one_error_from_the_workers(done, str(tmp_path / "stanford_cars"), "by hand")
    assert not line.startswith("error: rank")


COUNTING_IMAGES = textwrap.dedent("""
    # main_linprobe.py, counting the images this process passes through the frozen encoder (into COUNT.<rank>).
    import os, runpy, sys
    sys.path.insert(0, os.getcwd())
    import engine_linprobe as engine

    count, seen, real = sys.argv.pop(1), [], engine.FrozenTokens.__call__
    engine.FrozenTokens.__call__ = lambda self, images: seen.append(len(images)) or real(self, images)
    sys.argv = ["main_linprobe.py", *sys.argv[1:]]
    runpy.run_path("main_linprobe.py", run_name="__main__")
    with open(f"{count}.{os.environ.get('RANK', 0)}", "w") as f:
        f.write(str(sum(seen)))
""")


def test_knn_under_ddp_encodes_each_shard_once_and_equals_one_process(tmp_path):
    # 21 training and 15 validation images: each process encodes its own shards (11 + 8 and 10 + 7 images), and
    # the gathered k-NN gives exactly the rows of one process that encodes all 36.
    data = make_image_folder(tmp_path / "data", classes=3, per_class=7, val_per_class=5)
    script = tmp_path / "counting.py"
    script.write_text(COUNTING_IMAGES)
    common = [*TINY, "--data_path", data, "--epochs", "0", "--knn", "--knn_k", "1,3,5,100", "--knn_temperature",
              "0.07,1"]
    env = cli_env(**ONE_THREAD)
    single = subprocess.run([sys.executable, str(script), tmp_path / "single", *common, "--output_dir",
                             tmp_path / "one"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert single.returncode == 0, single.stderr[-3000:]
    done = torchrun_script(script, [tmp_path / "ddp", *common, "--output_dir", tmp_path / "two"], env)
    assert done.returncode == 0, done.stderr[-3000:]
    assert (tmp_path / "single.0").read_text() == "36"
    assert [(tmp_path / f"ddp.{rank}").read_text() for rank in (0, 1)] == ["19", "17"]
    one, two = (json.loads((tmp_path / name / "results.json").read_text()) for name in ("one", "two"))
    assert len(one) == 2 * 4 * 2 and one == two


def test_a_gpu_index_under_a_launcher_is_one_line_before_any_rendezvous(tmp_path):
    # Every process would take cuda:0 ("Duplicate GPU detected" in NCCL). Refused while the flags are read, before
    # the process waits for its peers (none are started here), on this CPU machine too.
    env = cli_env(RANK=0, WORLD_SIZE=2, LOCAL_RANK=0, LOCAL_WORLD_SIZE=2, MASTER_ADDR="127.0.0.1",
                  MASTER_PORT=free_port(), BEYOND_CLS_RENDEZVOUS_TIMEOUT=5)
    done = run_cli([*DIGITS, "--device", "cuda:0", "--output_dir", tmp_path / "out"], env=env, timeout=120)
    assert_user_error(done, "--device cuda:0 names one GPU for all 2 processes", "pass --device cuda")
    assert not (tmp_path / "out").exists()


def test_ddp_train_cache_trains_the_heads_of_an_uncached_ddp_run(tmp_path):
    # --no_augment under 2 processes: each encodes its shard of the 15 training images once, the shards are
    # gathered, and every epoch's DistributedSampler batches come from the cache: the same heads as without it.
    data = make_image_folder(tmp_path / "data", classes=3, per_class=5, val_per_class=2)
    common = [*TINY, "--data_path", data, "--cls_features", "cls,pos", "--batch_size", "4", "--epochs", "2",
              "--no_augment"]
    plain = torchrun([*common, "--output_dir", tmp_path / "plain"], cli_env(**ONE_THREAD))
    assert plain.returncode == 0, plain.stderr[-3000:]
    cached = torchrun([*common, "--output_dir", tmp_path / "cached", "--cache_train_features", "1"],
                      cli_env(**ONE_THREAD))
    assert cached.returncode == 0, cached.stderr[-3000:]
    assert "train cache: 15 training images per process" in cached.stdout, cached.stdout
    heads = [load_checkpoint(tmp_path / run / "checkpoint-last.pth")["probes"] for run in ("plain", "cached")]
    assert heads[0].keys() == heads[1].keys() and all(torch.equal(heads[0][k], heads[1][k]) for k in heads[0])
