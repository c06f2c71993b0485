"""Every user mistake of issue 7 ends in one line `error: <problem> (<what to do>)`, exit code 2, no traceback,
and an existing --output_dir exactly as it was. Each case runs the real script in a fresh process.

Starting a script costs seconds of imports, so every case is launched at once in a small pool when the module
starts (`runs`); each test then checks its own outcome.
"""
import shutil
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch

from helpers import (
    MALICE,
    TINY,
    assert_user_error,
    cli_env,
    free_port,
    make_image_folder,
    output_dir_with_sentinel,
    run_cli,
    snapshot,
    write_mae_checkpoint,
    write_malicious_checkpoint,
)
from models_vit import build_encoder

STATS = ["--device", "cpu", "--num_workers", "0", "--model", "vit_tiny_patch16"]  # main_attention_stats.py


@dataclass
class Case:
    """One CLI run: its arguments and what the single error line must contain."""
    args: list
    fragments: list = field(default_factory=list)
    script: str = "main_linprobe.py"
    env: dict = None
    progress_allowed: bool = False  # the error comes mid-epoch, after the progress bar started
    allowed_lines: list = field(default_factory=list)  # other stderr lines the run may print before the error
    sentinel: bool = True  # give the run an existing --output_dir holding a user's file


CASES = {}  # name -> builder(tmp: Path, shared: Shared) -> Case


def case(builder):
    CASES[builder.__name__] = builder
    return builder


@dataclass
class Shared:
    data: Path  # 2 classes x 4 images of 32 px
    mae_checkpoint: Path
    previous_run: callable  # -> Path of a finished 1-epoch run (waits for it)


def copy_data(tmp, shared):
    return Path(shutil.copytree(shared.data, tmp / "data"))


# ------------------------------------------------------------------------------------------------ data

@case
def data_path_missing(tmp, shared):
    return Case(["--data_path", tmp / "no_such_data"], [str(tmp / "no_such_data"), "does not exist"])


@case
def train_folder_missing(tmp, shared):
    root = copy_data(tmp, shared)
    shutil.rmtree(root / "train")
    return Case(["--data_path", root], ["no train/ folder"])


@case
def val_folder_missing(tmp, shared):
    root = copy_data(tmp, shared)
    shutil.rmtree(root / "val")
    return Case(["--data_path", root], ["no val/ folder"])


@case
def class_folder_without_images(tmp, shared):
    root = copy_data(tmp, shared)
    (root / "train" / "class_2").mkdir()
    (root / "train" / "class_2" / "readme.txt").write_text("not an image")
    return Case(["--data_path", root], [str(root / "train" / "class_2"), "has no images"])


def corrupt_image(tmp, shared, num_workers):
    root = copy_data(tmp, shared)
    bad = root / "train" / "class_1" / "img_2.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n truncated by a failed copy")
    return Case(["--data_path", root, "--num_workers", num_workers], [f"cannot read image {bad}", "--skip_bad_images"],
                progress_allowed=True)


@case
def corrupt_image_main_process(tmp, shared):
    return corrupt_image(tmp, shared, num_workers=0)


@case
def corrupt_image_in_a_worker(tmp, shared):
    return corrupt_image(tmp, shared, num_workers=1)


@case
def named_dataset_absent_offline(tmp, shared):
    return Case(["--data_path", f"flowers102:{tmp / 'datasets'}"],
                [f"flowers102 not found under {tmp / 'datasets'}", str(tmp / "datasets" / "flowers-102"), "--download"])


@case
def stanford_cars_absent(tmp, shared):
    return Case(["--data_path", f"cars:{tmp}", "--download"], [str(tmp / "stanford_cars"), "by hand"])


@case
def train_list_naming_images_the_data_lacks(tmp, shared):
    listed = tmp / "1percent.txt"
    listed.write_text("class_0/img_0.png\n" + "".join(f"n0144076{i}_10026.JPEG\n" for i in range(7)))
    return Case(["--data_path", shared.data, "--train_list", listed],
                ["7 of the 8 images listed", "n01440760_10026.JPEG", "and 2 more", "--train_list"])


@case
def nb_classes_smaller_than_the_data(tmp, shared):
    return Case(["--data_path", shared.data, "--nb_classes", 1], ["--nb_classes 1", "2 classes"])


# ------------------------------------------------------------------------------------------ checkpoints

