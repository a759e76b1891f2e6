"""The Fashion-MNIST IDX reader against hand-made bytes, the loader's search and errors, the ResNet-8 with
every norm of the study (CBN bound through the block convention), and the --quick study on synthetic IDX
files written here (the real data are never used by the tests)."""
import gzip
import importlib.util
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from cbn_mmdet.analysis import fashion_mnist as fm

ROOT = Path(__file__).resolve().parents[2]


def _write(path, payload):
    opener = gzip.open if str(path).endswith('.gz') else open
    with opener(path, 'wb') as f:
        f.write(payload)


def _idx_bytes(array):
    """IDX bytes of a uint8 array, written from the format description (not with numpy's writer)."""
    header = bytes([0, 0, 0x08, array.ndim]) + b''.join(struct.pack('>I', s) for s in array.shape)
    return header + bytes(int(v) for v in array.reshape(-1))


def _fake_dataset(directory, per_class_train=20, per_class_test=10):
    """Class k: a bright 4x4 square at a class-specific place plus noise (learnable in a few steps)."""
    rng = np.random.default_rng(0)
    directory.mkdir(parents=True, exist_ok=True)
    for split, per_class in (('train', per_class_train), ('test', per_class_test)):
        labels = np.repeat(np.arange(10, dtype=np.uint8), per_class)
        rng.shuffle(labels)
        images = rng.integers(0, 60, size=(labels.size, 28, 28), dtype=np.uint8)
        for i, k in enumerate(labels):
            row, col = 2 + 6 * (k // 4), 2 + 6 * (k % 4)
            images[i, row:row + 4, col:col + 4] = 250
        image_file, label_file = fm.FILES[split]
        _write(directory / image_file, _idx_bytes(images))
        _write(directory / label_file, _idx_bytes(labels))
    return directory


def test_read_idx_hand_made_bytes(tmp_path):
    # 2 images of 2x3, type 0x08 (uint8), 3 dims: sizes 2, 2, 3 big-endian
    raw = bytes([0, 0, 8, 3, 0, 0, 0, 2, 0, 0, 0, 2, 0, 0, 0, 3]) + bytes(range(12))
    for name in ('images-idx3-ubyte', 'images-idx3-ubyte.gz'):
        _write(tmp_path / name, raw)
        got = fm.read_idx(str(tmp_path / name))
        assert got.dtype == np.uint8 and got.shape == (2, 2, 3)
        assert got[1, 0, 2] == 8 and got[0, 1, 0] == 3
    # 1 dim of 3 big-endian int16 values: 1, -2, 258
    _write(tmp_path / 'short', bytes([0, 0, 0x0B, 1, 0, 0, 0, 3, 0, 1, 0xFF, 0xFE, 1, 2]))
    assert fm.read_idx(str(tmp_path / 'short')).tolist() == [1, -2, 258]


@pytest.mark.parametrize('raw, message', [
    (b'\x01\x00\x08\x01\x00\x00\x00\x01\x05', 'not an IDX file'),
    (b'\x00\x00\x07\x01\x00\x00\x00\x01\x05', 'unknown IDX type code 0x07'),
    (b'\x00\x00\x08\x02\x00\x00\x00\x01', 'truncated in its header'),
    (b'\x00\x00\x08\x01\x00\x00\x00\x03\x05\x06', 'has 10 bytes, expected 11'),
    (b'', 'not an IDX file'),
])
def test_read_idx_rejects_bad_files(tmp_path, raw, message):
    path = tmp_path / 'bad'
    _write(path, raw)
    with pytest.raises(ValueError, match=message):
        fm.read_idx(str(path))


def test_loader_search_order_and_missing_data(tmp_path, monkeypatch):
    monkeypatch.setattr(fm, 'SYSTEM_DIR', str(tmp_path / 'system'))
    monkeypatch.setenv('CBN_MMDET_CACHE', str(tmp_path / 'cache'))
    with pytest.raises(FileNotFoundError) as err:
        fm.load_fashion_mnist('train')
    text = str(err.value)
    assert '\n' not in text and str(tmp_path / 'system') in text and str(tmp_path / 'cache' / 'fashion-mnist') \
        in text and fm.SETUP_COMMAND in text
    cache = _fake_dataset(Path(fm.cache_dir()))
    images, labels, directory = fm.load_fashion_mnist('test')
    assert directory == str(cache) and images.shape == (100, 28, 28) and labels.dtype == np.int64
    assert np.bincount(labels).tolist() == [10] * 10
    system = _fake_dataset(Path(fm.SYSTEM_DIR), per_class_test=3)
    assert fm.load_fashion_mnist('test')[2] == str(system)      # the system copy comes first
    with pytest.raises(ValueError, match="split must be one of \\('train', 'test'\\), got 'val'"):
        fm.load_fashion_mnist('val')
    _write(system / fm.FILES['test'][1], _idx_bytes(np.full(30, 11, dtype=np.uint8)))
    with pytest.raises(ValueError, match=r'labels outside \[0, 9\]: 11..11'):
        fm.load_fashion_mnist('test')


@pytest.mark.parametrize('norm', ['bn', 'gn', 'bcn', 'mabn', 'naive', 'cbn', 'cbn_fullgrad', 'brn'])
def test_basic_resnet_every_norm(norm):
    from cbn_mmdet.analysis.fmnist_study import FMNISTConfig, build_net
    from cbn_mmdet.ops import CrossIterationBatchNorm2d

    torch.manual_seed(0)
    net = build_net(norm, 2, 40, FMNISTConfig())
    cbns = [m for m in net.modules() if isinstance(m, CrossIterationBatchNorm2d)]
    if norm in ('cbn', 'naive', 'cbn_fullgrad'):
        assert len(cbns) == 9 and all(m.is_bound for m in cbns)   # stem, 3 blocks x 2, 2 shortcuts
    x, y = torch.randn(2, 1, 28, 28), torch.tensor([3, 7])
    for _ in range(4):
        loss = torch.nn.functional.cross_entropy(net(x), y)
        net.zero_grad()
        loss.backward()
        assert torch.isfinite(loss) and net.conv1.weight.grad.abs().sum() > 0
    net.eval()
    assert net(x).shape == (2, 10)


def test_variant_cfgs_schedules():
    from cbn_mmdet.analysis.fmnist_study import FMNISTConfig, variant_cfgs
    cfg = FMNISTConfig()
    assert variant_cfgs('brn', 4, 1000, cfg) == (None, dict(type='BRN', momentum=0.1, warmup_iters=50,
                                                             r_ramp_iters=350, d_ramp_iters=200))
    assert variant_cfgs('mabn', 4, 1000, cfg)[1] == dict(type='MABN', B=4, real_B=32, warmup_iters=50)
    assert variant_cfgs('naive', 1, 200, cfg)[1]['rho'] == 0.0
    with pytest.raises(ValueError, match="norms must be a non-empty subset"):
        FMNISTConfig(norms=('bn', 'ln'))
    with pytest.raises(ValueError, match='train_images must be a multiple of 10 in \\[10, 60000\\].*got 15'):
        FMNISTConfig(train_images=15)


def _tool():
    spec = importlib.util.spec_from_file_location('_tool_fmnist', ROOT / 'tools' / 'analysis'
                                                  / 'fashion_mnist_study.py')
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def _restore_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def test_quick_study_through_the_tool(tmp_path, capsys, _restore_threads):
    data = _fake_dataset(tmp_path / 'data')
    out = tmp_path / 'out'
    result = _tool().main(['--quick', '--data-root', str(data), '--out', str(out), '--norms', 'bn,cbn,brn'])
    for name in ('fmnist_runs.csv', 'fmnist_summary.csv', 'fmnist_table.md', 'fmnist_acc.png'):
        assert (out / name).stat().st_size > 0, name
    table = (out / 'fmnist_table.md').read_text()
    for label in ('| BN |', '| CBN |', '| BRN |', 'b=2', 'b=8', f'data from {data}'):
        assert label in table
    assert f'[fmnist] data: {data}' in capsys.readouterr().out
    runs = result['results']
    assert len(runs) == 3 * 2 and {r['iters'] for r in runs} == {40, 10}   # 80 images, one epoch
    assert all(0.0 <= r['test_acc'] <= 1.0 and not r['diverged'] for r in runs)
    assert all(r['cbn_fallbacks'] == 0 for r in runs if r['norm'] == 'cbn')
    assert max(r['test_acc'] for r in runs) > 0.3     # the synthetic classes are learnt (chance: 0.1)


def test_tool_errors(tmp_path):
    tool = _tool()
    with pytest.raises(SystemExit):
        tool.parse_args(['--norms', 'bn,layernorm'])
    with pytest.raises(SystemExit, match='Fashion-MNIST not found: searched'):
        tool.main(['--quick', '--data-root', str(tmp_path / 'nothing'), '--out', str(tmp_path / 'o')])
    with pytest.raises(SystemExit, match='test_images must be a multiple of 10'):
        tool.main(['--quick', '--test-images', '7', '--out', str(tmp_path / 'o')])
