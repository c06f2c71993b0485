"""engine_linprobe + main_linprobe's building blocks, in process on a tiny random ViT (CPU fp32).

Expectations are independent of the code under test: a probe trained inside a ProbeSet is compared with the
same probe trained alone; an accumulated step with hand-computed SGD; accuracies with hand-counted hits.
"""
import math

import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import TensorDataset

import engine_linprobe as engine
import main_linprobe
import models_vit
from config import resolve_linprobe
from heads import HEADS, HeadOptions, TokenBatch, build_probe
from models_vit import build_encoder
from util.data import build_loader

NUM_CLASSES = 10
NO_SCALING = torch.amp.GradScaler("cpu", enabled=False)  # fp32: the loop's scaler passes gradients through


@pytest.fixture(scope="module")
def encoder():
    torch.manual_seed(0)
    return build_encoder("vit_tiny_patch16", input_size=32, embed_dim=32, depth=2, num_heads=2, verbose=False)


@pytest.fixture(scope="module")
def dataset():
    g = torch.Generator().manual_seed(1)
    images = torch.randn(48, 3, 32, 32, generator=g)
    targets = torch.randint(0, NUM_CLASSES, (48,), generator=g)
    return TensorDataset(images, targets)


def make_config(*flags):
    """The resolved configuration main_linprobe.py would run with these flags."""
    args = main_linprobe.get_args_parser().parse_args(["--device", "cpu", "--num_workers", "0", *flags])
    return resolve_linprobe(args)


def build(config, encoder):
    probe_set = engine.build_probe_set(config.probes, encoder, NUM_CLASSES, config.head_options, config.seed)
    return probe_set, engine.build_optimizer(probe_set, config.probes, config.optimizer, config.weight_decay)


def one_epoch(config, tokens_fn, probe_set, loader, optimizer, epoch=0):
    return engine.train_one_epoch(tokens_fn, probe_set, loader, optimizer, NO_SCALING, epoch,
                                  schedule=config.schedule, device="cpu", accum_iter=config.accum_iter)


def get_probe(probe_set, name):
    """The probe called `name` (the name shown in logs and results)."""
    return probe_set[name] if hasattr(type(probe_set), "__getitem__") else probe_set.probes[name]


def probe_state(probe_set, name):
    return {k: v.detach().clone() for k, v in get_probe(probe_set, name).state_dict().items()}


def train(config, encoder, dataset):
    tokens_fn = engine.FrozenTokens(encoder, device="cpu")
    probe_set, optimizer = build(config, encoder)
    loader = build_loader(dataset, config.batch_size, train=True, seed=config.seed)
    for epoch in range(config.epochs):
        loader.set_epoch(epoch)
        one_epoch(config, tokens_fn, probe_set, loader, optimizer, epoch)
    return probe_set


def test_every_probe_of_a_grid_trains_exactly_as_alone(encoder, dataset):
    # 0.03 and 0.3 next to 0.1: lr0 * (lr / lr0) != lr in the last bit for them, so a shared schedule scaled
    # per group would not be exact (measured: 0.0 max abs diff once each group schedules its own lr).
    heads, blrs = ["cls", "pos", "abmilp"], ["0.1", "0.03", "0.3"]
    common = ["--batch_size", "16", "--epochs", "2", "--warmup_epochs", "1", "--optimizer", "lars"]
    grid = train(make_config(*common, "--cls_features", ",".join(heads), "--blr", ",".join(blrs)), encoder, dataset)
    assert sorted(grid.names) == sorted(f"{h}_blr{b}" for h in heads for b in blrs)
    for head in heads:
        for blr in blrs:
            alone = train(make_config(*common, "--cls_features", head, "--blr", blr), encoder, dataset)
            assert alone.names == [head]  # a single probe keeps the plain head name
            together, expected = probe_state(grid, f"{head}_blr{blr}"), probe_state(alone, head)
            assert together.keys() == expected.keys()
            for key in expected:
                diff = (together[key].double() - expected[key].double()).abs().max().item()
                assert torch.equal(together[key], expected[key]), f"{head}_blr{blr} {key}: max abs diff {diff}"
            # the probe actually moved, so this is not the equality of two untouched initialisations
            init, _ = build(make_config(*common, "--cls_features", head, "--blr", blr), encoder)
            assert not torch.equal(probe_state(init, head)["classifier.weight"], expected["classifier.weight"])