@case
def checkpoint_path_missing(tmp, shared):
    missing = tmp / "weights" / "mae_pretrain_vit_tiny.pth"
    return Case(["--data_path", shared.data, "--finetune", missing], [str(missing)])


@case
def file_that_is_not_a_checkpoint(tmp, shared):
    junk = tmp / "notes.pth"
    junk.write_text("I am a text file with a .pth name\n")
    return Case(["--data_path", shared.data, "--finetune", junk], [str(junk), "not a torch"])


@case
def checkpoint_key_absent(tmp, shared):
    checkpoint = write_mae_checkpoint(tmp / "dino.pth", key="teacher")
    # The message lists every key the file holds: teacher and epoch.
    return Case(["--data_path", shared.data, "--finetune", checkpoint, "--checkpoint_key", "student"],
                ["'student'", "teacher", "epoch"])


@case
def checkpoint_of_another_architecture(tmp, shared):
    small = write_mae_checkpoint(tmp / "depth2_dim64.pth", depth=2, embed_dim=64, num_heads=2)
    # Keys the 12-block model has and the 2-block file lacks, and a shape pair: (64 wide) vs vit_tiny's 192.
    return Case(["--data_path", shared.data, "--finetune", small],
                ["does not fit vit_tiny_patch16", "missing: blocks.",
                 "patch_embed.proj.weight (64, 3, 16, 16) vs (192, 3, 16, 16)"])


@case
def recognised_layout_of_another_architecture(tmp, shared):
    # an I-JEPA training checkpoint (no [cls], patch 8, 64 wide, 2 blocks) probed as MAE's vit_tiny_patch16
    torch.manual_seed(0)
    encoder = build_encoder("vit_tiny_patch16", input_size=32, no_cls_token=True, patch_size=8, embed_dim=64,
                            depth=2, num_heads=2, verbose=False).state_dict()
    wrapped = {f"module.{k}": v for k, v in encoder.items()}
    path = tmp / "IN1K-vit.h.14-300e.pth.tar"
    torch.save({"encoder": wrapped, "target_encoder": wrapped, "predictor": {}, "epoch": 1}, path)
    return Case(["--data_path", shared.data, "--finetune", path],
                [f"I-JEPA checkpoint {path}, sub-model 'target_encoder'", "does not fit vit_tiny_patch16",
                 "patch_embed.proj.weight (64, 3, 8, 8) vs (192, 3, 16, 16)", "--model"])


@case
def checkpoint_with_non_finite_weights(tmp, shared):
    state = torch.load(shared.mae_checkpoint, weights_only=True)
    state["model"]["blocks.3.mlp.fc2.weight"][0, 0] = float("nan")
    path = tmp / "diverged.pth"
    torch.save(state, path)
    return Case(["--data_path", shared.data, "--finetune", path],
                ["non-finite weights: blocks.3.mlp.fc2.weight (1 NaN, 0 inf)", "diverged"])


@case
def unknown_timm_name(tmp, shared):
    return Case(["--data_path", shared.data, "--finetune", "vit_no_such_model_224"],
                ["'vit_no_such_model_224'", "unknown timm model"])


@case
def unknown_model_name(tmp, shared):
    return Case(["--data_path", shared.data, "--model", "vit_no_such_model"], ["unknown model 'vit_no_such_model'"])


@case
def known_timm_name_offline(tmp, shared):
    # An empty Hugging Face cache and offline mode: a cluster node without internet.
    env = cli_env(HF_HUB_OFFLINE=1, HF_HOME=tmp / "hf", TORCH_HOME=tmp / "torch")
    return Case(["--data_path", shared.data, "--finetune", "vit_tiny_patch16_224.augreg_in21k"],
                ["'vit_tiny_patch16_224.augreg_in21k' could not be downloaded"], env=env)


# ------------------------------------------------------------------------------------------------ flags

@case
def input_size_not_divisible_by_patch_size(tmp, shared):
    return Case(["--data_path", shared.data, "--input_size", 40], ["--input_size 40", "patch size 16"])


@case
def cls_head_without_cls_token(tmp, shared):
    return Case(["--data_path", shared.data, "--cls_features", "pos,cls", "--no_cls_token"],
                ["--cls_features cls", "--no_cls_token"])


@case
def batch_size_zero(tmp, shared):
    return Case(["--data_path", shared.data, "--batch_size", 0], ["--batch_size"])


