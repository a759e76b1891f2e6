"""Check every norm layer on a GPU: parity with float64, host syncs, GradScaler overflow steps, torch.compile,
timing and kernel counts. Prints one ``PASS|FAIL|SKIP|XFAIL <check> <detail>`` line per check and a summary;
exits 1 if any check FAILs.

Torch and ``cbn_mmdet.ops`` only (mmcv, mmengine and mmdet are blocked from import, so it runs on a bare CUDA
box); run it from a checkout (the official algorithm it times is the test oracle,
``tests/oracles/official_cbn.py``, loaded by path).

    python tools/gpu_check.py                 # on CUDA: everything (< 3 min on one GPU)
    python tools/gpu_check.py --quick         # fewer steps and layers (every layer still in fp32)
    python tools/gpu_check.py --only parity   # the checks whose name contains 'parity' (--skip: all others)
    python tools/gpu_check.py --list          # the names of the checks

Without CUDA it is a dry run: float32/bf16/fp16-autocast/channels_last CPU runs against float64,
``GradScaler('cpu')`` overflow steps and torch.compile (inductor when a C++ compiler exists, else
aot_eager; dynamo's eager backend under ``--quick``); the CUDA-only checks (sync debug mode, timing, kernel
counts) SKIP with the reason. ``--device cpu`` forces the dry run on a CUDA machine.

Checks:

* ``parity/<layer>/<mode>``: N SGD steps of conv + norm (+ ReLU) on the device in ``fp32`` (TF32 off),
  ``fp16_autocast``, ``bf16_autocast`` or ``channels_last`` against the same steps on CPU in float64; the
  error is max |a - b| / max(max |b|, 1) over every step's output and the final parameters and float buffers
  (integer buffers must be equal); tolerance per mode, printed.
* ``syncs/<layer>/<mode>``: training steps and an eval forward under ``torch.cuda.set_sync_debug_mode('error')``;
  ``syncs/<layer>/after_load``: the first training steps after a checkpoint load.
* ``amp_inf_grad/<layer>``: ``GradScaler`` with an inf injected into the gradient at the norm's output at one
  step: the step is skipped, the state stays finite, and the run equals one where that step's update is
  dropped or one that never saw the batch (same scale schedule). Catches state written in backward (MABN's
  gradient-statistic rows). Layers with ``use_grad_scaler`` (MABN) are given the scaler.
* ``amp_scale_change/<layer>``: a scaled run whose loss scale changes mid-run equals the unscaled run
  (power-of-two scales are exact): the layer keeps no gradient state in loss-scale units.
* ``amp_inf_batch/<layer>`` (CBN family, whose non-finite guard promises it): an inf in one batch's
  activations: step skipped, running statistics and window untouched, equal to a run without that batch.
* ``compile/cbn`` and ``compile_recompiles/cbn``: ``torch.compile`` of conv + CBN (``fullgraph=True`` where it
  traces) equals eager; no graph may be compiled after 2 warm-up steps (``torch._dynamo`` counters).
* ``timing/<norm>``: conv + {BN, GN, CBN, official CBN algorithm} training step, ms per step (CUDA events)
  and CUDA kernels per step (torch.profiler).

``XFAIL`` marks a failure listed in ``KNOWN_FAILURES`` (a defect known today; not counted as FAIL); a
listed check that passes prints ``FAIL ... XPASS`` so that the entry is removed once fixed.
"""
import argparse
import contextlib
import copy
import importlib.util
import math
import os.path as osp
import shutil
import sys
import time
import traceback

ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))
ORACLE = osp.join(ROOT, 'tests', 'oracles', 'official_cbn.py')

# Defects known today (check name -> what fails and where). A later fix turns the line into an XPASS FAIL.
KNOWN_FAILURES = {}

