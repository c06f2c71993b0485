"""Weighted k-NN on frozen features, DINO's protocol (facebookresearch/dino eval_knn.py).

Features are L2-normalised, so a dot product is the cosine similarity. Each test image takes its k most similar
training images; neighbour i votes for its class with weight exp(sim_i / T); the class with the most weight wins.

Distributed runs: `knn_rows` takes loaders over each process's shard (util.data.ShardSampler) of both sets: the
training features are gathered onto every process in dataset order, each process scores its own test images,
and the hits are summed, so the result is that of one process.
"""
import torch

from util import dist

FEATURE_KINDS = ("cls", "mean")


@torch.no_grad()
def extract_features(tokens_fn, loader, kinds=FEATURE_KINDS):
    """One pass of the frozen encoder over `loader` -> ({kind: [N, D] float32 on CPU}, labels [N] int64).

    tokens_fn: images -> TokenBatch (.tokens [B, T, D], .num_prefix, .has_cls). "cls" is the first token and is
    skipped when the encoder has no [cls] (registers are prefix tokens too, but not [cls]); "mean" averages the
    patch tokens only, as MAE's global pool does.
    """
    unknown = set(kinds) - set(FEATURE_KINDS)
    if unknown:
        raise ValueError(f"unknown feature kind(s) {sorted(unknown)}; choose from {FEATURE_KINDS}")
    feats, labels = {}, []
    for images, targets in loader:
        batch = tokens_fn(images)
        tokens = batch.tokens.float()
        pooled = {"mean": tokens[:, batch.num_prefix:].mean(dim=1)}
        if batch.num_prefix > 0 if batch.has_cls is None else batch.has_cls:
            pooled["cls"] = tokens[:, 0]
        for kind in kinds:
            if kind in pooled:
                feats.setdefault(kind, []).append(pooled[kind].cpu())
        labels.append(torch.as_tensor(targets).cpu())
    if not labels:
        raise ValueError("the loader yielded no batches")
    return {kind: torch.cat(chunks) for kind, chunks in feats.items()}, torch.cat(labels).long()


def knn_accuracy(train_feats, train_labels, test_feats, test_labels, num_classes, ks=(10, 20, 100, 200),
                 temperatures=(0.07,), chunk=128, device=None):
    """Top-1 accuracy (percent) of weighted k-NN for every (k, T): {(k, T): top1}.

    k larger than the training set is clipped to it (the key holds the k actually used). Work runs on `device`
    (default: train_feats' device), `chunk` test images at a time, so memory stays at chunk x N_train scores.
    """
    hits = knn_hits(train_feats, train_labels, test_feats, test_labels, num_classes, ks, temperatures, chunk, device)
    return {key: 100.0 * n / len(test_feats) for key, n in hits.items()}


@torch.no_grad()
def knn_hits(train_feats, train_labels, test_feats, test_labels, num_classes, ks=(10, 20, 100, 200),
             temperatures=(0.07,), chunk=128, device=None):
    """How many test images weighted k-NN classifies correctly, for every (k, T): {(k, T): hits}."""
    if train_feats.ndim != 2 or test_feats.ndim != 2 or train_feats.shape[1] != test_feats.shape[1]:
        raise ValueError(f"features must be [N, D] with the same D, got {tuple(train_feats.shape)} "
                         f"and {tuple(test_feats.shape)}")
    if len(train_feats) != len(train_labels) or len(test_feats) != len(test_labels):
        raise ValueError("need one label per feature")
    if len(train_feats) == 0 or len(test_feats) == 0:
        raise ValueError("need at least one training and one test feature")
    device = train_feats.device if device is None else torch.device(device)
    dtype = torch.promote_types(train_feats.dtype, torch.float32)  # bf16 features would blur the ranking
    train = torch.nn.functional.normalize(train_feats.to(device, dtype), dim=1)
    train_labels = train_labels.to(device).long()
    ks = sorted({min(int(k), len(train)) for k in ks})
    hits = {(k, t): 0 for k in ks for t in temperatures}
    for start in range(0, len(test_feats), chunk):
        query = torch.nn.functional.normalize(test_feats[start:start + chunk].to(device, dtype), dim=1)
        targets = test_labels[start:start + chunk].to(device).long()
        sims, idx = (query @ train.T).topk(ks[-1], dim=1)  # sorted: the first k columns are the k nearest
        neighbour_labels = train_labels[idx]
        for t in temperatures:
            # Subtracting each row's best similarity leaves the vote unchanged and keeps exp() finite for small T.
            weights = ((sims - sims[:, :1]) / t).exp()
            for k in ks:
                votes = torch.zeros(len(query), num_classes, device=device, dtype=dtype)
                votes.scatter_add_(1, neighbour_labels[:, :k], weights[:, :k])
                hits[(k, t)] += (votes.argmax(dim=1) == targets).sum().item()
    return hits


def knn_rows(tokens_fn, train_loader, val_loader, num_classes, ks, temperatures, device):
    """One encoder pass over both loaders (this process's shards under DDP), then k-NN on every feature kind:
    result rows for results.json (probe knn_<kind>_k<k>_T<t>, head knn-<kind>, best_acc1; lr and epoch None),
    the same on every process."""
    train_feats, train_labels = extract_features(tokens_fn, train_loader)
    val_feats, val_labels = extract_features(tokens_fn, val_loader)
    train_labels = dist.gather_shards(train_labels)
    val_count = int(dist.all_reduce_sum(torch.tensor([float(len(val_labels))], device=device)).item())
    rows = []
    for kind in train_feats:
        hits = knn_hits(dist.gather_shards(train_feats[kind]), train_labels, val_feats[kind], val_labels,
                        num_classes, ks=ks, temperatures=temperatures, device=device)
        summed = dist.all_reduce_sum(torch.tensor([float(n) for n in hits.values()], dtype=torch.float64,
                                                  device=device)).tolist()
        for (k, t), n in zip(hits, summed):
            top1 = 100.0 * n / val_count
            rows.append({"probe": f"knn_{kind}_k{k}_T{t:g}", "head": f"knn-{kind}", "lr": None,
                         "best_acc1": round(top1, 3), "best_epoch": None})
    return rows
