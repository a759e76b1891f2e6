"""The end-to-end demo (``bash tools/demo.sh``): synthetic data, train, test, bootstrap intervals, report."""
from .report import NOISE_RULE, exceeds_noise, plot_losses, results_markdown, seed_stats, summarize, summarize_matches
from .runner import DemoError, run_demo, save_untrained_checkpoint
from .variants import BN_TYPE, MIN_AP_GAIN, REFERENCES, REQUIRED, UNTRAINED, VARIANTS

__all__ = ['VARIANTS', 'REQUIRED', 'BN_TYPE', 'REFERENCES', 'UNTRAINED', 'MIN_AP_GAIN', 'DemoError', 'run_demo',
           'save_untrained_checkpoint', 'results_markdown', 'plot_losses', 'summarize', 'summarize_matches',
           'seed_stats', 'exceeds_noise', 'NOISE_RULE']