@case
def output_dir_that_cannot_be_written(tmp, shared):
    blocker = tmp / "results"  # a regular file where a folder should be: unwritable even for root
    blocker.write_text("a file, not a folder\n")
    return Case(["--data_path", shared.data, "--output_dir", blocker / "run1"], [str(blocker / "run1"),
                "cannot be written"], sentinel=False)


# ------------------------------------------------------------------------------------------------ resume

@case
def resume_of_another_head_configuration(tmp, shared):
    previous = shared.previous_run()
    return Case(["--data_path", shared.data, "--cls_features", "pos", "--resume", previous / "checkpoint-last.pth"],
                [str(previous / "checkpoint-last.pth"), "'cls'", "'pos'"])


@case
def auto_resume_in_a_folder_of_another_head_configuration(tmp, shared):
    previous = shared.previous_run()  # the earlier run's own folder: every byte there must survive
    return Case(["--data_path", shared.data, "--cls_features", "pos", "--output_dir", previous],
                [str(previous / "checkpoint-last.pth")], sentinel=False)


def copy_previous(tmp, shared):
    """A copy of the finished 1-epoch run's folder: each case resumes its own (runs hold a folder's lock)."""
    return Path(shutil.copytree(shared.previous_run(), tmp / "previous", ignore=shutil.ignore_patterns(".lock")))


@case
def auto_resume_with_another_blr(tmp, shared):
    return Case(["--data_path", shared.data, "--cls_features", "cls", "--blr", "20", "--output_dir",
                 copy_previous(tmp, shared)], ["lrs=", "--resume"], sentinel=False)


@case
def auto_resume_with_another_data_path(tmp, shared):
    return Case(["--data_path", copy_data(tmp, shared), "--cls_features", "cls", "--output_dir",
                 copy_previous(tmp, shared)], ["data=", "another --output_dir"], sentinel=False)


@case
def auto_resume_with_another_input_size(tmp, shared):
    return Case(["--data_path", shared.data, "--cls_features", "cls", "--input_size", 48, "--output_dir",
                 copy_previous(tmp, shared)], ["input_size=32", "input_size=48"], sentinel=False)


@case
def auto_resume_with_another_encoder(tmp, shared):
    return Case(["--data_path", shared.data, "--cls_features", "cls", "--finetune", shared.mae_checkpoint,
                 "--output_dir", copy_previous(tmp, shared)], ["encoder='random init'"], sentinel=False)


@case
def auto_resume_with_a_training_subset(tmp, shared):
    return Case(["--data_path", shared.data, "--cls_features", "cls", "--train_per_class", 2, "--output_dir",
                 copy_previous(tmp, shared)], ["train_subset='full'", "train_subset='2-shot (seed 0): 4 images",
                                              "--resume"], sentinel=False)


@case
def auto_resume_of_a_truncated_checkpoint(tmp, shared):
    previous = copy_previous(tmp, shared)
    last = previous / "checkpoint-last.pth"
    last.write_bytes(last.read_bytes()[:2000])
    return Case(["--data_path", shared.data, "--cls_features", "cls", "--output_dir", previous],
                [str(last), "delete"], sentinel=False)


@case
def eval_on_renamed_classes(tmp, shared):
    root = copy_data(tmp, shared)
    for split in ("train", "val"):
        (root / split / "class_0").rename(root / split / "zebra")
    checkpoint = shared.previous_run() / "checkpoint-last.pth"
    return Case(["--data_path", root, "--cls_features", "cls", "--eval", "--resume", checkpoint],
                ["classes=", "zebra"])


# ------------------------------------------------------------------------------ checkpoints that run code

# Every reader of a checkpoint refuses a file that asks to run code, and nothing of it runs: each case's file
# would create tmp/code_ran when unpickled (test_no_checkpoint_code_ran checks that it does not exist).
CODE_RAN = "code_ran"
TRUST_FRAGMENTS = ["asks to run", "--trust_checkpoint", "python -m util.checkpoint"]


def _malicious_finetune(how, legacy=False):
    def build(tmp, shared):
        evil = write_malicious_checkpoint(tmp / "downloaded.pth", tmp / CODE_RAN, how, legacy=legacy)
        return Case(["--data_path", shared.data, "--finetune", evil], [str(evil), *TRUST_FRAGMENTS])
    return build


for _how in MALICE:
    CASES[f"code_in_finetune_{_how.replace('.', '_')}"] = _malicious_finetune(_how)
