"""AbMILP on crafted tokens and crafted scorer weights: the weights are checked against hand computations."""
import numpy as np
import pytest
import torch
import torch.nn as nn

from abmilp import AbMILP

D, GRID = 16, (2, 3)  # non-square on purpose
N = GRID[0] * GRID[1]


def craft_scorer(model, direction, bias=0.0):
    """Depth-1 scorer: score(x) = direction . x + bias."""
    (linear,) = model.scorer
    with torch.no_grad():
        linear.weight.copy_(torch.as_tensor(direction, dtype=torch.float32)[None])
        linear.bias.fill_(bias)


def numpy_pool(tokens, direction, bias=0.0):
    """Independent AbMILP: softmax over tokens of (direction . x + bias), then the weighted sum."""
    out, maps = [], []
    for sample in tokens:
        scores = np.array([float(np.dot(direction, tok)) + bias for tok in sample])
        weights = np.exp(scores - scores.max())
        weights /= weights.sum()
        out.append(sum(w * tok for w, tok in zip(weights, sample)))
        maps.append(weights)
    return np.stack(out), np.stack(maps)


def test_token_with_far_larger_score_takes_all_weight():
    model = AbMILP(D, GRID, num_prefix=1, content="all")
    direction = np.zeros(D)
    direction[0] = 100.0
    tokens = torch.randn(2, 1 + N, D) * 0.01
    tokens[0, 4, 0] = 1.0   # sample 0: patch token 3 scores 100 more than the rest
    tokens[1, 0, 0] = 1.0   # sample 1: the [cls] token does
    craft_scorer(model, direction)
    out = model(tokens)
    assert torch.allclose(out[0], tokens[0, 4], atol=1e-5)
    assert torch.allclose(out[1], tokens[1, 0], atol=1e-5)
    assert model.attention_map.shape == (2, 1 + N)
    assert model.attention_map[0, 4] > 0.999 and model.attention_map[1, 0] > 0.999


