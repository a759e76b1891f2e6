"""torch.compile: the stateless CBN core traces into one graph (fullgraph=True), and a compiled conv+CBN
module matches the eager one step for step without recompiling once its paths are seen. The 'aot_eager'
backend traces forward and backward exactly as inductor does (dynamo + AOTAutograd) without generating
code, so this needs no C++ compiler and stays fast; tools/gpu_check.py compiles with inductor on a GPU."""
import copy

import torch
import torch.nn as nn

from cbn_mmdet.ops import CrossIterationBatchNorm2d
from cbn_mmdet.ops.cbn_normalise import cbn_normalise
from cbn_mmdet.ops.cbn_window import combine, compensate, empty_window, window_row_length, window_views

C, CIN = 4, 3


def _core(x, weight, bias, window, weight_t, current, count):
    window = window.clone()
    views = window_views(window, C, 1)
    views['stats'][-1].copy_(current)              # the staging row: the current entry at W_t
    views['weight'][-1].copy_(weight_t.flatten(1))
    threshold = torch.zeros(window.shape[0], 1, dtype=window.dtype)
    threshold[-1] = float('-inf')
    mean, sq, coef, _ = combine(*compensate(views, weight_t, 1.0), threshold)
    return cbn_normalise(x, weight, bias, mean, torch.addcmul(sq, mean, mean, value=-1), count, coef=coef)


def test_functional_core_compiles_to_one_graph_and_matches_eager():
    torch.manual_seed(0)
    window = empty_window(4, window_row_length(C, CIN * 9, 1), C)   # 3 past entries + the staging row
    window[0].normal_()
    window[0, C:2 * C] = window[0, :C].square() + 1.0          # one valid entry, two empty slots
    x = torch.randn(2, C, 5, 5, dtype=torch.float64)
    current = torch.stack((x.mean((0, 2, 3)), x.square().mean((0, 2, 3))))
    args = (window.double(), torch.randn(C, CIN, 3, 3, dtype=torch.float64), current, 50)
    results = []
    for fn in (_core, torch.compile(_core, fullgraph=True, backend='aot_eager')):
        xi = x.clone().requires_grad_()
        w = torch.ones(C, dtype=torch.float64, requires_grad=True)
        out = fn(xi, w, torch.zeros(C, dtype=torch.float64), *args)
        out.square().sum().backward()
        results.append((out.detach(), xi.grad, w.grad))
    for eager, compiled in zip(*results):
        torch.testing.assert_close(compiled, eager, rtol=1e-12, atol=1e-12)


def test_compiled_module_matches_eager_and_does_not_recompile():
    torch.manual_seed(0)
    eager = nn.Sequential(nn.Conv2d(CIN, C, 3, padding=1, bias=False),
                          CrossIterationBatchNorm2d(C, buffer_num=3, burnin=2))
    twin = copy.deepcopy(eager)
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    compiled = torch.compile(twin, backend=backend)
    batches = [torch.randn(2, CIN, 6, 6) for _ in range(10)]
    new_graphs = []
    for x in batches:
        before = len(graphs)
        outs = []
        for model in (eager, compiled):
            xi = x.clone().requires_grad_()
            out = model(xi)
            out.square().sum().backward()
            outs.append((out.detach(), xi.grad))
            with torch.no_grad():
                for p in model.parameters():
                    p -= 0.05 * p.grad
                    p.grad = None
        new_graphs.append(len(graphs) - before)
        for a, b in zip(*outs):
            torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)
    # plain path (burn-in) and window path are each compiled once; later steps reuse them
    assert sum(new_graphs[5:]) == 0, new_graphs
    for name in ('running_mean', 'running_var', 'window_mean', 'window_sq', 'window_weight', 'window_head'):
        torch.testing.assert_close(getattr(twin[1], name), getattr(eager[1], name), rtol=1e-5, atol=1e-6)


def test_models_compiled_before_their_first_forward_bind_and_train():
    """mmengine's ``compile=True`` compiles the model before its first forward, so the binding pre-hook
    (host bookkeeping on weak sets of modules) runs inside the compiled call. Dynamo must not trace it: once
    a compiled module sits in those sets it cannot. A BN model and two CBN models, all built first (CBN
    layers waiting for their conv), each compiled before its first step and run compiled first."""
    torch.manual_seed(0)
    models = [nn.Sequential(nn.Conv2d(CIN, C, 3, padding=1, bias=False), norm)
              for norm in (nn.BatchNorm2d(C), CrossIterationBatchNorm2d(C, buffer_num=2, burnin=0),
                           CrossIterationBatchNorm2d(C, buffer_num=2, burnin=0))]
    twins = [copy.deepcopy(model) for model in models]
    for model, eager in zip(models, twins):
        compiled = torch.compile(model, backend='aot_eager')
        for _ in range(3):
            x = torch.randn(2, CIN, 6, 6)
            outs = [m(x.clone().requires_grad_()) for m in (compiled, eager)]
            for out in outs:
                out.square().sum().backward()
            torch.testing.assert_close(outs[0], outs[1], rtol=1e-5, atol=1e-6)
    for model in models[1:]:
        assert model[1].is_bound and int(model[1].window_filled.sum()) == 2
