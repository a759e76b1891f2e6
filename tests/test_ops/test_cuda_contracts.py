"""Every layer, every option, a few real training steps under ``CudaContractMode``: no call a CUDA kernel
would reject. Each rule is also shown to fire on a call that breaks it (the mode is not vacuous), and
torch's own BatchNorm2d passes it in every mode (the rules are not stricter than CUDA)."""
import pytest
import torch
import torch.nn as nn

from .cuda_contracts import (
    KNOWN_HOST_SYNCS,
    LAYER_CASES,
    MODES,
    CudaContractError,
    CudaContractMode,
    build_case,
    case_params,
    eval_forward,
    meta_device,
    to_meta,
    train_steps,
)

STEPS = 4   # windows (buffer_num=2), burn-in (2-3) and MABN's moving averages (K=2) all switch within 4
# The ops each family's training step must reach (the rules that matter were really exercised).
EXPECTED_OPS = {
    'cbn': 'aten.native_batch_norm_backward.default',
    'sync': 'aten.native_batch_norm_backward.default',
    'bcn': 'aten.native_group_norm_backward.default',
}


def _expected_op(name):
    return EXPECTED_OPS.get(name.split('_')[0])


@pytest.mark.parametrize('mode', MODES)
@pytest.mark.parametrize('name', sorted(LAYER_CASES))
def test_training_respects_cuda_rules(name, mode):
    model = build_case(name, mode)
    with CudaContractMode(host_syncs=False) as rules:
        train_steps(model, STEPS, mode)
        eval_forward(model, mode)
    expected = _expected_op(name)
    if expected and name != 'cbn_frozen':
        assert expected in rules.seen, sorted(rules.seen)
    for value in model.state_dict().values():
        if value.is_floating_point():
            assert torch.isfinite(value).all()


@pytest.mark.parametrize('name', case_params({k: f'host sync: {v}' for k, v in KNOWN_HOST_SYNCS.items()}))
def test_training_on_a_non_cpu_device(name):
    """On ``meta`` every tensor a layer creates without ``device=`` is a stray CPU tensor (a CUDA run would
    refuse to mix it in), and every host read or CPU<->device copy raises."""
    model = to_meta(build_case(name))
    with meta_device(), CudaContractMode() as rules:
        train_steps(model, STEPS, device='meta')
        out = eval_forward(model, device='meta')
    assert out.device.type == 'meta'
    assert 'aten.convolution_backward.default' in rules.seen


