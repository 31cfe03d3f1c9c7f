import math

import torch
import torch.nn.functional as F

from picstream.evaluate import Features, knn_classify, linear_probe


def naive_knn(train, val, k, t):
    """One query at a time, straight from the InstDisc definition."""
    bank = F.normalize(train.features, dim=1)
    top1 = top5 = 0
    classes = int(train.labels.max()) + 1
    for x, y in zip(val.features, val.labels):
        sims = [(float(bank[i] @ F.normalize(x, dim=0)), i) for i in range(len(bank))]
        sims.sort(reverse=True)
        votes = [0.0] * classes
        for s, i in sims[:k]:
            votes[int(train.labels[i])] += math.exp(s / t)
        ranked = sorted(range(classes), key=lambda c: -votes[c])
        top1 += ranked[0] == int(y)
        top5 += int(y) in ranked[:5]
    n = len(val.labels)
    return 100 * top1 / n, 100 * top5 / n


def blobs(n, classes, dim, noise, seed):
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(classes, dim, generator=torch.Generator().manual_seed(99))
    labels = torch.randint(0, classes, (n,), generator=g)
    return Features(centers[labels] + noise * torch.randn(n, dim, generator=g), labels)


def test_knn_matches_naive_definition():
    train, val = blobs(300, 7, 8, 1.5, 0), blobs(60, 7, 8, 1.5, 1)
    result = knn_classify(train, val, k=20, temperature=0.07, chunk=16)
    top1, top5 = naive_knn(train, val, 20, 0.07)
    assert abs(result["top1"] - top1) < 1e-9 and abs(result["top5"] - top5) < 1e-9
    assert 20 < top1 < 100  # the case is neither trivial nor hopeless


def test_linear_probe_learns_separable_and_fails_on_noise():
    good = linear_probe(blobs(500, 5, 16, 0.3, 0), blobs(200, 5, 16, 0.3, 1), epochs=10)
    assert good["top1"] > 95
    g = torch.Generator().manual_seed(3)
    noise_train = Features(torch.randn(500, 16, generator=g), torch.randint(0, 5, (500,), generator=g))
    noise_val = Features(torch.randn(200, 16, generator=g), torch.randint(0, 5, (200,), generator=g))
    assert linear_probe(noise_train, noise_val, epochs=10)["top1"] < 40
