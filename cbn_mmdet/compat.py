"""The torch versions this package is tested with, and the warning outside them.

The dependency list sets no upper bound on torch, so that users on a newer torch can install; a version
outside the tested range gets one warning at import instead of a refusal (no known incompatibility).
"""
import re
import warnings

# Inclusive (major, minor) bounds of the torch releases the test suite has run on (widen it only after a
# full run on the new version). The dependency floor (torch>=2.1) is lower: older releases install, warned.
TESTED_TORCH = ((2, 13), (2, 13))


def _major_minor(version):
    """(major, minor) of a torch version string such as '2.13.0+cpu' or '2.14.0a0+git1234'."""
    match = re.match(r'(\d+)\.(\d+)', version)
    if match is None:
        raise ValueError(f'torch version: cannot read {version!r} as major.minor')
    return int(match.group(1)), int(match.group(2))


def tested_range_text():
    low, high = ('.'.join(map(str, bound)) for bound in TESTED_TORCH)
    return low if low == high else f'{low} to {high}'


def check_torch_version(version=None):
    """Warn (once per call) when ``version`` (default: the installed torch) is outside TESTED_TORCH.

    Returns True when inside the tested range."""
    if version is None:
        import torch
        version = torch.__version__
    low, high = TESTED_TORCH
    if low <= _major_minor(str(version)) <= high:
        return True
    warnings.warn(f'cbn_mmdet: installed torch {version} is outside the tested range torch '
                  f'{tested_range_text()}; it may work, but it has not been tested', UserWarning, stacklevel=2)
    return False
