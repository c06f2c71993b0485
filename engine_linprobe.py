"""One frozen forward, many probes: the training and evaluation loops of linear probing.

Every (aggregation, learning rate) pair is one `Probe` inside a `ProbeSet`. Each step the frozen encoder runs
once; every probe trains on the same tokens with its own BatchNorm, LARS state and learning rate. Probes share
no parameters, so the gradient of the summed loss w.r.t. one probe is exactly that probe's own gradient.
"""
import time
from contextlib import nullcontext

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.utils import accuracy
from tqdm import tqdm

from heads import HeadOptions, TokenBatch, build_probe
from models_vit import capture_attention
from util import dist
from util.amp import autocast
from util.lars import LARS


class NonFiniteLoss(RuntimeError):
    """A probe's loss became NaN or infinite; the run stops and keeps its last good checkpoint."""


class FrozenTokens:
    """Images -> TokenBatch through the frozen encoder, without autograd.

    Attention probabilities are captured only when a head reads them (`need_attention`), so the plain path keeps
    timm's fused attention. `oracle` is a second frozen encoder whose last-block [cls] attention weights patches.
    """

    def __init__(self, encoder, *, block=None, need_attention=False, oracle=None, device="cpu", amp="none",
                 compile=False):
        self.encoder = encoder
        # Capture hooks would break a compiled graph, so only the hook-free path is compiled.
        self.encode = encoder.forward_tokens
        if compile and not need_attention:
            self.encode = torch.compile(encoder.forward_tokens)
        self.block = encoder.block_index(block, attention=need_attention)  # ValueError: no such block (or map)
        if oracle is not None and not oracle.has_class_token:
            raise ValueError("the oracle encoder has no [cls] token whose attention could weight the patches")
        self.need_attention = need_attention
        self.oracle = oracle
        self.device = device
        self.amp = amp

    @torch.inference_mode()
    def _forward(self, images):
        attn = oracle_attn = None
        with autocast(self.device, self.amp):
            if self.need_attention:
                with capture_attention(self.encoder, blocks=[self.block]) as cap:
                    tokens = self.encoder.forward_tokens(images, block=self.block)
                attn = cap.records[self.block]["attn"]
            else:
                tokens = self.encode(images, block=self.block)
            if self.oracle is not None:
                last = self.oracle.depth - 1
                with capture_attention(self.oracle, blocks=[last]) as cap:
                    self.oracle.forward_tokens(images)
                prefix = self.oracle.num_prefix_tokens
                oracle_attn = cap.records[last]["attn"][:, :, 0, prefix:].float().mean(1)
        return tokens, attn, oracle_attn

    def __call__(self, images) -> TokenBatch:
        tokens, attn, oracle_attn = self._forward(images.to(self.device, non_blocking=True))
        # Inference-mode tensors cannot enter autograd; one copy per batch lets the heads train on them.
        clone = lambda t: None if t is None else t.clone()
        return TokenBatch(tokens=tokens.clone(), num_prefix=self.encoder.num_prefix_tokens,
                          grid=tuple(self.encoder.grid_size), attn=clone(attn), oracle_attn=clone(oracle_attn),
                          has_cls=bool(self.encoder.has_class_token))


class ProbeSet(nn.Module):
    """Named probes trained side by side; forward returns {name: logits}.

    A list, not a ModuleDict: names such as 'cls_blr0.1' hold dots, which module names may not.
    """

    def __init__(self, probes: dict):
        super().__init__()
        self.names = list(probes)
        self.heads = nn.ModuleList(probes.values())

    @property
    def probes(self) -> dict:
        return dict(zip(self.names, self.heads))

    def state_key(self, name):
        """Prefix of a probe's entries in this module's state_dict()."""
        return f"heads.{self.names.index(name)}."

    def forward(self, batch: TokenBatch):
        return {name: head(batch) for name, head in zip(self.names, self.heads)}


