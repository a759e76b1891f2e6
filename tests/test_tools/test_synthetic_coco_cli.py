"""tools/misc/synthetic_coco.py: generates the dataset once, reuses it, refuses other parameters there."""
import json

import pytest

from tests.tiny_config import load_tool

ARGS = ['--seed', '2', '--num-train', '2', '--num-val', '1', '--image-size', '48', '--min-size', '8',
        '--max-size', '20']


def test_generate_then_reuse(tmp_path, capsys):
    tool = load_tool('misc/synthetic_coco.py')
    out = tmp_path / 'coco'
    tool.main([str(out), *ARGS])
    assert capsys.readouterr().out.strip() == f'generated {out}'
    meta = json.loads((out / 'meta.json').read_text())
    assert (meta['seed'], meta['num_train'], meta['num_val'], meta['image_size']) == (2, 2, 1, 48)
    assert sorted(p.name for p in (out / 'train').iterdir()) == ['000000.png', '000001.png']
    tool.main([str(out), *ARGS])
    assert capsys.readouterr().out.strip() == f'reused {out}'
    with pytest.raises(SystemExit, match=r"other parameters: seed=2 \(asked: 5\)"):
        tool.main([str(out), *ARGS, '--seed', '5'])
    assert json.loads((out / 'meta.json').read_text())['seed'] == 2
