"""One frozen forward, many probes: the training and evaluation loops of linear probing.

Every (aggregation, learning rate) pair is one `Probe` inside a `ProbeSet`. Each step the frozen encoder runs
once; every probe trains on the same tokens with its own BatchNorm, LARS state and learning rate. Probes share
no parameters, so the gradient of the summed loss w.r.t. one probe is exactly that probe's own gradient.
"""
import time
import weakref
from contextlib import ExitStack, contextmanager, nullcontext
from dataclasses import dataclass, replace
from typing import Callable, Iterable, Iterator, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.utils import accuracy
from tqdm import tqdm

from heads import (
    HEADS,
    CentreAttention,
    ClsAttentionLowestEntropy,
    ClsAttentionMean,
    ClsToken,
    HeadOptions,
    TokenBatch,
    build_probe,
    centre_indices,
)
from models_vit import capture_attention
from util import dist
from util.amp import autocast
from util.data import HEAD_INIT, ShardSampler, derive_seed
from util.decode import device_images, pad_batch
from util.lars import LARS
from util.lr_sched import WarmupCosine


class NonFiniteLoss(RuntimeError):
    """A probe's loss became NaN or infinite; the run stops and keeps its last good checkpoint."""


class FrozenTokens:
    """Images -> TokenBatch through the frozen encoder, without autograd.

    Attention probabilities are captured only when a head reads them (`need_attention`), so the plain path keeps
    timm's fused attention. `oracle` is a second frozen encoder whose last-block [cls] attention weights patches.
    `need_blocks` n > 0: the same forward also yields the [cls] of the last n blocks up to the probed one and that
    block's mean patch token, each through the encoder's final norm (DINOv2's linear protocol).
    """

    def __init__(self, encoder, *, block=None, need_attention=False, need_blocks=0, oracle=None, device="cpu",
                 amp="none", compile=False):
        self.encoder = encoder
        # Capture hooks would break a compiled graph, so only the hook-free path is compiled.
        self.encode = encoder.forward_tokens
        if compile and not need_attention and not need_blocks:
            self.encode = torch.compile(encoder.forward_tokens)
        self.block = encoder.block_index(block, attention=need_attention)  # ValueError: no such block (or map)
        if oracle is not None and not oracle.has_class_token:
            raise ValueError("the oracle encoder has no [cls] token whose attention could weight the patches")
        if need_blocks and not encoder.has_class_token:
            raise ValueError(f"the [cls] tokens of the last {need_blocks} blocks were asked for but the encoder has "
                             "no [cls]")
        if need_blocks > self.block + 1:
            raise ValueError(f"the last {need_blocks} blocks up to block {self.block} were asked for but the encoder "
                             f"has {self.block + 1} blocks up to it")
        self.need_attention = need_attention
        self.need_blocks = need_blocks
        self.oracle = oracle
        self.device = device
        self.amp = amp

    @torch.inference_mode()
    def _forward(self, images):
        attn = oracle_attn = summary = None
        with autocast(self.device, self.amp):
            if self.need_attention or self.need_blocks:
                with ExitStack() as hooks:
                    if self.need_attention:
                        cap = hooks.enter_context(capture_attention(self.encoder, blocks=[self.block]))
                    if self.need_blocks:
                        first = self.block - self.need_blocks + 1
                        outputs = hooks.enter_context(_block_outputs(self.encoder, range(first, self.block + 1)))
                    tokens = self.encoder.forward_tokens(images, block=self.block)
                if self.need_attention:
                    attn = cap.records[self.block]["attn"]
                if self.need_blocks:
                    summary = self._last_blocks(outputs)
            else:
                tokens = self.encode(images, block=self.block)
            if self.oracle is not None:
                last = self.oracle.depth - 1
                with capture_attention(self.oracle, blocks=[last]) as cap:
                    self.oracle.forward_tokens(images)
                prefix = self.oracle.num_prefix_tokens
                oracle_attn = cap.records[last]["attn"][:, :, 0, prefix:].float().mean(1)
        return tokens, attn, oracle_attn, summary

    def _last_blocks(self, outputs):
        """([B, n, D] [cls] of each block, oldest first; [B, D] mean patch token of the last), after the final norm,
        as dinov2's get_intermediate_layers(norm=True) hands them to its linear probe."""
        norm, last = self.encoder.norm, max(outputs)  # a per-token norm: only the tokens read are normed
        block_cls = torch.stack([norm(outputs[i][:, 0]) for i in sorted(outputs)], 1)
        patch_mean = norm(outputs[last][:, self.encoder.num_prefix_tokens:]).float().mean(1)
        return block_cls.float(), patch_mean

    def __call__(self, images) -> TokenBatch:
        tokens, attn, oracle_attn, summary = self._forward(device_images(images, self.device))
        # Inference-mode tensors cannot enter autograd; one copy per batch lets the heads train on them.
        clone = lambda t: None if t is None else t.clone()
        block_cls, patch_mean = summary or (None, None)
        return TokenBatch(tokens=tokens.clone(), num_prefix=self.encoder.num_prefix_tokens,
                          grid=tuple(self.encoder.grid_size), attn=clone(attn), oracle_attn=clone(oracle_attn),
                          has_cls=bool(self.encoder.has_class_token), block_cls=clone(block_cls),
                          normed_patch_mean=clone(patch_mean))


