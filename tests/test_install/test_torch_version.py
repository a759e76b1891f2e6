"""The tested torch range: a newer torch installs and is told so once at import, a tested one is not."""
import importlib
import re
import warnings
from pathlib import Path

import pytest
import torch

import cbn_mmdet
from cbn_mmdet.compat import TESTED_TORCH, check_torch_version

PYPROJECT = Path(__file__).resolve().parents[2] / 'pyproject.toml'


def _reimport_warnings(monkeypatch, version):
    monkeypatch.setattr(torch, '__version__', version)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter('always')
        importlib.reload(cbn_mmdet)
    return [w for w in caught if 'cbn_mmdet: installed torch' in str(w.message)]


@pytest.mark.parametrize('version', ['2.14.0', '3.0.1+cu130', '2.12.1', '2.1.0', '1.13.1'])
def test_import_warns_outside_the_tested_range(monkeypatch, version):
    found = _reimport_warnings(monkeypatch, version)
    assert len(found) == 1, [str(w.message) for w in found]
    message = str(found[0].message)
    # names the installed version and the tested range (written out here, not read from the constant)
    assert f'torch {version} ' in message and 'tested range torch 2.13;' in message


@pytest.mark.parametrize('version', ['2.13.0', '2.13.0+cpu', '2.13.2+cu130'])
def test_import_is_silent_inside_the_tested_range(monkeypatch, version):
    assert _reimport_warnings(monkeypatch, version) == []


def test_prerelease_of_the_next_minor_is_outside():
    with pytest.warns(UserWarning, match=r'torch 2\.14\.0a0\+git5 is outside'):
        assert check_torch_version('2.14.0a0+git5') is False
    assert check_torch_version('2.13.1') is True


def test_unreadable_version_is_one_line_error():
    with pytest.raises(ValueError, match=r"^torch version: cannot read 'nightly' as major.minor$"):
        check_torch_version('nightly')


def test_dependencies_have_no_torch_upper_bound_and_admit_the_tested_range():
    # (tomllib is 3.11+; the package supports 3.9, so read the one dependency line directly)
    block = re.search(r'^dependencies = \[(.*?)^\]', PYPROJECT.read_text(), re.S | re.M).group(1)
    torch_specs = re.findall(r'"(torch\b[^"]*)"', block)
    assert torch_specs == ['torch>=2.1']
    assert (2, 1) <= TESTED_TORCH[0] <= TESTED_TORCH[1]
