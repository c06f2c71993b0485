"""Heads: one-batch overfit, non-learned weights vs independent loops, attention maps, errors, the README rows."""
import argparse
import math

import numpy as np
import pytest
import torch
import torch.nn as nn

from heads import HEADS, HeadOptions, Probe, TokenBatch, build_probe, resolve_head

GRID = (3, 4)  # non-square on purpose
N = GRID[0] * GRID[1]
HEADS_OF_ATTN = 3


def one_hot_batch(batch_size=2, num_prefix=1, dim=16, seed=0):
    """Patch n is the one-hot vector e_n, so a weighted sum of patches *is* the weight vector (first N dims)."""
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.zeros(batch_size, num_prefix + N, dim)
    tokens[:, :num_prefix] = torch.randn(batch_size, num_prefix, dim, generator=gen)
    tokens[:, num_prefix:, :N] = torch.eye(N)
    t = num_prefix + N
    attn = torch.randn(batch_size, HEADS_OF_ATTN, t, t, generator=gen).mul(2).softmax(-1)
    oracle = torch.rand(batch_size, N, generator=gen)
    return TokenBatch(tokens, num_prefix, GRID, attn=attn, oracle_attn=oracle)


def aggregate(name, batch, **options):
    probe = build_probe(name, batch.tokens.shape[-1], 4, batch.grid, batch.num_prefix, HeadOptions(**options))
    out = probe.aggregation(batch)
    return out[:, :N].detach().numpy().astype(np.float64), probe


# ---- independent expectations (plain loops over numpy arrays) ----