@contextmanager
def _block_outputs(encoder, indices):
    """Within the block, each forward fills {block index: that block's output} (forward hooks, registered only
    here, so the plain path stays hook-free and compilable)."""
    outputs = {}
    handles = [encoder.blocks[i].register_forward_hook(lambda module, args, out, i=i: outputs.__setitem__(i, out))
               for i in indices]
    try:
        yield outputs
    finally:
        for handle in handles:
            handle.remove()


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

    def state_key(self, name: str) -> str:
        """Prefix of a probe's entries in this module's state_dict()."""
        return f"heads.{self.names.index(name)}."

    def forward(self, batch: TokenBatch) -> dict:
        return {name: head(batch) for name, head in zip(self.names, self.heads)}


def build_probe_set(probes: Sequence, encoder: nn.Module, nb_classes: int, options: HeadOptions,
                    seed: int) -> ProbeSet:
    """One Probe per ProbeSpec; each initialised from the same seed, exactly as if it were trained alone."""
    built = {}
    for spec in probes:
        # a stream of its own: a random-initialised encoder of this seed draws from torch.manual_seed(seed)
        torch.manual_seed(derive_seed(seed, 0, HEAD_INIT))
        built[spec.name] = build_probe(spec.head, encoder.embed_dim, nb_classes, tuple(encoder.grid_size),
                                       encoder.num_prefix_tokens, options, has_cls=encoder.has_class_token)
    return ProbeSet(built)


def build_optimizer(probe_set: ProbeSet, probes: Sequence, kind: str, weight_decay: float) -> torch.optim.Optimizer:
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

    def update(self, logits: dict, targets: torch.Tensor, losses: Optional[dict] = None) -> None:
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

    def result(self, prefix: str) -> dict:
        sums = dist.all_reduce_sum(self.sums.clone())
        out = {}
        for i, name in enumerate(self.names):
            loss, top1, top5, n = sums[i].tolist()
            n = max(n, 1)
            out[name] = {f"{prefix}_loss": loss / n, f"{prefix}_acc1": 100 * top1 / n, f"{prefix}_acc5": 100 * top5 / n}
        return out


def _check_finite(iteration, losses, names, epoch):
    """Each probe's loss of a step averaged over processes, or NonFiniteLoss on every rank at once (a lone rank
    stopping would hang the others); one all-reduce carries both.

    Called one step late, after the next forward is queued, so the GPU never waits for this host sync.
    """
    finite = torch.isfinite(losses)
    summed = dist.all_reduce_sum(torch.cat([(~finite).sum().float().reshape(1), losses.float()]))
    if summed[0].item() != 0:
        bad = [name for name, ok in zip(names, finite.tolist()) if not ok] or ["(on another process)"]
        raise NonFiniteLoss(f"non-finite loss of probe {', '.join(bad)} at epoch {epoch} iteration {iteration}")
    return summed[1:] / dist.world_size()