MODES = ('fp32', 'fp16_autocast', 'bf16_autocast', 'channels_last')
# Relative error allowed against float64 after all steps (TF32 is off for the float32 modes).
TOLERANCE = {'fp32': 1e-4, 'channels_last': 1e-4, 'fp16_autocast': 3e-2, 'bf16_autocast': 5e-2}
C_IN, C_OUT, SIZE, BATCH = 4, 8, 8, 2
# --quick: every layer in fp32, these also in the other modes and through the GradScaler checks.
QUICK_LAYERS = ('cbn_window', 'sync_cbn', 'sync_bn', 'bcn_wsconv', 'mabn_cenconv', 'brn')


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description='Check every norm layer on CUDA (a CPU dry run without CUDA).')
    parser.add_argument('--quick', action='store_true', help='fewer steps and a quick compile backend')
    parser.add_argument('--device', default=None, help='device to check (default: cuda if available, else cpu)')
    parser.add_argument('--steps', type=int, default=None, help='SGD steps per parity run (default 20, quick 4)')
    parser.add_argument('--only', default=None, help='run only the checks whose name contains this text')
    parser.add_argument('--skip', default=None, help='skip the checks whose name contains this text')
    parser.add_argument('--list', action='store_true', help='print the names of the checks and exit')
    args = parser.parse_args(argv)
    if args.steps is not None and args.steps < 2:
        parser.error(f'--steps must be >= 2, got {args.steps}')
    return args


def _block_openmmlab():
    """Make ``import mmcv/mmengine/mmdet`` fail: the check runs on torch and ``cbn_mmdet.ops`` alone. Returns
    the names that are installed here (a plain ``import cbn_mmdet.ops`` would import them: the package's
    ``__init__`` registers the layers when mmengine and mmcv are found)."""
    installed = [name for name in ('mmcv', 'mmengine', 'mmdet')
                 if name not in sys.modules and importlib.util.find_spec(name) is not None]
    for name in ('mmcv', 'mmengine', 'mmdet'):
        sys.modules.setdefault(name, None)
    return installed


class Report:

    def __init__(self, only=None, skip=None):
        self.only, self.skip = only, skip
        self.counts = {'PASS': 0, 'FAIL': 0, 'SKIP': 0, 'XFAIL': 0}

    def wanted(self, check):
        return (self.only is None or self.only in check) and (self.skip is None or self.skip not in check)

    def line(self, status, check, detail):
        known = KNOWN_FAILURES.get(check)
        if known is not None and status == 'FAIL':
            status, detail = 'XFAIL', f'{detail} (known: {known})'
        elif known is not None and status == 'PASS':
            status, detail = 'FAIL', f'XPASS {detail}: listed in KNOWN_FAILURES ({known}) but passes; remove it'
        self.counts[status] += 1
        print(f'{status} {check} {detail}', flush=True)

    def run(self, check, fn):
        """``fn()`` returns ``(status, detail)``; an exception is a FAIL with its last line."""
        if not self.wanted(check):
            return
        started = time.perf_counter()
        try:
            status, detail = fn()
        except Exception as exc:   # noqa: BLE001 - every check reports, none stops the others
            where = traceback.extract_tb(exc.__traceback__)[-1]
            status, detail = 'FAIL', (f'{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ""} '
                                      f'({osp.basename(where.filename)}:{where.lineno})')
        if status != 'SKIP':
            detail = f'{detail} [{time.perf_counter() - started:.1f} s]'
        self.line(status, check, detail)


# ---------------------------------------------------------------------- layers
def layer_cases(ops, nn):
    """name -> () -> (conv, norm), deterministic under the caller's seed."""

    def cbn(**kwargs):
        def build(conv_cls=nn.Conv2d, cls=ops.CrossIterationBatchNorm2d):
            conv = conv_cls(C_IN, C_OUT, 3, padding=1, bias=False)
            norm = cls(C_OUT, **kwargs)
            if norm.buffer_num:
                ops.bind_cbn_to_conv(norm, conv)
            return conv, norm
        return build

    def plain(conv_cls, make_norm):
        return lambda: (conv_cls(C_IN, C_OUT, 3, padding=1, bias=False), make_norm())

    cases = {
        'cbn_plain': cbn(buffer_num=0),
        'cbn_burnin': cbn(buffer_num=2, burnin=3),
        'cbn_window': cbn(buffer_num=2),
        'cbn_two_stage_false': cbn(buffer_num=2, burnin=4, two_stage=False),
        'cbn_frozen': cbn(buffer_num=2, frozen=True),
        'cbn_grad_through_window': cbn(buffer_num=2, grad_through_window=True),
        'cbn_momentum_none': cbn(buffer_num=2, momentum=None),
        'cbn_stat_grad_sample': cbn(buffer_num=2, stat_grad_sample=0.25),
        'cbn_wsconv': lambda: cbn(buffer_num=2)(conv_cls=ops.WeightStandardizedConv2d),
        'sync_cbn': lambda: cbn(buffer_num=2)(cls=ops.SyncCrossIterationBatchNorm2d),
        'sync_bn': plain(nn.Conv2d, lambda: ops.SyncBatchNorm(C_OUT)),
        'sync_bn_momentum_none': plain(nn.Conv2d, lambda: ops.SyncBatchNorm(C_OUT, momentum=None)),
        'bcn_wsconv': plain(ops.WeightStandardizedConv2d, lambda: ops.BatchChannelNorm2d(C_OUT, num_groups=4)),
        'bcn_wsconv_estimate': plain(ops.WeightStandardizedConv2d,
                                     lambda: ops.BatchChannelNorm2d(C_OUT, num_groups=4, estimate_stats=True)),
        'bcn_momentum_none': plain(ops.WeightStandardizedConv2d,
                                   lambda: ops.BatchChannelNorm2d(C_OUT, num_groups=4, momentum=None)),
        'mabn_cenconv': plain(ops.CenteredConv2d,
                              lambda: ops.MovingAverageBatchNorm2d(C_OUT, B=BATCH, real_B=2 * BATCH, warmup_iters=1)),
        'bn': plain(nn.Conv2d, lambda: nn.BatchNorm2d(C_OUT)),
        'gn': plain(nn.Conv2d, lambda: nn.GroupNorm(4, C_OUT)),
    }
    if hasattr(ops, 'BatchRenorm2d'):
        cases['brn'] = plain(nn.Conv2d, lambda: ops.BatchRenorm2d(C_OUT, warmup_iters=1, r_ramp_iters=2,
                                                                   d_ramp_iters=2))
    return cases