def test_weights_match_independent_softmax_all_tokens():
    torch.manual_seed(0)
    model = AbMILP(D, GRID, num_prefix=1, content="all")
    direction = np.random.default_rng(0).normal(size=D)
    craft_scorer(model, direction, bias=0.3)
    tokens = torch.randn(3, 1 + N, D)
    expected, expected_map = numpy_pool(tokens.numpy().astype(np.float64), direction, 0.3)
    out = model(tokens)
    np.testing.assert_allclose(out.detach().numpy(), expected, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(model.attention_map.numpy(), expected_map, rtol=1e-4, atol=1e-6)


def test_content_patch_ignores_cls():
    model = AbMILP(D, GRID, num_prefix=1, content="patch")
    direction = np.zeros(D)
    direction[0] = 100.0
    craft_scorer(model, direction)
    tokens = torch.randn(2, 1 + N, D)
    tokens[:, 0, 0] = 50.0  # [cls] would win by far if it were pooled
    out = model(tokens)
    expected, expected_map = numpy_pool(tokens[:, 1:].numpy().astype(np.float64), direction)
    np.testing.assert_allclose(out.detach().numpy(), expected, rtol=1e-4, atol=1e-5)
    assert model.attention_map.shape == (2, N)
    changed = tokens.clone()
    changed[:, 0] = torch.randn(2, D) * 10
    assert torch.equal(model(changed), out)


def test_cond_pe_changes_scores_by_position():
    torch.manual_seed(0)
    direction = np.random.default_rng(1).normal(size=D)
    tokens = torch.randn(1, 1, D).expand(2, 1 + N, D).contiguous()  # the same token everywhere
    plain = AbMILP(D, GRID, num_prefix=1, cond="none", content="all")
    with_pe = AbMILP(D, GRID, num_prefix=1, cond="pe", content="all")
    craft_scorer(plain, direction)
    craft_scorer(with_pe, direction)
    plain(tokens)
    np.testing.assert_allclose(plain.attention_map.numpy(), np.full((2, 1 + N), 1 / (1 + N)), rtol=1e-5)
    with_pe(tokens)
    weights = with_pe.attention_map[0]
    assert torch.unique(weights.round(decimals=5)).numel() == 1 + N  # every position scores differently
    # [cls] gets a zero position embedding: its score is direction . x exactly, so its weight follows from
    # the patch scores; recover those from the map and check the first patch (row 0, col 0: sin 0 = 0, cos 0 = 1).
    scores = torch.log(weights) - torch.log(weights[0]) + float(np.dot(direction, tokens[0, 0].numpy()))
    pe_00 = np.array(([0.0] * (D // 4) + [1.0] * (D // 4)) * 2)  # (sin 0, cos 0) for the column, then the row
    assert scores[1].item() == pytest.approx(float(np.dot(direction, tokens[0, 1].numpy() + pe_00)), abs=1e-3)


def test_sa_map_pools_raw_tokens_and_sa_both_pools_mixed_tokens():
    torch.manual_seed(0)
    tokens = torch.randn(2, 1 + N, D)
    for sa in ("map", "both"):
        model = AbMILP(D, GRID, num_prefix=1, sa=sa, content="all")
        out = model(tokens)
        mixed = model.self_attn(tokens)
        pooled_raw = torch.einsum("bt,btd->bd", model.attention_map, tokens)
        pooled_mixed = torch.einsum("bt,btd->bd", model.attention_map, mixed)
        # the scorer reads the mixed tokens in both modes
        scores = model.scorer(mixed).squeeze(-1)
        assert torch.allclose(model.attention_map, scores.softmax(1), atol=1e-6)
        expected = pooled_raw if sa == "map" else pooled_mixed
        assert torch.allclose(out, expected, atol=1e-5)
        assert not torch.allclose(pooled_raw, pooled_mixed, atol=1e-3)
    assert AbMILP(D, GRID, sa="none").self_attn is None


@pytest.mark.parametrize("act,cls", [("tanh", nn.Tanh), ("relu", nn.ReLU)])
def test_depth_builds_an_mlp_with_the_activation(act, cls):
    model = AbMILP(D, GRID, act=act, depth=3)
    layers = list(model.scorer)
    assert [type(m) for m in layers] == [nn.Linear, cls, nn.Linear, cls, nn.Linear]
    assert layers[0].in_features == D and layers[-1].out_features == 1
    assert model(torch.randn(2, 1 + N, D)).shape == (2, D)


def test_bad_options_raise_value_error():
    for kwargs in (dict(act="gelu"), dict(sa="all"), dict(cond="rope"), dict(content="cls"), dict(depth=0)):
        with pytest.raises(ValueError):
            AbMILP(D, GRID, **kwargs)
    with pytest.raises(ValueError, match="divisible by 4"):
        AbMILP(18, GRID, cond="pe")


def test_defaults_are_the_papers_published_command():
    # relu / none / depth 1 / none / patch: the flags of the paper's published command
    model = AbMILP(D, GRID, num_prefix=1)
    assert (model.sa, model.cond, model.content) == ("none", "none", "patch")
    assert [type(m) for m in model.scorer] == [nn.Linear] and model.self_attn is None


def mae_sincos_table(dim, side):
    """MAE's get_2d_sincos_pos_embed (util/pos_embed.py), which the paper's AbMILP uses, written out in numpy."""
    grid = np.stack(np.meshgrid(np.arange(side, dtype=np.float64), np.arange(side, dtype=np.float64)))  # w first

    def one_d(d, pos):
        omega = 1.0 / 10000 ** (np.arange(d // 2, dtype=np.float64) / (d / 2.0))
        out = np.einsum("m,d->md", pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    return np.concatenate([one_d(dim // 2, grid[0]), one_d(dim // 2, grid[1])], axis=1)


@pytest.mark.parametrize("content", ["patch", "all"])
def test_pe_table_is_trained_and_laid_out_as_the_papers(content):
    side = 3
    model = AbMILP(D, (side, side), num_prefix=1, cond="pe", content=content)
    assert isinstance(model.pos_embed, nn.Parameter) and model.pos_embed.requires_grad
    expected = mae_sincos_table(D, side)
    if content == "all":  # the paper's cls_token=True: one zero row first
        expected = np.concatenate([np.zeros((1, D)), expected])
    np.testing.assert_allclose(model.pos_embed.detach().numpy(), expected, atol=1e-6)
    assert "pos_embed" in model.state_dict()
    model(torch.randn(2, 1 + side * side, D)).sum().backward()
    assert model.pos_embed.grad is not None and model.pos_embed.grad.abs().sum() > 0