CASES["code_in_finetune_legacy_format"] = _malicious_finetune("subprocess", legacy=True)


@case
def code_in_oracle(tmp, shared):
    evil = write_malicious_checkpoint(tmp / "dino.pth", tmp / CODE_RAN)
    return Case(["--data_path", shared.data, "--cls_features", "oracle", "--oracle", evil],
                [str(evil), *TRUST_FRAGMENTS])


def _malicious_heads(tmp, shared, folder=None, name="checkpoint-last.pth"):
    """Heads of a finished run with code nested among them, in `folder` (default tmp); the marker is in tmp."""
    heads = torch.load(shared.previous_run() / "checkpoint-last.pth", weights_only=True)
    return write_malicious_checkpoint((folder or tmp) / name, tmp / CODE_RAN, "nested", base=heads)


@case
def code_in_explicit_resume(tmp, shared):
    evil = _malicious_heads(tmp, shared)
    return Case(["--data_path", shared.data, "--cls_features", "cls", "--resume", evil], [str(evil), "asks to run"])


@case
def code_in_auto_resume(tmp, shared):
    previous = copy_previous(tmp, shared)
    evil = _malicious_heads(tmp, shared, folder=previous)
    return Case(["--data_path", shared.data, "--cls_features", "cls", "--output_dir", previous],
                [str(evil), "asks to run"], sentinel=False)


@case
def code_in_eval_heads(tmp, shared):
    evil = _malicious_heads(tmp, shared, name="checkpoint-best.pth")
    return Case(["--data_path", shared.data, "--cls_features", "cls", "--eval", "--resume", evil],
                [str(evil), "asks to run"])


@case
def attention_stats_code_in_finetune(tmp, shared):
    evil = write_malicious_checkpoint(tmp / "downloaded.pth", tmp / CODE_RAN, "os.system")
    return Case([*STATS, "--input_size", 32, "--data_path", shared.data, "--finetune", evil],
                [str(evil), *TRUST_FRAGMENTS], script="main_attention_stats.py")


def test_no_checkpoint_code_ran(runs):
    cases = [name for name in CASES if "code_in" in name]
    for name in cases:
        runs[name].result()
    ran = [name for name in cases if (runs["root"] / name / CODE_RAN).exists()]
    assert not ran, f"checkpoint code ran in {ran}"


def trusted_checkpoint_run(out, data):
    """--trust_checkpoint is the way past the refusal: the file's code runs, and the probe trains on it."""
    evil = write_malicious_checkpoint(out.parent / f"{out.name}.pth", out.parent / f"{out.name}_{CODE_RAN}")
    return out.parent / f"{out.name}_{CODE_RAN}", run_cli([*TINY, "--data_path", data, "--finetune", evil,
                                                           "--trust_checkpoint", "--output_dir", out])


def test_trust_checkpoint_runs_the_file_and_trains(runs):
    marker, done = runs["trusted_checkpoint"].result()
    assert done.returncode == 0, done.stderr[-3000:]
    assert marker.exists()
    assert "--trust_checkpoint" in done.stderr  # the run says, in one warning line, that it ran the file's code


@case
def eval_with_another_encoder(tmp, shared):
    checkpoint = shared.previous_run() / "checkpoint-last.pth"  # heads trained on a random-initialised encoder
    return Case(["--data_path", shared.data, "--cls_features", "cls", "--eval", "--resume", checkpoint,
                 "--finetune", shared.mae_checkpoint],
                ["encoder='random init'", "this run has encoder='mae_vit_tiny.pth (", "--finetune"])


@case
def eval_with_another_sub_model(tmp, shared):
    checkpoint = shared.previous_run() / "checkpoint-last.pth"
    return Case(["--data_path", shared.data, "--cls_features", "cls", "--eval", "--resume", checkpoint,
                 "--finetune", shared.mae_checkpoint, "--checkpoint_key", "model"],
                ["checkpoint_key=None", "checkpoint_key='model'", "--checkpoint_key"])


@case
def eval_with_another_input_size(tmp, shared):
    checkpoint = shared.previous_run() / "checkpoint-last.pth"
    return Case(["--data_path", shared.data, "--cls_features", "cls", "--eval", "--resume", checkpoint,
                 "--input_size", 48], ["input_size=32", "input_size=48", "--input_size"])


