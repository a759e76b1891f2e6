"""The end-to-end demo (``bash tools/demo.sh``): synthetic data, train, test, results table, loss curves."""
from .report import plot_losses, results_markdown
from .runner import DemoError, run_demo, save_untrained_checkpoint
from .variants import MIN_AP_GAIN, REQUIRED, UNTRAINED, VARIANTS

__all__ = ['VARIANTS', 'REQUIRED', 'UNTRAINED', 'MIN_AP_GAIN', 'DemoError', 'run_demo', 'save_untrained_checkpoint',
           'results_markdown', 'plot_losses']