def centre_cells(grid, k):
    """Hand-derived: the k x k block whose top-left corner is floor((size - k) / 2) on each axis."""
    h, w = grid
    return [(r, c) for r in range(h) for c in range(w)
            if (h - k) // 2 <= r < (h - k) // 2 + k and (w - k) // 2 <= c < (w - k) // 2 + k]


def loop_centre_attention(attn, prefix, grid, k):
    b_, heads = attn.shape[:2]
    cells = centre_cells(grid, k)
    out = np.zeros((b_, N))
    for b in range(b_):
        for n in range(N):
            total = 0.0
            for (r, c) in cells:
                for h in range(heads):
                    total += attn[b, h, prefix + r * grid[1] + c, prefix + n]
            out[b, n] = total
        out[b] /= out[b].sum()
    return out


def loop_cls_attention(attn, prefix, lowest_entropy):
    out = np.zeros((attn.shape[0], N))
    for b in range(attn.shape[0]):
        raw = [np.array([attn[b, h, 0, prefix + n] for n in range(N)]) for h in range(attn.shape[1])]
        if lowest_entropy:
            maps = [row / row.sum() for row in raw]
            entropies = [-sum(p * math.log(p) for p in m) for m in maps]
            out[b] = maps[int(np.argmin(entropies))]
        else:
            mean = sum(raw) / len(raw)
            out[b] = mean / mean.sum()
    return out


def test_centre_crop_cells_match_the_papers_indices_on_14x14():
    # The paper's code: c = 14 // 2, rows/cols c - ceil(k/2) .. c + floor(k/2) (exclusive).
    for k in range(1, 5):
        start, stop = 7 - math.ceil(k / 2), 7 + math.floor(k / 2)
        paper = [(r, c) for r in range(start, stop) for c in range(start, stop)]
        assert centre_cells((14, 14), k) == paper
    assert centre_cells((5, 7), 1) == [(2, 3)]  # the true centre on an odd grid


@pytest.mark.parametrize("k", [1, 2, 3])
def test_cp_weights(k):
    batch = one_hot_batch()
    got, probe = aggregate(f"cp{k}", batch)
    expected = np.zeros(N)
    for (r, c) in centre_cells(GRID, k):
        expected[r * GRID[1] + c] = 1 / k ** 2
    np.testing.assert_allclose(got, np.stack([expected] * 2), atol=1e-6)
    np.testing.assert_allclose(probe.attention_map.numpy(), got, atol=1e-6)


@pytest.mark.parametrize("k,prefix", [(1, 1), (2, 1), (3, 1), (2, 0)])
def test_ca_weights(k, prefix):
    batch = one_hot_batch(num_prefix=prefix)
    got, probe = aggregate(f"ca{k}", batch)
    np.testing.assert_allclose(got, loop_centre_attention(batch.attn.numpy(), prefix, GRID, k), atol=1e-5)
    assert probe.attention_map.shape == (2, N)


@pytest.mark.parametrize("prefix", [1, 2])
def test_attn_mn_and_lcte_weights(prefix):
    batch = one_hot_batch(num_prefix=prefix)
    attn = batch.attn.numpy().astype(np.float64)
    got, _ = aggregate("attn-mn", batch)
    np.testing.assert_allclose(got, loop_cls_attention(attn, prefix, lowest_entropy=False), atol=1e-5)
    got, _ = aggregate("attn-lcte", batch)
    np.testing.assert_allclose(got, loop_cls_attention(attn, prefix, lowest_entropy=True), atol=1e-5)


def test_attn_lcte_picks_the_sharpest_head_per_sample():
    batch = one_hot_batch()
    batch.attn[0, 2, 0] = torch.tensor([0.1] + [0.9 / N] * N)   # sample 0: head 2 is flat ...
    batch.attn[0, 1, 0] = torch.tensor([0.5] + [0.5 / N] * N)
    batch.attn[0, 0, 0] = torch.tensor([0.1] + [0.9 / N] * N)
    batch.attn[0, 1, 0, 1 + 5] = 0.5 + 0.5 / N                   # ... head 1 peaks on patch 5
    got, _ = aggregate("attn-lcte", batch)
    assert got[0].argmax() == 5 and got[0, 5] > 0.5


def test_oracle_weights_are_the_renormalised_oracle_attention():
    batch = one_hot_batch()
    got, _ = aggregate("oracle", batch)
    oracle = batch.oracle_attn.numpy()
    np.testing.assert_allclose(got, oracle / oracle.sum(1, keepdims=True), atol=1e-6)
    batch.oracle_attn = torch.rand(2, N + 1)
    with pytest.raises(ValueError, match="same patch grid"):
        aggregate("oracle", batch)


def test_attention_heads_require_attention():
    batch = one_hot_batch()
    batch.attn = None
    for name in [n for n, spec in HEADS.items() if spec.needs_attention and n != "ca4"]:  # ca4 needs 4x4
        with pytest.raises(RuntimeError, match="attention"):
            aggregate(name, batch)


def test_cls_pos_both_values():
    batch = one_hot_batch(dim=16)
    dim = 16
    cls = build_probe("cls", dim, 3, GRID, 1).aggregation(batch)
    pos = build_probe("pos", dim, 3, GRID, 1).aggregation(batch)
    both = build_probe("both", dim, 3, GRID, 1)
    assert torch.equal(cls, batch.tokens[:, 0])
    np.testing.assert_allclose(pos[:, :N].numpy(), np.full((2, N), 1 / N), atol=1e-6)
    assert torch.allclose(both.aggregation(batch), torch.cat([cls, pos], 1))
    assert both.classifier.in_features == 2 * dim and both.attention_map is None


# ---- learned heads: maps are exposed, shaped, and are the weights actually used ----

def random_batch(batch_size=2, dim=32, prefix=1, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return TokenBatch(torch.randn(batch_size, prefix + N, dim, generator=gen), prefix, GRID)


def test_learned_attention_maps_shape_and_meaning():
    batch = random_batch()
    x = batch.patches

    ep = build_probe("ep", 32, 4, GRID, 1, HeadOptions(ep_queries=4))
    out = ep.aggregation(batch)
    assert ep.attention_map.shape == (2, 4, N)
    values = ep.aggregation.pooler.value(x).reshape(2, N, 4, 8)
    for q in range(4):  # query q pools slice q of the value projection with its own weights
        pooled = torch.einsum("bn,bnc->bc", ep.attention_map[:, q], values[:, :, q])
        assert torch.allclose(out[:, q * 8:(q + 1) * 8], pooled, atol=1e-5)

    simpool = build_probe("simpool", 32, 4, GRID, 1)
    out = simpool.aggregation(batch)
    normed = nn.functional.layer_norm(x, (32,), eps=1e-6)
    assert simpool.attention_map.shape == (2, N)
    assert torch.allclose(out, torch.einsum("bn,bnd->bd", simpool.attention_map, normed), atol=1e-5)

    single = build_probe("map", 32, 4, GRID, 1, HeadOptions(map_heads=1)).eval()  # MAP maps in eval mode only
    single.aggregation.train()(batch)
    assert single.attention_map is None  # training pays nothing for it
    out = single.aggregation.eval()(batch)
    kv = single.aggregation.pooler.pool.kv
    v = x @ kv.weight[32:].T + kv.bias[32:]
    assert single.attention_map.shape == (2, N)
    assert torch.allclose(out, torch.einsum("bn,bnd->bd", single.attention_map, v), atol=1e-5)
    multi = build_probe("map", 32, 4, GRID, 1, HeadOptions(map_heads=4)).eval()
    multi(batch)
    assert multi.attention_map.shape == (2, N)
    assert torch.allclose(multi.attention_map.sum(-1), torch.ones(2))

    for content in ("all", "patch"):
        abmilp = build_probe("abmilp", 32, 4, GRID, 1, HeadOptions(abmilp_content=content))
        abmilp(batch)
        assert abmilp.attention_map.shape == (2, N)  # patches only, ready to reshape to the grid
    assert build_probe("cls", 32, 4, GRID, 1).attention_map is None


# ---- one-batch overfit ----

OVERFIT = [("cls", {}), ("pos", {}), ("both", {}), ("abmilp", {}),
           ("abmilp", dict(abmilp_act="relu", abmilp_sa="both", abmilp_depth=2, abmilp_cond="pe",
                           abmilp_content="patch")),
           ("abmilp", dict(abmilp_sa="map")), ("ep", dict(ep_queries=8)), ("simpool", {}), ("map", dict(map_heads=4))]


@pytest.fixture
def one_thread():
    """Tiny matrices: a second thread only adds synchronisation, and it is slower on a shared machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize("name,options", OVERFIT, ids=[f"{n}-{i}" for i, (n, _) in enumerate(OVERFIT)])
def test_one_batch_overfit(name, options, one_thread):
    torch.manual_seed(0)
    batch = random_batch(batch_size=16, dim=32, seed=1)
    labels = torch.arange(16) % 4
    probe = build_probe(name, 32, 4, GRID, 1, HeadOptions(**options))
    optimizer = torch.optim.Adam(probe.parameters(), lr=1e-2)
    for _ in range(200):
        loss = nn.functional.cross_entropy(probe(batch), labels)
        if loss.item() < 0.005:
            break
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    probe.eval()
    with torch.no_grad():
        logits = probe(batch)
    assert nn.functional.cross_entropy(logits, labels).item() < 0.05
    assert (logits.argmax(1) == labels).all()


# ---- construction, errors, table ----

def test_probe_is_bn_then_linear_initialised_like_the_papers_code():
    # nn.Linear's default: weight and bias ~ U(-1/sqrt(d), 1/sqrt(d)), std 1/sqrt(3d)
    torch.manual_seed(0)
    d = 256
    probe = build_probe("pos", d, 1000, (14, 14), 1)
    assert isinstance(probe, Probe) and probe.norm.affine is False and probe.norm.eps == 1e-6
    weight, bias, bound = probe.classifier.weight, probe.classifier.bias, 1 / math.sqrt(d)
    assert weight.shape == (1000, d)
    for values in (weight, bias):
        assert values.abs().max().item() <= bound and values.abs().max().item() > 0.98 * bound
    assert abs(weight.std().item() - bound / math.sqrt(3)) < 0.01 * bound / math.sqrt(3)
    assert abs(bias.std().item() - bound / math.sqrt(3)) < 0.06 * bound / math.sqrt(3)  # 1,000 draws only


def test_probe_initialised_like_mae_on_request():
    torch.manual_seed(0)
    probe = build_probe("pos", 256, 1000, (14, 14), 1, HeadOptions(head_init="mae"))
    weight = probe.classifier.weight
    assert torch.all(probe.classifier.bias == 0)
    assert 0.0097 < weight.std().item() < 0.0103 and abs(weight.mean().item()) < 5e-4


def test_errors():
    with pytest.raises(ValueError, match="the heads are cls, pos"):
        resolve_head("gap")
    for name in ("cls", "both", "attn-mn", "attn-lcte"):
        with pytest.raises(ValueError, match="\\[cls\\]"):
            build_probe(name, 32, 4, GRID, 0)
    for name in ("pos", "abmilp", "cp2", "ca2", "ep", "simpool", "map", "oracle"):
        build_probe(name, 32, 4, GRID, 0)  # patch-token heads work without [cls]
    with pytest.raises(ValueError, match="centre crop"):
        build_probe("cp4", 32, 4, GRID, 1)
    with pytest.raises(ValueError, match="5 queries x d_out 1 do not divide"):
        build_probe("ep", 32, 4, GRID, 1, HeadOptions(ep_queries=5))
    with pytest.raises(ValueError, match="5 attention heads do not divide"):
        build_probe("map", 32, 4, GRID, 1, HeadOptions(map_heads=5))


# the peer's (billpsomas/efficient-probing) 14 learned heads, and ours
PEER_HEADS = {"abmilp", "simpool", "esimpool", "clip", "siglip", "aim", "ep", "cbam", "coca", "cait", "dinovit", "jepa",
              "dolg", "cae"}
LEARNED = PEER_HEADS | {"map"}
WITH_ALL = LEARNED - {"abmilp", "clip", "cbam"}  # abmilp_all is --abmilp_content all; clip and cbam need the grid
DINOV2 = {"dinov2_n1", "dinov2_n1_avgpool", "dinov2_n4", "dinov2_n4_avgpool"}


def test_table_and_resolution():
    expected = {"cls", "pos", "both", "abmilp", "attn-mn", "attn-lcte", "oracle"} | LEARNED | DINOV2
    expected |= {f"cp{k}" for k in range(1, 5)} | {f"ca{k}" for k in range(1, 5)} | {f"{h}_all" for h in WITH_ALL}
    assert set(HEADS) == expected
    assert resolve_head(" CA3 ").name == "ca3"
    assert HEADS["oracle"].needs_oracle and not HEADS["oracle"].needs_cls
    assert {n for n, s in HEADS.items() if s.learned} == LEARNED | {f"{h}_all" for h in WITH_ALL}
    assert all(HEADS[f"{h}_all"].needs_cls for h in WITH_ALL) and not any(HEADS[h].needs_cls for h in LEARNED)
    assert {n: s.needs_blocks for n, s in HEADS.items() if s.needs_blocks} == {
        "dinov2_n1": 1, "dinov2_n1_avgpool": 1, "dinov2_n4": 4, "dinov2_n4_avgpool": 4}
    assert all(HEADS[h].needs_cls and not HEADS[h].learned for h in DINOV2)


@pytest.mark.parametrize("name,hint", [("abmilp_all", "--abmilp_content all"), ("clip_all", "use clip"),
                                       ("cbam_all", "use cbam")])
def test_the_peers_all_variants_we_do_not_build_say_what_to_use(name, hint):
    with pytest.raises(ValueError, match=hint):
        resolve_head(name)


def test_options_from_args_and_cli_flags():
    parser = argparse.ArgumentParser()
    HeadOptions.add_arguments(parser)
    args = parser.parse_args("--abmilp_act relu --abmilp_sa none --abmilp_depth 1 --abmilp_cond none "
                             "--abmilp_content patch --ep_queries 16".split())
    assert HeadOptions.from_args(args) == HeadOptions(abmilp_act="relu", abmilp_content="patch", ep_queries=16)
    assert HeadOptions.from_args(argparse.Namespace()) == HeadOptions()


def aggregation_parameters(name, options=None):
    """Trainable parameters of a head's aggregation alone (BatchNorm and Linear excluded), ViT-B/16 at 224."""
    probe = build_probe(name, 768, 1000, (14, 14), num_prefix=1, options=options)
    return sum(p.numel() for p in probe.aggregation.parameters() if p.requires_grad)


def test_vit_b_parameter_counts_of_the_readme_table():
    counts = {name: aggregation_parameters(name) for name in HEADS}
    d, n, ln = 768, 14 * 14, 2 * 768
    assert counts["cls"] == 0 and counts["ca2"] == 0 and not HEADS["ca2"].learned
    mlp = (d * 4 * d + 4 * d) + (4 * d * d + d)
    expected = {
        "abmilp": d + 1,
        "ep": 32 * d + d * d,
        "simpool": ln + 2 * d * d,
        "map": d + (d * d + d) + (2 * d * d + 2 * d),
        "esimpool": ln,                                                   # the LayerNorm's affine only
        "clip": ln + (3 * d * d + 3 * d) + (d * d + d) + (n + 1) * d,     # LayerNorm, qkv, proj, positions
        "siglip": d + (d * d + d) + (2 * d * d + 2 * d) + (d * d + d) + mlp,
        "aim": d + 2 * d * d,                                             # query, k, v (BatchNorm without affine)
        "cbam": 2 * (d * d // 16) + 2 * 7 * 7 + 2,                       # channel MLP, 7x7 conv, BatchNorm affine
        "coca": d + d + d * 512 + d * 128 + 512 * d,                     # query, LayerNorm gain, q, kv, out
        "cait": d + 3 * ln + 2 * d + 3 * (d * d + d) + (d * d + d) + mlp,  # cls, 3 norms, 2 layer scales, q/k/v, proj
        "dinovit": 2 * ln + 3 * d * d + (d * d + d) + mlp,
        "jepa": d + 2 * ln + (d * d + d) + (2 * d * d + 2 * d) + (d * d + d) + mlp,
        "dolg": (d * d + d) + ln + (d + 1),
        "cae": d + 3 * ln + 3 * d * d + (d * d + d),
    }
    assert {name: counts[name] for name in expected} == expected
    assert all(counts[f"{h}_all"] == counts[h] for h in WITH_ALL)
    assert all(counts[h] == 0 and not HEADS[h].learned for h in DINOV2)
    assert aggregation_parameters("ep", HeadOptions(ep_d_out=2)) == 32 * d + d * d // 2


def test_registers_without_cls_refuse_cls_heads_and_never_count_as_patches():
    batch = one_hot_batch(num_prefix=4)  # four registers, no [cls]
    for name in ("cls", "both", "attn-mn", "attn-lcte"):
        with pytest.raises(ValueError, match="\\[cls\\]"):
            build_probe(name, 16, 4, GRID, 4, has_cls=False)
    probe = build_probe("pos", 16, 4, GRID, 4, has_cls=False)
    assert np.allclose(probe.aggregation(batch)[:, :N].numpy(), 1 / N)  # the mean of the N one-hot patches only
    assert build_probe("cls", 16, 4, GRID, 5, has_cls=True).aggregation(batch).shape == (2, 16)


# ---- the peer's heads: token selection, learning at MAE's token scales, float32 pooling

MAE_WIDTH = 48  # divisible by every default head count (esimpool 12, aim/jepa 16, map/dinovit/cae 8, clip/cait 4)
MAE_OPTIONS = HeadOptions(ep_queries=4)


def mae_like_tokens(images, seed, *, prefix=1, signal=2, amplitude=5.0, classes=4):
    """Tokens as MAE's pre-norm ones look: every channel has a large common mean (300x the spread of the tokens
    around it). Every patch carries a random unit direction of norm `amplitude` (distractors), except `signal`
    random patches per image, which carry their class's direction. Returns (TokenBatch, labels, signal positions)."""
    fixed, gen = torch.Generator().manual_seed(1234), torch.Generator().manual_seed(seed)
    mean = 300.0 * torch.randn(MAE_WIDTH, generator=fixed)
    directions = torch.linalg.qr(torch.randn(MAE_WIDTH, MAE_WIDTH, generator=fixed))[0][:, :classes].T
    labels = torch.arange(images) % classes
    tokens = mean + torch.randn(images, prefix + N, MAE_WIDTH, generator=gen)
    carried = nn.functional.normalize(torch.randn(images, N, MAE_WIDTH, generator=gen), dim=-1)
    positions = torch.rand(images, N, generator=gen).argsort(1)[:, :signal]
    carried[torch.arange(images)[:, None], positions] = directions[labels][:, None]
    tokens[:, prefix:] += amplitude * carried
    return TokenBatch(tokens, prefix, GRID), labels, positions


def recalibrate_batchnorms(probe, batch):
    """Every BatchNorm's running statistics set to this batch's, with the trained weights: what the end of a
    cosine schedule gives. A constant-lr toy run would otherwise evaluate with statistics that lag the drift of
    a 300x channel mean through weights that are still moving."""
    for module in probe.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.reset_running_stats()
            module.momentum = None  # a cumulative average: one pass gives the batch's own statistics
    with torch.no_grad():
        probe.train()(batch)
    return probe.eval()


@pytest.mark.parametrize("name", sorted(LEARNED))
def test_every_learned_head_learns_a_signal_hidden_among_distractors_at_maes_scale(name, one_thread):
    train, labels, _ = mae_like_tokens(384, seed=1)
    test, test_labels, _ = mae_like_tokens(256, seed=2)
    torch.manual_seed(0)
    probe = build_probe(name, MAE_WIDTH, 4, GRID, 1, MAE_OPTIONS)
    optimizer = torch.optim.Adam(probe.parameters(), lr=3e-3)
    for _ in range(100):
        loss = nn.functional.cross_entropy(probe(train), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    recalibrate_batchnorms(probe, train)
    with torch.no_grad():
        accuracy = (probe(test).argmax(1) == test_labels).float().mean().item()
    assert accuracy > 0.6, f"{name}: held-out accuracy {accuracy:.3f} (chance 0.25)"


@pytest.mark.parametrize("name", sorted(WITH_ALL))
def test_all_variants_pool_cls_and_the_patches_but_never_the_registers(name):
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randn(3, 3 + N, 48, generator=gen)  # [cls], two registers, the patches
    batch = TokenBatch(tokens, 3, GRID)
    probe = build_probe(f"{name}_all", 48, 4, GRID, 3, MAE_OPTIONS).eval()
    pooler = probe.aggregation.pooler
    with torch.no_grad():
        out = probe.aggregation(batch)
        torch.testing.assert_close(out, pooler(torch.cat([tokens[:, :1], tokens[:, 3:]], 1)))
        other_registers = TokenBatch(torch.cat([tokens[:, :1], torch.randn(3, 2, 48), tokens[:, 3:]], 1), 3, GRID)
        torch.testing.assert_close(probe.aggregation(other_registers), out)
        other_cls = TokenBatch(torch.cat([torch.randn(3, 1, 48), tokens[:, 1:]], 1), 3, GRID)
        assert not torch.equal(probe.aggregation(other_cls), out)
        patches_only = build_probe(name, 48, 4, GRID, 3, MAE_OPTIONS).eval()
        patches_only.aggregation.load_state_dict(probe.aggregation.state_dict())
        assert torch.equal(patches_only.aggregation(other_cls), patches_only.aggregation(batch))
    if probe.attention_map is not None:
        assert probe.attention_map.shape[-1] == N  # the patches' share, ready to reshape to the grid


def test_ep_d_out_narrows_the_classifier():
    probe = build_probe("ep", 48, 4, GRID, 1, HeadOptions(ep_queries=4, ep_d_out=3))
    assert probe.aggregation.out_dim == 16 and probe.classifier.in_features == 16 and probe.norm.num_features == 16
    assert probe(random_batch(dim=48)).shape == (2, 4)


def test_dinov2_heads_concatenate_the_last_blocks_cls_oldest_first_then_the_patch_mean():
    gen = torch.Generator().manual_seed(0)
    block_cls, patch_mean = torch.randn(2, 4, 16, generator=gen), torch.randn(2, 16, generator=gen)
    batch = TokenBatch(torch.randn(2, 1 + N, 16), 1, GRID, block_cls=block_cls, normed_patch_mean=patch_mean)
    features = {name: build_probe(name, 16, 3, GRID, 1).aggregation(batch) for name in DINOV2}
    assert torch.equal(features["dinov2_n1"], block_cls[:, 3])
    assert torch.equal(features["dinov2_n1_avgpool"], torch.cat([block_cls[:, 3], patch_mean], 1))
    assert torch.equal(features["dinov2_n4"], torch.cat([block_cls[:, i] for i in range(4)], 1))
    assert torch.equal(features["dinov2_n4_avgpool"], torch.cat([*block_cls.unbind(1), patch_mean], 1))
    assert build_probe("dinov2_n4_avgpool", 16, 3, GRID, 1).classifier.in_features == 5 * 16
    short = TokenBatch(batch.tokens, 1, GRID, block_cls=block_cls[:, 3:], normed_patch_mean=patch_mean)
    with pytest.raises(ValueError, match="last 4 blocks but the TokenBatch carries 1"):
        build_probe("dinov2_n4", 16, 3, GRID, 1).aggregation(short)


def mae_batch_with_everything(images=64):
    """MAE-like tokens plus attention, an oracle's attention and DINOv2's block summaries at the same scales."""
    batch, _, _ = mae_like_tokens(images, seed=3)
    gen = torch.Generator().manual_seed(4)
    t = 1 + N
    batch.attn = torch.randn(images, 3, t, t, generator=gen).softmax(-1)
    batch.oracle_attn = torch.rand(images, N, generator=gen)
    batch.block_cls = batch.tokens[:, :1].repeat(1, 4, 1) + torch.randn(images, 4, MAE_WIDTH, generator=gen)
    batch.normed_patch_mean = batch.patches.mean(1)
    return batch


@pytest.mark.parametrize("name", sorted(set(HEADS) - {"cp4", "ca4"}))  # a 4x4 crop does not fit the 3x4 grid
def test_pooled_features_keep_their_spread_under_bf16_autocast(name):
    """What BatchNorm normalises must not be rounded to bf16: with channel means 300x the spread across images,
    bf16's 8-bit mantissa (steps of 2 between 256 and 512) leaves a channel constant or quantisation noise."""
    batch = mae_batch_with_everything()
    torch.manual_seed(0)
    probe = build_probe(name, MAE_WIDTH, 4, GRID, 1, MAE_OPTIONS)
    seen = []
    probe.norm.register_forward_pre_hook(lambda module, args: seen.append(args[0].detach().float()))
    with torch.no_grad():
        probe(batch)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            probe(batch)
    exact, under_autocast = (features.std(0) for features in seen)  # per channel, across images
    assert seen[1].dtype == torch.float32
    torch.testing.assert_close(under_autocast, exact, rtol=1e-3, atol=1e-6)


def test_every_parameter_of_every_head_gets_a_gradient():
    """DDP (without find_unused_parameters) stops at a parameter that never receives one."""
    batch = mae_batch_with_everything(images=8)
    for name in sorted(set(HEADS) - {"cp4", "ca4"}):
        probe = build_probe(name, MAE_WIDTH, 4, GRID, 1, MAE_OPTIONS)
        probe(batch).sum().backward()
        assert [n for n, p in probe.named_parameters() if p.requires_grad and p.grad is None] == [], name


@pytest.mark.parametrize("name", ["ep", "simpool", "map"])
def test_heads_saved_before_poolers_py_load_into_the_current_module(name):
    """ep, simpool and map kept their parameters at aggregation.X before the poolers moved to poolers.py
    (aggregation.pooler.X): a probe saved then (module version 1) loads, with the same weights."""
    torch.manual_seed(0)
    probe = build_probe(name, 64, 10, (4, 4), 1)
    current = probe.state_dict(keep_vars=False)
    old = {k.replace("aggregation.pooler.", "aggregation."): v for k, v in current.items()}
    old = type(current)(old)
    old._metadata = {key.replace("aggregation.pooler", "aggregation"): meta
                     for key, meta in current._metadata.items() if key != "aggregation.pooler"}
    old._metadata["aggregation"] = {"version": 1}
    fresh = build_probe(name, 64, 10, (4, 4), 1)
    fresh.load_state_dict(old)
    assert all(torch.equal(fresh.state_dict()[k], v) for k, v in current.items())