def build_probe_set(probes, encoder, nb_classes, options: HeadOptions, seed):
    """One Probe per ProbeSpec; each initialised from the same seed, exactly as if it were trained alone."""
    built = {}
    for spec in probes:
        torch.manual_seed(seed)
        built[spec.name] = build_probe(spec.head, encoder.embed_dim, nb_classes, tuple(encoder.grid_size),
                                       encoder.num_prefix_tokens, options, has_cls=encoder.has_class_token)
    return ProbeSet(built)


def build_optimizer(probe_set, probes, kind, weight_decay):
    """One optimizer over every probe: a param group per probe, carrying that probe's own peak lr."""
    groups = [{"params": [p for p in probe_set.probes[spec.name].parameters() if p.requires_grad],
               "peak_lr": spec.lr, "probe": spec.name, "weight_decay": weight_decay} for spec in probes]
    if kind == "lars":
        return LARS(groups, lr=probes[0].lr, weight_decay=weight_decay)
    if kind == "sgd":
        return torch.optim.SGD(groups, lr=probes[0].lr, momentum=0.9, weight_decay=weight_decay)
    raise ValueError(f"unknown optimizer {kind!r}; choose lars or sgd")


class ProbeMeters:
    """Running sums of loss and top-k hits per probe, summed over processes at the end of an epoch."""

    def __init__(self, names, device):
        self.names = list(names)
        self.sums = torch.zeros(len(self.names), 4, dtype=torch.float64, device=device)  # loss, top1, top5, n

    def update(self, logits: dict, targets, losses: dict = None):
        # Stays on the device: one host sync per epoch, not one per probe per step.
        n = targets.shape[0]
        rows = []
        for name in self.names:
            out = logits[name].float()
            acc1, acc5 = accuracy(out, targets, topk=(1, min(5, out.shape[1])))
            loss = losses[name].detach() if losses is not None else F.cross_entropy(out, targets)
            # timm returns percentages; rounding back to hit counts keeps epoch accuracies exact
            hits1, hits5 = (acc1 * n / 100).round(), (acc5 * n / 100).round()
            rows.append(torch.stack([loss * n, hits1, hits5, torch.ones_like(loss) * n]))
        self.sums += torch.stack(rows).double()

    def result(self, prefix):
        sums = dist.all_reduce_sum(self.sums.clone())
        out = {}
        for i, name in enumerate(self.names):
            loss, top1, top5, n = sums[i].tolist()
            n = max(n, 1)
            out[name] = {f"{prefix}_loss": loss / n, f"{prefix}_acc1": 100 * top1 / n, f"{prefix}_acc5": 100 * top5 / n}
        return out


def _check_finite(iteration, losses, names, epoch):
    """Mean loss of a step, or NonFiniteLoss on every rank at once (a lone rank stopping would hang the others).

    Called one step late, after the next forward is queued, so the GPU never waits for this host sync.
    """
    finite = torch.isfinite(losses)
    all_finite = dist.all_reduce_sum((~finite).sum().float().reshape(1)).item() == 0
    if not all_finite:
        bad = [name for name, ok in zip(names, finite.tolist()) if not ok] or ["(on another process)"]
        raise NonFiniteLoss(f"non-finite loss of probe {', '.join(bad)} at epoch {epoch} iteration {iteration}")
    return losses.mean().item()