@pytest.mark.parametrize('mode', MODES)
def test_torch_batch_norm_passes_the_rules(mode):
    """Oracle for the rules' strictness: torch's own BN (whose CUDA path these rules come from)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU())
    if mode == 'channels_last':
        model.to(memory_format=torch.channels_last)
    with CudaContractMode() as rules:
        train_steps(model, 2, mode)
        eval_forward(model, mode)
    assert 'aten.native_batch_norm_backward.default' in rules.seen


# ---------------------------------------------------------------------- each rule fires
def _bn_args(dtype=torch.float32, param_dtype=torch.float32):
    x = torch.randn(2, 3, 4, 4).to(dtype)
    return x, torch.ones(3, dtype=param_dtype), torch.zeros(3, dtype=param_dtype)


def test_rule_undefined_save_tensors():
    x, w, b = _bn_args()
    with pytest.raises(CudaContractError, match='save_mean/save_invstd undefined'), CudaContractMode():
        torch.ops.aten.native_batch_norm_backward(torch.ones_like(x), x, w, b, w, None, None, False, 1e-5,
                                                  [False, True, True])


def test_rule_mixed_parameter_dtypes_forward():
    x, _, _ = _bn_args(torch.bfloat16)
    w64 = torch.ones(3, dtype=torch.float64)
    with pytest.raises(CudaContractError, match='batch-norm dtypes'), CudaContractMode():
        torch.ops.aten.native_batch_norm(x, w64, None, torch.zeros(3, dtype=torch.float64),
                                         torch.ones(3, dtype=torch.float64), True, 0.1, 1e-5)


def test_rule_weight_and_running_stats_must_share_a_dtype():
    x, w, _ = _bn_args(torch.float16)
    half = torch.zeros(3, dtype=torch.float16)
    with pytest.raises(CudaContractError, match='batch-norm dtypes'), CudaContractMode():
        torch.ops.aten.native_batch_norm(x, w, None, half, half + 1, True, 0.1, 1e-5)


def test_rule_float32_statistics_accepted_for_half_input():
    x, w, b = _bn_args(torch.bfloat16)
    with CudaContractMode():   # the mixed type CUDA supports (autocast's BN): no error
        torch.ops.aten.native_batch_norm(x, w, b, torch.zeros(3), torch.ones(3), True, 0.1, 1e-5)


def test_rule_backward_grad_dtype_and_save_dtype():
    x, w, b = _bn_args()
    save = torch.zeros(3), torch.ones(3)
    with pytest.raises(CudaContractError, match='grad_out torch.float64'), CudaContractMode():
        torch.ops.aten.native_batch_norm_backward(torch.ones_like(x, dtype=torch.float64), x, w, b, w, *save,
                                                  False, 1e-5, [True, True, True])
    with pytest.raises(CudaContractError, match='save_mean torch.float64'), CudaContractMode():
        torch.ops.aten.native_batch_norm_backward(torch.ones_like(x), x, w, b, w, save[0].double(),
                                                  save[1].double(), True, 1e-5, [True, True, True])


def test_rule_statistics_kernels():
    """These kernels are CUDA-only in torch (no CPU kernel to call): the rule is fed their arguments."""
    x = torch.randn(2, 3, 4, 4, dtype=torch.float16)
    rules = CudaContractMode()
    stats = [torch.zeros(3, dtype=torch.float64), torch.ones(3, dtype=torch.float64)]
    with pytest.raises(CudaContractError, match='statistics torch.float64'):
        rules._rule_bn_stat_kernels('aten.batch_norm_elemt.default', [x, None, None, *stats, 1e-5])
    with pytest.raises(CudaContractError, match='mean torch.float32 and invstd torch.float64'):
        rules._rule_bn_stat_kernels('aten.batch_norm_backward_elemt.default',
                                    [x, x, torch.zeros(3), torch.ones(3, dtype=torch.float64)])
    half_stats = [torch.zeros(3, dtype=torch.float16), torch.ones(3, dtype=torch.float16)]
    rules._rule_bn_stat_kernels('aten.batch_norm_elemt.default', [x, None, None, *half_stats, 1e-5])
    x_cl = x.to(memory_format=torch.channels_last)
    with pytest.raises(CudaContractError, match='channels-last'):   # that kernel reads float32 statistics
        rules._rule_bn_stat_kernels('aten.batch_norm_elemt.default', [x_cl, None, None, *half_stats, 1e-5])
    float_stats = [torch.zeros(3), torch.ones(3)]
    with pytest.raises(CudaContractError, match='channels-last grad_out with an input of strides'):
        rules._rule_bn_stat_kernels('aten.batch_norm_backward_elemt.default', [x_cl, x, *float_stats])
    rules._rule_bn_stat_kernels('aten.batch_norm_backward_elemt.default', [x_cl, x_cl, *float_stats])
    rules._rule_bn_stat_kernels('aten.batch_norm_backward_reduce.default', [x_cl, x_cl, *float_stats, None])


@pytest.mark.parametrize('call', [
    lambda t: t.sum().item(),
    lambda t: bool(t.sum() > 0),
    lambda t: float(t.max()),
    lambda t: torch.equal(t, t),
    lambda t: t[t > 0],
    lambda t: torch.nonzero(t),
    lambda t: t.unique(),
    lambda t: t + torch.tensor([1.0]),
])
def test_rule_host_sync(call):
    t = torch.randn(4)
    with pytest.raises(CudaContractError, match='host sync'), CudaContractMode():
        call(t)
    with CudaContractMode(host_syncs=False):
        call(t)


def test_rule_stray_cpu_tensor_on_a_device():
    dev, index = torch.zeros(4, device='meta'), torch.tensor([1])
    with pytest.raises(CudaContractError, match=r'mixes device tensors with CPU tensors of shape \[\(4,\)\]'):
        with CudaContractMode():
            dev + torch.ones(4)
    with pytest.raises(CudaContractError, match='device'), CudaContractMode():
        dev.index_copy_(0, index, torch.ones(1, device='meta'))
    scalar = torch.ones(())
    with CudaContractMode():
        dev * scalar                         # a 0-dim CPU tensor is a scalar: accepted by CUDA kernels


def test_rule_synchronising_copies():
    with pytest.raises(CudaContractError, match='copies cpu -> meta'), CudaContractMode():
        torch.ones(3).to('meta')             # a blocking host-to-device copy
    with pytest.raises(CudaContractError, match='host data'), CudaContractMode():
        torch.tensor(3.0)                    # torch.tensor(v, device=<GPU>) copies v from host memory
    with pytest.raises(CudaContractError, match='copies meta -> cpu'), CudaContractMode():
        torch.zeros(2, device='meta').cpu()
    with CudaContractMode():
        torch.full((), 3.0, device='meta')   # a fill kernel: no transfer


def test_cbn_runs_on_a_device_without_autocast():
    model = to_meta(build_case('cbn_window'))
    train_steps(model, 2, device='meta')      # no meta_device() shim here
