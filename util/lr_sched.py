"""Learning-rate rules of MAE's linear probing: lr = blr * effective batch / 256, per-iteration linear warmup,
then a half-cosine to min_lr."""
import math
from dataclasses import dataclass


def scaled_lr(blr, batch_size, accum_iter=1, world_size=1):
    """Absolute lr from the base lr: blr * effective batch size / 256."""
    return blr * batch_size * accum_iter * world_size / 256


@dataclass(frozen=True)
class WarmupCosine:
    """lr at a fractional epoch (epoch + step / steps_per_epoch) for a given peak lr.

    min_lr is absolute and shared: every probe of a sweep ends at min_lr, as it would if trained alone.
    """
    epochs: int
    warmup_epochs: float
    min_lr: float = 0.0

    def lr(self, epoch: float, peak_lr: float) -> float:
        if epoch < self.warmup_epochs:
            return peak_lr * epoch / self.warmup_epochs
        cosine_epochs = self.epochs - self.warmup_epochs
        progress = min(1.0, (epoch - self.warmup_epochs) / cosine_epochs) if cosine_epochs > 0 else 1.0
        return self.min_lr + (peak_lr - self.min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))

    def apply(self, optimizer, epoch: float) -> None:
        """Set every param group's lr from its own "peak_lr": probes with different lrs share one optimizer, each
        scheduled exactly as if it were trained alone."""
        for group in optimizer.param_groups:
            group["lr"] = self.lr(epoch, group["peak_lr"])
