"""The fused Triton KAF kernels: compiled on CUDA when the machine has a GPU, otherwise run by
Triton's interpreter on CPU tensors (conftest sets TRITON_INTERPRET=1 before Triton is imported).
The interpreter runs the same kernel code with numpy, so indexing, masking, the layouts and the
reductions are checked on any machine; the GPU compiler only where there is a GPU."""
import os
import warnings

import pytest
import torch

import activations

pytestmark = pytest.mark.skipif(activations.triton is None, reason="triton is not installed")
D, GAMMA = 20, activations.kaf_dictionary(20, 3.0)[1]
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture
def triton_runs():
    """The kernels can run here: on the GPU, or in the interpreter that conftest turned on."""
    assert DEVICE == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"


def _both(act, x, alpha, kernel, need=(True, True), memory_format=torch.contiguous_format):
    """Output and gradients of the fused kernels and of the naive reference, same upstream gradient."""
    d = act.kaf_dictionary(D, 3.0)[0].to(DEVICE, alpha.dtype)
    x = x.to(DEVICE, memory_format=memory_format).requires_grad_(need[0])
    alpha = alpha.to(DEVICE).requires_grad_(need[1])
    inputs = [t for t, n in zip((x, alpha), need) if n]
    fused = act.KAFTritonFunction.apply(x, alpha, d, GAMMA, kernel, tuple(d.tolist()))
    ref = act.kaf_naive(x.to(alpha.dtype), alpha, d, GAMMA, kernel)
    g = torch.randn(ref.shape, dtype=ref.dtype, generator=torch.Generator().manual_seed(1)).to(DEVICE)
    return (fused, torch.autograd.grad(fused, inputs, g.to(fused.dtype))), (ref, torch.autograd.grad(ref, inputs, g))


@pytest.mark.parametrize("shape,channels,memory_format", [
    ((2, 3, 5, 5), 3, torch.contiguous_format),   # NCHW: a tile runs along H*W of one channel
    ((2, 3, 5, 5), 3, torch.channels_last),       # a tile runs across channels
    ((64, 8, 16, 16), 8, torch.channels_last),    # many tiles per program in backward
    ((3, 70), 70, torch.contiguous_format),       # fully connected, more channels than a tile holds
    ((2, 3, 7), 1, torch.contiguous_format),      # alpha shared by every channel
])
@pytest.mark.parametrize("kernel", activations.KAF_KERNELS)
def test_fused_kaf_matches_naive_in_every_layout(triton_runs, shape, channels, memory_format, kernel):
    gen = torch.Generator().manual_seed(0)
    x = 2 * torch.randn(shape, generator=gen)
    alpha = torch.randn(channels, D, generator=gen)
    (out, grads), (ref, ref_grads) = _both(activations, x, alpha, kernel, memory_format=memory_format)
    assert out.is_contiguous(memory_format=memory_format)  # the caller's layout is kept
    assert torch.allclose(out, ref, atol=1e-5, rtol=1e-5)
    for got, want in zip(grads, ref_grads):
        assert got.shape == want.shape
        assert torch.allclose(got, want, atol=1e-4 * want.abs().max().item(), rtol=1e-4)


