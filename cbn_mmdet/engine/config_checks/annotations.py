"""COCO annotation files must parse, checked before the work_dir exists (pycocotools would fail later with
a bare ``JSONDecodeError`` that names no file).

This parses each local ``.json`` annotation file once more than mmdet will (for COCO train2017, some
seconds and its size in memory, once per process), which buys a message naming the field and the file.
"""
import json

from .errors import ConfigError
from .paths import dataset_annotation_files

__all__ = ['check_annotation_files']


def _read_coco(path):
    """``None`` if ``path`` is a COCO-style JSON file, else the reason it is not."""
    try:
        with open(path, 'rb') as f:
            data = json.load(f)
    except UnicodeDecodeError as err:
        return f'not UTF-8 text ({err.reason} at byte {err.start})'
    except json.JSONDecodeError as err:
        return f'not valid JSON ({err.msg} at line {err.lineno}, column {err.colno})'
    except OSError as err:
        return f'cannot be read ({err.strerror})'
    if not isinstance(data, dict):
        return f'not a COCO annotation file (top level is a {type(data).__name__}, expected an object)'
    wrong = [k for k in ('images', 'annotations', 'categories') if k in data and not isinstance(data[k], list)]
    if 'images' not in data or wrong:
        return (f'not a COCO annotation file (needs lists images/annotations/categories; top-level keys: '
                f'{sorted(data)[:8]})')
    return None


def check_annotation_files(cfg, splits):
    """Every existing local ``.json`` annotation file of ``splits`` must be COCO-style JSON."""
    seen = set()
    for field, value, path in dataset_annotation_files(cfg, splits):
        if path in seen or not str(path).endswith('.json'):
            continue
        seen.add(path)
        reason = _read_coco(path)
        if reason is not None:
            shown = f' (resolved: {path!r})' if path != value else ''
            raise ConfigError(f'{field} = {value!r}{shown}: the annotation file is {reason}')