# ---------------------------------------------------------------------- shared training loop
class Harness:

    def __init__(self, torch, ops, device, steps, quick):
        import torch.nn as nn
        self.torch, self.nn, self.ops = torch, nn, ops
        self.device = torch.device(device)
        self.steps, self.quick = steps, quick
        self.cases = layer_cases(ops, nn)

    def build(self, name):
        self.torch.manual_seed(0)
        conv, norm = self.cases[name]()
        return self.nn.Sequential(conv, norm, self.nn.ReLU())

    def batches(self, count, dtype=None):
        torch = self.torch
        gen = torch.Generator().manual_seed(7)
        out = []
        for _ in range(count):
            x = torch.randn(BATCH, C_IN, SIZE, SIZE, generator=gen, dtype=torch.float64)
            target = torch.randn(BATCH, C_OUT, SIZE, SIZE, generator=gen, dtype=torch.float64)
            out.append((x, target))
        return out

    def autocast(self, mode):
        torch = self.torch
        if mode in ('fp16_autocast', 'bf16_autocast'):
            dtype = torch.float16 if mode == 'fp16_autocast' else torch.bfloat16
            return torch.autocast(self.device.type, dtype=dtype)
        return contextlib.nullcontext()

    def train(self, model, batches, mode='fp32', device=None, dtype=None, optimizer=None, hooks=None,
              scaler=None, skip=(), forward_only=()):
        """SGD steps; returns the per-step outputs (float64, CPU). ``hooks[i](out)`` may edit step i's graph;
        ``skip``: steps whose update is dropped (forward and backward still run); ``forward_only``: steps
        that run the forward alone (no backward, no update). Both map a step to the loss scale set after it."""
        torch = self.torch
        device = self.device if device is None else torch.device(device)
        if optimizer is None:
            optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        outputs = []
        model.train()
        for i, (x, target) in enumerate(batches):
            x = x.detach().to(device=device, dtype=dtype or torch.float32)     # a fresh leaf every run
            if mode == 'channels_last':
                x = x.contiguous(memory_format=torch.channels_last)
            x.requires_grad_()
            target = target.to(device=device, dtype=dtype or torch.float32)
            with self.autocast(mode) if device.type == self.device.type else contextlib.nullcontext():
                out = model(x)
            if hooks and i in hooks:
                hooks[i](out)
            loss = (out.to(target.dtype) * target).mean()
            if i in forward_only:
                if scaler is not None:
                    scaler.update(new_scale=forward_only[i])
            elif scaler is None:
                loss.backward()
                if i not in skip:
                    optimizer.step()
            else:
                scaler.scale(loss).backward()
                if i in skip:
                    scaler.update(new_scale=skip[i])
                else:
                    scaler.step(optimizer)
                    scaler.update()
            optimizer.zero_grad(set_to_none=True)
            outputs.append(out.detach().to('cpu', torch.float64))
        return outputs

    def state(self, model):
        return {k: v.detach().to('cpu') for k, v in model.state_dict().items()}


