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