def train_one_epoch(tokens_fn: Optional[Callable[..., TokenBatch]], probes: nn.Module, loader: Iterable,
                    optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler, epoch: int, *,
                    schedule: WarmupCosine, device: Union[str, torch.device], amp: str = "none",
                    accum_iter: int = 1, on_step: Optional[Callable[..., None]] = None) -> Tuple[dict, float]:
    """One pass over the training set; returns ({probe: {train_loss, train_acc1, train_acc5, lr}}, img/s).

    on_step(iteration, {probe: loss averaged over processes}, {probe: lr}): called for every iteration (one late).

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
            step_losses = _check_finite(*previous[:2], inner.names, epoch)
            mean_loss = step_losses.mean().item()
            if on_step is not None:
                on_step(previous[0], dict(zip(inner.names, step_losses.tolist())), previous[2])
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
        previous = (it, torch.stack([loss.detach() for loss in losses.values()]),
                    {group["probe"]: group["lr"] for group in optimizer.param_groups})
        seen += len(targets)
    if previous is not None:
        step_losses = _check_finite(*previous[:2], inner.names, epoch)
        if on_step is not None:
            on_step(previous[0], dict(zip(inner.names, step_losses.tolist())), previous[2])
    optimizer.zero_grad(set_to_none=True)  # a partial accumulation group is dropped, not carried over
    elapsed = time.perf_counter() - start
    stats = meters.result("train")
    for group in optimizer.param_groups:
        stats[group["probe"]]["lr"] = group["lr"]
    return stats, seen * dist.world_size() / max(elapsed, 1e-9)


@dataclass(frozen=True)
class CacheLayout:
    """What the heads read of one validation image, so the eval cache keeps that and nothing else."""
    tokens: int            # tokens kept: 1 ([cls] only, when every head reads [cls] alone) or all of them
    width: int             # channels per token
    num_prefix: int        # prefix tokens ([cls] and registers)
    has_cls: bool
    grid: Tuple[int, int]
    keys: int              # tokens the attention attends over (all of the encoder's)
    attn_heads: int = 0    # 0: no head reads attention
    attn_rows: Tuple[int, ...] = ()  # query rows of the attention the heads read (the rest is zeros on reuse)
    oracle_patches: int = 0          # 0: no --oracle
    blocks: int = 0                  # DINOv2's heads: [cls] of the last `blocks` blocks and a normed patch mean

    @property
    def every_token(self) -> bool:
        """Every token and nothing else is kept: what k-NN's [cls] and mean-pooled features need."""
        return self.tokens == self.keys and not self.attn_heads and not self.oracle_patches

    def bytes_per_image(self, element_size: int = 4) -> int:
        return element_size * (self.tokens * self.width + self.attn_heads * len(self.attn_rows) * self.keys
                               + self.oracle_patches + (self.blocks + 1) * self.width * bool(self.blocks))

    def describe(self) -> str:
        parts = [f"{self.tokens} token(s) x {self.width} channels"]
        if self.attn_heads:
            parts.append(f"attention {self.attn_heads} heads x {len(self.attn_rows)} of {self.keys} rows x "
                         f"{self.keys}")
        if self.oracle_patches:
            parts.append(f"{self.oracle_patches} oracle weights")
        if self.blocks:
            parts.append(f"[cls] of {self.blocks} block(s) + a patch mean x {self.width} channels")
        return " + ".join(parts)