def rel_error(torch, a, b):
    """max |a - b| / max(max |b|, 1): relative for large tensors, absolute for small ones (a bias near 0)."""
    if not b.numel():
        return 0.0
    a, b = a.to(torch.float64), b.to(torch.float64)
    return (a - b).abs().max().item() / max(b.abs().max().item(), 1.0)


def compare_states(torch, got, want, keys=None, skip_ints=False):
    """Max relative error over float tensors; integer mismatches listed."""
    worst, worst_key, bad_ints = 0.0, None, []
    for key in keys if keys is not None else want:
        a, b = got[key], want[key]
        if not b.is_floating_point():
            if not skip_ints and not torch.equal(a, b):
                bad_ints.append(key)
            continue
        if a.shape != b.shape:
            bad_ints.append(f'{key} shape')
            continue
        if not bool(torch.isfinite(a).all()):
            return math.inf, key, bad_ints
        err = rel_error(torch, a, b)
        if err > worst:
            worst, worst_key = err, key
    return worst, worst_key, bad_ints


# ---------------------------------------------------------------------- checks
def check_parity(h, name, mode):
    torch = h.torch
    if mode == 'fp16_autocast' and h.device.type == 'cpu' and not _cpu_fp16_autocast(torch):
        return 'SKIP', 'CPU autocast has no float16 here'
    init = h.build(name)
    batches = h.batches(h.steps)
    ref = copy.deepcopy(init).double()
    ref_out = h.train(ref, batches, device='cpu', dtype=torch.float64)
    dev = copy.deepcopy(init).to(h.device)
    if mode == 'channels_last':
        dev = dev.to(memory_format=torch.channels_last)
    out = h.train(dev, batches, mode=mode)
    err_out = max(rel_error(torch, a, b) for a, b in zip(out, ref_out))
    err_state, key, bad = compare_states(torch, h.state(dev), h.state(ref))
    tol = TOLERANCE[mode]
    err = max(err_out, err_state)
    detail = (f'steps={h.steps} max_rel_err={err:.2e} (outputs {err_out:.2e}, state {err_state:.2e}'
              f'{" at " + key if key else ""}) tol={tol:.0e}')
    if bad:
        return 'FAIL', f'{detail}; integer buffers differ: {bad}'
    return ('PASS' if err <= tol else 'FAIL'), detail


def _cpu_fp16_autocast(torch):
    try:
        with torch.autocast('cpu', dtype=torch.float16):
            return torch.nn.functional.conv2d(torch.ones(1, 1, 2, 2), torch.ones(1, 1, 1, 1)).dtype == torch.float16
    except (RuntimeError, AssertionError):
        return False


def check_syncs(h, name, mode):
    torch = h.torch
    if h.device.type != 'cuda':
        return 'SKIP', 'CUDA only (torch.cuda.set_sync_debug_mode); the CPU proxy is tests/test_ops/test_host_syncs.py'
    model = h.build(name).to(h.device)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    batches = [(x.to(h.device), t.to(h.device)) for x, t in h.batches(6)]
    h.train(model, batches[:3], mode=mode, optimizer=optimizer)      # lazy initialisation, momentum buffers
    x_eval = batches[0][0].float()
    model.eval()
    with torch.no_grad(), h.autocast(mode):      # the eval path's first call outside the checked region too
        model(x_eval)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode('error')
    try:
        _train_no_copy(h, model, batches[3:], mode, optimizer)
        model.eval()
        with torch.no_grad(), h.autocast(mode):
            model(x_eval)
    except RuntimeError as exc:
        return 'FAIL', f'host sync: {str(exc).splitlines()[0]}'
    finally:
        torch.cuda.set_sync_debug_mode(0)
    torch.cuda.synchronize()
    return 'PASS', '3 training steps + eval forward, no synchronising call'


def check_syncs_after_load(h, name):
    """The first training steps after a checkpoint load (fresh model and optimizer) under sync debug mode."""
    torch = h.torch
    if h.device.type != 'cuda':
        return 'SKIP', 'CUDA only (torch.cuda.set_sync_debug_mode); the CPU proxy is tests/test_ops/test_host_syncs.py'
    import io
    batches = [(x.to(h.device), t.to(h.device)) for x, t in h.batches(5)]
    model = h.build(name).to(h.device)
    h.train(model, batches[:3])
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    buf.seek(0)
    fresh = h.build(name).to(h.device)
    fresh.load_state_dict(torch.load(buf, map_location=h.device))
    optimizer = torch.optim.SGD(fresh.parameters(), lr=0.05, momentum=0.9)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode('error')
    try:
        _train_no_copy(h, fresh, batches[3:], 'fp32', optimizer)
    except RuntimeError as exc:
        return 'FAIL', f'host sync: {str(exc).splitlines()[0]}'
    finally:
        torch.cuda.set_sync_debug_mode(0)
    torch.cuda.synchronize()
    return 'PASS', '2 training steps after load_state_dict, no synchronising call'


