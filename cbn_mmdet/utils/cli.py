"""Argument-parsing helpers shared by the scripts in ``tools/`` (the one place for them).

The package's library functions take plain arguments; only the tools parse ``sys.argv``.
"""
import argparse
import os
import os.path as osp

__all__ = ['add_launcher_args', 'set_local_rank_env', 'add_cfg_options_arg', 'parse_mmdet_tool_args', 'int_list',
           'float_list', 'choice_list', 'config_overrides', 'config_error_exit', 'add_study_args', 'study_config',
           'run_converter']

LAUNCHERS = ('none', 'pytorch', 'slurm', 'mpi')


def add_launcher_args(parser):
    """mmdet's ``--launcher`` and ``--local-rank`` options."""
    parser.add_argument('--launcher', choices=list(LAUNCHERS), default='none', help='job launcher')
    # torch.distributed.launch passes --local-rank (torch>=2) or --local_rank; torchrun sets LOCAL_RANK.
    parser.add_argument('--local_rank', '--local-rank', type=int, default=0)


def set_local_rank_env(local_rank):
    """``LOCAL_RANK`` from ``--local-rank`` unless the launcher already set it (torchrun does)."""
    if 'LOCAL_RANK' not in os.environ:
        os.environ['LOCAL_RANK'] = str(local_rank)


def add_cfg_options_arg(parser):
    """mmdet's ``--cfg-options key=value ...`` (parsed into a dict by mmengine's ``DictAction``).

    An item without ``=`` or with an empty key is a usage error naming it (mmengine's action raises a
    bare ``ValueError`` traceback).
    """
    from mmengine.config import DictAction

    class CheckedDictAction(DictAction):
        def __call__(self, parser, namespace, values, option_string=None):
            for item in values or ():
                if '=' not in item or not item.split('=', 1)[0].strip():
                    parser.error(f'{option_string} {item!r}: expected key=value (e.g. train_cfg.max_epochs=1)')
            super().__call__(parser, namespace, values, option_string)

    parser.add_argument('--cfg-options', nargs='+', action=CheckedDictAction,
                        help='override config settings, key=value pairs (xxx=yyy) merged into the config')


def parse_mmdet_tool_args(parser, argv=None):
    """Finish a train/test parser with mmdet's ``--cfg-options``, ``--launcher``, ``--local-rank``; parse."""
    add_cfg_options_arg(parser)
    add_launcher_args(parser)
    args = parser.parse_args(argv)
    set_local_rank_env(args.local_rank)
    return args


def int_list(text):
    """``'1,2,4'`` -> ``(1, 2, 4)`` (an ``argparse`` type)."""
    return _values(text, int)


def float_list(text):
    """``'0.1,1'`` -> ``(0.1, 1.0)`` (an ``argparse`` type)."""
    return _values(text, float)


def _values(text, kind):
    try:
        return tuple(kind(v) for v in text.split(','))
    except ValueError:
        raise argparse.ArgumentTypeError(f'{text!r} is not a comma-separated list of {kind.__name__}s') from None


def choice_list(choices):
    """An ``argparse`` type: a comma-separated subset of ``choices``."""
    def parse(text):
        values = tuple(text.split(','))
        unknown = [v for v in values if v not in choices]
        if unknown:
            raise argparse.ArgumentTypeError(f'unknown value(s) {unknown}; choose from {tuple(choices)}')
        return values
    return parse


def config_overrides(args, names):
    """``{name: value}`` for the options in ``names`` that were given (not ``None``) on the command line."""
    return {name: getattr(args, name) for name in names if getattr(args, name, None) is not None}


def config_error_exit(tool, err):
    """The one-line exit of a tool refusing a config: ``tools/train.py: config error: ...`` (exit code 1)."""
    return SystemExit(f'{tool}: config error: {err}')


def add_study_args(parser, defaults, datasets):
    """The options every fidelity study takes: ``--out``, ``--dataset``, ``--threads``, ``--quick``."""
    parser.add_argument('--out', default=defaults.out, help='output folder (default: %(default)s)')
    parser.add_argument('--dataset', default=defaults.dataset, choices=datasets)
    parser.add_argument('--threads', type=int, help=f'torch threads (default: {defaults.threads})')
    parser.add_argument('--quick', action='store_true', help='a tiny run (for tests and smoke checks)')


def study_config(config_cls, args, options):
    """``config_cls`` (a study's settings) from the parsed ``args``: the given ``options`` (and
    ``--threads``) override the defaults, or the quick run's with ``--quick``."""
    overrides = dict(config_overrides(args, (*options, 'threads')), out=args.out, dataset=args.dataset)
    return config_cls.quick(**overrides) if args.quick else config_cls(**overrides)


def run_converter(src, dst, convert):
    """The flow of every ``tools/model_converters`` script: read the released checkpoint ``src``, apply
    ``convert`` (``{key: tensor} -> {key: tensor}``, including any check against the target model), write
    ``dst`` as an mmengine checkpoint (``meta.converted_from`` = the source's file name) and say so.

    A :class:`~cbn_mmdet.converters.ConversionError` (reading or converting) exits with one line,
    ``<src>: <what is wrong>``, before anything is written. Returns the converted dict.
    """
    from ..converters import ConversionError, load_state_dict, save_state_dict
    try:
        state_dict = load_state_dict(src)
    except ConversionError as error:
        raise SystemExit(str(error)) from None          # its message starts with the file's name
    try:
        converted = convert(state_dict)
    except ConversionError as error:
        raise SystemExit(f'{src}: {error}') from None
    save_state_dict(converted, dst, meta=dict(converted_from=osp.basename(src)))
    print(f'wrote {dst} ({len(converted)} tensors)')
    return converted
