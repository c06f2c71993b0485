"""config.py: the training-subset flags resolved into the frozen configuration, or one error naming the flag."""
import pytest

import main_linprobe
from config import resolve_linprobe
from util.errors import UserError
from util.subsets import FRACTION, LIST, PER_CLASS, TrainSubset


def resolve(*flags):
    args = main_linprobe.get_args_parser().parse_args(["--device", "cpu", "--model", "vit_tiny_patch16", *flags])
    return resolve_linprobe(args)


def test_no_subset_flag_trains_on_the_whole_split():
    assert resolve().train_subset is None


def test_subset_flags_resolve_with_their_seed(tmp_path):
    assert resolve("--train_per_class", "5").train_subset == TrainSubset(PER_CLASS, 5, 0)
    assert resolve("--train_fraction", "0.01", "--subset_seed", "3").train_subset == TrainSubset(FRACTION, 0.01, 3)
    listed = tmp_path / "1percent.txt"
    listed.write_text("a/b.jpg\n")
    config = resolve("--train_list", str(listed))
    assert config.train_subset == TrainSubset(LIST, str(listed), None)
    assert config.to_dict()["train_subset"] == {"kind": LIST, "value": str(listed), "seed": None}


def _assert_one_line_error(flags, fragments):
    """`flags` are refused with one line `<problem> (<what to do>)` holding every fragment."""
    with pytest.raises(UserError) as info:
        resolve(*flags)
    message = str(info.value)
    assert "\n" not in message and message.endswith(")") and " (" in message
    for fragment in fragments:
        assert fragment in message, message


@pytest.mark.parametrize("flags, fragments", [
    (["--train_per_class", "0"], ["--train_per_class 0", "at least 1"]),
    (["--train_fraction", "0"], ["--train_fraction 0", "greater than 0"]),
    (["--train_fraction", "1.5"], ["--train_fraction 1.5", "above 1"]),
    (["--train_fraction", "nan"], ["--train_fraction nan", "finite"]),
    (["--train_per_class", "2", "--train_fraction", "0.5"], ["--train_per_class and --train_fraction", "only one"]),
    (["--train_list", "/no/such/list.txt"], ["--train_list /no/such/list.txt", "not a file"]),
    (["--subset_seed", "2"], ["--subset_seed 2", "--train_per_class"]),
    (["--train_per_class", "2", "--subset_seed", "-1"], ["--subset_seed -1", "out of range"]),
])
def test_bad_subset_flags_are_one_line_user_errors(flags, fragments):
    _assert_one_line_error(flags, fragments)


def test_subset_seed_with_a_list_is_refused(tmp_path):
    listed = tmp_path / "list.txt"
    listed.write_text("a/b.jpg\n")
    with pytest.raises(UserError, match="--subset_seed 1 has no subset to draw"):
        resolve("--train_list", str(listed), "--subset_seed", "1")


LAUNCHED_AS_RANK_1_OF_2 = dict(RANK="1", WORLD_SIZE="2", LOCAL_RANK="1", LOCAL_WORLD_SIZE="2")


def test_under_a_launcher_every_process_takes_cuda_local_rank(monkeypatch):
    from util.dist import process_device
    for name, value in LAUNCHED_AS_RANK_1_OF_2.items():
        monkeypatch.setenv(name, value)
    assert [process_device(d) for d in ("cuda", "cuda:0", "cpu")] == ["cuda:1", "cuda:1", "cpu"]
    monkeypatch.setenv("WORLD_SIZE", "1")  # one process: the device it names
    assert process_device("cuda:1") == "cuda:1"


def test_under_a_launcher_an_explicit_gpu_index_is_refused(monkeypatch):
    from config import resolve_device
    for name, value in LAUNCHED_AS_RANK_1_OF_2.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(UserError, match=r"--device cuda:0 names one GPU for all 2 processes \(pass --device cuda"):
        resolve_device("cuda:0")
    assert resolve_device("cpu") == "cpu"


@pytest.mark.parametrize("flags, fragments", [
    (["--cls_features", "esimpool", "--esimpool_heads", "7"], ["--cls_features esimpool", "--esimpool_heads 7",
                                                               "width 192", "divisor"]),
    (["--cls_features", "ep", "--ep_queries", "32", "--ep_d_out", "5"], ["--ep_queries 32 x --ep_d_out 5 = 160"]),
    (["--cls_features", "aim", "--aim_heads", "0"], ["--aim_heads 0", "at least 1"]),
    (["--cls_features", "jepa", "--jepa_heads", "0"], ["--jepa_heads 0"]),
    (["--cls_features", "ep", "--ep_d_out", "0"], ["--ep_d_out 0"]),
    (["--cls_features", "siglip", "--map_heads", "5"], ["--cls_features siglip", "--map_heads 5"]),
    (["--cls_features", "dinov2_n4", "--return_block", "2"], ["dinov2_n4", "last 4 blocks", "has 3 up to the probed "
                                                              "block 2", "--return_block of at least 3"]),
    (["--cls_features", "dinov2_n1_avgpool", "--no_cls_token"], ["dinov2_n1_avgpool", "[cls]"]),
    (["--cls_features", "ep_all", "--no_cls_token"], ["ep_all", "[cls]"]),
    (["--cls_features", "abmilp_all"], ["abmilp_all", "--abmilp_content all"]),
    (["--cls_features", "clip_all"], ["clip_all", "use clip"]),
])
def test_bad_head_flags_are_one_line_user_errors(flags, fragments):
    _assert_one_line_error(flags, fragments)


def test_heads_reading_blocks_ask_for_as_many_as_the_widest():
    assert resolve("--cls_features", "cls,ep").needs_blocks == 0
    assert resolve("--cls_features", "dinov2_n1,dinov2_n4_avgpool").needs_blocks == 4
    assert resolve("--cls_features", "dinov2_n4", "--return_block", "3").needs_blocks == 4
    assert resolve("--cls_features", "dinov2_n1", "--return_block", "-12").needs_blocks == 1


# ------------------------------------------------------------------------------------------------ dashboards

def test_dashboard_flags_resolve_into_the_config():
    from config import DashboardSpec
    assert resolve().dashboard == DashboardSpec(images_every=10)
    config = resolve("--wandb_project", "probes", "--wandb_entity", "lab", "--wandb_group", "mae-in1k",
                     "--wandb_tags", "mae, sweep,,", "--log_images_every", "0")
    assert config.dashboard == DashboardSpec("probes", "lab", "mae-in1k", ("mae", "sweep"), 0)
    assert config.to_dict()["dashboard"]["tags"] == ("mae", "sweep")


@pytest.mark.parametrize("flags, fragments", [
    (["--log_images_every", "-1"], ["--log_images_every -1", "at least 0"]),
    (["--wandb_project", "a/b"], ["--wandb_project 'a/b'", "not a wandb name"]),
    (["--wandb_group", " "], ["--wandb_group ' '", "not a wandb name"]),
    (["--wandb_tags", "x" * 65], ["--wandb_tags", "64 characters"]),
])
def test_bad_dashboard_flags_are_one_line_user_errors(flags, fragments):
    with pytest.raises(UserError) as info:
        resolve(*flags)
    for fragment in fragments:
        assert fragment in str(info.value)