def _train_no_copy(h, model, batches, mode, optimizer):
    """Training steps without any host transfer (the batches are on the device already)."""
    model.train()
    for x, target in batches:
        x = x.float().requires_grad_()
        with h.autocast(mode):
            out = model(x)
        (out.float() * target.float()).mean().backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)


def _scaler(h, init_scale, *models):
    """A GradScaler that never grows; layers that take one (``use_grad_scaler``, e.g. MABN) are given it."""
    torch = h.torch
    scaler = torch.amp.GradScaler(h.device.type, init_scale=init_scale, growth_interval=1_000_000)
    for model in models:
        for module in model.modules():
            if hasattr(module, 'use_grad_scaler'):
                module.use_grad_scaler(scaler)
    return scaler


def _poison_grad(torch):
    def hook(out):
        out.register_hook(lambda g: g * float('inf'))
    return hook


def _run_without(h, init, batches, k, scale_after):
    """The scaled run that never sees batch ``k`` (the scale set to ``scale_after`` where it was)."""
    torch = h.torch
    model = copy.deepcopy(init).to(h.device)
    scaler = _scaler(h, 2.0 ** 8, model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    h.train(model, batches[:k], scaler=scaler, optimizer=optimizer)
    scaler.update(new_scale=scale_after)
    h.train(model, batches[k + 1:], scaler=scaler, optimizer=optimizer)
    return model


def check_amp_inf_grad(h, name):
    """Overflow in backward at step k: skipped step, finite state, and the run equals one of: the run that
    drops step k's update (the forward's statistics kept, as BN's running statistics are), the run that never
    saw batch k (the step taken back, as MABN does), or the run whose step k is a forward alone (CBN: the step
    enters no average, but the forward counter — burn-in, the fast mode's sampling grid — counted it)."""
    torch = h.torch
    k, steps = 3, 8
    init = h.build(name)
    batches = h.batches(steps)
    hit = copy.deepcopy(init).to(h.device)
    scaler = _scaler(h, 2.0 ** 8, hit)
    h.train(hit, batches, scaler=scaler, hooks={k: _poison_grad(torch)})
    if scaler.get_scale() > 2.0 ** 7:
        return 'FAIL', f'the overflow step was not detected: scale {scaler.get_scale()} (expected {2.0 ** 7})'
    if scaler.get_scale() < 2.0 ** 7:
        return 'FAIL', (f'later steps overflowed too (scale {scaler.get_scale()}, expected one backoff to '
                        f'{2.0 ** 7}): the overflow step poisoned the layer\'s state')
    dropped = copy.deepcopy(init).to(h.device)
    h.train(dropped, batches, scaler=_scaler(h, 2.0 ** 8, dropped), skip={k: 2.0 ** 7})
    err_dropped, key_dropped, bad = compare_states(torch, h.state(hit), h.state(dropped))
    if bad:
        err_dropped, key_dropped = math.inf, f'integer buffers {bad}'
    unseen = _run_without(h, init, batches, k, 2.0 ** 7)
    floats = [key for key, v in h.state(unseen).items() if v.is_floating_point()]
    err_unseen, key_unseen, _ = compare_states(torch, h.state(hit), h.state(unseen), keys=floats)
    forward_alone = copy.deepcopy(init).to(h.device)
    h.train(forward_alone, batches, scaler=_scaler(h, 2.0 ** 8, forward_alone), forward_only={k: 2.0 ** 7})
    err_forward, key_forward, _ = compare_states(torch, h.state(hit), h.state(forward_alone), keys=floats)
    references = (('the run dropping that update', err_dropped, key_dropped),
                  ('the run without that batch', err_unseen, key_unseen),
                  ('the run with its forward alone', err_forward, key_forward))
    detail = f'inf gradient at step {k}/{steps}: max_rel_err ' + ', '.join(
        f'vs {label} {err:.2e}' + (f' (at {key})' if key else '') for label, err, key in references)
    return ('PASS' if min(err for _, err, _ in references) <= 1e-5 else 'FAIL'), detail


def check_amp_scale_change(h, name):
    torch = h.torch
    k, steps = 3, 8
    init = h.build(name)
    batches = h.batches(steps)
    scaled = copy.deepcopy(init).to(h.device)
    scaler = _scaler(h, 2.0 ** 12, scaled)
    optimizer = torch.optim.SGD(scaled.parameters(), lr=0.05, momentum=0.9)
    h.train(scaled, batches[:k], scaler=scaler, optimizer=optimizer)
    scaler.update(new_scale=2.0 ** 4)
    h.train(scaled, batches[k:], scaler=scaler, optimizer=optimizer)
    plain = copy.deepcopy(init).to(h.device)
    h.train(plain, batches)
    # The parameters: buffers may legitimately hold scaled gradient statistics while the scale is constant.
    keys = [key for key, _ in scaled.named_parameters()]
    err, key, _ = compare_states(torch, h.state(scaled), h.state(plain), keys=keys)
    detail = f'scale 2^12 -> 2^4 at step {k}/{steps}: parameters max_rel_err vs the unscaled run {err:.2e}' + \
        (f' at {key}' if key else '')
    return ('PASS' if err <= 1e-5 else 'FAIL'), detail


def check_amp_inf_batch(h, name):
    torch = h.torch
    k, steps = 3, 8
    init = h.build(name)
    batches = h.batches(steps)
    bad_batch = (batches[k][0].clone(), batches[k][1])
    bad_batch[0][0, 0, 0, 0] = float('inf')
    hit = copy.deepcopy(init).to(h.device)
    scaler = _scaler(h, 2.0 ** 8, hit)
    h.train(hit, batches[:k] + [bad_batch] + batches[k + 1:], scaler=scaler)
    if scaler.get_scale() != 2.0 ** 7:
        return 'FAIL', f'scale {scaler.get_scale()} after the run (expected one skipped step: {2.0 ** 7})'
    ref = _run_without(h, init, batches, k, 2.0 ** 7)
    # Counters legitimately differ (the skipped step still counts as a training forward).
    keys = [key for key, v in h.state(ref).items() if v.is_floating_point()]
    err, key, _ = compare_states(torch, h.state(hit), h.state(ref), keys=keys)
    detail = f'inf activation in batch {k}/{steps}: max_rel_err vs the run without that batch {err:.2e}' + \
        (f' at {key}' if key else '')
    return ('PASS' if err <= 1e-5 else 'FAIL'), detail


def _compile_backend(h):
    if h.device.type == 'cuda':
        return 'inductor'
    if h.quick:
        return 'eager'        # dynamo's tracing, guards and graph breaks without a compiler's time
    if shutil.which('g++') or shutil.which('c++') or shutil.which('clang++'):
        return 'inductor'
    return 'aot_eager'


WARM_COMPILE_STEPS = 2     # first-step paths (window filling, cached views) may compile a graph of their own


def check_compile(h, results):
    """conv + CBN (window) compiled vs eager; stores the graph counts per step for compile_recompiles."""
    torch = h.torch
    from torch._dynamo.utils import counters
    steps = WARM_COMPILE_STEPS + (2 if h.quick else 3)
    init = h.build('cbn_window')
    batches = h.batches(steps)
    eager = copy.deepcopy(init).to(h.device)
    eager_out = h.train(eager, batches)
    backend = _compile_backend(h)
    notes = []
    for fullgraph in (True, False):
        torch._dynamo.reset()
        counters.clear()
        model = copy.deepcopy(init).to(h.device)
        compiled = torch.compile(model, backend=backend, fullgraph=fullgraph)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        out, graphs = [], []
        try:
            for batch in batches:       # one step at a time: the graph count after each
                out += h.train(compiled, [batch], optimizer=optimizer)
                graphs.append(counters['stats']['unique_graphs'])
            break
        except Exception as exc:   # noqa: BLE001 - fullgraph may not trace: retry with graph breaks
            if not fullgraph:
                raise
            notes.append(f'fullgraph=True failed ({type(exc).__name__}: {str(exc).splitlines()[0][:120]})')
    breaks = sum(counters['graph_break'].values())
    results['graphs'] = (graphs, backend)
    err_out = max(rel_error(torch, a, b) for a, b in zip(out, eager_out))
    err_state, key, bad = compare_states(torch, h.state(model), h.state(eager))
    err = max(err_out, err_state)
    detail = (f'backend={backend} fullgraph={fullgraph} steps={steps} graphs={graphs[-1]} graph_breaks={breaks} '
              f'max_rel_err_vs_eager={err:.2e}' + (f' ({"; ".join(notes)})' if notes else ''))
    return ('PASS' if err <= 1e-4 and not bad else 'FAIL'), detail


def check_recompiles(h, results):
    """No graph compiled after the warm-up steps (a per-step recompile would add one every step)."""
    if 'graphs' not in results:
        return 'SKIP', 'compile/cbn did not run'
    graphs, backend = results['graphs']
    later = graphs[-1] - graphs[WARM_COMPILE_STEPS - 1]
    detail = (f'{later} graph(s) compiled in the {len(graphs) - WARM_COMPILE_STEPS} steps after {WARM_COMPILE_STEPS} '
              f'warm-up steps (graphs after each step: {graphs}; backend={backend})')
    return ('PASS' if later == 0 else 'FAIL'), detail


def check_timing(h, norm, official_cls):
    torch = h.torch
    if h.device.type != 'cuda':
        return 'SKIP', 'CUDA only (CUDA events, CUDA kernels per step)'
    if norm == 'official' and official_cls is None:
        return 'SKIP', f'official algorithm not loadable from {osp.relpath(ORACLE, ROOT)}'
    channels, size, batch = 64, 56, 2
    step = timing_step(h, norm, official_cls, channels, size, batch)
    with _default_cuda_math(torch):
        return _time_steps(h, step, norm, channels, size, batch)


def timing_step(h, norm, official_cls, channels, size, batch):
    """One training step of conv + ``norm`` on ``h.device`` (a closure over the model and its optimizer)."""
    torch, nn = h.torch, h.nn
    torch.manual_seed(0)
    conv = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
    if norm == 'bn':
        layer = nn.BatchNorm2d(channels)
    elif norm == 'gn':
        layer = nn.GroupNorm(32, channels)
    elif norm == 'cbn':
        layer = h.ops.CrossIterationBatchNorm2d(channels, buffer_num=3)
        h.ops.bind_cbn_to_conv(layer, conv)
    else:
        layer = official_cls(channels, buffer_num=3)
        ref = layer.reference     # plain attributes, not buffers: moved by hand
        ref.running_mean, ref.running_var = ref.running_mean.to(h.device), ref.running_var.to(h.device)
    conv, layer = conv.to(h.device), layer.to(h.device)
    optimizer = torch.optim.SGD(list(conv.parameters()) + list(layer.parameters()), lr=0.01, momentum=0.9)
    x = torch.randn(batch, channels, size, size, device=h.device)
    target = torch.randn_like(x)

    def step():
        y = conv(x)
        out = layer(y, conv.weight) if norm == 'official' else layer(y)
        (out * target).mean().backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return out

    return step


@contextlib.contextmanager
def _default_cuda_math(torch):
    """Time with torch's default cuDNN settings (the parity checks turned TF32 and determinism off)."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cudnn.deterministic
    torch.backends.cudnn.allow_tf32, torch.backends.cudnn.deterministic = True, False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cudnn.deterministic = saved


def _time_steps(h, step, norm, channels, size, batch):
    torch = h.torch
    for _ in range(10):
        step()
    torch.cuda.synchronize()
    timed = 20 if h.quick else 50
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(timed):
        step()
    end.record()
    torch.cuda.synchronize()
    ms = start.elapsed_time(end) / timed
    profiled = 3
    activities = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    with torch.profiler.profile(activities=activities) as prof:
        for _ in range(profiled):
            step()
        torch.cuda.synchronize()
    kernels = sum(1 for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA
                  and not e.name.startswith(('Memcpy', 'Memset')))
    return 'PASS', (f'conv{channels}x{channels}+{norm} N={batch} {size}x{size}: {ms:.3f} ms/step, '
                    f'{kernels / profiled:.0f} CUDA kernels/step')


def _load_official():
    if not osp.exists(ORACLE):
        return None
    spec = importlib.util.spec_from_file_location('_official_cbn_oracle', ORACLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return getattr(module, 'OfficialCBNModule', None)


def plan_checks(h, dry):
    """Every check of this run, in order: ``[(name, fn)]``, ``fn()`` returning ``(status, detail)``."""
    plan = []
    subset = [name for name in h.cases if name in QUICK_LAYERS] if h.quick else list(h.cases)
    for name in h.cases:
        for mode in MODES:
            if mode == 'fp32' or name in subset:
                plan.append((f'parity/{name}/{mode}', lambda n=name, m=mode: check_parity(h, n, m)))
    for name in h.cases:
        for mode in ('fp32', 'fp16_autocast'):
            plan.append((f'syncs/{name}/{mode}', lambda n=name, m=mode: check_syncs(h, n, m)))
        plan.append((f'syncs/{name}/after_load', lambda n=name: check_syncs_after_load(h, n)))
    for name in subset:
        plan.append((f'amp_inf_grad/{name}', lambda n=name: check_amp_inf_grad(h, n)))
        plan.append((f'amp_scale_change/{name}', lambda n=name: check_amp_scale_change(h, n)))
    for name in ('cbn_plain', 'cbn_window', 'cbn_frozen', 'cbn_grad_through_window', 'cbn_momentum_none',
                 'cbn_wsconv', 'sync_cbn'):
        if name in subset or name == 'cbn_momentum_none':
            plan.append((f'amp_inf_batch/{name}', lambda n=name: check_amp_inf_batch(h, n)))
    results = {}
    plan.append(('compile/cbn', lambda: check_compile(h, results)))
    plan.append(('compile_recompiles/cbn', lambda: check_recompiles(h, results)))
    official = {}

    def timing(norm):
        if not dry and 'cls' not in official:
            try:
                official['cls'] = _load_official()
            except Exception as exc:   # noqa: BLE001 - the oracle is optional here
                print(f'# official algorithm not loadable: {type(exc).__name__}: {exc}', flush=True)
                official['cls'] = None
        return check_timing(h, norm, official.get('cls'))

    for norm in ('bn', 'gn', 'cbn', 'official'):
        plan.append((f'timing/{norm}', lambda n=norm: timing(n)))
    return plan


# ---------------------------------------------------------------------- main
def main(argv=None):
    args = parse_args(argv)
    started = time.perf_counter()
    installed = _block_openmmlab()
    import torch
    if importlib.util.find_spec('cbn_mmdet') is None:
        sys.path.insert(0, ROOT)
    report = Report(args.only, args.skip)
    try:
        import cbn_mmdet.ops as ops
    except ImportError as exc:
        report.line('FAIL', 'import/cbn_mmdet.ops', f'with mmcv/mmengine/mmdet blocked: {exc}')
        return 1
    pulled = [name for name in ('mmcv', 'mmengine', 'mmdet') if sys.modules.get(name) is not None]
    note = (f'; {", ".join(installed)} installed here: a plain `import cbn_mmdet.ops` imports them (the package '
            '__init__ registers the layers when mmengine and mmcv are found)') if installed else ''
    if not args.list:
        report.line('FAIL' if pulled else 'PASS', 'import/cbn_mmdet.ops',
                    f'torch {torch.__version__}, mmcv/mmengine/mmdet blocked and not needed{note}')

    device = args.device or ('cuda' if torch.cuda.is_available() else 'cpu')
    if device.startswith('cuda') and not torch.cuda.is_available():
        report.line('FAIL', 'device', f'--device {device} but torch.cuda.is_available() is False')
        return 1
    dry = not device.startswith('cuda')
    steps = args.steps or (4 if args.quick else 20)
    if dry:
        torch.set_num_threads(1)     # tiny ops: one thread is several times faster than a contended pool
    if not dry:
        torch.backends.cuda.matmul.allow_tf32 = False     # float32 parity against float64 means real float32
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cudnn.deterministic = True
        torch.backends.cudnn.benchmark = False
        name = torch.cuda.get_device_name(torch.device(device))
        print(f'# device {device} ({name}), torch {torch.__version__}, CUDA {torch.version.cuda}', flush=True)
    elif not args.list:
        print(f'# dry run on {device}, torch {torch.__version__}: CUDA-only checks SKIP', flush=True)
    h = Harness(torch, ops, device, steps, args.quick)

    for check, fn in plan_checks(h, dry):
        if args.list:
            print(check)
        else:
            report.run(check, fn)
    if args.list:
        return 0

    counts = report.counts
    elapsed = time.perf_counter() - started
    print(f'# summary: {counts["PASS"]} PASS, {counts["FAIL"]} FAIL, {counts["SKIP"]} SKIP, {counts["XFAIL"]} XFAIL '
          f'in {elapsed:.1f} s ({"dry run, CPU" if dry else device})', flush=True)
    return 1 if counts['FAIL'] else 0


if __name__ == '__main__':
    sys.exit(main())