@case
def eval_of_a_random_encoder_with_another_seed(tmp, shared):
    checkpoint = shared.previous_run() / "checkpoint-last.pth"
    return Case(["--data_path", shared.data, "--cls_features", "cls", "--eval", "--resume", checkpoint,
                 "--seed", 1], ["seed=0", "seed=1", "--seed"])


@case
def accum_iter_above_the_iterations_of_an_epoch(tmp, shared):
    # 8 images in batches of 4: 2 iterations, so the optimizer would never step
    return Case(["--data_path", shared.data, "--accum_iter", 4],
                ["an epoch has 2 iteration(s) (8 images, batch 4", "fewer than --accum_iter 4",
                 "--accum_iter 2 or less"])


# ---------------------------------------------------------------------------------------- numeric flags

def flag_case(flags, *fragments):
    return lambda tmp, shared: Case(["--data_path", shared.data, *flags], list(fragments))


for _name, _flags, _fragments in [
    ("blr_nan", ["--blr", "nan"], ["--blr nan", "finite"]),
    ("lr_negative", ["--lr", "-1"], ["--lr -1"]),
    ("min_lr_nan", ["--min_lr", "nan"], ["--min_lr nan"]),
    ("min_lr_negative", ["--min_lr", "-5"], ["--min_lr -5"]),
    ("min_lr_above_the_lr", ["--min_lr", "100"], ["--min_lr 100", "peak lr"]),
    ("knn_k_zero", ["--knn", "--knn_k", "0"], ["--knn_k 0"]),
    ("knn_k_negative", ["--knn", "--knn_k", "-5"], ["--knn_k -5"]),
    ("knn_temperature_zero", ["--knn", "--knn_temperature", "0"], ["--knn_temperature 0"]),
    ("knn_temperature_negative", ["--knn", "--knn_temperature", "-0.07"], ["--knn_temperature -0.07"]),
    ("input_size_zero", ["--input_size", "0"], ["--input_size 0"]),
    ("seed_negative", ["--seed", "-1"], ["--seed -1"]),
    ("unknown_device", ["--device", "tpu"], ["--device 'tpu'"]),
    ("return_block_past_the_last", ["--return_block", "12"], ["--return_block 12", "12-block"]),
    ("return_block_before_the_first", ["--return_block", "-13"], ["--return_block -13"]),
    ("start_epoch_past_the_end", ["--start_epoch", "5", "--epochs", "1"], ["--start_epoch 5"]),
    ("weight_decay_inf", ["--weight_decay", "inf"], ["--weight_decay inf"]),
    ("ep_queries_not_dividing", ["--cls_features", "ep", "--ep_queries", "5"], ["--ep_queries 5", "divisor"]),
    ("map_heads_zero", ["--cls_features", "map", "--map_heads", "0"], ["--map_heads 0"]),
    ("abmilp_depth_zero", ["--cls_features", "abmilp", "--abmilp_depth", "0"], ["--abmilp_depth 0"]),
    ("cache_size_negative", ["--cache_eval_features", "-1"], ["--cache_eval_features -1"]),
    ("train_cache_with_augmentation", ["--cache_train_features", "1"], ["--cache_train_features 1", "--no_augment"]),
    ("decoder_gpu_without_cuda", ["--decoder", "gpu", "--device", "cpu"], ["--decoder gpu", "--decoder fast"]),
]:
    CASES[_name] = flag_case(_flags, *_fragments)


@case
def oracle_checkpoint_missing(tmp, shared):
    return Case(["--data_path", shared.data, "--cls_features", "oracle", "--oracle", tmp / "dino.pth"],
                [str(tmp / "dino.pth"), "--oracle"])


@case
def oracle_is_a_folder(tmp, shared):
    return Case(["--data_path", shared.data, "--cls_features", "oracle", "--oracle", tmp],
                [str(tmp), "--oracle"])


@case
def stale_rank_and_world_size_without_a_master(tmp, shared):
    env = cli_env(RANK=0, WORLD_SIZE=2, LOCAL_RANK=0, MASTER_ADDR=None, MASTER_PORT=None)
    return Case(["--data_path", shared.data], ["RANK=0", "WORLD_SIZE=2", "unset RANK"], env=env)


