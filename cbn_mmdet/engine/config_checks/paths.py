"""Dataset paths: every local file the dataloaders and evaluators will read must exist (checked before the
Runner creates the work_dir, instead of a ``FileNotFoundError`` deep in dataset building)."""
import os.path as osp

from .errors import ConfigError

__all__ = ['check_dataset_paths', 'dataset_annotation_files']

_WRAPPER_KEYS = ('dataset', 'datasets')


def _is_remote(path):
    return isinstance(path, str) and '://' in path


def _join(root, path):
    if not root or osp.isabs(path) or _is_remote(path):
        return path
    return osp.join(root, path)


def _dataset_paths(dataset, field):
    """Yield ``(field, value, resolved_path)`` for the paths one dataset config reads, as mmengine's
    ``BaseDataset`` resolves them (``ann_file`` and every ``data_prefix`` entry joined to ``data_root``).
    Wrappers (Repeat/ClassBalanced/MultiImageMix: ``dataset``; Concat: ``datasets``) are followed."""
    if not isinstance(dataset, dict):
        return
    if 'dataset' in dataset:
        yield from _dataset_paths(dataset['dataset'], f'{field}.dataset')
    if isinstance(dataset.get('datasets'), (list, tuple)):
        for i, sub in enumerate(dataset['datasets']):
            yield from _dataset_paths(sub, f'{field}.datasets[{i}]')
    if any(k in dataset for k in _WRAPPER_KEYS) and 'ann_file' not in dataset:
        return
    if dataset.get('backend_args') is not None:     # a remote storage backend: nothing local to check
        return
    root = dataset.get('data_root')
    if isinstance(root, str) and root and not _is_remote(root):
        yield f'{field}.data_root', root, root
    ann_file = dataset.get('ann_file')
    if isinstance(ann_file, str) and ann_file:
        yield f'{field}.ann_file', ann_file, _join(root, ann_file)
    prefix = dataset.get('data_prefix')
    if isinstance(prefix, dict):
        for key, value in prefix.items():
            if isinstance(value, str) and value:
                yield f'{field}.data_prefix.{key}', value, _join(root, value)


def _evaluator_paths(evaluator, field):
    if isinstance(evaluator, (list, tuple)):
        for i, sub in enumerate(evaluator):
            yield from _evaluator_paths(sub, f'{field}[{i}]')
        return
    if not isinstance(evaluator, dict):
        return
    if isinstance(evaluator.get('metrics'), (list, tuple, dict)):   # type='Evaluator', metrics=[...]
        yield from _evaluator_paths(evaluator['metrics'], f'{field}.metrics')
    ann_file = evaluator.get('ann_file')
    if isinstance(ann_file, str) and ann_file and not _is_remote(ann_file) \
            and evaluator.get('backend_args') is None:
        yield f'{field}.ann_file', ann_file, ann_file


def check_dataset_paths(cfg, splits):
    """Every local path the dataloaders/evaluators of ``splits`` ('train', 'val', 'test') read must exist."""
    missing = []
    for split in splits:
        loader = cfg.get(f'{split}_dataloader')
        if isinstance(loader, dict):
            missing += [(f, v, p) for f, v, p in _dataset_paths(loader.get('dataset'), f'{split}_dataloader.dataset')
                        if not osp.exists(p)]
        if split != 'train':
            missing += [(f, v, p) for f, v, p in _evaluator_paths(cfg.get(f'{split}_evaluator'), f'{split}_evaluator')
                        if not osp.exists(p)]
    if missing:
        lines = [f"  {field} = {value!r}" + (f' (resolved: {path!r})' if path != value else '')
                 for field, value, path in missing]
        raise ConfigError('dataset path(s) in the config do not exist:\n' + '\n'.join(lines) +
                          '\nFix data_root/ann_file/data_prefix (e.g. --cfg-options '
                          f"{missing[0][0]}=...) or put the dataset there.")


def dataset_annotation_files(cfg, splits):
    """``(field, value, path)`` of every existing local annotation file the ``splits`` read."""
    for split in splits:
        loader = cfg.get(f'{split}_dataloader')
        entries = []
        if isinstance(loader, dict):
            entries += list(_dataset_paths(loader.get('dataset'), f'{split}_dataloader.dataset'))
        if split != 'train':
            entries += list(_evaluator_paths(cfg.get(f'{split}_evaluator'), f'{split}_evaluator'))
        for field, value, path in entries:
            if field.endswith('.ann_file') and osp.isfile(path):
                yield field, value, path
