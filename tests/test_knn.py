"""Weighted k-NN (util/knn.py) against hand-computed votes, sklearn, and timm's own pooling."""
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from sklearn.neighbors import KNeighborsClassifier
from timm.models.vision_transformer import VisionTransformer

from util.knn import extract_features, knn_accuracy


def unit(*values):
    v = torch.tensor(values, dtype=torch.float64)
    return v / v.norm()


def at_similarity(sim, angle):
    """A unit vector whose cosine with e1 is `sim`, rotated by `angle` in the (e2, e3) plane."""
    rest = math.sqrt(1 - sim * sim)
    return torch.tensor([sim, rest * math.cos(angle), rest * math.sin(angle)], dtype=torch.float64)


def test_separable_clusters_are_classified_perfectly():
    gen = torch.Generator().manual_seed(0)
    directions = torch.eye(16)[:4] * 5.0  # 4 orthogonal class directions
    def sample(per_class):
        labels = torch.arange(4).repeat_interleave(per_class)
        return directions[labels] + 0.05 * torch.randn(len(labels), 16, generator=gen), labels
    train, train_labels = sample(40)
    test, test_labels = sample(20)
    result = knn_accuracy(train, train_labels, test, test_labels, num_classes=4, chunk=7)
    assert set(result) == {(10, 0.07), (20, 0.07), (100, 0.07), (160, 0.07)}  # 200 clipped to 160 train images
    assert all(acc == 100.0 for acc in result.values())


def test_weights_let_few_close_neighbours_beat_many_far_ones():
    # Query e1. Class 0: three neighbours at cosine 0.5; class 1: two at cosine 0.9; class 2: two at cosine 0
    # (outside the 5 nearest). Class 1 wins iff 2 exp(0.9/T) > 3 exp(0.5/T), i.e. T < 0.4 / ln 1.5 = 0.9865.
    train = torch.stack([at_similarity(0.5, a) for a in (0.0, 2.0, 4.0)]
                        + [at_similarity(0.9, a) for a in (1.0, 3.0)]
                        + [at_similarity(0.0, a) for a in (0.5, 2.5)])
    norms = torch.tensor([3.0, 0.2, 7.0, 1.5, 0.4, 2.0, 9.0], dtype=torch.float64)
    train = train * norms[:, None]  # only directions count
    train_labels = torch.tensor([0, 0, 0, 1, 1, 2, 2])
    query, query_label = unit(4.0, 0.0, 0.0)[None], torch.tensor([1])
    result = knn_accuracy(train, train_labels, query, query_label, num_classes=3, ks=(5,),
                          temperatures=(0.01, 0.07, 0.9, 1.1, 100.0))
    assert result == {(5, 0.01): 100.0, (5, 0.07): 100.0, (5, 0.9): 100.0, (5, 1.1): 0.0, (5, 100.0): 0.0}


def test_k_larger_than_the_training_set_uses_all_of_it():
    # Four class-0 points on one side, two class-1 points next to the query. With uniform weights the 3 nearest
    # vote 2:1 for class 1, but all 6 (k=50 clipped to 6) vote 4:2 for class 0.
    train = torch.stack([unit(-1, 0.1 * i, 0) for i in range(4)] + [unit(1, 0.1, 0), unit(1, -0.1, 0)])
    train_labels = torch.tensor([0, 0, 0, 0, 1, 1])
    result = knn_accuracy(train, train_labels, unit(1, 0, 0.1)[None], torch.tensor([1]), num_classes=2,
                          ks=(3, 50), temperatures=(1e6,))
    assert result == {(3, 1e6): 100.0, (6, 1e6): 0.0}


