"""Test-suite wide settings: deterministic, single-threaded torch keeps the suite quick on 2 cores."""
import torch

torch.set_num_threads(1)