def train_one_epoch(tokens_fn, probes, loader, optimizer, scaler, epoch, *, schedule, device, amp="none",
                    accum_iter=1):
    """One pass over the training set; returns ({probe: {train_loss, train_acc1, train_acc5, lr}}, img/s).

    scaler: a torch.amp.GradScaler, enabled for float16 autocast only.

    The lr follows `schedule` (a WarmupCosine), set before each accumulation group. The optimizer steps after
    every `accum_iter` micro-batches; a last, partial group is dropped as in the paper's (and MAE's) code: its
    gradients are cleared at the start of the next epoch without a step.
    """
    probes.train()
    inner = probes.module if hasattr(probes, "module") else probes
    meters = ProbeMeters(inner.names, device)
    optimizer.zero_grad(set_to_none=True)
    start, seen = time.perf_counter(), 0
    bar = tqdm(loader, desc=f"epoch {epoch}", disable=not dist.is_main(), dynamic_ncols=True,
               unit="batch", mininterval=1.0)
    previous = None  # (iteration, per-probe losses) of the last step, checked once the next forward is queued
    for it, (images, targets) in enumerate(bar):
        if it % accum_iter == 0:
            schedule.apply(optimizer, epoch + it / len(loader))
        targets = targets.to(device, non_blocking=True)
        batch = tokens_fn(images)
        if previous is not None:
            mean_loss = _check_finite(*previous, inner.names, epoch)
            if dist.is_main():
                imgs = seen * dist.world_size() / max(time.perf_counter() - start, 1e-9)
                bar.set_postfix(loss=f"{mean_loss:.4f}", lr=f"{optimizer.param_groups[0]['lr']:.3g}",
                                img_s=f"{imgs:.0f}", refresh=False)
        step_now = (it + 1) % accum_iter == 0
        # DDP all-reduces gradients only on the micro-batch that steps.
        sync = nullcontext() if step_now or not hasattr(probes, "no_sync") else probes.no_sync()
        with sync:
            with autocast(device, amp):
                logits = probes(batch)
            losses = {name: F.cross_entropy(out.float(), targets) for name, out in logits.items()}
            total = sum(losses.values()) / accum_iter
            scaler.scale(total).backward()  # a GradScaler(enabled=False) passes everything through unscaled
        if step_now:
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
        meters.update(logits, targets, losses)
        previous = (it, torch.stack([loss.detach() for loss in losses.values()]))
        seen += images.shape[0]
    if previous is not None:
        _check_finite(*previous, inner.names, epoch)
    optimizer.zero_grad(set_to_none=True)  # a partial accumulation group is dropped, not carried over
    elapsed = time.perf_counter() - start
    stats = meters.result("train")
    for group in optimizer.param_groups:
        stats[group["probe"]]["lr"] = group["lr"]
    return stats, seen * dist.world_size() / max(elapsed, 1e-9)


class EvalTokenCache:
    """Validation tokens are deterministic: the first evaluation keeps them (up to `budget_gib`), later ones reuse.

    If the tokens outgrow the budget, caching stops with a warning and every evaluation runs the encoder.
    """

    def __init__(self, budget_gib):
        self.budget = budget_gib * 2 ** 30
        self.items, self.size, self.complete, self.overflow = [], 0, False, False

    def add(self, batch: TokenBatch, targets):
        if self.overflow:
            return
        tensors = [t for t in (batch.tokens, batch.attn, batch.oracle_attn) if t is not None]
        self.size += sum(t.numel() * t.element_size() for t in tensors)
        if self.size > self.budget:
            self.items, self.overflow = [], True
            if dist.is_main():
                print(f"note: validation tokens exceed --cache_eval_features {self.budget / 2 ** 30:g} GiB; "
                      "not caching them", flush=True)
            return
        self.items.append((batch, targets))

    def batches(self, tokens_fn, loader):
        """(TokenBatch, targets) pairs: from the cache when complete, else from the encoder (filling the cache)."""
        if self.complete:
            yield from self.items
            return
        for images, targets in loader:
            batch = tokens_fn(images)
            self.add(batch, targets)
            yield batch, targets
        self.complete = not self.overflow


def _fresh_batches(tokens_fn, loader):
    for images, targets in loader:
        yield tokens_fn(images), targets


@torch.no_grad()
def evaluate(tokens_fn, probes, loader, *, device, amp="none", desc="eval", cache=None):
    """Top-1/top-5 accuracy and loss of every probe on `loader` (tokens from `cache` when one is given).

    Under --dist_eval each process sees its own shard (no padding duplicates); the sums are added over processes.
    """
    probes.eval()
    inner = probes.module if hasattr(probes, "module") else probes
    meters = ProbeMeters(inner.names, device)
    batches = cache.batches(tokens_fn, loader) if cache is not None else _fresh_batches(tokens_fn, loader)
    for batch, targets in tqdm(batches, total=len(loader), desc=desc, disable=not dist.is_main(),
                               dynamic_ncols=True, leave=False, mininterval=1.0):
        targets = targets.to(device, non_blocking=True)
        with autocast(device, amp):
            logits = inner(batch)
        meters.update(logits, targets)
    return meters.result("test")
