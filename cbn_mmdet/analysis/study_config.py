"""What every fidelity study shares: its settings' common part (the data set, the output folder, the
torch threads, a ``quick`` variant for the tests and smoke checks) and how it writes its tables."""
import csv
import os
from dataclasses import dataclass
from typing import ClassVar

import torch

from .data import load_dataset

__all__ = ['StudyConfig', 'write_csv']


@dataclass
class StudyConfig:
    """Base of the studies' settings; a study adds its own fields and its ``QUICK`` overrides."""
    dataset: str = 'digits'
    out: str = 'work_dirs/fidelity'
    threads: int = 1

    QUICK: ClassVar[dict] = {}   # the fields a quick run changes

    @classmethod
    def quick(cls, **overrides):
        """A tiny run: ``QUICK`` updated by ``overrides``."""
        return cls(**{**cls.QUICK, **overrides})

    def start(self):
        """Set the torch threads, create the output folder; return the data set's splits."""
        torch.set_num_threads(self.threads)
        os.makedirs(self.out, exist_ok=True)
        return load_dataset(self.dataset)


def write_csv(path, rows):
    """``rows`` (dicts with the same keys) as a CSV file, floats to 6 significant digits; nothing if empty."""
    if not rows:
        return
    with open(path, 'w', newline='') as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        for row in rows:
            writer.writerow({k: (f'{v:.6g}' if isinstance(v, float) else v) for k, v in row.items()})
