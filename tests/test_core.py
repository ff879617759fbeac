"""Core: activations, models, attacks, FGSM training end to end, eval.py and checkpoints."""
import json
import math
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import activations
import attacks
import data
import eval as eval_script
import models
import train_fast
import utils

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMOOTH = ["elu", "softplus", "silu", "gelu", "psilu", "psoftplus", "pssilu", "kaf", "rbf"]
PARAMETRIC = ["prelu", "psilu", "psoftplus", "pssilu", "kaf"]


# ------------------------------------------------------------------------------------- activations
@pytest.mark.parametrize("name", activations.NAMES)
@pytest.mark.parametrize("shape", [(4, 3, 5, 5), (4, 3)])
def test_activation_shape_dtype_and_gradients(name, shape):
    act = activations.make_factory(name, "channel" if name in PARAMETRIC else None)(3)
    x = torch.randn(*shape, requires_grad=True)
    out = act(x)
    assert out.shape == x.shape and out.dtype == x.dtype
    (out * torch.randn_like(out)).sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    for p in act.parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, f"{name}: no gradient reaches {p.shape}"


@pytest.mark.parametrize("name", SMOOTH)
def test_smooth_activations_gradcheck_float64(name):
    act = activations.make_factory(name, "channel" if name in PARAMETRIC else None)(2).double()
    if name != "kaf":  # move scalar parameters off the kink of |.| at 0 (b starts at 1e-8)
        for p in act.parameters():
            p.data.uniform_(0.3, 0.7)
    x = torch.randn(3, 2, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(act, (x,))
    for name_p, p in act.named_parameters():  # also the derivative w.r.t. each parameter
        call = lambda v: torch.func.functional_call(act, {name_p: v}, (x.detach(),), strict=False)
        assert torch.autograd.gradcheck(call, (p.detach().clone().requires_grad_(True),))


@pytest.mark.parametrize("name", ["psilu", "psoftplus", "pssilu"])
def test_parametric_units_keep_only_their_input_for_backward(name):
    """Their autograd functions save x and the (tiny) parameters, not the sigmoid and products that
    autograd on the formula would keep; gradients stay exact in both sharing scopes."""
    from bench import SavedForBackward
    for scope in ("network", "channel"):
        act = activations.make_factory(name, scope)(3).double()
        for p in act.parameters():
            p.data.uniform_(0.3, 0.7)
        x = torch.randn(2, 3, 4, 4, dtype=torch.float64, requires_grad=True)
        assert torch.autograd.gradcheck(act, (x,))
        params = dict(act.named_parameters())
        for pname, p in params.items():
            call = lambda v: torch.func.functional_call(act, {pname: v}, (x.detach(),), strict=False)
            assert torch.autograd.gradcheck(call, (p.detach().clone().requires_grad_(True),))
        # followed by a layer, as in a network: no more memory than native SiLU (psoftplus reuses the
        # output the next layer keeps anyway), where autograd on the formula kept 1.3-1.8x more
        conv = torch.nn.Conv2d(3, 3, 1).double()
        peaks = {}
        for unit in (act, torch.nn.functional.silu):
            with SavedForBackward() as saved:
                out = conv(unit(x))
            peaks[unit is act] = saved.peak
            del out
        assert peaks[True] <= peaks[False] + 256, (name, scope, peaks)  # + parameter-sized bits


def test_kaf_memory_efficient_matches_naive_and_gradcheck():
    _, gamma = activations.kaf_dictionary(20, 3.0)
    d = torch.linspace(-3, 3, 20, dtype=torch.float64)  # equally spaced to float64 precision
    alpha = torch.randn(3, 20, dtype=torch.float64, requires_grad=True)
    x = (2 * torch.randn(2, 3, 4, 4, dtype=torch.float64)).requires_grad_(True)
    fn = lambda x, a: activations.KAFFunction.apply(x, a, d, gamma, tuple(d.tolist()))
    assert torch.autograd.gradcheck(fn, (x, alpha))
    ref = activations.kaf_naive(x, alpha, d, gamma)
    out = fn(x, alpha)
    assert torch.allclose(out, ref, atol=1e-12)
    g = torch.randn_like(out)
    gx, ga = torch.autograd.grad(out, (x, alpha), g)
    rx, ra = torch.autograd.grad(ref, (x, alpha), g)
    assert torch.allclose(gx, rx, atol=1e-10) and torch.allclose(ga, ra, atol=1e-10)


@pytest.mark.parametrize("kernel", activations.KAF_KERNELS)
def test_kaf_loop_in_row_chunks_matches_naive(monkeypatch, kernel):
    """On a CPU the loop works through the batch a few rows at a time (cache-sized); the result and
    both gradients are those of the whole-tensor reference, for uneven chunks and channels_last,
    with each kernel."""
    original = activations.KAFFunction._row_chunks
    monkeypatch.setattr(activations.KAFFunction, "_row_chunks", staticmethod(lambda x: original(x, elements=3 * 2 * 5 * 5)))
    assert len(activations.KAFFunction._row_chunks(torch.zeros(7, 2, 5, 5))) == 3  # rows 0-2, 3-5, 6
    _, gamma = activations.kaf_dictionary(20, 3.0)
    d = torch.linspace(-3, 3, 20, dtype=torch.float64)
    for memory_format in (torch.contiguous_format, torch.channels_last):
        x = (2 * torch.randn(7, 2, 5, 5, dtype=torch.float64)).to(memory_format=memory_format).requires_grad_(True)
        alpha = torch.randn(2, 20, dtype=torch.float64, requires_grad=True)
        out = activations.KAFFunction.apply(x, alpha, d, gamma, tuple(d.tolist()), kernel)
        ref = activations.kaf_naive(x, alpha, d, gamma, kernel)
        g = torch.randn_like(ref)
        got, want = torch.autograd.grad(out, (x, alpha), g), torch.autograd.grad(ref, (x, alpha), g)
        assert torch.allclose(out, ref, atol=1e-12)
        assert all(torch.allclose(a, b, atol=1e-10) for a, b in zip(got, want))
        (x_only,) = torch.autograd.grad(activations.KAFFunction.apply(x, alpha, d, gamma, tuple(d.tolist()), kernel), x, g)
        assert torch.allclose(x_only, want[0], atol=1e-10)  # an attack's pass: no kernel values computed


@pytest.mark.parametrize("size,gamma_rule", [(20, "paper"), (20, "code"), (50, "paper"), (120, "code")])
def test_kaf_loop_runs_stay_finite_and_exact_far_out(size, gamma_rule):
    """The loop evaluates runs of equally spaced kernels from two exps each (E <- E rho): in float32,
    inputs from the dictionary's middle to +-1e4 give the float64 reference to float32 accuracy,
    with no overflow (the one-exp-per-kernel form gave NaN from D=50), and both gradients too;
    +-inf gives ~0 (its gradient is NaN, as the reference's)."""
    d, gamma = activations.kaf_dictionary(size, 3.0, gamma_rule)
    kaf = lambda x, alpha: activations.KAFFunction.apply(x, alpha, d, gamma, tuple(d.tolist()))
    assert all(length <= 12 for _, length, _ in activations.KAFFunction._runs(tuple(d.tolist()), gamma))
    s = torch.cat([torch.linspace(-12, 12, 4001), torch.tensor([-1e4, -50.0, 50.0, 1e4])])
    x = s.view(1, 1, -1).repeat(2, 3, 1).requires_grad_(True)
    alpha = torch.randn(3, size, requires_grad=True)
    far = kaf(torch.tensor([[-math.inf, math.inf]]), alpha[:1])  # the values at the clamp: < 5e-13 |alpha|
    assert far.abs().max() <= 5e-13 * alpha.abs().max()
    out = kaf(x, alpha)
    xd, ad = x.detach().double().requires_grad_(True), alpha.detach().double().requires_grad_(True)
    ref = activations.kaf_naive(xd, ad, d.double(), gamma)
    g = torch.randn_like(out)
    got, want = torch.autograd.grad(out, (x, alpha), g), torch.autograd.grad(ref, (xd, ad), g.double())
    for a, b in [(out, ref), *zip(got, want)]:
        assert torch.isfinite(a).all()
        assert (a.double() - b).abs().max() <= 2e-5 * b.abs().max(), (a.double() - b).abs().max() / b.abs().max()


def test_kaf_loop_handles_unequally_spaced_dictionaries():
    """A dictionary that is not equally spaced is cut into runs of equal spacing (here of one or
    two kernels), with the same result and gradients as the reference."""
    d = torch.tensor([-3.0, -1.0, 0.0, 0.5, 1.0, 1.5, 2.0, 4.0], dtype=torch.float64)
    runs = activations.KAFFunction._runs(tuple(d.tolist()), 2.0)
    assert [(first, length) for first, length, _ in runs] == [(0, 2), (2, 5), (7, 1)]
    x = (2 * torch.randn(3, 2, 5, dtype=torch.float64)).requires_grad_(True)
    alpha = torch.randn(2, 8, dtype=torch.float64, requires_grad=True)
    fn = lambda x, a: activations.KAFFunction.apply(x, a, d, 2.0, tuple(d.tolist()))
    assert torch.autograd.gradcheck(fn, (x, alpha))
    assert torch.allclose(fn(x, alpha), activations.kaf_naive(x, alpha, d, 2.0), rtol=0, atol=1e-12)


@pytest.mark.parametrize("name", ["kaf", "psilu", "psoftplus", "pssilu"])
def test_backward_skips_parameter_gradients_an_attack_does_not_use(name, monkeypatch):
    """torch.autograd.grad(loss, x), as in every attack step, makes the written-out backwards skip
    their parameter gradients (for KAF a third of the work); backward() and autograd.grad w.r.t. the
    parameters still get them, equal to autograd on the naive formula."""
    asked = []
    original = activations._grads_needed
    monkeypatch.setattr(activations, "_grads_needed", lambda ctx: asked.append(original(ctx)) or asked[-1])
    act = activations.make_factory(name, scope="channel")(3).double()
    params = list(act.parameters())
    x0 = torch.randn(2, 3, 4, 4, dtype=torch.float64, requires_grad=True)
    (gx,) = torch.autograd.grad(act(x0 * 1.0).sum(), [x0])
    assert asked[-1][0] and not any(asked[-1][1:])
    grads = torch.autograd.grad(act(x0 * 1.0).sum(), params)
    assert not asked[-1][0] and all(asked[-1][1:1 + len(params)])
    act(x0 * 1.0).sum().backward()
    assert all(asked[-1][:1 + len(params)])
    if name == "kaf":
        ref = activations.kaf_naive(x0 * 1.0, act.alpha, act.dictionary, act.gamma).sum()
        want_x, *want = torch.autograd.grad(ref, [x0, *params])
        assert torch.allclose(gx, want_x, atol=1e-6) and torch.allclose(grads[0], want[0], atol=1e-6)
    assert torch.allclose(x0.grad, gx) and all(torch.allclose(p.grad, g) for p, g in zip(params, grads))


def test_kaf_elu_init_approximates_elu_on_dictionary_range():
    kaf = activations.KAF(channels=4, init="elu")
    s = torch.linspace(-3, 3, 301).view(1, 1, -1).expand(1, 4, -1)
    err = (kaf(s) - F.elu(s)).abs().max().item()
    assert err < 0.05, err
    far = kaf(torch.full((1, 4, 1), 10.0))  # Gaussian kernels vanish outside the dictionary: bounded
    assert far.abs().max() < 1e-3


def test_pssilu_at_b_zero_is_scaled_silu():
    act = activations.PSSiLU(init_a=1.7, init_b=0.0)
    x = torch.randn(100)
    assert torch.allclose(act(x), x * torch.sigmoid(1.7 * x), atol=1e-6)
    act.b.data.fill_(50.0)  # far out: the shift stays below 1, the output finite
    assert act.beta().item() < 1 and torch.isfinite(act(x)).all()


def test_pssilu_shift_has_a_gradient_everywhere_in_its_range_and_init_b_sets_it():
    """beta = b_max tanh(|b| / b_max): d beta / d b > 0 for every beta in (0, b_max), where a hard
    clamp has none past its bound; --act-init b=... sets beta itself."""
    for beta in (1e-6, 0.1, 0.5, 0.9, 0.99, 0.998):
        act = activations.PSSiLU(init_b=beta)
        assert act.beta().item() == pytest.approx(beta, rel=1e-5, abs=1e-7)
        act(torch.randn(64)).sum().backward()
        (dbeta_db,) = torch.autograd.grad(act.beta().sum(), act.b)
        assert dbeta_db.item() > 1e-4 and act.b.grad.abs().item() > 0, beta
    with pytest.raises(ValueError, match="init_b"):
        activations.PSSiLU(init_b=1.0)


def test_symmetric_units_and_kwta_formulas():
    x = torch.tensor([-3.0, -1.0, -0.5, 0.0, 0.5, 1.0, 3.0])
    assert torch.allclose(activations.MReLU()(x), torch.tensor([0, 0, 0.5, 1, 0.5, 0, 0.0]))
    assert torch.allclose(activations.RBF()(x), torch.exp(-x ** 2))
    out = activations.KWTA(gamma=0.25)(torch.arange(8.0).view(1, 2, 2, 2))
    assert out.flatten().tolist() == [0, 0, 0, 0, 0, 0, 6, 7]


@pytest.mark.parametrize("name", PARAMETRIC)
def test_parametric_activations_learn(name):
    """SGD on the activation's own parameters fits a teacher of the same family with other parameter
    values: the parameters move and the loss falls to a fraction of its start."""
    torch.manual_seed(0)
    act = activations.make_factory(name, "layer")(1)
    teacher = activations.make_factory(name, "layer")(1)
    with torch.no_grad():
        for p in teacher.parameters():
            p.add_(0.5 * torch.randn_like(p)) if name == "kaf" else p.copy_(torch.full_like(p, 0.4 if p.abs().max() < 0.5 else 2.0))
    before = [p.detach().clone() for p in act.parameters()]
    x = torch.linspace(-3, 3, 200)
    target = teacher(x).detach()
    opt = torch.optim.SGD(act.parameters(), lr=0.1)
    losses = []
    for _ in range(100):
        loss = (act(x) - target).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses[::20]
    assert any((p.detach() - b).abs().max() > 1e-4 for p, b in zip(act.parameters(), before))


def test_scopes_share_parameters_as_documented():
    count = lambda scope: activations.activation_parameter_count(
        models.build("lenet", "pssilu", 10, 1, 28, act_scope=scope))
    assert count("network") == 2  # one (a, b) pair in the whole network, as in Dai et al.
    assert count("layer") == 2 * 3
    assert count("channel") == 2 * (16 + 32 + 256)
    kaf = models.build("lenet", "kaf", 10, 1, 28)
    assert activations.activation_parameter_count(kaf) == 20 * (16 + 32 + 256)


def test_activation_registry_refuses_bad_names_and_options():
    with pytest.raises(ValueError, match="unknown activation"):
        activations.make_factory("sigmoidx")
    with pytest.raises(ValueError, match="takes no option"):
        activations.make_factory("relu", beta=2)
    with pytest.raises(ValueError, match="scope"):
        activations.make_factory("prelu", "everywhere")


# ------------------------------------------------------------------------------------------ models
BIG = {"wrn28_10", "wrn34_10", "vgg16", "resnet18", "preactresnet18"}


@pytest.mark.parametrize("arch", models.ARCH_NAMES)
def test_every_model_builds_with_every_activation(arch):
    if arch == "lenet":
        datasets = [("fashionmnist", 1, 28, 10)]
    else:
        datasets = [("cifar10", 3, 32, 10), ("cifar100", 3, 32, 100)]
    names = activations.NAMES if arch not in BIG else ["relu", "kaf", "pssilu", "kwta"]
    for ds, c, size, classes in datasets:
        for name in names:
            model = models.build(arch, name, classes, c, size).eval()
            with torch.no_grad():
                out = model(torch.rand(2, c, size, size))
            assert out.shape == (2, classes) and torch.isfinite(out).all(), (arch, name, ds)


@pytest.mark.parametrize("arch", sorted(BIG))
def test_big_models_build_with_all_activations(arch):
    """Construction only (a forward of every big model x every activation would take minutes on CPU)."""
    for name in activations.NAMES:
        model = models.build(arch, name, 10, 3, 32)
        assert model.config["act"] == name
        assert sum(isinstance(m, activations.REGISTRY[name][0]) for m in model.modules()) >= 1


@pytest.mark.parametrize("arch", models.ARCH_NAMES)
def test_every_model_is_its_bare_network_applied_to_normalised_inputs(arch):
    """forward(x) == net((x - mean) / std), computed here from the numbers, not from the buffers."""
    c, size = (1, 28) if arch == "lenet" else (3, 32)
    mean, std = [0.3, 0.45, 0.6][:c], [0.2, 0.5, 0.35][:c]
    torch.manual_seed(0)
    model = models.build(arch, "relu", 10, c, size, mean=mean, std=std).eval()
    x = torch.rand(2, c, size, size)
    expected_input = (x - torch.tensor(mean).view(1, c, 1, 1)) / torch.tensor(std).view(1, c, 1, 1)
    with torch.no_grad():
        out, bare = model(x), model.net(expected_input)
        assert torch.equal(out, bare)  # the same float32 operations: bit for bit
        assert not torch.equal(out, model.net(x))  # the inputs' normalisation reaches the output


def test_models_normalise_inside_and_saf_insert():
    model = models.build("lenet", "relu", 10, 1, 28, mean=[0.3], std=[0.2])
    assert torch.allclose(model.mean.flatten(), torch.tensor([0.3])) and torch.allclose(model.std.flatten(), torch.tensor([0.2]))
    lenet = models.build("lenet", "relu", 10, 1, 28, saf_insert="mrelu")
    assert not any(isinstance(m, activations.ReLU) for m in lenet.modules())
    assert sum(isinstance(m, activations.MReLU) for m in lenet.modules()) == 3
    res = models.build("resnet20", "relu", 10, 3, 32, saf_insert="rbf")
    # RBF right after each conv (stem + first conv of each of the 9 blocks); ReLU after residual sums
    assert sum(isinstance(m, activations.RBF) for m in res.modules()) == 10
    assert sum(isinstance(m, activations.ReLU) for m in res.modules()) == 9


# ----------------------------------------------------------------------------------------- attacks
@pytest.mark.parametrize("norm,eps", [("linf", 0.1), ("l2", 1.0)])
def test_attacks_stay_in_ball_and_image_range(trained_lenet, norm, eps):
    model, x, y = trained_lenet
    x, y = x[:64], y[:64]
    for loss in ("ce", "cw"):
        adv = attacks.pgd(model, x, y, eps, eps / 4, 5, restarts=2, norm=norm, loss=loss)
        delta = (adv - x).flatten(1)
        size = delta.abs().max(1).values if norm == "linf" else delta.norm(dim=1)
        assert (size <= eps + 1e-5).all()
        assert adv.min() >= 0 and adv.max() <= 1
    adv = attacks.fgsm(model, x, y, eps)
    assert (adv - x).abs().max() <= eps + 1e-6 and adv.min() >= 0 and adv.max() <= 1


def test_attacks_restore_mode_and_leave_parameter_grads_alone(trained_lenet):
    model, x, y = trained_lenet
    model.zero_grad(set_to_none=True)
    model.train()
    attacks.pgd(model, x[:16], y[:16], 0.1, 0.025, 2)
    assert model.training
    assert all(p.grad is None for p in model.parameters())
    model.eval()


def test_fgsm_and_pgd_break_the_undefended_model_by_a_margin(trained_lenet):
    """At eps 0.1 the naturally trained fixture is breakable: FGSM must cost it at least 8 points of
    accuracy (it costs about 15 on the 256 probe images) and PGD-10 at least 20 more than FGSM
    (about 43).  An attack that does not move, or moves down the loss (a flipped sign), leaves the
    accuracy at the clean one and fails."""
    model, x, y = trained_lenet
    eps = 0.1
    torch.manual_seed(0)
    clean, _ = attacks.robust_accuracy(model, x, y)
    fgsm, _ = attacks.robust_accuracy(model, x, y, lambda m, a, b: attacks.fgsm(m, a, b, eps))
    pgd, _ = attacks.robust_accuracy(model, x, y, lambda m, a, b: attacks.pgd(m, a, b, eps, eps / 4, 10))
    assert clean > 0.8, "the fixture model should have learned the synthetic task"
    assert fgsm <= clean - 0.08, (fgsm, clean)
    assert pgd <= fgsm - 0.2, (pgd, fgsm)


class Linear(torch.nn.Module):
    """x -> W flatten(x) + b: a linear classifier, whose worst case in an L-inf ball is known in closed
    form.  Example x of label y can be misclassified within eps iff for some class j != y

        r_j = (z_y - z_j) / ||w_y - w_j||_1 < eps,

    reached at the vertex x - eps sign(w_y - w_j) (when that stays in [0, 1])."""

    def __init__(self, d, classes, seed):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.weight = torch.nn.Parameter(torch.randn(classes, d, generator=g))
        self.bias = torch.nn.Parameter(torch.zeros(classes))

    def forward(self, x):
        return x.flatten(1) @ self.weight.t() + self.bias

    def radius(self, x, y):
        """Per example, the smallest L-inf perturbation that changes the prediction (min_j r_j)."""
        with torch.no_grad():
            z = self(x)
            margin = z.gather(1, y[:, None]) - z
            l1 = (self.weight[y][:, None, :] - self.weight[None]).abs().sum(2)
            r = margin / l1.clamp_min(1e-12)
            r[torch.arange(len(y)), y] = float("inf")
            return r.min(1).values


@pytest.fixture(scope="module")
def linear_problem():
    """A 10-class linear model on 200 8 x 8 images with pixels in [0.3, 0.7] (eps never reaches the
    [0, 1] borders), labels = its own predictions, and eps halfway between the two middle certified
    radii: exactly half of the images are breakable, none within 1e-4 of the boundary."""
    model = Linear(64, 10, seed=0).eval()
    x = 0.3 + 0.4 * torch.rand(200, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    y = attacks.predict(model, x)
    r = model.radius(x, y)
    mid = r.sort().values[99:101]
    eps = mid.mean().item()
    assert mid[1] - mid[0] > 2e-4 and eps < 0.3
    return model, x, y, eps, r < eps


def test_fgsm_is_the_signed_gradient_step_of_a_linear_model(linear_problem):
    """For a linear model grad_x CE = W^T (softmax(z) - onehot(y)), so FGSM must return exactly
    x + eps sign(W^T (p - e_y)) (no clipping here); it then breaks most of the breakable images and
    none of the certified ones."""
    model, x, y, eps, breakable = linear_problem
    with torch.no_grad():
        p = F.softmax(model(x), 1)
        grad = (p - F.one_hot(y, 10).float()) @ model.weight
    adv = attacks.fgsm(model, x, y, eps)
    assert torch.allclose(adv, x + eps * grad.sign().view_as(x), atol=1e-6)
    broken = attacks.predict(model, adv) != y
    assert not (broken & ~breakable).any()
    assert broken.sum() >= 0.8 * breakable.sum(), (int(broken.sum()), int(breakable.sum()))


@pytest.mark.parametrize("attack", ["pgd", "apgd-ce", "apgd-dlr", "apgd-t"])
def test_attacks_reach_the_closed_form_worst_case_of_a_linear_model(linear_problem, attack):
    """PGD-10 and APGD (CE, DLR, targeted; 20 iterations) break exactly the images whose certified
    radius is below eps: accuracy falls from 1 to the closed-form robust accuracy (0.5 here), no
    image is missed, and none beyond the radius is broken."""
    model, x, y, eps, breakable = linear_problem
    torch.manual_seed(0)
    run = {"pgd": lambda: attacks.pgd(model, x, y, eps, eps / 4, 10),
           "apgd-ce": lambda: attacks.apgd(model, x, y, eps, 20, "ce"),
           "apgd-dlr": lambda: attacks.apgd(model, x, y, eps, 20, "dlr"),
           "apgd-t": lambda: attacks.apgd(model, x, y, eps, 20, "dlr", targeted=True, n_target_classes=3)}[attack]
    broken = attacks.predict(model, run()) != y
    assert breakable.float().mean() == 0.5
    assert torch.equal(broken, breakable), (int((breakable & ~broken).sum()), int((broken & ~breakable).sum()))


def test_restarts_never_raise_accuracy(trained_lenet):
    model, x, y = trained_lenet
    eps = 0.04
    results = []
    for restarts in (1, 3):
        torch.manual_seed(5)  # the first restart of both runs starts from the same random point
        acc, correct = attacks.robust_accuracy(model, x, y, lambda m, a, b: attacks.pgd(m, a, b, eps, eps / 4, 3, restarts))
        results.append(correct)
    assert not (results[1] & ~results[0]).any()  # no example robust to 3 restarts but broken by 1
    assert results[1].float().mean() <= results[0].float().mean()


class Window(torch.nn.Module):
    """A toy model of images whose mean brightness m starts at 0.5, 3 classes, label 0.  Class 1 wins
    only while m lies in (0.515, 0.525); the cross-entropy gradient always points to brighter images
    (through class 2's logit, which never wins), so fixed-step PGD from x (step 0.01) walks through
    the window (iterate 2) and out of it again (iterates 3 to 5)."""

    def forward(self, x):
        m = x.mean((1, 2, 3))
        window = ((m > 0.515) & (m < 0.525)).float()  # no gradient through the comparison
        return torch.stack([torch.zeros_like(m), 10 * window - 5, m - 20], 1)


def test_pgd_keeps_the_first_misclassified_iterate():
    model = Window()
    model.dummy = torch.nn.Parameter(torch.zeros(1))  # attacks look up the model's device
    x, y = torch.full((3, 1, 2, 2), 0.5), torch.zeros(3, dtype=torch.long)
    x[2] = 0.3  # far from the window: never fooled within eps
    assert (attacks.predict(model, x) == y).all()
    for norm, alpha in (("linf", 0.01), ("l2", 0.02)):  # L2: a step of 0.02 moves every pixel by 0.01
        adv = attacks.pgd(model, x, y, 0.05 if norm == "linf" else 0.1, alpha, 5, norm=norm, random_init=False)
        assert attacks.predict(model, adv).tolist() == [1, 1, 0], norm  # the last iterate (m = 0.55) is correct again
        assert torch.allclose(adv[:2], torch.full_like(adv[:2], 0.52)), norm  # the early success is kept
        assert torch.allclose(adv[2], torch.full_like(adv[2], 0.35)), norm  # the rest: the last iterate
    # restarts: an example fooled by one run keeps that run's point
    adv = attacks.pgd(model, x, y, 0.05, 0.01, 5, restarts=3, random_init=False)
    assert attacks.predict(model, adv).tolist() == [1, 1, 0]


class FarFromTheBoundary(torch.nn.Module):
    """Two classes; class 0 wins by a margin of at least 5 that no step within eps can close, so PGD
    fools nothing and its loss softplus(w.x + b - 10) grows with w.x."""

    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(16, 1)
        with torch.no_grad():
            self.lin.weight.uniform_(-0.3, 0.3)
            self.lin.bias.zero_()

    def forward(self, x):
        z = self.lin(x.flatten(1))
        return torch.cat([torch.full_like(z, 10.0), z], 1)


def test_pgd_restarts_keep_the_last_iterate_of_the_highest_loss_run_where_none_fools():
    model = FarFromTheBoundary()
    x, y = torch.rand(32, 1, 4, 4) * 0.5 + 0.25, torch.zeros(32, dtype=torch.long)
    eps, alpha = 0.1, 0.01  # one small step: where a run ends depends on its random start
    torch.manual_seed(7)
    runs = [attacks.pgd(model, x, y, eps, alpha, 1) for _ in range(3)]  # the same three random starts
    torch.manual_seed(7)
    adv = attacks.pgd(model, x, y, eps, alpha, 1, restarts=3)
    assert (attacks.predict(model, adv) == y).all()  # nothing fooled: the rule under test applies
    with torch.no_grad():
        losses = torch.stack([attacks.per_example_loss(model(r), y) for r in runs])  # 3 x 32
    winner = losses.argmax(0)
    assert len(set(winner.tolist())) == 3  # the restarts differ, and each wins somewhere
    expected = torch.stack(runs)[winner, torch.arange(len(x))]
    assert torch.equal(adv, expected)


def test_cw_margin_loss():
    logits = torch.tensor([[2.0, 1.0, 0.5], [0.0, 3.0, 1.0]])
    y = torch.tensor([0, 0])
    assert torch.allclose(attacks.cw_margin_loss(logits, y), torch.tensor([-1.0, 3.0]))


# ------------------------------------------------------------------------------------- schedules
def test_cyclic_schedule_default_points():
    lr = lambda s: utils.lr_at(s, 100, "cyclic", 0.2)
    assert lr(0) == 0 and abs(lr(40) - 0.2) < 1e-12 and abs(lr(100)) < 1e-12 and abs(lr(70) - 0.1) < 1e-9


# ------------------------------------------------------------------------------------- data
def test_idx_reader_and_fraction(tmp_path):
    import gzip
    import struct
    images = torch.randint(0, 256, (5, 28, 28), dtype=torch.uint8)
    with gzip.open(tmp_path / "t10k-images-idx3-ubyte.gz", "wb") as f:
        f.write(struct.pack(">HBB", 0, 8, 3) + struct.pack(">III", 5, 28, 28) + images.numpy().tobytes())
    with gzip.open(tmp_path / "t10k-labels-idx1-ubyte.gz", "wb") as f:
        f.write(struct.pack(">HBB", 0, 8, 1) + struct.pack(">I", 5) + bytes([0, 1, 2, 3, 4]))
    x, y = data.load_split("fashionmnist", str(tmp_path), train=False)
    assert x.shape == (5, 1, 28, 28) and torch.equal(x[:, 0], images) and y.tolist() == [0, 1, 2, 3, 4]
    assert abs(utils.fraction("8/255") - 8 / 255) < 1e-12 and utils.fraction("0.1") == 0.1


def test_batches_augmentation_is_a_shifted_or_flipped_copy():
    x = torch.arange(2 * 3 * 32 * 32, dtype=torch.float32).view(2, 3, 32, 32) % 256
    batches = data.Batches(x.to(torch.uint8), torch.tensor([0, 1]), 2, shuffle=False, augment="crop+flip")
    xb, yb = next(iter(batches))
    assert xb.shape == (2, 3, 32, 32) and 0 <= xb.min() and xb.max() <= 1
    # the centre of each augmented image is a translated (maybe flipped) patch of the original
    orig = x.to(torch.uint8).float() / 255
    for i in range(2):
        found = any(torch.equal(cand[:, 8:24, 8:24], xb[i][:, 8:24, 8:24])
                    for dy in range(-4, 5) for dx in range(-4, 5)
                    for cand in [torch.roll(orig[i], (dy, dx), (1, 2)), torch.roll(orig[i].flip(2), (dy, dx), (1, 2))])
        assert found


# ------------------------------------------------------------------------------- end to end
def _run_cli(*args):
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=300)


def test_train_fast_end_to_end_then_eval_then_reload(tmp_path):
    out = tmp_path / "run"
    summary = train_fast.main(["--dataset", "synthetic", "--model", "lenet", "--act", "pssilu", "--epochs", "1",
                               "--n-train", "256", "--n-eval", "64", "--batch-size", "64", "--epsilon", "0.1",
                               "--eval-pgd-steps", "3", "--device", "cpu", "--out-dir", str(out)])
    on_disk = json.loads((out / "summary.json").read_text())
    for key in ("flags", "clean_acc", "pgd_acc", "pgd", "train_time_s", "epochs_completed", "activation_params",
                "activation_values"):
        assert key in on_disk, key
    assert on_disk["epochs_completed"] == 1 and on_disk["activation_params"] == 2
    assert on_disk["pgd"]["steps"] == 3 and abs(on_disk["pgd"]["eps"] - 0.1) < 1e-12
    assert 0 <= on_disk["pgd_acc"] <= on_disk["clean_acc"] <= 1 and summary["clean_acc"] == on_disk["clean_acc"]
    assert len(next(iter(on_disk["activation_values"].values()))) == 1  # PSSiLU a (network scope)

    ckpt = str(out / "checkpoint.pt")
    model = models.load_checkpoint(ckpt)
    assert not model.training
    x = torch.rand(8, 1, 28, 28)
    run_model = models.build(**model.config)
    run_model.load_state_dict(torch.load(ckpt, weights_only=True)["model_state"])
    assert torch.equal(model(x), run_model.eval()(x))

    result = eval_script.main([ckpt, "--n-eval", "64", "--pgd-steps", "3", "--device", "cpu",
                               "--out", str(tmp_path / "e.json")])
    acc = result["accuracy"]
    assert set(acc) == {"clean", "fgsm", "pgd3x1"}
    assert abs(acc["clean"] - on_disk["clean_acc"]) < 1e-6
    assert acc["pgd3x1"] <= acc["clean"]
    assert json.loads((tmp_path / "e.json").read_text())["accuracy"] == acc


@pytest.mark.parametrize("argv,message", [
    (["train_fast.py", "--act", "sigmoid"], "invalid choice"),
    (["train_fast.py", "--epsilon", "0"], "--epsilon must be in (0, 1]"),
    (["train_fast.py", "--epsilon", "8/0"], "fraction"),
    (["train_fast.py", "--batch-size", "1"], "BatchNorm cannot train on one image"),
    (["train_fast.py", "--attack", "none", "--nfgsm"], "belong to the FGSM attack"),
    (["train_fast.py", "--act", "relu", "--kaf-size", "10"], "applies to --act kaf"),
    (["train_fast.py", "--dataset", "cifar10", "--data-dir", "/nonexistent/dir", "--device", "cpu"], "--data-dir"),
    (["eval.py", "/nonexistent/checkpoint.pt", "--device", "cpu"], "checkpoint not found"),
])
def test_bad_input_gives_one_line_error(argv, message):
    r = _run_cli(*argv)
    assert r.returncode == 2, r.stderr
    lines = [l for l in r.stderr.strip().splitlines() if l.strip()]
    assert len(lines) == 1 and message in lines[0] and "Traceback" not in r.stderr, r.stderr


def test_truncated_checkpoint_gives_one_line_error(tmp_path):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"PK\x03\x04 not really a checkpoint")
    r = _run_cli("eval.py", str(bad), "--device", "cpu")
    assert r.returncode == 2 and "cannot read checkpoint" in r.stderr and "Traceback" not in r.stderr


