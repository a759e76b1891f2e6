"""Small image-classification data for the fidelity studies (no download, no mmdet).

* ``digits``: scikit-learn's bundled handwritten digits (1797 images, 8x8, 10 classes; the file ships
  inside the scikit-learn wheel, nothing is fetched).
* ``synthetic``: a documented stand-in for machines without scikit-learn (and for the tests): 10
  classes, each a fixed random smooth 8x8 prototype; a sample is its class prototype with a random
  contrast in [0.6, 1.4], a random offset N(0, 0.3), a random shift of up to one pixel (circular) and
  pixel noise N(0, 0.5). Deterministic given ``data_seed``.

Both are returned as float32 tensors ``(N, 1, 8, 8)``, standardised with the training split's mean/std.
"""
import torch

__all__ = ['DATASETS', 'load_dataset', 'synthetic_digits']

DATASETS = ('digits', 'synthetic')


def synthetic_digits(num_samples=1797, data_seed=0):
    """The synthetic stand-in described in the module docstring: ``(images (N, 1, 8, 8), labels (N,))``."""
    gen = torch.Generator().manual_seed(data_seed)
    base = torch.randn(10, 1, 4, 4, generator=gen)
    prototypes = torch.nn.functional.interpolate(base, size=(8, 8), mode='bilinear', align_corners=False)
    prototypes = prototypes / prototypes.flatten(1).std(1).view(-1, 1, 1, 1)
    labels = torch.arange(num_samples) % 10
    labels = labels[torch.randperm(num_samples, generator=gen)]
    images = prototypes[labels].clone()
    contrast = torch.empty(num_samples, 1, 1, 1).uniform_(0.6, 1.4, generator=gen)
    offset = 0.3 * torch.randn(num_samples, 1, 1, 1, generator=gen)
    images = images * contrast + offset
    shifts = torch.randint(-1, 2, (num_samples, 2), generator=gen)
    for i in range(num_samples):
        images[i] = torch.roll(images[i], shifts=(int(shifts[i, 0]), int(shifts[i, 1])), dims=(1, 2))
    images = images + 0.5 * torch.randn(images.shape, generator=gen)
    return images, labels


def _digits():
    try:
        from sklearn.datasets import load_digits
    except ImportError as err:   # pragma: no cover - depends on the environment
        raise ImportError("dataset 'digits' needs scikit-learn (pip install scikit-learn); "
                          "or pass dataset='synthetic' (--dataset synthetic)") from err
    bunch = load_digits()
    images = torch.as_tensor(bunch.images, dtype=torch.float32).unsqueeze(1)
    return images, torch.as_tensor(bunch.target, dtype=torch.long)


def load_dataset(name='digits', test_fraction=0.2, data_seed=0):
    """``(x_train, y_train, x_test, y_test)``; the split is a fixed random one given ``data_seed``.

    Args:
        name (str): ``'digits'`` or ``'synthetic'``.
        test_fraction (float): share of the images held out for testing. Default: 0.2.
        data_seed (int): seeds the split (and the synthetic images); independent of training seeds.
    """
    if name == 'digits':
        images, labels = _digits()
    elif name == 'synthetic':
        images, labels = synthetic_digits(data_seed=data_seed)
    else:
        raise ValueError(f'load_dataset: name must be one of {DATASETS}, got {name!r}')
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f'load_dataset: test_fraction must be in (0, 1), got {test_fraction!r}')
    gen = torch.Generator().manual_seed(1000 + data_seed)
    order = torch.randperm(images.shape[0], generator=gen)
    num_test = int(round(test_fraction * images.shape[0]))
    test_idx, train_idx = order[:num_test], order[num_test:]
    x_train, x_test = images[train_idx], images[test_idx]
    mean, std = x_train.mean(), x_train.std()
    return (x_train - mean) / std, labels[train_idx], (x_test - mean) / std, labels[test_idx]
