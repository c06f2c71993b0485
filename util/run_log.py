"""Where results go: log.txt (one JSON object per line), TensorBoard, and wandb when asked for.

Two time axes, as MAE's logs: per iteration (`step`) and per epoch (`epoch`).
- TensorBoard: MAE's epoch_1000x axis, int((iteration / iterations per epoch + epoch) * 1000) for iterations and
  1000 * epoch for an epoch's values. Every run opens its writer with purge_step = 1000 * its first epoch, so
  TensorBoard's reader drops whatever a killed run wrote from that point on: no step appears twice.
- wandb: the global iteration (epoch * iterations per epoch + iteration) as wandb's step, with `epoch` (fractional)
  the x axis of iteration values and `epoch_index` that of epoch values (wandb.define_metric). wandb cannot take
  back a row, so its rows are held until `commit()`, which an entry point calls after the epoch's checkpoint:
  a run killed mid-epoch sent nothing of that epoch, and its resume sends it once. One run per experiment: its id
  is kept in OUTPUT_DIR/dashboard.json and a resumed run continues it (wandb.init(id=..., resume="allow")).

Only the main process logs (enabled=False elsewhere). A backend that fails (wandb not logged in, a full disk) is
one warning line on stderr, and the run goes on without that backend.
"""
import io
import json
import os
import secrets
import string
import sys

DASHBOARD_STATE = "dashboard.json"  # the wandb run id and the last wandb step sent


def wandb_requested(asked: bool) -> bool:
    return bool(asked or os.environ.get("WANDB_PROJECT"))


def epoch_1000x(epoch, iteration=0, iterations=1):
    """MAE's TensorBoard x axis: 1000 per epoch (engine_finetune.py / engine_pretrain.py)."""
    return int((iteration / max(iterations, 1) + epoch) * 1000)