def cache_layout(probe_set: ProbeSet, encoder: nn.Module, *, block: Optional[int] = None,
                 oracle: Optional[nn.Module] = None) -> CacheLayout:
    """The CacheLayout of `probe_set`'s heads on `encoder`'s tokens (of `block`)."""
    probes = list((probe_set.module if hasattr(probe_set, "module") else probe_set).heads)
    grid, prefix = tuple(encoder.grid_size), encoder.num_prefix_tokens
    keys = prefix + grid[0] * grid[1]
    cls_only = all(type(p.aggregation) is ClsToken for p in probes)
    rows = set()
    readers = [p for p in probes if HEADS[p.head_name].needs_attention]
    for probe in readers:
        agg = probe.aggregation
        if isinstance(agg, CentreAttention):  # the k x k centre patches' rows
            rows.update((prefix + centre_indices(grid, agg.k)).tolist())
        elif isinstance(agg, (ClsAttentionMean, ClsAttentionLowestEntropy)):  # the [cls] row
            rows.add(0)
        else:  # a head this table does not know: keep the whole map
            rows.update(range(keys))
    heads = encoder.blocks[encoder.block_index(block)].attn.num_heads if readers else 0
    return CacheLayout(tokens=1 if cls_only else keys, width=encoder.embed_dim,
                       num_prefix=prefix, has_cls=bool(encoder.has_class_token), grid=grid,
                       keys=keys, attn_heads=heads, attn_rows=tuple(sorted(rows)),
                       oracle_patches=grid[0] * grid[1] if oracle is not None else 0,
                       blocks=max(HEADS[p.head_name].needs_blocks for p in probes))