@case
def stale_rank_and_world_size_nobody_joins(tmp, shared):
    env = cli_env(RANK=0, WORLD_SIZE=2, LOCAL_RANK=0, MASTER_ADDR="127.0.0.1", MASTER_PORT=free_port(),
                  BEYOND_CLS_RENDEZVOUS_TIMEOUT=3)
    case = Case(["--data_path", shared.data], ["did not join within 3 s", "unset RANK"], env=env)
    case.allowed_lines = ["waiting up to 3 s for 2 processes"]
    return case


# -------------------------------------------------------------------------------------- attention stats

@case
def attention_stats_data_path_missing(tmp, shared):
    return Case([*STATS, "--input_size", 32, "--data_path", tmp / "nope"], [str(tmp / "nope"), "does not exist"],
                script="main_attention_stats.py")


@case
def attention_stats_checkpoint_missing(tmp, shared):
    missing = tmp / "mae.pth"
    return Case([*STATS, "--input_size", 32, "--data_path", shared.data, "--finetune", missing], [str(missing)],
                script="main_attention_stats.py")


@case
def attention_stats_input_size_not_divisible(tmp, shared):
    return Case([*STATS, "--input_size", 40, "--data_path", shared.data, "--finetune", shared.mae_checkpoint],
                ["--input_size 40"], script="main_attention_stats.py")


# ------------------------------------------------------------------------------------------------ runs

@dataclass
class Outcome:
    case: Case
    done: object  # CompletedProcess
    out: Path
    before: dict  # snapshot of --output_dir before the run


def run_case(name, tmp, shared):
    spec = CASES[name](tmp, shared)
    out = output_dir_with_sentinel(tmp / "out") if spec.sentinel else None
    if "--output_dir" not in spec.args:
        spec.args += ["--output_dir", out or tmp / "out"]
    out = Path(spec.args[spec.args.index("--output_dir") + 1])
    before = snapshot(out) if out.is_dir() else None
    base = TINY if spec.script == "main_linprobe.py" else []
    done = run_cli([*base, *spec.args], env=spec.env, script=spec.script)
    return Outcome(spec, done, out, before)


def finished_run(out, data):
    done = run_cli([*TINY, "--data_path", data, "--output_dir", out, "--cls_features", "cls"])
    assert done.returncode == 0, done.stderr[-3000:]
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """name -> Future[Outcome] for every case (and the success runs below), all started at once."""
    root = tmp_path_factory.mktemp("errors")
    data = make_image_folder(root / "data")
    pool = ThreadPoolExecutor(max_workers=4)
    previous = pool.submit(finished_run, root / "previous_run", data)
    shared = Shared(data, write_mae_checkpoint(root / "mae_vit_tiny.pth"), lambda: previous.result())
    futures = {"previous_run": previous, "root": root}
    for name in SUCCESS_RUNS:
        futures[name] = pool.submit(SUCCESS_RUNS[name], root / name, data)
    for name in CASES:
        (root / name).mkdir()
        futures[name] = pool.submit(run_case, name, root / name, shared)
    yield futures
    pool.shutdown(cancel_futures=True)


@pytest.mark.parametrize("name", list(CASES))
def test_user_error(runs, name):
    outcome = runs[name].result()
    assert_user_error(outcome.done, *outcome.case.fragments, progress_allowed=outcome.case.progress_allowed,
                      allowed_lines=outcome.case.allowed_lines)
    if outcome.before is not None:
        after = snapshot(outcome.out)
        changed = [p for p in outcome.before if after.get(p, "gone") != outcome.before[p]]
        assert not changed, f"the failing run changed {changed} in its --output_dir"
        if not outcome.case.progress_allowed:  # a run that never started training leaves nothing behind either
            assert after == outcome.before, f"new files in --output_dir: {sorted(after.keys() - outcome.before.keys())}"


def test_output_dir_blocker_file_is_untouched(runs):
    outcome = runs["output_dir_that_cannot_be_written"].result()
    assert outcome.out.parent.read_text() == "a file, not a folder\n"


# ------------------------------------------------------------------------------------------- runs that work

def skip_bad_images_run(out, data):
    root = Path(shutil.copytree(data, out.parent / f"{out.name}_data"))
    bad = root / "val" / "class_0" / "img_1.png"
    bad.write_text("this is not a PNG")
    return bad, run_cli([*TINY, "--data_path", root, "--skip_bad_images", "--output_dir", out])


def image_modes_run(out, data):
    root = make_image_folder(out.parent / f"{out.name}_data", modes=("L", "RGBA", "CMYK", "P"))
    return root, run_cli([*TINY, "--data_path", root, "--output_dir", out])