def test_every_learned_and_dinov2_head_trains_side_by_side_from_one_forward_per_batch(dataset):
    torch.manual_seed(0)
    enc = build_encoder("vit_tiny_patch16", input_size=32, embed_dim=32, depth=4, num_heads=2, verbose=False)
    heads = [h for h, spec in HEADS.items() if spec.learned or spec.needs_blocks]
    config = make_config("--model", "vit_tiny_patch16", "--cls_features", ",".join(heads), "--blr", "1",
                         "--batch_size", "16", "--epochs", "1", "--warmup_epochs", "0", "--esimpool_heads", "4")
    assert config.needs_blocks == 4
    forwards = []
    enc.patch_embed.register_forward_hook(lambda *args: forwards.append(1))
    tokens_fn = engine.FrozenTokens(enc, need_blocks=config.needs_blocks)
    probe_set, optimizer = build(config, enc)
    before = {name: probe_state(probe_set, name) for name in probe_set.names}
    loader = build_loader(dataset, 16, train=True, seed=0)
    loader.set_epoch(0)
    stats, _ = one_epoch(config, tokens_fn, probe_set, loader, optimizer)
    assert len(forwards) == len(loader)  # one encoder forward per batch feeds every head
    assert sorted(probe_set.names) == sorted(f"{h}_blr1" for h in heads)
    for head in heads:
        name = f"{head}_blr1"
        after = probe_state(probe_set, name)
        assert math.isfinite(stats[name]["train_loss"]), name
        moved = [key for key in after if not torch.equal(after[key], before[name][key])]
        assert "classifier.weight" in moved, name
        if HEADS[head].learned:  # the pooler trained too, not only the classifier on top of it
            assert any(key.startswith("aggregation.") and "running" not in key for key in moved), name


def test_min_lr_applies_to_every_probe_of_a_sweep_as_if_alone(encoder, dataset):
    # The cosine ends at --min_lr for every probe, as each would when trained alone (not at min_lr * lr / lr0).
    common = ["--batch_size", "16", "--epochs", "2", "--warmup_epochs", "1", "--min_lr", "0.001",
              "--cls_features", "pos"]
    grid = train(make_config(*common, "--blr", "0.1,1"), encoder, dataset)
    alone = train(make_config(*common, "--blr", "1"), encoder, dataset)
    together, expected = probe_state(grid, "pos_blr1"), probe_state(alone, "pos")
    for key in expected:
        diff = (together[key].double() - expected[key].double()).abs().max().item()
        assert torch.equal(together[key], expected[key]), f"pos_blr1 {key}: max abs diff {diff}"


