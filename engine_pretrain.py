"""The training loop of self-supervised pretraining (MAE or MoCo v3), as MAE's engine_pretrain.py: one epoch on
explicit values, never the command line. A diverged run raises NonFiniteLoss; main_pretrain.py words it.
"""
import math
import time
from typing import Optional

import numpy as np
import torch
from timm.optim import param_groups_weight_decay
from tqdm import tqdm

from pretrain_models import MoCoV3, momentum_at
from util.lr_sched import WarmupCosine
from util.run_log import RunLog

MASK_STREAM = 0x6D61736B  # "mask": the purpose word of the masks' seeds


class NonFiniteLoss(RuntimeError):
    """The loss became NaN or infinite; the run stops and keeps its last good checkpoint."""


def mask_generator(seed: int, epoch: int, device: str) -> torch.Generator:
    """The generator of MAE's masks in one epoch, seeded from (seed, epoch, rank 0, purpose): its own stream, apart
    from the loader's (seed, epoch, rank) shuffle and augmentation, so a resumed run draws the uninterrupted run's
    masks whatever the number of loader workers (the global RNG serves the transforms when there are none)."""
    state = np.random.SeedSequence([seed, epoch, 0, MASK_STREAM]).generate_state(1, np.uint64)[0]
    return torch.Generator(device=device).manual_seed(int(state))


def build_optimizer(model: torch.nn.Module, *, lr: float, weight_decay: float,
                    betas: tuple) -> torch.optim.AdamW:
    """AdamW over the trained parameters, each group with its "peak_lr" for the schedule. A MaskedAutoencoder
    leaves biases and norms undecayed (MAE); MoCo v3 decays every trained parameter."""
    if isinstance(model, MoCoV3):
        groups = [{"params": [p for p in model.parameters() if p.requires_grad], "weight_decay": weight_decay}]
    else:
        groups = param_groups_weight_decay(model, weight_decay)
    groups = [dict(g, params=[p for p in g["params"] if p.requires_grad], peak_lr=lr) for g in groups]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=lr, betas=betas)


def train_one_epoch(model: torch.nn.Module, loader, optimizer: torch.optim.Optimizer, epoch: int, *,
                    schedule: WarmupCosine, device: str, log: RunLog, moco_m: float = 0.99,
                    mask_generator: Optional[torch.Generator] = None) -> dict:
    """One epoch: the lr set per iteration from `schedule`; a MoCoV3's momentum rises from `moco_m` to 1 over
    the schedule's epochs; a MaskedAutoencoder draws its masks from `mask_generator` (None: the global RNG).
    Returns the epoch's mean train_loss, last lr, img/s and seconds."""
    model.train()
    steps = len(loader)
    total, count, start = 0.0, 0, time.time()
    bar = tqdm(loader, desc=f"epoch {epoch}", dynamic_ncols=True, leave=False, mininterval=1.0)
    for step, (images, _) in enumerate(bar):
        progress = epoch + step / steps
        schedule.apply(optimizer, progress)
        lr = optimizer.param_groups[0]["lr"]
        if isinstance(model, MoCoV3):
            x1, x2 = (x.to(device, non_blocking=True) for x in images)
            loss = model(x1, x2, momentum_at(progress, schedule.epochs, moco_m))
            batch = len(x1)
        else:
            images = images.to(device, non_blocking=True)
            loss = model(images, generator=mask_generator)[0]
            batch = len(images)
        value = loss.item()
        if not math.isfinite(value):
            raise NonFiniteLoss(f"the loss became {value} at epoch {epoch} step {step}")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        total += value * batch
        count += batch
        bar.set_postfix(loss=f"{value:.4f}", lr=f"{lr:.2e}", refresh=False)
        log.step({"train/loss_step": value, "train/lr": lr}, epoch, step, steps)
    seconds = time.time() - start
    return {"train_loss": total / max(count, 1), "lr": lr, "img/s": count / max(seconds, 1e-9), "seconds": seconds}
