"""RunLog: log.txt lines, TensorBoard scalars read back with TensorBoard's own reader, wandb offline."""
import glob
import json

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from util.run_log import RunLog, wandb_requested


def test_log_lines_and_tensorboard_scalars(tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_PROJECT", raising=False)
    log = RunLog(str(tmp_path))
    log.line({"epoch": 0, "test_acc1": 12.5})
    log.line({"epoch": 1, "test_acc1": 25.0})
    log.scalars({"test_acc1/cls": 12.5}, step=0)
    log.scalars({"test_acc1/cls": 25.0}, step=1)
    log.close()
    lines = [json.loads(line) for line in (tmp_path / "log.txt").read_text().splitlines()]
    assert lines == [{"epoch": 0, "test_acc1": 12.5}, {"epoch": 1, "test_acc1": 25.0}]
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    assert [(e.step, e.value) for e in events.Scalars("test_acc1/cls")] == [(0, 12.5), (1, 25.0)]
    assert not (tmp_path / "wandb").exists()


def test_disabled_log_writes_nothing(tmp_path):
    log = RunLog(str(tmp_path), wandb=True, enabled=False)  # a non-main DDP process
    log.line({"epoch": 0})
    log.scalars({"x": 1.0}, step=0)
    log.close()
    assert list(tmp_path.iterdir()) == []


def test_wandb_offline_run_is_written_locally(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_PROJECT", "beyond-cls-test")
    monkeypatch.setenv("WANDB_SILENT", "true")
    assert wandb_requested(False)  # WANDB_PROJECT alone turns it on
    log = RunLog(str(tmp_path), settings={"schedule": {"epochs": 3}, "seed": 0}, run_name="probe-run",
                 tensorboard=False)
    assert log.wandb is not None and log.wandb.name == "probe-run"
    assert log.wandb.config["schedule.epochs"] == 3
    log.scalars({"test_acc1/cls": 50.0}, step=0)
    log.close()
    assert glob.glob(str(tmp_path / "wandb" / "offline-run-*" / "*.wandb"))


# ------------------------------------------------------------------------------------- axes, resume, failures

def _scalars(folder, tag):
    events = EventAccumulator(str(folder), size_guidance={"scalars": 0, "images": 0, "tensors": 0})
    events.Reload()
    return [(e.step, e.value) for e in events.Scalars(tag)]


def test_iterations_on_maes_epoch_1000x_axis_and_epochs_at_1000_per_epoch(tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_PROJECT", raising=False)
    log = RunLog(str(tmp_path))
    for epoch in range(2):
        for it in range(3):
            log.step({"train/loss/cls": 10 * epoch + it}, epoch, it, 3)
        log.epoch({"test_acc1/cls": 50 + epoch}, epoch, 3)
    log.close()
    # int((it / 3 + epoch) * 1000), as MAE's engine_finetune.py
    assert _scalars(tmp_path / "tensorboard", "train/loss/cls") == [
        (0, 0), (333, 1), (666, 2), (1000, 10), (1333, 11), (1666, 12)]
    assert _scalars(tmp_path / "tensorboard", "test_acc1/cls") == [(0, 50), (1000, 51)]


def test_a_resumed_run_leaves_no_tensorboard_step_twice(tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_PROJECT", raising=False)
    first = RunLog(str(tmp_path))
    for epoch in range(2):  # epoch 1 is written, then the run dies before its checkpoint
        for it in range(2):
            first.step({"train/loss/cls": 1.0 + epoch}, epoch, it, 2)
        first.epoch({"test_acc1/cls": 50.0 + epoch}, epoch, 2)
    first.tb.flush()  # what a kill -9 leaves: the events on disk, no close
    second = RunLog(str(tmp_path), resumed=True, start_epoch=1)  # resumes from epoch 0's checkpoint
    for it in range(2):
        second.step({"train/loss/cls": 5.0}, 1, it, 2)
    second.epoch({"test_acc1/cls": 60.0}, 1, 2)
    second.close()
    assert _scalars(tmp_path / "tensorboard", "train/loss/cls") == [(0, 1.0), (500, 1.0), (1000, 5.0), (1500, 5.0)]
    assert _scalars(tmp_path / "tensorboard", "test_acc1/cls") == [(0, 50.0), (1000, 60.0)]
    fresh = RunLog(str(tmp_path))  # starting over (no checkpoint): nothing of the killed attempts stays visible
    fresh.epoch({"test_acc1/cls": 70.0}, 0, 2)
    fresh.close()
    assert _scalars(tmp_path / "tensorboard", "test_acc1/cls") == [(0, 70.0)]


def test_custom_scalars_draw_one_chart_per_head_with_a_line_per_lr(tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_PROJECT", raising=False)
    from tensorboard.plugins.custom_scalar import layout_pb2

    log = RunLog(str(tmp_path))
    log.layout({"cls": ["cls_blr0.1", "cls_blr1"], "abmilp": ["abmilp_blr0.1", "abmilp_blr1"]})
    log.close()
    events = EventAccumulator(str(tmp_path / "tensorboard"), size_guidance={"tensors": 0})
    events.Reload()
    layout = layout_pb2.Layout()
    layout.ParseFromString(events.Tensors("custom_scalars__config__")[0].tensor_proto.string_val[0])
    charts = {c.title: list(c.multiline.tag) for cat in layout.category for c in cat.chart}
    assert charts["train/loss/cls"] == [r"^train/loss/(cls_blr0\.1|cls_blr1)$"]
    assert charts["test_acc1/abmilp"] == [r"^test_acc1/(abmilp_blr0\.1|abmilp_blr1)$"]


def test_summary_table_config_and_image_reach_tensorboard(tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_PROJECT", raising=False)
    import numpy as np

    log = RunLog(str(tmp_path), settings={"probes": ("cls", "pos"), "nb_classes": None}, info={"nb_classes": 10})
    log.summary({"best_acc1/cls": 51.5})
    log.table("results", [{"probe": "cls", "best_acc1": 51.5}, {"probe": "knn_cls_k10", "best_acc1": 40.0}])
    picture = np.zeros((6, 4, 3), np.uint8)
    picture[:, :2, 0] = 255
    log.epoch_image("attention/abmilp", picture, 2, 10)
    log.close()
    events = EventAccumulator(str(tmp_path / "tensorboard"), size_guidance={"tensors": 0, "images": 0})
    events.Reload()
    text = {tag: events.Tensors(tag)[0].tensor_proto.string_val[0].decode() for tag in events.Tags()["tensors"]}
    assert "| probe | best_acc1 |" in text["results/text_summary"] and "| knn_cls_k10 | 40.0 |" in text[
        "results/text_summary"]
    assert json.loads(_unindent(text["summary/text_summary"])) == {"best_acc1/cls": 51.5}
    config = json.loads(_unindent(text["config/text_summary"]))
    assert config["probes"] == ["cls", "pos"] and config["run"]["nb_classes"] == 10 and "torch" in config["versions"]
    image = events.Images("attention/abmilp")[0]
    assert image.step == 2000 and (image.width, image.height) == (4, 6)
    import io

    from PIL import Image
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(image.encoded_image_string)).convert("RGB")), picture)


def _unindent(markdown):
    return "\n".join(line[4:] for line in markdown.splitlines())


def test_a_failing_tensorboard_is_one_warning_and_the_log_goes_on(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("WANDB_PROJECT", raising=False)
    log = RunLog(str(tmp_path))

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(log.tb, "add_scalar", full_disk)
    for epoch in range(3):
        log.step({"train/loss/cls": 1.0}, epoch, 0, 1)
        log.epoch({"test_acc1/cls": 1.0}, epoch, 1)
        log.line({"epoch": epoch})
    log.close()
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and err[0].startswith("warning: tensorboard logging stopped (OSError")
    assert len((tmp_path / "log.txt").read_text().splitlines()) == 3


# ----------------------------------------------------------------------------------------------- wandb offline

def _offline(monkeypatch, tmp_path):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.delenv("WANDB_PROJECT", raising=False)


def test_wandb_resumes_its_run_and_never_sends_a_step_twice(tmp_path, monkeypatch, capsys):
    from config import DashboardSpec
    from helpers import read_wandb_offline, wandb_history, wandb_record

    _offline(monkeypatch, tmp_path)
    spec = DashboardSpec(project="p", group="g", tags=("a", "b"))
    first = RunLog(str(tmp_path), settings={"probes": ("cls", "pos"), "epochs": 3}, info={"nb_classes": 10},
                   wandb=True, tensorboard=False, job_type="linprobe", dashboard=spec)
    for epoch in range(2):
        for it in range(3):
            first.step({"train/loss/cls": 10 * epoch + it, "train/lr/cls": 0.5}, epoch, it, 3)
        first.epoch({"test_acc1/cls": 50 + epoch}, epoch, 3)
        if epoch == 0:
            first.commit()  # after epoch 0's checkpoint; epoch 1 dies before its checkpoint
    first.wandb.finish()  # the process ends without committing epoch 1
    second = RunLog(str(tmp_path), wandb=True, tensorboard=False, job_type="linprobe", dashboard=spec,
                    resumed=True, start_epoch=1)
    for it in range(3):
        second.step({"train/loss/cls": 100 + it, "train/lr/cls": 0.5}, 1, it, 3)
    second.epoch({"test_acc1/cls": 70}, 1, 3)
    second.commit()
    second.summary({"best_acc1/cls": 70})
    second.table("results", [{"probe": "cls", "lr": 0.5, "best_acc1": 70}])
    second.close()
    import wandb
    wandb.teardown()  # the wandb service of this process closes its files (a CLI run's ends with its process)
    assert capsys.readouterr().err.strip() == ""

    records = read_wandb_offline(tmp_path)
    runs = wandb_record(records, "run")
    assert len(runs) == 2 and runs[0].run.run_id == runs[1].run.run_id
    assert (runs[0].run.job_type, runs[0].run.run_group, list(runs[0].run.tags)) == ("linprobe", "g", ["a", "b"])
    history = wandb_history(records)
    steps = [step for step, _ in history]
    assert steps == list(range(6)), steps  # global iteration, each once, rising across the resume
    rows = dict(history)
    assert [rows[s]["train/loss/cls"] for s in range(6)] == [0, 1, 2, 100, 101, 102]
    assert rows[4]["epoch"] == 1 + 1 / 3 and (rows[2]["epoch_index"], rows[2]["test_acc1/cls"]) == (0, 50)
    assert rows[5]["test_acc1/cls"] == 70 and rows[5]["results/_type"] == "table-file"
    config = {item.key: json.loads(item.value_json) for item in runs[0].run.config.update}
    assert config["probes"] == ["cls", "pos"] and config["epochs"] == 3 and config["run.nb_classes"] == 10
    metrics = {m.metric.name: m.metric.step_metric for m in wandb_record(records, "metric")}
    assert metrics["train/loss/cls"] == "epoch" and metrics["test_acc1/cls"] == "epoch_index"
    summary = {item.key: json.loads(item.value_json) for s in wandb_record(records, "summary")
               for item in s.summary.update if item.key}
    assert summary["best_acc1/cls"] == 70


def test_a_failing_wandb_is_one_warning_and_the_run_goes_on(tmp_path, monkeypatch, capsys):
    _offline(monkeypatch, tmp_path)
    log = RunLog(str(tmp_path), wandb=True, tensorboard=True)

    def refused(*args, **kwargs):
        raise ConnectionError("wandb is unreachable")
    monkeypatch.setattr(log.wandb, "log", refused)
    for epoch in range(2):
        log.step({"train/loss/cls": 1.0}, epoch, 0, 1)
        log.epoch({"test_acc1/cls": 1.0}, epoch, 1)
        log.commit()
    log.summary({"best_acc1/cls": 1.0})
    log.close()
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert err == ["warning: wandb logging stopped (ConnectionError: wandb is unreachable); the run goes on, "
                   "log.txt and the checkpoints are kept"]
    assert _scalars(tmp_path / "tensorboard", "test_acc1/cls") == [(0, 1.0), (1000, 1.0)]


def test_a_picture_that_fails_to_draw_is_one_warning_and_no_more_pictures(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("WANDB_PROJECT", raising=False)
    import numpy as np

    log = RunLog(str(tmp_path))
    calls = []

    def broken():
        calls.append(1)
        raise RuntimeError("CUDA out of memory")
    for epoch in range(3):
        log.picture("attention/probes", broken, epoch, 1)
        log.picture("pictures/loss_curve", lambda: np.zeros((2, 2, 3), np.uint8), epoch, 1)
        log.epoch({"test_acc1/cls": 1.0}, epoch, 1)
    log.close()
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert err == ["warning: dashboard pictures stopped (RuntimeError: CUDA out of memory); the run goes on"]
    assert calls == [1]
    assert _scalars(tmp_path / "tensorboard", "test_acc1/cls") == [(0, 1.0), (1000, 1.0), (2000, 1.0)]
    disabled = RunLog(str(tmp_path / "other"), enabled=False)  # a non-main process draws nothing
    disabled.picture("attention/probes", broken, 0, 1)
    assert calls == [1]