def test_accum_iter_steps_every_second_iteration_with_the_mean_gradient(encoder):
    # 5 batches, accum 2: steps after iterations 1 and 3; the last, partial group is dropped (the paper's code).
    g = torch.Generator().manual_seed(2)
    data = TensorDataset(torch.randn(40, 3, 32, 32, generator=g), torch.randint(0, NUM_CLASSES, (40,), generator=g))
    config = make_config("--cls_features", "pos", "--optimizer", "sgd", "--batch_size", "8", "--accum_iter", "2",
                         "--blr", "0.1", "--epochs", "1", "--warmup_epochs", "0")
    peak = 0.1 * 8 * 2 / 256
    assert [p.lr for p in config.probes] == [pytest.approx(peak)]
    tokens_fn = engine.FrozenTokens(encoder, device="cpu")
    probe_set, optimizer = build(config, encoder)
    start = probe_state(probe_set, "pos")
    loader = build_loader(data, 8, train=True, seed=0)
    loader.set_epoch(0)
    batches = list(loader)
    assert len(batches) == 5

    seen_by_step = []
    real_step = optimizer.step

    def counting_step(*a, **k):
        seen_by_step.append([p.grad.clone() for p in probe_set.parameters() if p.grad is not None])
        return real_step(*a, **k)

    optimizer.step = counting_step
    loader.set_epoch(0)
    one_epoch(config, tokens_fn, probe_set, loader, optimizer)
    assert len(seen_by_step) == 2
    assert all(p.grad is None for p in probe_set.parameters())  # the partial group's gradients are not carried

    # Hand computation of the first step: SGD(momentum 0.9) starts with buf = grad, so w1 = w0 - lr * grad,
    # grad = mean of the two micro-batches' gradients, each micro-batch normalised by its own BatchNorm stats.
    reference = build_probe("pos", encoder.embed_dim, NUM_CLASSES, tuple(encoder.grid_size),
                            encoder.num_prefix_tokens, HeadOptions())
    reference.load_state_dict(start)
    reference.train()
    for images, targets in batches[:2]:
        with torch.no_grad():
            tokens = encoder.forward_tokens(images)
        batch = TokenBatch(tokens=tokens, num_prefix=encoder.num_prefix_tokens, grid=tuple(encoder.grid_size))
        (F.cross_entropy(reference(batch), targets) / 2).backward()
    expected_grads = [p.grad for p in reference.parameters() if p.grad is not None]
    assert len(expected_grads) == len(seen_by_step[0])
    for got, want in zip(seen_by_step[0], expected_grads):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)
    # lr is set at iterations 0, 2, 4 only: the last value is the cosine schedule at epoch 4/5 (no warmup).
    lr = peak * 0.5 * (1 + math.cos(math.pi * 4 / 5))
    assert optimizer.param_groups[0]["lr"] == pytest.approx(lr)


def test_23_iterations_with_accum_2_make_11_optimizer_steps(encoder):
    data = TensorDataset(torch.randn(46, 3, 32, 32), torch.randint(0, NUM_CLASSES, (46,)))
    config = make_config("--cls_features", "pos", "--batch_size", "2", "--accum_iter", "2", "--epochs", "1",
                         "--warmup_epochs", "0")
    probe_set, optimizer = build(config, encoder)
    steps = []
    real_step = optimizer.step
    optimizer.step = lambda *a, **k: (steps.append(1), real_step(*a, **k))[1]
    loader = build_loader(data, 2, train=True, seed=0)
    loader.set_epoch(0)
    assert len(loader) == 23
    one_epoch(config, engine.FrozenTokens(encoder, device="cpu"), probe_set, loader, optimizer)
    assert len(steps) == 11


def test_lr_warmup_value_after_an_epoch(encoder, dataset):
    # 48 images / 16 = 3 iterations; lr is set at iteration 2 last: lr * (2/3) / warmup_epochs.
    config = make_config("--cls_features", "cls", "--blr", "0.1", "--batch_size", "16", "--epochs", "20",
                         "--warmup_epochs", "10")
    assert config.probes[0].lr == pytest.approx(0.1 * 16 / 256)
    tokens_fn = engine.FrozenTokens(encoder, device="cpu")
    probe_set, optimizer = build(config, encoder)
    loader = build_loader(dataset, 16, train=True, seed=0)
    loader.set_epoch(0)
    stats, imgs_per_s = one_epoch(config, tokens_fn, probe_set, loader, optimizer)
    assert stats["cls"]["lr"] == pytest.approx(0.1 * 16 / 256 * (2 / 3) / 10)
    assert set(stats["cls"]) >= {"train_loss", "train_acc1", "train_acc5", "lr"}
    assert imgs_per_s > 0