class TokenCache:
    """Frozen tokens of images that are the same every epoch (the val transform): one encoder pass keeps what the
    heads read of them (CacheLayout), later passes read that instead of running the encoder.

    The validation set (--cache_eval_features): the first evaluation fills it, in loader order; under DDP each
    process keeps its own shard. The training set under --no_augment (--cache_train_features): `fill` runs one
    pass over it before the first epoch, every process then holds the whole set (each epoch shards it anew), and
    `loader` gives each epoch's batches in the train loader's own shuffled order: the heads see exactly the
    batches, and the tokens, an uncached run gives them.

    Kept in host memory, not on the GPU, which the batch's activations need, and in the dtype the encoder gave
    (float32): stored in bf16, a channel whose mean is 300x its spread (MAE's pre-norm tokens) gives pooled
    features correlated only 0.86 with their float32 values across images (measured on synthetic tokens), and
    BatchNorm then normalises that rounding; float16 keeps 0.996 there (benchmarks/bench_loader.py), but cached and
    uncached runs would then train other heads. One buffer per field; on CUDA it is page-locked in place (torch's
    pinned allocator would round each allocation up to a power of two) so copies to the GPU run asynchronously
    (gpu_check.sh times the evaluation from the cache).
    """

    def __init__(self, layout: CacheLayout, images, *, device="cpu"):
        self.layout, self.capacity, self.device = layout, images, torch.device(device)
        self.buffers, self.batch_ends, self.complete = None, [], False

    def _allocate(self, batch, targets):
        layout, n = self.layout, self.capacity
        self.buffers = {"tokens": torch.empty((n, layout.tokens, layout.width), dtype=batch.tokens.dtype),
                        "targets": torch.empty(n, dtype=torch.as_tensor(targets).dtype)}
        if layout.attn_heads:
            self.buffers["attn"] = torch.empty((n, layout.attn_heads, len(layout.attn_rows), layout.keys),
                                               dtype=batch.attn.dtype)
        if layout.oracle_patches:
            self.buffers["oracle"] = torch.empty((n, layout.oracle_patches), dtype=batch.oracle_attn.dtype)
        if layout.blocks:
            self.buffers["block_cls"] = torch.empty((n, layout.blocks, layout.width), dtype=batch.block_cls.dtype)
            self.buffers["patch_mean"] = torch.empty((n, layout.width), dtype=batch.normed_patch_mean.dtype)

    def _page_lock(self):
        if self.device.type == "cuda":
            for name, buffer in self.buffers.items():
                if name != "targets":  # the loader's labels: small, and copied by evaluate() as fresh ones are
                    _page_lock(buffer)

    def _keep(self, batch, targets):
        if self.buffers is None:
            self._allocate(batch, targets)
            self._page_lock()
        start = self.batch_ends[-1] if self.batch_ends else 0
        end = start + len(targets)
        if end > self.capacity:
            raise RuntimeError(f"the token cache holds {self.capacity} images but the loader gave more")
        b = self.buffers
        b["tokens"][start:end].copy_(batch.tokens[:, :self.layout.tokens])
        b["targets"][start:end].copy_(torch.as_tensor(targets))
        if "attn" in b:
            rows = torch.tensor(self.layout.attn_rows, device=batch.attn.device)
            b["attn"][start:end].copy_(batch.attn.index_select(2, rows))
        if "oracle" in b:
            b["oracle"][start:end].copy_(batch.oracle_attn)
        if "block_cls" in b:
            b["block_cls"][start:end].copy_(batch.block_cls)
            b["patch_mean"][start:end].copy_(batch.normed_patch_mean)
        self.batch_ends.append(end)

    def _cached(self, rows):
        """(TokenBatch, targets) of the cached images `rows` (a slice, or dataset indices)."""
        b, layout, device = self.buffers, self.layout, self.device
        move = lambda t: t.to(device, non_blocking=True)
        # Shaped as the encoder's output, zeros where the heads read nothing: a head then sees the same values
        # with the same strides as from the encoder, which keeps its kernels', and so its results', last bits.
        tokens = move(b["tokens"][rows])
        n = len(tokens)
        if layout.tokens < layout.keys:
            kept, tokens = tokens, tokens.new_zeros((n, layout.keys, layout.width))
            tokens[:, :layout.tokens] = kept
        attn = None
        if "attn" in b:
            kept = move(b["attn"][rows])
            attn = kept.new_zeros((n, layout.attn_heads, layout.keys, layout.keys))
            attn[:, :, list(layout.attn_rows)] = kept
        cached = lambda name: move(b[name][rows]) if name in b else None
        return TokenBatch(tokens=tokens, num_prefix=layout.num_prefix, grid=layout.grid, attn=attn,
                          oracle_attn=cached("oracle"), has_cls=layout.has_cls, block_cls=cached("block_cls"),
                          normed_patch_mean=cached("patch_mean")), b["targets"][rows]

    def batches(self, tokens_fn: Optional[Callable[..., TokenBatch]], loader: Iterable) -> Iterator[tuple]:
        """(TokenBatch, targets) pairs: from the cache when complete, else from the encoder (filling the cache)."""
        if self.complete:
            starts = [0] + self.batch_ends[:-1]
            for start, end in zip(starts, self.batch_ends):
                yield self._cached(slice(start, end))
            return
        self.batch_ends = []  # an evaluation cut short starts over
        for images, targets in loader:
            batch = tokens_fn(images)
            self._keep(batch, targets)
            yield batch, targets
        self.complete = True

    def fill(self, tokens_fn: Callable[..., TokenBatch], loader: Iterable, batch_size: int) -> None:
        """One encoder pass over `loader`: this process's ShardSampler shard of the training set, in order (its
        whole set without DDP); then every process holds every image's rows, in dataset order.

        Every image is encoded in a batch of `batch_size`, the size training encodes it in: a shorter last batch
        is padded with copies of its last image, whose tokens are dropped. A matrix product can round a row in
        another way at another batch size (measured on the CPU: 7e-7 on ViT-Ti tokens, batch 3 vs 4), while at
        one size a row does not depend on the others; so the cached tokens are the uncached ones bit for bit."""
        self.capacity, self.batch_ends = len(loader.sampler), []
        for images, targets in loader:
            n = len(targets)
            batch = tokens_fn(pad_batch(images, batch_size))
            self._keep(replace(batch, tokens=batch.tokens[:n], attn=_first(batch.attn, n),
                               oracle_attn=_first(batch.oracle_attn, n), block_cls=_first(batch.block_cls, n),
                               normed_patch_mean=_first(batch.normed_patch_mean, n)), targets)
        self.complete = True
        if self.batch_ends[-1] != self.capacity:
            raise RuntimeError(f"the token cache expected {self.capacity} images but the loader gave "
                               f"{self.batch_ends[-1]}")
        self.buffers = {name: dist.gather_shards(buffer) for name, buffer in self.buffers.items()}
        self.capacity = len(self.buffers["targets"])
        if dist.world_size() > 1:
            self._page_lock()

    def shard_batches(self, batch_size: int) -> Iterator[tuple]:
        """(TokenBatch, targets) of this process's ShardSampler shard of a filled cache, in order: what a train=False
        loader over the set gives k-NN, without reading an image."""
        rows = list(ShardSampler(range(self.capacity), dist.world_size(), dist.rank()))
        for start in range(0, len(rows), batch_size):
            yield self._cached(torch.tensor(rows[start:start + batch_size]))

    def loader(self, train_loader: Iterable) -> "CachedLoader":
        """`train_loader`'s batches, read from the filled cache (see CachedLoader)."""
        if not self.complete:
            raise RuntimeError("fill the token cache before reading batches from it")
        return CachedLoader(self, train_loader)


