"""Machine description, tables and the generated sections of ``docs/benchmarks.md`` (torch only)."""
import os
import platform
import re

import torch

__all__ = ['machine_info', 'machine_line', 'markdown_table', 'text_table', 'write_doc_section', 'fmt_bytes']


def _cpu_model():
    try:
        with open('/proc/cpuinfo') as f:
            for line in f:
                if line.startswith('model name'):
                    return line.split(':', 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info(device='cpu'):
    """What a reader needs to compare numbers: device, torch, threads and the load when measured."""
    info = {'cpu': _cpu_model(), 'cores': os.cpu_count(), 'torch': torch.__version__,
            'threads': torch.get_num_threads(), 'device': str(device)}
    try:
        info['load'] = tuple(round(v, 2) for v in os.getloadavg())
    except OSError:
        info['load'] = None
    if torch.device(device).type == 'cuda':
        info['gpu'] = torch.cuda.get_device_name(torch.device(device))
        info['cuda'] = torch.version.cuda
    return info


def machine_line(info, load_before=None):
    parts = [f"{info['cpu']} ({info['cores']} cores)", f"torch {info['torch']}", f"{info['threads']} threads",
             f"device {info['device']}"]
    if 'gpu' in info:
        parts.append(f"{info['gpu']}, CUDA {info['cuda']}")
    if load_before is not None:
        parts.append('load average (1, 5, 15 min) before: ' + ', '.join(f'{v:.2f}' for v in load_before))
    if info.get('load') is not None:
        parts.append('after: ' + ', '.join(f'{v:.2f}' for v in info['load']))
    return '; '.join(parts)


def fmt_bytes(n):
    if n is None:
        return 'n/a'
    for unit, scale in (('GB', 1 << 30), ('MB', 1 << 20), ('KB', 1 << 10)):
        if abs(n) >= scale:
            return f'{n / scale:.1f} {unit}'
    return f'{n} B'


def text_table(header, rows):
    widths = [max(len(str(v)) for v in col) for col in zip(header, *rows)]
    line = '  '.join(f'{{:{w}}}' for w in widths)
    out = [line.format(*header), line.format(*('-' * w for w in widths))]
    out += [line.format(*(str(v) for v in row)) for row in rows]
    return '\n'.join(out)


def markdown_table(header, rows):
    out = ['| ' + ' | '.join(header) + ' |', '|' + '|'.join('---' for _ in header) + '|']
    out += ['| ' + ' | '.join(str(v) for v in row) + ' |' for row in rows]
    return '\n'.join(out)


_DOC_HEAD = ('# Benchmarks\n\nSections between `<!-- BEGIN name -->` and `<!-- END name -->` are written by '
             'the tools (`tools/benchmark_norm.py --markdown`, `tools/benchmark_model.py --markdown`); the '
             'rest is hand-written.\n')


def write_doc_section(path, name, body):
    """Replace the generated section ``name`` of the markdown file ``path`` (append it if absent)."""
    begin, end = f'<!-- BEGIN {name} -->', f'<!-- END {name} -->'
    block = f'{begin}\n{body.rstrip()}\n{end}'
    text = open(path).read() if os.path.exists(path) else _DOC_HEAD
    pattern = re.compile(re.escape(begin) + r'.*?' + re.escape(end), re.S)
    if pattern.search(text):
        text = pattern.sub(lambda _: block, text)
    else:
        text = text.rstrip() + '\n\n' + block + '\n'
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, 'w') as f:
        f.write(text)