def test_probe_meters_count_hits_by_hand():
    meters = engine.ProbeMeters(["a", "b"], "cpu")
    targets = torch.tensor([0, 1, 2, 3])
    logits_a = torch.eye(6)[[0, 1, 0, 0]] * 5.0  # right, right, wrong, wrong
    # b: target always 6th-ranked for sample 0 (top-5 miss), otherwise right
    logits_b = torch.tensor([[0., 5, 4, 3, 2, 1], [0, 9, 0, 0, 0, 0], [0, 0, 9, 0, 0, 0], [0, 0, 0, 9, 0, 0]])
    meters.update({"a": logits_a, "b": logits_b}, targets)
    meters.update({"a": logits_a[:2], "b": logits_b[:2]}, targets[:2])  # second batch: a 2/2, b 1/2
    out = meters.result("test")
    assert out["a"]["test_acc1"] == pytest.approx(100 * 4 / 6)
    assert out["b"]["test_acc1"] == pytest.approx(100 * 4 / 6)
    # (a's top-5 is left out: its wrong rows tie five classes at 0.) b's sample 0 is its only top-5 miss.
    assert out["b"]["test_acc5"] == pytest.approx(100 * 4 / 6)
    loss_a = (4 * F.cross_entropy(logits_a, targets) + 2 * F.cross_entropy(logits_a[:2], targets[:2])) / 6
    assert out["a"]["test_loss"] == pytest.approx(loss_a.item(), rel=1e-6)


def test_frozen_tokens_match_the_encoder_and_feed_autograd(encoder):
    images = torch.randn(3, 3, 32, 32)
    plain = engine.FrozenTokens(encoder, device="cpu")(images)
    with torch.no_grad():
        want = encoder.forward_tokens(images)
    torch.testing.assert_close(plain.tokens, want)
    assert plain.attn is None and plain.num_prefix == 1 and plain.grid == (2, 2)
    with_attn = engine.FrozenTokens(encoder, device="cpu", need_attention=True)(images)
    torch.testing.assert_close(with_attn.tokens, want)
    assert with_attn.attn.shape == (3, 2, 5, 5)
    torch.testing.assert_close(with_attn.attn.sum(-1), torch.ones(3, 2, 5))
    probe = build_probe("abmilp", 32, NUM_CLASSES, (2, 2), 1, HeadOptions())
    F.cross_entropy(probe(plain), torch.tensor([0, 1, 2])).backward()  # inference tensors would raise here
    assert all(p.grad is not None for p in probe.parameters() if p.requires_grad)


def test_evaluate_matches_hand_counted_accuracy(encoder, dataset):
    probe_set, _ = build(make_config("--cls_features", "cls,pos", "--blr", "1", "--batch_size", "16"), encoder)
    with torch.no_grad():  # make the two probes differ and predict something non-trivial
        for i, name in enumerate(probe_set.names):
            for p in get_probe(probe_set, name).parameters():
                p.normal_(0, 1, generator=torch.Generator().manual_seed(10 + i))
    loader = build_loader(dataset, 16, train=False)
    stats = engine.evaluate(engine.FrozenTokens(encoder, device="cpu"), probe_set, loader, device="cpu")
    images, targets = dataset.tensors
    with torch.no_grad():
        tokens = encoder.forward_tokens(images)
    batch = TokenBatch(tokens=tokens, num_prefix=1, grid=(2, 2))
    for name in probe_set.names:
        probe = get_probe(probe_set, name).eval()
        with torch.no_grad():
            logits = probe(batch)
        acc1 = 100 * (logits.argmax(1) == targets).double().mean().item()
        assert stats[name]["test_acc1"] == pytest.approx(acc1)
        assert stats[name]["test_loss"] == pytest.approx(F.cross_entropy(logits, targets).item(), rel=1e-5)


def test_non_finite_loss_names_the_probe(encoder, dataset):
    config = make_config("--cls_features", "cls,pos", "--blr", "1", "--batch_size", "16", "--epochs", "1")
    probe_set, optimizer = build(config, encoder)
    with torch.no_grad():
        for p in get_probe(probe_set, "pos_blr1").parameters():
            p.fill_(float("nan"))
    loader = build_loader(dataset, 16, train=True)
    loader.set_epoch(0)
    with pytest.raises(engine.NonFiniteLoss, match="pos_blr1"):
        one_epoch(config, engine.FrozenTokens(encoder, device="cpu"), probe_set, loader, optimizer)