@pytest.mark.parametrize("size,gamma_rule,equal", [(20, "code", True), (50, "paper", True), (8, "paper", False)])
def test_fused_gaussian_runs_stay_exact_far_out(triton_runs, size, gamma_rule, equal):
    """The Gaussian kernels come in runs from two exps each: from the dictionary's middle to +-1e4
    the float64 reference to float32 accuracy, both gradients too; an unequally spaced dictionary
    falls back to one exp per kernel with the same result."""
    d, gamma = activations.kaf_dictionary(size, 3.0, gamma_rule)
    if not equal:
        d = torch.tensor([-3.0, -1.0, 0.0, 0.5, 1.0, 1.5, 2.0, 4.0])
    s = torch.cat([torch.linspace(-12, 12, 301), torch.tensor([-1e4, -50.0, 50.0, 1e4])])
    x = s.view(1, 1, -1).repeat(2, 3, 1).to(DEVICE).requires_grad_(True)
    alpha = torch.randn(3, size, generator=torch.Generator().manual_seed(0)).to(DEVICE).requires_grad_(True)
    out = activations.KAFTritonFunction.apply(x, alpha, d.to(DEVICE), gamma, "gaussian", tuple(d.tolist()))
    xd, ad = x.detach().double().requires_grad_(True), alpha.detach().double().requires_grad_(True)
    ref = activations.kaf_naive(xd, ad, d.double().to(DEVICE), gamma)
    g = torch.randn(ref.shape, dtype=ref.dtype, generator=torch.Generator().manual_seed(1)).to(DEVICE)
    got, want = torch.autograd.grad(out, (x, alpha), g.float()), torch.autograd.grad(ref, (xd, ad), g)
    for a, b in [(out, ref), *zip(got, want)]:
        assert torch.isfinite(a).all()
        assert (a.double() - b).abs().max() <= 2e-5 * b.abs().max(), (a.double() - b).abs().max() / b.abs().max()


@pytest.mark.parametrize("need", [(True, False), (False, True)])
def test_fused_kaf_computes_only_the_gradients_asked_for(triton_runs, need):
    gen = torch.Generator().manual_seed(0)
    x, alpha = 2 * torch.randn(2, 4, 3, 3, generator=gen), torch.randn(4, D, generator=gen)
    (_, grads), (_, ref_grads) = _both(activations, x, alpha, "gaussian", need=need)
    assert len(grads) == 1 and torch.allclose(grads[0], ref_grads[0], atol=1e-4)


def test_fused_kaf_bfloat16_input_computes_in_float32(triton_runs):
    gen = torch.Generator().manual_seed(0)
    x, alpha = (2 * torch.randn(2, 4, 6, 6, generator=gen)).bfloat16(), torch.randn(4, D, generator=gen)
    (out, (gx, ga)), (ref, (rx, ra)) = _both(activations, x, alpha, "gaussian")
    assert out.dtype == gx.dtype == torch.bfloat16 and ga.dtype == torch.float32
    assert (out.float() - ref).abs().max() <= 2 ** -7 * ref.abs().max()  # one bf16 rounding of the result
    assert torch.allclose(ga, ra, rtol=1e-2, atol=1e-2 * ra.abs().max().item())  # bf16 upstream gradient only


@pytest.mark.parametrize("kernel", ["gaussian", "softplus"])
def test_fused_kaf_gradcheck_float64(triton_runs, kernel):
    d, gamma = activations.kaf_dictionary(6, 3.0)  # small: the interpreter runs one launch per perturbation
    d = d.to(DEVICE, torch.float64)
    x = (2 * torch.randn(1, 2, 2, 3, dtype=torch.float64, device=DEVICE)).requires_grad_(True)
    alpha = torch.randn(2, 6, dtype=torch.float64, device=DEVICE, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, a: activations.KAFTritonFunction.apply(x, a, d, gamma, kernel, tuple(d.tolist())),
                                     (x, alpha))


def test_kaf_module_trains_the_same_with_fused_and_loop_kernels(triton_runs):
    import models
    losses, grads = {}, {}
    for impl in ("triton", "loop"):
        torch.manual_seed(0)
        model = models.build("lenet", "kaf", 10, 1, 28, act_options={"impl": impl})
        model = model.to(DEVICE, memory_format=torch.channels_last)
        x, y = torch.rand(8, 1, 28, 28, device=DEVICE), torch.randint(0, 10, (8,), device=DEVICE)
        loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        losses[impl], grads[impl] = loss.item(), [p.grad for p in model.parameters()]
    assert abs(losses["triton"] - losses["loop"]) < 1e-5
    for a, b in zip(grads["triton"], grads["loop"]):
        assert torch.allclose(a, b, atol=1e-5 + 1e-4 * b.abs().max().item())


