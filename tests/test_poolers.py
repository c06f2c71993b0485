"""poolers.py: each pooler against its definition, recomputed here by hand in float64 from the same weights
(per-head loops over channel slices, written from the peer's modules), and the library poolers against a fresh
timm module given the same weights."""
import math

import pytest
import torch
import torch.nn.functional as F
from timm.layers import AttentionPool2d, AttentionPoolLatent

import poolers

D, GRID = 32, (3, 4)
N = GRID[0] * GRID[1]


def tokens(batch=3, count=N, seed=0):
    return torch.randn(batch, count, D, generator=torch.Generator().manual_seed(seed))


def randomise(module, seed=1):
    """Every parameter (LayerNorm affines, biases, zero-initialised queries) drawn at random, so no term of a
    definition can hide behind an initial 0 or 1."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * (0.3 if p.dim() > 1 else 1.0))
    return module


def w(t):
    return t.detach().double()


def linear(x, layer):
    return x @ w(layer.weight).T + (0 if layer.bias is None else w(layer.bias))


def layer_norm(x, norm, eps):
    mean = x.mean(-1, keepdim=True)
    var = ((x - mean) ** 2).mean(-1, keepdim=True)
    out = (x - mean) / torch.sqrt(var + eps)
    out = out * w(norm.weight) if norm.weight is not None else out
    return out + w(norm.bias) if norm.bias is not None else out


def heads_attention(q, k, v, heads):
    """q [B, Q, C], k [B, T, C], v [B, T, C']: head h attends with channel slice h of q and k, scaled by the slice
    width^-1/2, and pools slice h of v. Returns ([B, Q, C'], weights [B, heads, Q, T])."""
    cq, cv = q.shape[-1] // heads, v.shape[-1] // heads
    outs, maps = [], []
    for h in range(heads):
        scores = q[..., h * cq:(h + 1) * cq] @ k[..., h * cq:(h + 1) * cq].transpose(1, 2) / math.sqrt(cq)
        weights = scores.softmax(-1)
        outs.append(weights @ v[..., h * cv:(h + 1) * cv])
        maps.append(weights)
    return torch.cat(outs, -1), torch.stack(maps, 1)


def mlp(x, module):
    return linear(F.gelu(linear(x, module.fc1)), module.fc2)


def batch_stats_norm(x, norm, eps):
    """BatchNorm in training mode over every axis but the last (channels), biased variance."""
    axes = tuple(range(x.dim() - 1))
    out = (x - x.mean(axes)) / torch.sqrt(x.var(axes, unbiased=False) + eps)
    return out * w(norm.weight) + w(norm.bias) if norm.affine else out


def check(pooler, x, expected, expected_map=None):
    got = pooler(x)
    assert got.shape == (x.shape[0], pooler.out_dim)
    torch.testing.assert_close(got.double(), expected, rtol=1e-4, atol=1e-5)
    if expected_map is not None:
        torch.testing.assert_close(pooler.attention_map.double(), expected_map, rtol=1e-4, atol=1e-6)


# ---- queries without projections

@pytest.mark.parametrize("queries,d_out", [(4, 1), (4, 2), (1, 4)])
def test_ep_pools_value_slices_per_query(queries, d_out):
    pooler, x = randomise(poolers.EfficientProbing(D, queries, d_out)), tokens()
    xd = w(x)
    weights = (w(pooler.queries) @ xd.transpose(1, 2) / math.sqrt(D)).softmax(-1)  # [B, Q, T], keys are the tokens
    values, width = linear(xd, pooler.value), D // d_out // queries
    expected = torch.cat([weights[:, q:q + 1] @ values[..., q * width:(q + 1) * width] for q in range(queries)], -1)
    assert pooler.out_dim == D // d_out
    check(pooler, x, expected[:, 0], weights)


def test_simpool_queries_with_the_mean_token():
    pooler, x = randomise(poolers.SimPool(D)), tokens()
    xd = w(x)
    normed = layer_norm(xd, pooler.norm, 1e-6)
    query = linear(xd.mean(1, keepdim=True), pooler.wq)
    out, weights = heads_attention(query, linear(normed, pooler.wk), normed, 1)
    check(pooler, x, out[:, 0], weights[:, 0, 0])


@pytest.mark.parametrize("heads", [1, 4])
def test_esimpool_normed_query_and_keys_raw_values(heads):
    pooler, x = randomise(poolers.ESimPool(D, heads)), tokens()
    xd = w(x)
    query = layer_norm(xd.mean(1, keepdim=True), pooler.norm, 1e-6)  # LayerNorm of the mean, not mean of LayerNorms
    out, weights = heads_attention(query, layer_norm(xd, pooler.norm, 1e-6), xd, heads)
    check(pooler, x, out[:, 0], weights.mean(1)[:, 0])


def test_aim_batchnorms_tokens_then_one_query_over_projections():
    pooler, x = randomise(poolers.AimPool(D, 4)).train(), tokens()
    normed = batch_stats_norm(w(x), pooler.norm, 1e-6)  # statistics over images and tokens
    out, weights = heads_attention(w(pooler.query), linear(normed, pooler.k), linear(normed, pooler.v), 4)
    check(pooler, x, out[:, 0], weights.mean(1)[:, 0])


# ---- one query, projections

def test_siglip_is_timms_attention_pool_latent_with_projection_and_mlp():
    pooler, x = randomise(poolers.LatentAttentionPool(D, 4, full=True)), tokens()
    pool, xd = pooler.pool, w(x)
    kv = linear(xd, pool.kv)
    out, weights = heads_attention(linear(w(pool.latent), pool.q), kv[..., :D], kv[..., D:], 4)
    pooled = linear(out, pool.proj)
    expected = (pooled + mlp(pooled, pool.mlp))[:, 0]
    check(pooler, x, expected)
    reference = AttentionPoolLatent(D, num_heads=4)  # timm's module, built as the peer builds it, same weights
    reference.load_state_dict(pool.state_dict())
    torch.testing.assert_close(pooler(x), reference(x))
    pooler.eval()(x)
    torch.testing.assert_close(pooler.attention_map.double(), weights.mean(1)[:, 0], rtol=1e-4, atol=1e-6)


def test_map_stops_before_the_projection():
    pooler, x = randomise(poolers.LatentAttentionPool(D, 4)), tokens()
    pool = pooler.pool
    kv = linear(w(x), pool.kv)
    out, weights = heads_attention(linear(w(pool.latent), pool.q), kv[..., :D], kv[..., D:], 4)
    check(pooler, x, out[:, 0])
    assert pooler.attention_map is None  # training pays nothing for the map
    pooler.eval()(x)
    torch.testing.assert_close(pooler.attention_map.double(), weights.mean(1)[:, 0], rtol=1e-4, atol=1e-6)


def test_clip_is_layernorm_then_timms_attention_pool_2d():
    pooler, x = randomise(poolers.ClipAttentionPool(D, GRID)), tokens()
    normed = layer_norm(w(x), pooler.norm, 1e-6)
    pool = pooler.pool
    sequence = torch.cat([normed.mean(1, keepdim=True), normed], 1) + w(pool.pos_embed)
    qkv = linear(sequence, pool.qkv)
    out, weights = heads_attention(qkv[:, :1, :D], qkv[..., D:2 * D], qkv[..., 2 * D:], 4)  # the mean token's query
    check(pooler, x, linear(out, pool.proj)[:, 0])
    # timm's own module, fed the normed tokens as the feature map it expects: row r, column c is token r * W + c
    reference = AttentionPool2d(D, feat_size=GRID, num_heads=4)
    reference.load_state_dict(pool.state_dict())
    grid = torch.stack([torch.stack([normed[:, r * GRID[1] + c] for c in range(GRID[1])], -1)
                        for r in range(GRID[0])], -2)  # [B, D, H, W]
    torch.testing.assert_close(pooler(x).double(), reference.double()(grid), rtol=1e-4, atol=1e-5)
    pooler.eval()(x)
    torch.testing.assert_close(pooler.attention_map.double(), weights.mean(1)[:, 0, 1:], rtol=1e-4, atol=1e-6)


def test_coca_one_normed_query_eight_heads_share_one_key_and_value():
    pooler, x = randomise(poolers.CocaPool(D)), tokens()
    assert pooler.norm.bias is None and pooler.to_q.out_features == 512 and pooler.to_kv.out_features == 128
    query = linear(layer_norm(w(pooler.query), pooler.norm, 1e-5), pooler.to_q)  # [1, 512]
    kv = linear(w(x), pooler.to_kv)
    k, v = kv[..., :64], kv[..., 64:]
    outs, maps = [], []
    for h in range(8):
        weights = (query[:, h * 64:(h + 1) * 64] @ k.transpose(1, 2) / 8.0).softmax(-1)  # [B, 1, T]
        outs.append(weights @ v)
        maps.append(weights)
    expected = linear(torch.cat(outs, -1), pooler.to_out)[:, 0]
    check(pooler, x, expected, torch.stack(maps, 1).mean(1)[:, 0])


def test_cae_query_key_value_have_their_own_layernorms():
    pooler, x = randomise(poolers.CaePool(D)), tokens()
    xd = w(x)
    q = linear(layer_norm(w(pooler.query), pooler.norm_q, 1e-5), pooler.q)
    k = linear(layer_norm(xd, pooler.norm_k, 1e-5), pooler.k)
    v = linear(layer_norm(xd, pooler.norm_v, 1e-5), pooler.v)
    out, weights = heads_attention(q, k, v, 8)
    check(pooler, x, linear(out, pooler.proj)[:, 0], weights.mean(1)[:, 0])


def test_jepa_raw_query_cross_attends_then_residual_mlp():
    pooler, x = randomise(poolers.JepaPool(D, 4)), tokens()
    kv = linear(layer_norm(w(x), pooler.norm1, 1e-5), pooler.kv)
    query = w(pooler.query)
    out, weights = heads_attention(linear(query, pooler.q), kv[..., :D], kv[..., D:], 4)
    pooled = query + linear(out, pooler.proj)
    pooled = pooled + mlp(layer_norm(pooled, pooler.norm2, 1e-5), pooler.mlp)
    check(pooler, x, pooled[:, 0], weights.mean(1)[:, 0])


def test_jepa_initialisation_is_ijepas():
    torch.manual_seed(0)
    pooler = poolers.JepaPool(768, 16)
    assert all(torch.all(layer.bias == 0) for layer in (pooler.q, pooler.kv, pooler.proj, pooler.mlp.fc1))
    assert abs(pooler.q.weight.std().item() - 0.02) < 0.001
    assert abs(pooler.proj.weight.std().item() - 0.02 / math.sqrt(2)) < 0.001  # residual outputs rescaled
    assert abs(pooler.mlp.fc2.weight.std().item() - 0.02 / math.sqrt(2)) < 0.001


def test_cait_moves_a_learned_cls_by_class_attention_then_layernorm():
    pooler, x = randomise(poolers.CaitPool(D)), tokens()
    block, cls = pooler.block, w(pooler.cls_token).expand(x.shape[0], 1, D)
    u = layer_norm(torch.cat([cls, w(x)], 1), block.norm1, 1e-6)
    out, weights = heads_attention(linear(u[:, :1], block.attn.q), linear(u, block.attn.k), linear(u, block.attn.v), 4)
    moved = cls + w(block.gamma_1) * linear(out, block.attn.proj)
    moved = moved + w(block.gamma_2) * mlp(layer_norm(moved, block.norm2, 1e-6), block.mlp)
    check(pooler, x, layer_norm(moved, pooler.norm, 1e-5)[:, 0])
    pooler.eval()(x)
    torch.testing.assert_close(pooler.attention_map.double(), weights.mean(1)[:, 0, 1:], rtol=1e-4, atol=1e-6)


# ---- over the tokens' grid or each token

def test_dinovit_is_one_more_block_then_the_mean():
    pooler, x = randomise(poolers.DinoViTPool(D)), tokens()
    block, xd = pooler.block, w(x)
    assert block.attn.qkv.bias is None
    qkv = linear(layer_norm(xd, block.norm1, 1e-5), block.attn.qkv)
    out, weights = heads_attention(qkv[..., :D], qkv[..., D:2 * D], qkv[..., 2 * D:], 8)
    y = xd + linear(out, block.attn.proj)
    y = y + mlp(layer_norm(y, block.norm2, 1e-5), block.mlp)
    check(pooler, x, y.mean(1))
    pooler.eval()(x)
    torch.testing.assert_close(pooler.attention_map.double(), weights.mean((1, 2)), rtol=1e-4, atol=1e-6)


def test_dolg_softplus_score_times_normalised_batchnormed_projection():
    pooler, x = randomise(poolers.DolgPool(D)).train(), tokens()
    f = batch_stats_norm(linear(w(x), pooler.conv1), pooler.norm, 1e-5)
    score = F.softplus(linear(F.relu(f), pooler.conv2))  # [B, T, 1]
    expected = (score * f / f.norm(dim=-1, keepdim=True)).mean(1)
    check(pooler, x, expected, score[..., 0])


def test_dolg_initialisation_is_dolgs():
    torch.manual_seed(0)
    pooler = poolers.DolgPool(768)
    assert abs(pooler.conv1.weight.std().item() - math.sqrt(2 / 768)) < 0.01 * math.sqrt(2 / 768)
    assert pooler.conv2.weight.shape == (1, 768) and 0.9 < pooler.conv2.weight.std().item() / math.sqrt(2) < 1.1


def cbam_reference(pooler, x, running=False):
    """[B, D] output and [B, N] spatial gate of the peer's CbamPooling on tokens laid out row by row on GRID."""
    (h, wd), b = GRID, x.shape[0]
    maps = torch.zeros(b, D, h, wd, dtype=torch.float64)
    for r in range(h):
        for c in range(wd):
            maps[:, :, r, c] = w(x[:, r * wd + c])
    channel = pooler.cbam.channel
    fc1, fc2 = w(channel.fc1.weight)[:, :, 0, 0], w(channel.fc2.weight)[:, :, 0, 0]
    squeeze = lambda z: F.relu(z @ fc1.T) @ fc2.T
    gated = maps * torch.sigmoid(squeeze(maps.mean((2, 3))) + squeeze(maps.amax((2, 3))))[:, :, None, None]
    spatial = pooler.cbam.spatial.conv
    s = F.conv2d(torch.cat([gated.mean(1, keepdim=True), gated.amax(1, keepdim=True)], 1), w(spatial.conv.weight),
                 padding=3)
    bn = spatial.bn
    if running:
        s = (s - w(bn.running_mean)) / torch.sqrt(w(bn.running_var) + 1e-5)
    else:
        s = (s - s.mean()) / torch.sqrt(s.var(unbiased=False) + 1e-5)
    gate = torch.sigmoid(s * w(bn.weight) + w(bn.bias))  # [B, 1, H, W]
    return F.relu(gated * gate + maps).mean((2, 3)), gate.flatten(1)


def test_cbam_gates_channels_then_space_adds_the_tokens_relu_mean():
    pooler, x = randomise(poolers.CbamPool(D, GRID)), tokens()
    expected, _ = cbam_reference(pooler, x)
    check(pooler, x, expected)
    pooler.eval()(x)
    expected, gate = cbam_reference(pooler, x, running=True)
    torch.testing.assert_close(pooler(x).double(), expected, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(pooler.attention_map.double(), gate, rtol=1e-4, atol=1e-6)


def test_grid_poolers_refuse_tokens_off_their_grid():
    for pooler in (poolers.ClipAttentionPool(D, GRID), poolers.CbamPool(D, GRID)):
        with pytest.raises(ValueError, match="do not fill the 3x4 patch grid"):
            pooler(tokens(count=N + 1))


def test_heads_must_divide_the_width():
    for build in (lambda: poolers.ESimPool(D, 5), lambda: poolers.AimPool(D, 5), lambda: poolers.JepaPool(D, 5),
                  lambda: poolers.LatentAttentionPool(D, 5)):
        with pytest.raises(ValueError, match="5 attention heads do not divide the embedding width 32"):
            build()
    with pytest.raises(ValueError, match="4 queries x d_out 3 do not divide"):
        poolers.EfficientProbing(D, 4, 3)