class CountingTokens:
    """FrozenTokens that counts how many batches went through the encoder."""

    def __init__(self, encoder):
        self.inner, self.calls = engine.FrozenTokens(encoder, device="cpu"), 0

    def __call__(self, images):
        self.calls += 1
        return self.inner(images)


def test_cached_eval_tokens_equal_fresh_ones_and_skip_the_encoder(encoder, dataset):
    probe_set, _ = build(make_config("--cls_features", "cls,abmilp", "--blr", "1", "--batch_size", "16"), encoder)
    loader = build_loader(dataset, 16, train=False)
    fresh = engine.evaluate(engine.FrozenTokens(encoder, device="cpu"), probe_set, loader, device="cpu")
    layout = engine.cache_layout(probe_set, encoder)
    tokens_fn, cache = CountingTokens(encoder), engine.TokenCache(layout, len(dataset))
    first = engine.evaluate(tokens_fn, probe_set, loader, device="cpu", cache=cache)
    assert tokens_fn.calls == len(loader)
    second = engine.evaluate(tokens_fn, probe_set, loader, device="cpu", cache=cache)
    assert tokens_fn.calls == len(loader)  # the second evaluation ran no encoder forward
    assert first == fresh and second == fresh


@pytest.mark.parametrize("heads", ["cls,abmilp", "cls"])
def test_train_cache_gives_the_heads_an_uncached_run_gives(encoder, heads):
    # --no_augment: one encoder pass fills the cache, then every epoch reads its own shuffled batches from it.
    # 45 images in batches of 16 with drop_last: each epoch leaves out other images, so the cache holds them all.
    # "cls" alone keeps one token of the 5 (the rest zeros on reuse); abmilp reads every token.
    g = torch.Generator().manual_seed(3)
    data = TensorDataset(torch.randn(45, 3, 32, 32, generator=g), torch.randint(0, NUM_CLASSES, (45,), generator=g))
    config = make_config("--cls_features", heads, "--blr", "1,3", "--batch_size", "16", "--epochs", "3",
                         "--warmup_epochs", "1", "--no_augment", "--cache_train_features", "1")
    uncached = train(config, encoder, data)
    tokens_fn = CountingTokens(encoder)
    probe_set, optimizer = build(config, encoder)
    cache = engine.TokenCache(engine.cache_layout(probe_set, encoder), len(data))
    cache.fill(tokens_fn, build_loader(data, 16, train=False), 16)
    assert tokens_fn.calls == 3 and cache.capacity == 45
    loader = cache.loader(build_loader(data, 16, train=True, seed=config.seed))
    assert len(loader) == 2
    for epoch in range(config.epochs):
        loader.set_epoch(epoch)
        one_epoch(config, engine.cached_tokens, probe_set, loader, optimizer, epoch)
    assert tokens_fn.calls == 3  # the epochs ran no encoder forward
    if cache.layout.every_token:  # k-NN's features from the cache, without an encoder pass
        from util.knn import extract_features
        fresh = extract_features(engine.FrozenTokens(encoder, device="cpu"), build_loader(data, 16, train=False))
        cached_features = extract_features(engine.tokens_or_cached(tokens_fn), cache.shard_batches(16))
        assert tokens_fn.calls == 3
        assert all(torch.equal(fresh[0][k], cached_features[0][k]) for k in fresh[0])
        assert torch.equal(fresh[1], cached_features[1])
    for name in uncached.names:
        expected, cached = probe_state(uncached, name), probe_state(probe_set, name)
        assert all(torch.equal(cached[key], expected[key]) for key in expected), name
    init, _ = build(config, encoder)
    assert not torch.equal(probe_state(init, uncached.names[0])["classifier.weight"],
                           probe_state(uncached, uncached.names[0])["classifier.weight"])