def test_triton_usable_only_where_it_can_run_and_only_when_it_works(triton_runs, monkeypatch):
    monkeypatch.setattr(activations, "_TRITON_KAF_OK", {})
    right = activations.KAFTritonFunction.forward
    with torch.no_grad():  # e.g. the first KAF call is an evaluation: the check still runs its backward
        assert activations.triton_kaf_usable(DEVICE)  # the check ran and agreed
    if DEVICE == "cpu":
        monkeypatch.delenv("TRITON_INTERPRET")
        assert not activations.triton_kaf_usable("cpu")  # compiled Triton needs CUDA
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    # a kernel that fails to build on some machine: one warning, then KAF falls back to the loop
    activations._TRITON_KAF_OK.clear()

    def broken(*args, **kwargs):
        raise RuntimeError("PTX assembly failed")
    monkeypatch.setattr(activations.KAFTritonFunction, "forward", staticmethod(broken))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert not activations.triton_kaf_usable(DEVICE)
        assert not activations.triton_kaf_usable(DEVICE)  # decided once per device
    assert len(caught) == 1 and "PTX assembly failed" in str(caught[0].message)
    # a kernel that runs but computes something else is refused the same way
    activations._TRITON_KAF_OK.clear()
    monkeypatch.setattr(activations.KAFTritonFunction, "forward",  # e.g. a miscompiled kernel: wrong bandwidth
                        staticmethod(lambda ctx, x, alpha, d, gamma, *rest: right(ctx, x, alpha, d, 2 * gamma, *rest)))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert not activations.triton_kaf_usable(DEVICE)
    assert len(caught) == 1 and "disagree" in str(caught[0].message)


def test_auto_impl_on_cpu_uses_the_loop_and_checkpoints_forget_the_impl(tmp_path, monkeypatch):
    import models
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    kaf = activations.KAF(3)
    x = torch.randn(2, 3, 4, 4)
    assert torch.equal(kaf(x), activations.KAFFunction.apply(x, kaf.alpha, kaf.dictionary, kaf.gamma,
                                                             kaf.dictionary_values))
    with pytest.raises(RuntimeError, match="needs CUDA"):
        activations.KAF(3, impl="triton")(x)
    # a model trained with the fused kernels on a GPU can be evaluated on a CPU
    model = models.build("lenet", "kaf", 10, 1, 28, act_options={"impl": "triton"})
    torch.save({"model_config": model.config, "model_state": model.state_dict()}, tmp_path / "c.pt")
    loaded = models.load_checkpoint(str(tmp_path / "c.pt"))
    assert all(m.impl == "auto" for m in activations.activation_modules(loaded))
    assert loaded(torch.rand(2, 1, 28, 28)).shape == (2, 10)


def test_auto_impl_takes_the_fused_kernels_on_a_gpu_except_under_torch_compile(monkeypatch):
    class OnGPU:  # what impl_for looks at, without needing a GPU
        is_cuda, device = True, torch.device("cuda", 0)
    monkeypatch.setattr(activations, "triton_kaf_usable", lambda device: True)
    assert activations.KAF(3).impl_for(OnGPU) == "triton"
    assert activations.KAF(3, kernel="relu").impl_for(OnGPU) == "triton"
    assert activations.KAF(3, impl="loop").impl_for(OnGPU) == "loop"
    monkeypatch.setattr(activations, "_compiling", lambda: True)
    assert activations.KAF(3).impl_for(OnGPU) == "loop"
    assert activations.KAF(3, kernel="softplus").impl_for(OnGPU) == "loop"
    monkeypatch.setattr(activations, "_compiling", lambda: False)
    monkeypatch.setattr(activations, "triton_kaf_usable", lambda device: False)  # failed its self-check
    assert activations.KAF(3).impl_for(OnGPU) == "loop"


def test_kaf_impls_reports_what_each_model_computes_with_here():
    import models
    assert activations.kaf_impls(models.build("lenet", "relu", 10, 1, 28), "cpu") == []
    assert activations.kaf_impls(models.build("lenet", "kaf", 10, 1, 28), "cpu") == ["loop"]
    softplus = models.build("lenet", "kaf", 10, 1, 28, act_options={"kernel": "softplus"})
    assert activations.kaf_impls(softplus, "cpu", compiled=True) == ["loop"]