def fresh_start_after_deleted_checkpoints_run(out, data):
    """A finished run rerun as is, then again after its checkpoints were deleted."""
    first = run_cli([*TINY, "--data_path", data, "--output_dir", out])
    again = run_cli([*TINY, "--data_path", data, "--output_dir", out])
    old_log = (out / "log.txt").read_text()
    for checkpoint in out.glob("checkpoint-*.pth"):
        checkpoint.unlink()
    fresh = run_cli([*TINY, "--data_path", data, "--output_dir", out, "--seed", 1])
    return first, again, old_log, fresh


def train_list_of_one_class_run(out, data):
    listed = out.parent / f"{out.name}.txt"
    listed.write_text("class_0/img_0.png\nclass_0/img_1.png\n")
    return run_cli([*TINY, "--data_path", data, "--train_list", listed, "--batch_size", 2, "--output_dir", out])


def folder_named_like_a_built_in_dataset_run(out, data):
    here = out.parent / f"{out.name}_cwd"
    shutil.copytree(data, here / "digits")
    return here, run_cli([*TINY, "--data_path", "digits", "--output_dir", out], cwd=here)


SUCCESS_RUNS = {"skip_bad_images": skip_bad_images_run, "image_modes": image_modes_run,
                "fresh_start": fresh_start_after_deleted_checkpoints_run,
                "train_list_one_class": train_list_of_one_class_run,
                "shadowing_folder": folder_named_like_a_built_in_dataset_run,
                "trusted_checkpoint": trusted_checkpoint_run}


def test_skip_bad_images_finishes_and_counts(runs):
    bad, done = runs["skip_bad_images"].result()
    assert done.returncode == 0, done.stderr[-3000:]
    assert "Traceback" not in done.stderr and "error:" not in done.stderr
    lines = done.stderr.split("\n")
    assert any(line.startswith(f"warning: skipping cannot read image {bad}") for line in lines), done.stderr[-2000:]
    assert any(line.startswith("warning: skipped 1 ") for line in lines), f"no count at the end:\n{done.stderr[-2000:]}"


def test_grayscale_rgba_cmyk_palette_images_simply_work(runs):
    root, done = runs["image_modes"].result()
    assert {p.suffix for p in root.rglob("img_*")} == {".png", ".jpg"}  # CMYK can only be a JPEG
    assert done.returncode == 0, done.stderr[-3000:]
    assert "warning" not in done.stderr and "error" not in done.stderr, done.stderr[-3000:]


def test_nothing_left_to_train_is_said_and_a_fresh_start_keeps_the_old_log(runs):
    first, again, old_log, fresh = runs["fresh_start"].result()
    out = Path(first.args[first.args.index("--output_dir") + 1])
    for done in (first, again, fresh):
        assert done.returncode == 0, done.stderr[-3000:]
    assert "epochs 0..0" in first.stdout
    assert "nothing left to train: the checkpoint already holds all 1 epochs (1 probe(s) on 8 images" in again.stdout
    assert "epochs 1..0" not in again.stdout and "training" not in again.stdout
    assert len(old_log.splitlines()) == 1  # the rerun added nothing
    assert f"note: {out / 'log.txt'} held another run (no checkpoint of it is left): kept as log.1.txt, this run " \
           "starts a new log" in fresh.stderr.splitlines()
    assert (out / "log.1.txt").read_text() == old_log
    assert len((out / "log.txt").read_text().splitlines()) == 1  # only the new run's epoch
    assert list((out / "tensorboard.1").glob("events.out.tfevents.*"))


def test_a_training_list_that_covers_some_classes_is_warned_about(runs):
    done = runs["train_list_one_class"].result()
    assert done.returncode == 0, done.stderr[-3000:]
    warnings = [line for line in done.stderr.splitlines() if line.startswith("warning:")]
    assert warnings == ["warning: the training subset covers 1 of the 2 classes; no training image of class_1 (the "
                        "heads cannot learn to predict them)"]


def test_a_folder_named_like_a_built_in_dataset_is_the_one_read_and_said(runs):
    here, done = runs["shadowing_folder"].result()
    assert done.returncode == 0, done.stderr[-3000:]
    assert "training 1 probe(s) on 8 images, validating on 8, 2 classes, epochs 0..0; data: the folder " \
           f"{here / 'digits'} (not the built-in digits)" in done.stdout, done.stdout