def test_eval_cache_of_cls_heads_keeps_only_cls(encoder, dataset):
    # [cls]-only heads read one token of the 5: the cache holds 1/5 of the tokens and evaluates the same.
    probe_set, _ = build(make_config("--cls_features", "cls", "--blr", "1,3", "--batch_size", "16"), encoder)
    layout = engine.cache_layout(probe_set, encoder)
    assert (layout.tokens, layout.attn_heads) == (1, 0)
    assert layout.bytes_per_image() == 32 * 4  # one float32 token of width 32
    loader = build_loader(dataset, 16, train=False)
    fresh = engine.evaluate(engine.FrozenTokens(encoder, device="cpu"), probe_set, loader, device="cpu")
    cache = engine.TokenCache(layout, len(dataset))
    engine.evaluate(engine.FrozenTokens(encoder, device="cpu"), probe_set, loader, device="cpu", cache=cache)
    assert cache.buffers["tokens"].shape == (48, 1, 32) and "attn" not in cache.buffers
    assert engine.evaluate(None, probe_set, loader, device="cpu", cache=cache) == fresh
    # one head that reads patches: every token is kept
    probe_set, _ = build(make_config("--cls_features", "cls,pos", "--batch_size", "16"), encoder)
    assert engine.cache_layout(probe_set, encoder).tokens == 5


def test_eval_cache_layout_of_vit_b16_on_imagenet():
    # What README states: ViT-B/16 at 224 px has 197 tokens of 768 channels; ca4 reads the 16 centre patches'
    # rows and attn-mn the [cls] row of 12 heads x 197 keys; float32 throughout.
    encoder = build_encoder("vit_base_patch16", verbose=False)
    config = make_config("--model", "vit_base_patch16", "--cls_features", "pos,ca4,attn-mn")
    probe_set = engine.build_probe_set(config.probes, encoder, 1000, config.head_options, 0)
    layout = engine.cache_layout(probe_set, encoder)
    assert layout.attn_rows == (0, *sorted(1 + 14 * r + c for r in range(5, 9) for c in range(5, 9)))
    assert layout.bytes_per_image() == 4 * (197 * 768 + 12 * 17 * 197)
    probe_set = engine.build_probe_set(make_config("--model", "vit_base_patch16").probes, encoder, 1000,
                                       HeadOptions(), 0)
    assert engine.cache_layout(probe_set, encoder).bytes_per_image() == 4 * 768  # --cls_features cls


@pytest.mark.parametrize("family", ["registers", "registers, no [cls]"])
def test_eval_cache_keeps_every_attention_row_the_heads_read(family):
    # Every attention-reading head gives the same output when the rows the cache drops are zero; a cache that
    # dropped a row a head reads (e.g. without the prefix offset) would change it.
    name, arch, size = FAMILIES[family]
    torch.manual_seed(0)
    enc = build_encoder(name, input_size=size, verbose=False, **arch)
    batch = engine.FrozenTokens(enc, need_attention=True)(torch.randn(3, 3, size, size))
    readers = [h for h, spec in HEADS.items() if spec.needs_attention and (enc.has_class_token or not spec.needs_cls)]
    assert len(readers) >= 4
    for head in readers:
        probe_set = engine.ProbeSet({head: build_probe(head, 32, 3, enc.grid_size, enc.num_prefix_tokens,
                                                       has_cls=enc.has_class_token)}).eval()
        layout = engine.cache_layout(probe_set, enc)
        assert 0 < len(layout.attn_rows) <= 16 < layout.keys
        cache = engine.TokenCache(layout, 3)
        list(cache.batches(lambda images: batch, [(None, torch.arange(3))]))
        (cached, _), = cache.batches(None, None)
        kept = torch.zeros_like(batch.attn)
        kept[:, :, list(layout.attn_rows)] = batch.attn[:, :, list(layout.attn_rows)]
        assert torch.equal(cached.attn, kept)
        torch.testing.assert_close(probe_set(cached)[head], probe_set(batch)[head], rtol=0, atol=0)