class CachedLoader:
    """A train loader's epochs from a TokenCache: its sampler's order (set_epoch reshuffles it as for the loader),
    its batch size and drop_last, without reading an image. Yields (TokenBatch, targets): train with a tokens_fn
    that passes the TokenBatch on (`cached_tokens`)."""

    def __init__(self, cache, loader):
        self.cache, self.loader = cache, loader

    def set_epoch(self, epoch: int) -> None:
        self.loader.set_epoch(epoch)

    def __len__(self):
        return len(self.loader)

    def __iter__(self):
        order, size = list(self.loader.sampler), self.loader.batch_size
        for i in range(len(self)):
            yield self.cache._cached(torch.tensor(order[i * size:(i + 1) * size]))


def _first(tensor, n):
    return None if tensor is None else tensor[:n]


def cached_tokens(batch: TokenBatch) -> TokenBatch:
    """The tokens_fn of a CachedLoader's batches: they are TokenBatches already."""
    return batch


def tokens_or_cached(tokens_fn: Callable[..., TokenBatch]) -> Callable[..., TokenBatch]:
    """A tokens_fn for batches that are images (encoded by `tokens_fn`) or cached TokenBatches (passed on)."""
    return lambda images: images if isinstance(images, TokenBatch) else tokens_fn(images)


def _page_lock(tensor):
    """Page-lock a host tensor's memory in place for fast, asynchronous copies to the GPU (left pageable, with a
    note, if the driver refuses); unlocked when the tensor is freed."""
    cudart, size = torch.cuda.cudart(), tensor.numel() * tensor.element_size()
    if size == 0:
        return
    if cudart.cudaHostRegister(tensor.data_ptr(), size, 0) != cudart.cudaError.success:
        if dist.is_main():
            print("note: the eval cache could not be page-locked; it stays in pageable host memory", flush=True)
        return
    weakref.finalize(tensor, cudart.cudaHostUnregister, tensor.data_ptr())


def _fresh_batches(tokens_fn, loader):
    for images, targets in loader:
        yield tokens_fn(images), targets


@torch.no_grad()
def evaluate(tokens_fn: Optional[Callable[..., TokenBatch]], probes: nn.Module, loader: Iterable, *,
             device: Union[str, torch.device], amp: str = "none", cache: Optional[TokenCache] = None) -> dict:
    """Top-1/top-5 accuracy and loss of every probe on `loader` (tokens from `cache` when one is given).

    Under DDP each process sees its own shard (no padding duplicates); the sums are added over processes.
    """
    probes.eval()
    inner = probes.module if hasattr(probes, "module") else probes
    meters = ProbeMeters(inner.names, device)
    batches = cache.batches(tokens_fn, loader) if cache is not None else _fresh_batches(tokens_fn, loader)
    for batch, targets in tqdm(batches, total=len(loader), desc="eval", disable=not dist.is_main(),
                               dynamic_ncols=True, leave=False, mininterval=1.0):
        targets = targets.to(device, non_blocking=True)
        with autocast(device, amp):
            logits = inner(batch)
        meters.update(logits, targets)
    return meters.result("test")
