"""Fashion-MNIST (Xiao, Rasul, Vollgraf, arXiv 1708.07747; MIT licence) from its IDX files, with numpy.

The files are those of the Debian/Ubuntu package ``dataset-fashion-mnist``: installed, they are in
``/usr/share/datasets/fashion-mnist/``; ``bash tools/misc/get_fashion_mnist.sh`` unpacks the package
without installing it into ``$CBN_MMDET_CACHE/fashion-mnist/`` (default ``~/.cache/cbn_mmdet``). The
loader looks in these two places, in that order (or only in ``root`` when given), and never substitutes
other data: if the files are missing it raises, naming the paths searched and the setup command.

70 000 grey 28x28 images of 10 clothing classes: 60 000 for training, 10 000 for testing.
"""
import gzip
import os
import os.path as osp

import numpy as np

__all__ = ['SYSTEM_DIR', 'FILES', 'CLASSES', 'SETUP_COMMAND', 'cache_dir', 'search_dirs', 'find_fashion_mnist',
           'read_idx', 'load_fashion_mnist']

SYSTEM_DIR = '/usr/share/datasets/fashion-mnist'
SETUP_COMMAND = 'bash tools/misc/get_fashion_mnist.sh'
FILES = {
    'train': ('train-images-idx3-ubyte.gz', 'train-labels-idx1-ubyte.gz'),
    'test': ('t10k-images-idx3-ubyte.gz', 't10k-labels-idx1-ubyte.gz'),
}
CLASSES = ('T-shirt/top', 'Trouser', 'Pullover', 'Dress', 'Coat', 'Sandal', 'Shirt', 'Sneaker', 'Bag',
           'Ankle boot')

# IDX type codes (the third byte of the magic number) -> big-endian numpy dtypes.
_IDX_DTYPES = {0x08: np.dtype('>u1'), 0x09: np.dtype('>i1'), 0x0B: np.dtype('>i2'), 0x0C: np.dtype('>i4'),
               0x0D: np.dtype('>f4'), 0x0E: np.dtype('>f8')}


def cache_dir():
    """``$CBN_MMDET_CACHE/fashion-mnist`` (default ``~/.cache/cbn_mmdet/fashion-mnist``)."""
    base = os.environ.get('CBN_MMDET_CACHE') or osp.join(osp.expanduser('~'), '.cache', 'cbn_mmdet')
    return osp.join(base, 'fashion-mnist')


def search_dirs(root=None):
    """The directories :func:`find_fashion_mnist` looks in, in order."""
    return [root] if root is not None else [SYSTEM_DIR, cache_dir()]


def find_fashion_mnist(root=None):
    """The first directory of :func:`search_dirs` holding all four files; raises ``FileNotFoundError``."""
    names = [name for pair in FILES.values() for name in pair]
    for directory in search_dirs(root):
        if all(osp.isfile(osp.join(directory, name)) for name in names):
            return directory
    raise FileNotFoundError(f'Fashion-MNIST not found: searched {search_dirs(root)} for {names}; '
                            f'run `{SETUP_COMMAND}` (or install the package dataset-fashion-mnist)')


def read_idx(path):
    """An IDX file (gzip-compressed if its name ends in ``.gz``) as a numpy array of its stored shape.

    Format: 2 zero bytes, a type byte, a byte with the number of dimensions ``k``, ``k`` big-endian
    uint32 sizes, then the data in row-major order, big-endian.
    """
    opener = gzip.open if path.endswith('.gz') else open
    with opener(path, 'rb') as f:
        raw = f.read()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0:
        raise ValueError(f'read_idx: {path} is not an IDX file (magic bytes {raw[:4].hex() or "<empty>"})')
    dtype = _IDX_DTYPES.get(raw[2])
    if dtype is None:
        raise ValueError(f'read_idx: {path} has an unknown IDX type code 0x{raw[2]:02x}')
    ndim = raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise ValueError(f'read_idx: {path} is truncated in its header ({len(raw)} bytes, {ndim} dims)')
    shape = tuple(int(v) for v in np.frombuffer(raw, dtype='>u4', count=ndim, offset=4))
    expected = header + int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if len(raw) != expected:
        raise ValueError(f'read_idx: {path} has {len(raw)} bytes, expected {expected} for shape {shape} '
                         f'of {dtype.name}')
    return np.frombuffer(raw, dtype=dtype, offset=header).reshape(shape).astype(dtype.newbyteorder('='))


def load_fashion_mnist(split='train', root=None):
    """``(images, labels, directory)`` of a split: ``uint8 (N, 28, 28)``, ``int64 (N,)`` and where they came
    from.

    Args:
        split (str): ``'train'`` (60 000 images) or ``'test'`` (10 000).
        root (str | None): a directory holding the four ``.gz`` files; default: search the system
            directory, then the cache (see the module docstring).
    """
    if split not in FILES:
        raise ValueError(f'load_fashion_mnist: split must be one of {tuple(FILES)}, got {split!r}')
    directory = find_fashion_mnist(root)
    image_file, label_file = (osp.join(directory, name) for name in FILES[split])
    images, labels = read_idx(image_file), read_idx(label_file)
    if images.ndim != 3 or labels.ndim != 1 or images.shape[0] != labels.shape[0]:
        raise ValueError(f'load_fashion_mnist: {image_file} {images.shape} and {label_file} {labels.shape} do '
                         'not form (N, H, W) images with N labels')
    if labels.size and (labels.min() < 0 or labels.max() >= len(CLASSES)):
        raise ValueError(f'load_fashion_mnist: {label_file} has labels outside [0, {len(CLASSES) - 1}]: '
                         f'{labels.min()}..{labels.max()}')
    return images, labels.astype(np.int64), directory