def _write_idx(folder, split="test", images=None, labels=None, raw_images=None):
    """IDX files of a split in ``folder`` (gzipped); ``raw_images`` replaces the image file's bytes."""
    import gzip
    import struct
    folder.mkdir(parents=True, exist_ok=True)
    stems = data.IDX_FILES[split]
    images = torch.randint(0, 256, (5, 28, 28), dtype=torch.uint8) if images is None else images
    labels = [0, 1, 2, 3, 4] if labels is None else labels
    head = struct.pack(">HBB", 0, 8, images.dim()) + struct.pack(">" + "I" * images.dim(), *images.shape)
    with gzip.open(folder / f"{stems[0]}.gz", "wb") as f:
        f.write(head + images.numpy().tobytes() if raw_images is None else raw_images)
    with gzip.open(folder / f"{stems[1]}.gz", "wb") as f:
        f.write(struct.pack(">HBB", 0, 8, 1) + struct.pack(">I", len(labels)) + bytes(labels))
    return images


def test_idx_reader_takes_the_named_dataset_only(tmp_path):
    fashion = _write_idx(tmp_path / "data" / "FashionMNIST" / "raw")
    digits = _write_idx(tmp_path / "data" / "MNIST" / "raw")
    x, _ = data.load_split("mnist", str(tmp_path / "data"), train=False)  # FashionMNIST/raw is not looked at
    assert torch.equal(x[:, 0], digits)
    x, _ = data.load_split("fashionmnist", str(tmp_path / "data"), train=False)
    assert torch.equal(x[:, 0], fashion)
    _write_idx(tmp_path / "fashion-mnist")  # a bare folder whose name says Fashion-MNIST (Debian's)
    with pytest.raises(data.DataError, match="--dataset mnist but .*fashion-mnist holds FashionMNIST"):
        data.load_split("mnist", str(tmp_path / "fashion-mnist"), train=False)
    assert data.load_split("fashionmnist", str(tmp_path / "fashion-mnist"), train=False)[0].shape == (5, 1, 28, 28)
    _write_idx(tmp_path / "MNIST" / "raw")  # torchvision's MNIST folder given as --data-dir itself
    with pytest.raises(data.DataError, match="holds MNIST"):
        data.load_split("fashionmnist", str(tmp_path / "MNIST" / "raw"), train=False)