class RunLog:
    """Writes the same values to log.txt, TensorBoard and (optionally) wandb; only on the main process.

    settings: the resolved configuration (config.py to_dict); info: facts of the run beside it (classes, data
    sizes, the encoder's fingerprint...). Both become wandb's config (nested dicts as dotted keys, lists as lists)
    and TensorBoard text. resumed: continue the wandb run and TensorBoard steps of OUTPUT_DIR from `start_epoch`
    on (False: a new wandb run). dashboard: a config.DashboardSpec (project, entity, group, tags)."""

    def __init__(self, output_dir, *, settings=None, info=None, wandb=False, run_name=None, enabled=True,
                 tensorboard=True, job_type=None, dashboard=None, resumed=False, start_epoch=0):
        self.output_dir = output_dir
        self.enabled = enabled
        self.tb = None
        self.wandb = None
        self._pending = {}  # wandb step -> row, sent by commit()
        self._defined = set()
        self._last_step = -1
        self._no_pictures = False
        if not enabled:
            return
        config = _plain({**(settings or {}), **({"run": info} if info else {}), "versions": _versions()})
        if tensorboard:
            self._guard("tensorboard", self._start_tensorboard, start_epoch, config)
        if wandb_requested(wandb):
            self.wandb = _start_wandb(self, output_dir, run_name, config, job_type, dashboard, resumed)

    def _start_tensorboard(self, start_epoch, config):
        from torch.utils.tensorboard import SummaryWriter
        # Events of an earlier process at or after this run's first step (a killed attempt) are hidden by
        # TensorBoard's reader; a fresh run (start 0) thus hides all of them (e.g. an epoch 0 killed before its log
        # line, which leaves no log.txt for util.run_state.set_aside_old_log to set aside with its events).
        self.tb = SummaryWriter(log_dir=os.path.join(self.output_dir, "tensorboard"),
                                purge_step=epoch_1000x(start_epoch))
        self.tb.add_text("config", _markdown_json(config), 0)

    def layout(self, groups: dict):
        """TensorBoard's Custom Scalars page: one chart per head ({head: [probe names]}), one line per probe (lr)
        of it, for the per-iteration loss and lr and the per-epoch accuracy. wandb draws one panel per key."""
        if self.tb is None:
            return
        import re

        def charts(prefix):
            return {f"{prefix}{head}": ["Multiline", [f"^{prefix}({'|'.join(map(re.escape, names))})$"]]
                    for head, names in groups.items()}
        self._guard("tensorboard", self.tb.add_custom_scalars,
                    {"train loss per iteration": charts("train/loss/"), "lr per iteration": charts("train/lr/"),
                     "val acc1 per epoch": charts("test_acc1/")})

    # ---------------------------------------------------------------------------------------------- values

    def scalars(self, values: dict, step: int):
        """Logs flat {tag: number} at `step` to TensorBoard and wandb at once (values with no epoch axis)."""
        if self.tb is not None:
            self._guard("tensorboard", lambda: [self.tb.add_scalar(t, v, step) for t, v in values.items()])
        if self.wandb is not None:
            self._guard("wandb", self.wandb.log, dict(values), step=step)
            self._last_step = max(self._last_step, step)

    def step(self, values: dict, epoch: int, iteration: int, iterations: int):
        """Per-iteration values (losses, lrs): TensorBoard now, wandb at commit()."""
        if self.tb is not None:
            x = epoch_1000x(epoch, iteration, iterations)
            self._guard("tensorboard", lambda: [self.tb.add_scalar(t, v, x) for t, v in values.items()])
        if self.wandb is not None:
            row = self._row(epoch * iterations + iteration, values, "epoch")
            row["epoch"] = epoch + iteration / max(iterations, 1)

    def epoch(self, values: dict, epoch: int, iterations: int):
        """An epoch's values (evaluation, means, img/s): TensorBoard at 1000 * epoch, wandb in the row of the epoch's
        last iteration, plotted against epoch_index."""
        if self.tb is not None:
            x = epoch_1000x(epoch)
            self._guard("tensorboard", lambda: [self.tb.add_scalar(t, v, x) for t, v in values.items()])
        if self.wandb is not None:
            row = self._row((epoch + 1) * max(iterations, 1) - 1, values, "epoch_index")
            row["epoch_index"] = epoch

    def _row(self, step, values, axis):
        for key in values:
            if key not in self._defined:
                self._guard("wandb", self.wandb.define_metric, key, step_metric=axis)
                self._defined.add(key)
        row = self._pending.setdefault(step, {})
        row.update(values)
        return row

    def commit(self):
        """Sends the held wandb rows in step order and flushes TensorBoard (call after the epoch's checkpoint is
        saved). Rows at or before the last step sent (a resume with fewer iterations per epoch) are dropped: wandb's
        steps only rise."""
        if self.tb is not None:  # a kill loses at most the epoch in progress (the writer flushes every 2 minutes)
            self._guard("tensorboard", self.tb.flush)
        if self.wandb is None or not self._pending:
            return
        rows, self._pending = sorted(self._pending.items()), {}
        for step, row in rows:
            if step > self._last_step:
                self._guard("wandb", self.wandb.log, row, step=step)
                self._last_step = step
        if self.wandb is not None:
            self._guard("wandb", _write_state, self.output_dir, {"wandb_id": self.wandb.id,
                                                                 "wandb_step": self._last_step})

    def line(self, record: dict):
        """Appends one JSON object to log.txt."""
        if not self.enabled:
            return
        with open(os.path.join(self.output_dir, "log.txt"), "a") as f:
            f.write(json.dumps(record) + "\n")

    # ------------------------------------------------------------------------------------ summary, tables, images

    def summary(self, values: dict):
        """Run-level results (best acc1 and its epoch per probe): wandb's run summary and a TensorBoard text."""
        if self.wandb is not None:
            self._guard("wandb", self.wandb.summary.update, dict(values))
        if self.tb is not None:
            self._guard("tensorboard", self.tb.add_text, "summary", _markdown_json(values), 0)

    def table(self, tag: str, rows: list, step: int = 0):
        """A list of dicts (one per row, the same keys): a wandb Table and a Markdown table as TensorBoard text."""
        if not rows:
            return
        columns = list(dict.fromkeys(key for row in rows for key in row))
        if self.wandb is not None:
            def log_table():
                import wandb
                data = [[_cell(row.get(c)) for c in columns] for row in rows]
                self.wandb.log({tag: wandb.Table(columns=columns, data=data)}, step=max(step, self._last_step))
            self._guard("wandb", log_table)
        if self.tb is not None:
            lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
            lines += ["| " + " | ".join(str(_cell(row.get(c))) for c in columns) + " |" for row in rows]
            self._guard("tensorboard", self.tb.add_text, tag, "\n".join(lines), step)

    def image(self, tag, picture, step=0):
        """A PNG file, a PNG's bytes or an HxWx3 uint8 array: TensorBoard add_image and a wandb Image. wandb's copy
        is sent at once when there is no epoch axis, else with the step's rows at commit()."""
        if self.tb is None and self.wandb is None:
            return
        import numpy as np
        from PIL import Image

        if isinstance(picture, (str, os.PathLike)):
            array = np.asarray(Image.open(picture).convert("RGB"))
        elif isinstance(picture, bytes):
            array = np.asarray(Image.open(io.BytesIO(picture)).convert("RGB"))
        else:
            array = np.asarray(picture)
        if self.tb is not None:
            self._guard("tensorboard", self.tb.add_image, tag, array, step, dataformats="HWC")
        if self.wandb is not None:
            import wandb
            self._guard("wandb", self.wandb.log, {tag: wandb.Image(array)}, step=max(step, self._last_step))

    def epoch_image(self, tag, array, epoch, iterations):
        """An epoch's picture (attention maps, reconstructions): TensorBoard at 1000 * epoch, wandb at commit()."""
        if self.tb is not None:
            self._guard("tensorboard", self.tb.add_image, tag, array, epoch_1000x(epoch), dataformats="HWC")
        if self.wandb is not None:
            def held():
                import wandb
                row = self._pending.setdefault((epoch + 1) * max(iterations, 1) - 1, {})
                row[tag] = wandb.Image(array)
                row["epoch_index"] = epoch
            self._guard("wandb", held)

    def picture(self, tag, draw, epoch, iterations):
        """epoch_image(tag, draw(), ...): drawn only when a backend is on; a drawing that fails is one warning and
        no more pictures, never a lost run."""
        if self._no_pictures or (self.tb is None and self.wandb is None):
            return
        try:
            picture = draw()
        except Exception as err:
            print(f"warning: dashboard pictures stopped ({type(err).__name__}: {err}); the run goes on",
                  file=sys.stderr, flush=True)
            self._no_pictures = True
            return
        if picture is not None:
            self.epoch_image(tag, picture, epoch, iterations)

    def close(self):
        self.commit()
        if self.tb is not None:
            self._guard("tensorboard", self.tb.close)
        if self.wandb is not None:
            self._guard("wandb", self.wandb.finish)

    # ---------------------------------------------------------------------------------------------- failures

    def _guard(self, backend, call, *args, **kwargs):
        """call(*args, **kwargs); a failure turns the backend off with one warning line (never a lost run)."""
        try:
            return call(*args, **kwargs)
        except Exception as err:
            print(f"warning: {backend} logging stopped ({type(err).__name__}: {err}); the run goes on, "
                  "log.txt and the checkpoints are kept", file=sys.stderr, flush=True)
            if backend == "tensorboard":
                tb, self.tb = self.tb, None
                _close_quietly(tb)
            else:
                self.wandb = None
            return None