@pytest.mark.parametrize("k", [1, 5, 15, 51])
def test_huge_temperature_matches_sklearn_uniform_cosine_knn(k):
    rng = np.random.default_rng(k)
    train, test = rng.normal(size=(300, 8)), rng.normal(size=(60, 8))
    train_labels, test_labels = rng.integers(0, 2, 300), rng.integers(0, 2, 60)
    sk = KNeighborsClassifier(n_neighbors=k, metric="cosine", weights="uniform", algorithm="brute")
    expected = sk.fit(train, train_labels).predict(test) == test_labels
    args = (torch.from_numpy(train), torch.from_numpy(train_labels))
    per_image = [knn_accuracy(*args, torch.from_numpy(test[i:i + 1]), torch.from_numpy(test_labels[i:i + 1]),
                              num_classes=2, ks=(k,), temperatures=(1e6,))[(k, 1e6)] == 100.0 for i in range(60)]
    assert per_image == expected.tolist()
    overall = knn_accuracy(*args, torch.from_numpy(test), torch.from_numpy(test_labels), num_classes=2,
                           ks=(k,), temperatures=(1e6,), chunk=16)
    assert overall[(k, 1e6)] == pytest.approx(100.0 * expected.mean())


def test_extract_features_pools_cls_and_patch_mean():
    # Token j of image b holds the value 10*b + j; the prefix token (j=0) must not enter the mean.
    def tokens_fn(images):
        b = images[:, 0, 0, 0]
        values = 10 * b[:, None] + torch.arange(5.0)[None]  # [B, 5 tokens]
        return SimpleNamespace(tokens=values[:, :, None].expand(-1, -1, 3), num_prefix=1, has_cls=True)
    loader = [(torch.full((2, 1, 1, 1), 0.0).index_fill(0, torch.tensor([1]), 1.0), torch.tensor([7, 8])),
              (torch.full((1, 1, 1, 1), 2.0), torch.tensor([9]))]
    feats, labels = extract_features(tokens_fn, loader)
    assert labels.tolist() == [7, 8, 9]
    assert feats["cls"][:, 0].tolist() == [0.0, 10.0, 20.0]
    assert feats["mean"][:, 0].tolist() == [2.5, 12.5, 22.5]  # mean of 1..4 plus 10*b


def test_extract_features_without_prefix_has_no_cls():
    tokens_fn = lambda images: SimpleNamespace(tokens=torch.ones(len(images), 4, 2), num_prefix=0, has_cls=None)
    feats, labels = extract_features(tokens_fn, [(torch.zeros(3, 1), torch.tensor([0, 1, 0]))])
    assert set(feats) == {"mean"} and feats["mean"].shape == (3, 2)


def test_registers_without_cls_give_no_cls_feature_and_stay_out_of_the_mean():
    # timm's vit_medium_patch16_reg4_gap_256: 4 register tokens, no [cls] (a small copy of it)
    import engine_linprobe
    from models_vit import build_encoder
    torch.manual_seed(0)
    encoder = build_encoder("vit_medium_patch16_reg4_gap_256", input_size=32, embed_dim=32, depth=1, num_heads=2,
                            verbose=False)
    assert not encoder.has_class_token and encoder.num_prefix_tokens == 4
    images = torch.randn(3, 3, 32, 32)
    feats, _ = extract_features(engine_linprobe.FrozenTokens(encoder), [(images, torch.zeros(3))])
    assert set(feats) == {"mean"}
    with torch.no_grad():
        torch.testing.assert_close(feats["mean"], encoder.forward_tokens(images)[:, 4:].mean(dim=1))


def test_extract_features_matches_timm_pooling_on_a_tiny_vit():
    from models_vit import build_encoder
    torch.manual_seed(0)
    encoder = build_encoder("vit_tiny_patch16", input_size=32, embed_dim=32, depth=2, num_heads=2,
                            final_norm=True, verbose=False)
    images = torch.randn(5, 3, 32, 32)
    tokens_fn = lambda x: SimpleNamespace(tokens=encoder.forward_tokens(x), num_prefix=encoder.num_prefix_tokens,
                                          has_cls=encoder.has_class_token)
    feats, _ = extract_features(tokens_fn, [(images[:3], torch.zeros(3)), (images[3:], torch.zeros(2))])
    with torch.no_grad():
        reference = VisionTransformer.forward_features(encoder, images)  # timm's own, final norm included
        torch.testing.assert_close(feats["cls"], encoder.pool(reference, "token"))
        torch.testing.assert_close(feats["mean"], encoder.pool(reference, "avg"))
