"""Where results go: log.txt (one JSON object per line), TensorBoard, and wandb when asked for."""
import json
import os
import sys


def wandb_requested(asked: bool) -> bool:
    return bool(asked or os.environ.get("WANDB_PROJECT"))


class RunLog:
    """Writes the same scalars to log.txt, TensorBoard and (optionally) wandb; only on the main process.

    settings: the run's configuration for wandb (nested dicts are flattened to dotted keys)."""

    def __init__(self, output_dir, *, settings=None, wandb=False, run_name=None, enabled=True, tensorboard=True):
        self.output_dir = output_dir
        self.enabled = enabled
        self.tb = None
        self.wandb = None
        if not enabled:
            return
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter
            self.tb = SummaryWriter(log_dir=os.path.join(output_dir, "tensorboard"))
        if wandb_requested(wandb):
            self.wandb = _start_wandb(output_dir, run_name, settings or {})

    def scalars(self, values: dict, step: int):
        """Logs flat {tag: number} to TensorBoard and wandb."""
        if self.tb is not None:
            for tag, value in values.items():
                self.tb.add_scalar(tag, value, step)
        if self.wandb is not None:
            self.wandb.log(values, step=step)

    def line(self, record: dict):
        """Appends one JSON object to log.txt."""
        if not self.enabled:
            return
        with open(os.path.join(self.output_dir, "log.txt"), "a") as f:
            f.write(json.dumps(record) + "\n")

    def image(self, tag, png_path, step=0):
        if self.wandb is not None:
            import wandb
            self.wandb.log({tag: wandb.Image(png_path)}, step=step)

    def close(self):
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()


def _flatten(settings, prefix=""):
    flat = {}
    for key, value in settings.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        elif isinstance(value, (int, float, str, bool, type(None))):
            flat[f"{prefix}{key}"] = value
        else:
            flat[f"{prefix}{key}"] = str(value)
    return flat


def _start_wandb(output_dir, run_name, settings):
    try:
        import wandb
        # An explicit name keeps wandb from asking the server for a generated run name.
        return wandb.init(
            project=os.environ.get("WANDB_PROJECT", "beyond-cls"),
            name=run_name or os.path.basename(os.path.abspath(output_dir)),
            dir=output_dir,
            config=_flatten(settings),
        )
    except Exception as err:  # wandb is optional: a dashboard failure must never stop a run
        print(f"warning: wandb disabled ({type(err).__name__}: {err}); set WANDB_MODE=offline to log locally",
              file=sys.stderr)
        return None