def _close_quietly(writer):
    if writer is None:
        return
    try:
        writer.close()
    except Exception:  # the writer failed already; its warning was printed
        pass


def _cell(value):
    return value if isinstance(value, (int, float, str, bool)) or value is None else json.dumps(value)


def _markdown_json(values):
    """JSON as TensorBoard's text plugin shows it: a Markdown code block (indented four spaces)."""
    return "\n".join("    " + line for line in json.dumps(values, indent=1, default=str).splitlines())


def _plain(value):
    """JSON-like data: tuples become lists, other objects their str (wandb's config and TensorBoard text)."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, (int, float, str, bool, type(None))):
        return value
    return str(value)


def _flatten(settings, prefix=""):
    """Nested dicts as dotted keys (wandb's config panel filters on them); lists stay lists."""
    flat = {}
    for key, value in settings.items():
        if isinstance(value, dict) and value:
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _versions():
    import timm
    import torch
    return {"python": sys.version.split()[0], "torch": torch.__version__, "timm": timm.__version__}


def read_state(output_dir):
    """OUTPUT_DIR/dashboard.json ({} when absent or unreadable)."""
    try:
        with open(os.path.join(output_dir, DASHBOARD_STATE)) as f:
            state = json.load(f)
        return state if isinstance(state, dict) else {}
    except (OSError, ValueError):
        return {}


def _write_state(output_dir, state):
    path = os.path.join(output_dir, DASHBOARD_STATE)
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        json.dump(state, f)
    os.replace(tmp, path)


def _new_run_id():
    """wandb's form of a run id: 8 characters of [a-z0-9]."""
    return "".join(secrets.choice(string.ascii_lowercase + string.digits) for _ in range(8))


def _start_wandb(log, output_dir, run_name, config, job_type, dashboard, resumed):
    try:
        import wandb
        state = read_state(output_dir) if resumed else {}
        run_id = state.get("wandb_id") or _new_run_id()
        log._last_step = int(state.get("wandb_step", -1)) if state.get("wandb_id") else -1
        name = run_name or os.path.basename(os.path.abspath(output_dir))
        project = getattr(dashboard, "project", None) or os.environ.get("WANDB_PROJECT", "beyond-cls")
        # An explicit name keeps wandb from asking the server for a generated run name.
        run = wandb.init(project=project, entity=getattr(dashboard, "entity", None),
                         group=getattr(dashboard, "group", None) or name, tags=list(getattr(dashboard, "tags", ())),
                         job_type=job_type, name=name, id=run_id, resume="allow", dir=output_dir,
                         config=_flatten(config))
        run.define_metric("epoch")
        run.define_metric("epoch_index")
        _write_state(output_dir, {"wandb_id": run.id, "wandb_step": log._last_step})
        return run
    except Exception as err:  # wandb is optional: a dashboard failure must never stop a run
        print(f"warning: wandb disabled ({type(err).__name__}: {err}); set WANDB_MODE=offline to log locally",
              file=sys.stderr)
        return None
