"""Turn a data-loading failure deep in a dataloader into one line naming the file.

A corrupt or truncated image is only found when a dataloader (worker) decodes it: mmcv's
``LoadImageFromFile`` then fails with ``failed to load image: <path>`` at the end of a long traceback
(re-raised in the main process with the worker's traceback as text). :func:`data_errors_named` re-raises
such a failure as a :class:`DataError` whose message names the file; anything else passes unchanged.
"""
import contextlib
import re

__all__ = ['DataError', 'explain_data_error', 'data_errors_named']

# mmcv.transforms.LoadImageFromFile: ``assert img is not None, f'failed to load image: {filename}'``.
_IMAGE = re.compile(r'failed to load image: (\S+)')


class DataError(RuntimeError):
    """A dataset file (image) cannot be read; the message names it."""


def explain_data_error(err):
    """The one-line explanation of ``err`` when it is a known data-file failure, else ``None``."""
    match = _IMAGE.search(str(err))
    if match:
        return (f'image {match.group(1)!r} cannot be decoded (corrupt, truncated or not an image): replace it, '
                'or remove it from the annotation file')
    return None


@contextlib.contextmanager
def data_errors_named():
    """Within the block, known data-file failures are re-raised as :class:`DataError`."""
    try:
        yield
    except Exception as err:
        message = explain_data_error(err)
        if message is None:
            raise
        raise DataError(message) from err