def test_eval_cache_keeps_mae_scale_tokens_exactly():
    # MAE's pre-norm tokens: a channel whose mean is 300x its spread. The cache must not round them (bf16 keeps
    # ~2 of the spread's bits there), so cached and fresh evaluations agree exactly.
    gen = torch.Generator().manual_seed(0)
    tokens = 300 + torch.randn(48, 5, 32, generator=gen)
    targets = torch.randint(0, NUM_CLASSES, (48,), generator=gen)
    loader = [(torch.arange(i, i + 16), targets[i:i + 16]) for i in range(0, 48, 16)]
    tokens_fn = lambda idx: TokenBatch(tokens=tokens[idx], num_prefix=1, grid=(2, 2), has_cls=True)
    torch.manual_seed(0)
    probe_set = engine.ProbeSet({h: build_probe(h, 32, NUM_CLASSES, (2, 2), 1) for h in ("pos", "cls")})
    probe_set.train()
    with torch.no_grad():
        probe_set(tokens_fn(torch.arange(48)))  # BatchNorm statistics of these features
    fresh = engine.evaluate(tokens_fn, probe_set, loader, device="cpu")
    cache = engine.TokenCache(engine.cache_layout(probe_set, SimpleEncoder()), 48)
    engine.evaluate(tokens_fn, probe_set, loader, device="cpu", cache=cache)
    assert torch.equal(cache.buffers["tokens"], tokens)
    assert engine.evaluate(None, probe_set, loader, device="cpu", cache=cache) == fresh


class SimpleEncoder:
    """What cache_layout reads of an encoder: a 2x2 grid behind one [cls], width 32."""
    grid_size, num_prefix_tokens, embed_dim, has_class_token = (2, 2), 1, 32, True


# timm architectures of each family, tiny, at an input size that gives a 4x4 patch grid (room for cp4/ca4)
FAMILIES = {
    "registers": ("vit_small_patch14_reg4_dinov2", dict(embed_dim=32, depth=2, num_heads=2), 56),
    "relative position bias": ("beitv2_base_patch16_224", dict(patch_size=8, embed_dim=32, depth=2, num_heads=2), 32),
    "registers, no [cls]": ("vit_medium_patch16_reg4_gap_256", dict(patch_size=8, embed_dim=32, depth=2,
                                                                    num_heads=2), 32),
}


@pytest.mark.parametrize("family", FAMILIES)
def test_every_head_runs_on_every_family(family):
    name, arch, size = FAMILIES[family]
    torch.manual_seed(0)
    enc = build_encoder(name, input_size=size, verbose=False, **arch)
    oracle = build_encoder("vit_tiny_patch16", input_size=size, patch_size=size // 4, embed_dim=32, depth=2,
                           num_heads=2, verbose=False)
    images = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(2))
    blocks = 2 if enc.has_class_token else 0  # the [cls] of the last blocks exist with a [cls] only
    batch = engine.FrozenTokens(enc, need_attention=True, need_blocks=blocks, oracle=oracle)(images)
    tokens = enc.num_prefix_tokens + 16
    assert batch.tokens.shape == (2, tokens, 32) and batch.attn.shape == (2, 2, tokens, tokens)
    assert batch.num_prefix == enc.num_prefix_tokens and batch.patches.shape == (2, 16, 32)
    options = HeadOptions(esimpool_heads=4)  # the default 12 does not divide the width 32
    for head, spec in HEADS.items():
        if spec.needs_cls and not enc.has_class_token:
            with pytest.raises(ValueError, match="\\[cls\\]"):
                build_probe(head, 32, 3, enc.grid_size, enc.num_prefix_tokens, options, has_cls=False)
            continue
        probe = build_probe(head, 32, 3, enc.grid_size, enc.num_prefix_tokens, options,
                            has_cls=enc.has_class_token).eval()
        if spec.needs_blocks > enc.depth:
            with pytest.raises(ValueError, match="last 4 blocks but the TokenBatch carries 2"):
                probe(batch)
            continue
        logits = probe(batch)
        assert logits.shape == (2, 3) and torch.isfinite(logits).all(), head
        if probe.attention_map is not None:
            assert probe.attention_map.shape[-1] == 16, head  # weights over the patches, never the registers