@pytest.mark.parametrize("case,message", [
    ("size", r"images of shape \(27, 27\), not 28 x 28"),
    ("ndim", r"images of shape \(784,\), not 28 x 28"),
    ("label", "holds label 10, outside 0 .. 9"),
    ("count", "holds 5 images but .* 4 labels"),
    ("short", "holds 3000 bytes of data where its header .* says 3920"),
    ("header", "header is cut short"),
    ("truncated", "truncated or corrupt"),
    ("corrupt", "truncated or corrupt"),
])
def test_idx_reader_refuses_broken_files_in_one_line(tmp_path, case, message, capsys):
    import gzip
    import struct
    good = torch.randint(0, 256, (5, 28, 28), dtype=torch.uint8)
    head = struct.pack(">HBB", 0, 8, 3) + struct.pack(">III", 5, 28, 28)
    if case == "size":
        _write_idx(tmp_path, "train", images=torch.zeros(5, 27, 27, dtype=torch.uint8))
    elif case == "ndim":
        _write_idx(tmp_path, "train", images=torch.zeros(5, 784, dtype=torch.uint8))
    elif case == "label":
        _write_idx(tmp_path, "train", labels=[0, 1, 2, 3, 10])
    elif case == "count":
        _write_idx(tmp_path, "train", labels=[0, 1, 2, 3])
    elif case == "short":
        _write_idx(tmp_path, "train", raw_images=head + good.numpy().tobytes()[:3000])
    elif case == "header":
        _write_idx(tmp_path, "train", raw_images=head[:9])
    else:
        _write_idx(tmp_path, "train")
        path = tmp_path / "train-images-idx3-ubyte.gz"
        raw = path.read_bytes()
        path.write_bytes(raw[:len(raw) // 2] if case == "truncated" else raw[:10] + b"\xff" * (len(raw) - 10))
    with pytest.raises(data.DataError, match=message):
        data.load_split("fashionmnist", str(tmp_path), train=True)
    # through a script: one line, exit code 2, before any training
    import train_fast
    with pytest.raises(SystemExit) as e:
        utils.main_guard(lambda: train_fast.main(["--dataset", "fashionmnist", "--data-dir", str(tmp_path), "--model", "lenet",
                                                  "--device", "cpu", "--out-dir", str(tmp_path / "run")]))
    err = [l for l in capsys.readouterr().err.splitlines() if l.strip()]
    assert e.value.code == 2 and len(err) == 1 and err[0].startswith("error: "), err


@pytest.mark.parametrize("module,use", [
    ("activations", "m = activations.make_factory('kaf')(4); assert m(torch.randn(2, 4, 3, 3)).shape == (2, 4, 3, 3)"),
    ("attacks", "net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 3)); x = torch.rand(4, 1, 4, 4); "
                "adv = attacks.pgd(net, x, torch.zeros(4, dtype=torch.long), 0.1, 0.03, 3); "
                "assert (adv - x).abs().max() <= 0.1 + 1e-6"),
    ("data", "x, y = data.synthetic_data('synthetic', 64, 0); b = data.Batches(x, y, 32, augment='crop+flip'); "
             "assert [len(yb) for _, yb in b] == [32, 32]"),
])
def test_a_module_copied_alone_into_another_project_works(tmp_path, module, use):
    import shutil
    shutil.copy(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), f"{module}.py"), tmp_path)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    r = subprocess.run([sys.executable, "-c", f"import torch, {module}; {use}"], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