def test_without_attention_heads_the_forward_stays_fused(monkeypatch):
    name, arch, size = FAMILIES["relative position bias"]
    enc = build_encoder(name, input_size=size, verbose=False, **arch)
    images = torch.randn(2, 3, size, size)

    def no_capture(*args, **kwargs):
        raise AssertionError("attention probabilities were recomputed")
    monkeypatch.setattr(models_vit, "attention_probabilities", no_capture)
    assert engine.FrozenTokens(enc).__call__(images).attn is None
    with pytest.raises(AssertionError, match="recomputed"):  # the attention-reading path does recompute them
        engine.FrozenTokens(enc, need_attention=True)(images)


def test_dinov2_block_tokens_are_timms_own_intermediates_from_one_forward():
    torch.manual_seed(0)
    enc = build_encoder("vit_small_patch14_reg4_dinov2", input_size=28, patch_size=7, embed_dim=32, depth=5,
                        num_heads=2, verbose=False)  # registers: DINOv2's patch mean leaves them out
    with torch.no_grad():  # a final norm with its own affine, so a missing or a second norm shows
        enc.norm.weight.normal_(1, 0.5)
        enc.norm.bias.normal_(0, 0.5)
    images = torch.randn(3, 3, 28, 28, generator=torch.Generator().manual_seed(1))
    forwards = []
    enc.patch_embed.register_forward_hook(lambda *args: forwards.append(1))
    batch = engine.FrozenTokens(enc, need_blocks=4, amp="bfloat16")(images)
    assert len(forwards) == 1  # the blocks' tokens come from the forward that made batch.tokens
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        # timm's own path: get_intermediate_layers(n=4, norm=True), as dinov2's linear protocol reads them
        layers = enc.forward_intermediates(images, indices=4, norm=True, return_prefix_tokens=True,
                                           output_fmt="NLC", intermediates_only=True)
    torch.testing.assert_close(batch.block_cls, torch.stack([prefix[:, 0] for _, prefix in layers], 1).float())
    torch.testing.assert_close(batch.normed_patch_mean, layers[-1][0].float().mean(1))
    assert batch.block_cls.dtype == batch.normed_patch_mean.dtype == torch.float32
    # an earlier probed block: the four blocks up to it
    early = engine.FrozenTokens(enc, block=3, need_blocks=4)(images)
    with torch.no_grad():
        layers = enc.forward_intermediates(images, indices=[0, 1, 2, 3], norm=True, return_prefix_tokens=True,
                                           output_fmt="NLC", intermediates_only=True)
    torch.testing.assert_close(early.block_cls, torch.stack([prefix[:, 0] for _, prefix in layers], 1))
    torch.testing.assert_close(early.normed_patch_mean, layers[-1][0].mean(1))
    assert engine.FrozenTokens(enc).__call__(images).block_cls is None  # only filled when a head reads it


def test_frozen_tokens_refuse_more_blocks_than_the_encoder_has_or_no_cls(encoder):
    with pytest.raises(ValueError, match="last 4 blocks up to block 1 were asked for but the encoder has 2"):
        engine.FrozenTokens(encoder, need_blocks=4)
    with pytest.raises(ValueError, match="last 2 blocks up to block 0"):
        engine.FrozenTokens(encoder, block=0, need_blocks=2)
    name, arch, size = FAMILIES["registers, no [cls]"]
    with pytest.raises(ValueError, match="no \\[cls\\]"):
        engine.FrozenTokens(build_encoder(name, input_size=size, verbose=False, **arch), need_blocks=1)


def test_frozen_tokens_refuse_blocks_outside_the_encoder(encoder):
    assert engine.FrozenTokens(encoder, block=-2).block == 0
    for block in (2, -3):
        with pytest.raises(ValueError, match=f"block {block} does not exist in a 2-block encoder"):
            engine.FrozenTokens(encoder, block=block)
