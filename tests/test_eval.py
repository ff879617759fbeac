"""Evaluation that cannot be fooled: APGD, the Square attack, noise / nonsense metrics, the
gradient-masking sanity checks and eval.py's presets (CPU, small)."""
import json
import math
import sys
import time
import types

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import attacks
import data
import eval as eval_script
import train_fast

EPS = 0.1


def accuracy(model, x, y):
    return (attacks.predict(model, x) == y).float().mean().item()


def in_ball(adv, x, eps):
    return (adv - x).abs().max().item() <= eps + 1e-6 and adv.min().item() >= 0 and adv.max().item() <= 1


def eval_args(*extra):
    """eval.py's settings without a checkpoint (for eval.evaluate on an in-memory model)."""
    return eval_script.get_args(["unused.pt", "--device", "cpu", "--batch-size", "64", *map(str, extra)])


class Quantised(nn.Module):
    """A deliberately gradient-masked model: the input is quantised, round(x k) / k, before the network.
    round has derivative 0 everywhere (no straight-through estimator), so every input gradient is 0
    and gradient attacks are blind, while the model is as vulnerable as before."""

    def __init__(self, net, k=16):
        super().__init__()
        self.net, self.k = net, k

    def forward(self, x):
        return self.net(torch.round(x * self.k) / self.k)


class PartlyBlind(nn.Module):
    """The same function as ``net``, but the images brighter than ``threshold`` (mean pixel) pass
    their input detached: their input gradient is exactly 0, so gradient attacks cannot move them,
    while a black-box attack finds them as vulnerable as the others."""

    def __init__(self, net, threshold):
        super().__init__()
        self.net, self.threshold = net, threshold

    def forward(self, x):
        bright = (x.mean((1, 2, 3)) > self.threshold).view(-1, 1, 1, 1)
        return self.net(torch.where(bright, x.detach(), x))


class TargetedOnly(nn.Module):
    """4 classes, label 0, on images whose mean pixel is 0.5 + s (s = 0 clean).  Logits

        z = (0, -1 - 9 s, -4 + 48 s, -10)

    Within eps 0.1 class 1 never wins (z_1 <= -0.1) and class 2 wins for s > 1/12.  Near s = 0 the
    cross-entropy, the untargeted DLR loss and the CW margin all rise towards s < 0 (towards class 1,
    the runner-up), so untargeted gradient attacks walk to s = -eps and stay correct; the targeted DLR
    loss towards class 2 rises towards s > 0 and wins.  A local trap, not gradient masking: the
    gradients are exact and never zero."""

    def __init__(self):
        super().__init__()
        self.dummy = nn.Parameter(torch.zeros(1))  # attacks look up the model's device

    def forward(self, x):
        s = x.mean((1, 2, 3)) - 0.5
        return torch.stack([torch.zeros_like(s), -1 - 9 * s, -4 + 48 * s, torch.full_like(s, -10.0)], 1)


def targeted_only_data(n=8):
    """Images of 16 x 16 pixels around 0.5 with mean exactly 0.5 (s = 0), label 0: a random start
    moves s by a few thousandths only, far from where the untargeted gradients turn (s ~ 0.023)."""
    noise = 0.02 * torch.randn(n, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    return 0.5 + noise - noise.mean((1, 2, 3), keepdim=True), torch.zeros(n, dtype=torch.long)


# ------------------------------------------------------------------------------------------- APGD
def test_dlr_losses_and_apgd_checkpoints():
    logits = torch.tensor([[3.0, 1.0, 0.0, -1.0], [0.0, 2.0, 1.0, 5.0]])
    y = torch.tensor([0, 1])
    # -(z_y - max_{i != y} z_i) / (z_pi1 - z_pi3): (-(3 - 1) / (3 - 0), -(2 - 5) / (5 - 1))
    assert torch.allclose(attacks.dlr_loss(logits, y), torch.tensor([-2 / 3, 3 / 4]))
    assert torch.allclose(attacks.dlr_loss(7 * logits + 3, y), attacks.dlr_loss(logits, y))  # shift/scale invariant
    # targeted: -(z_y - z_t) / (z_pi1 - (z_pi3 + z_pi4) / 2)
    t = torch.tensor([2, 3])
    assert torch.allclose(attacks.dlr_targeted_loss(logits, y, t), torch.tensor([-3 / 3.5, 3 / 4.5]))
    assert attacks.apgd_checkpoints(100) == [0, 22, 41, 57, 70, 80, 87, 93, 99]  # the paper's p_j, N = 100


@pytest.mark.parametrize("kind", ["ce", "dlr", "targeted"])
def test_apgd_stays_in_ball_and_image_range(trained_lenet, kind):
    model, x, y = trained_lenet
    x, y = x[:64].clone(), y[:64]
    x[:16] = (x[:16] > 0.5).float()  # saturated pixels: the [0, 1] clipping must hold at the borders
    model.zero_grad(set_to_none=True)
    model.train()
    adv = attacks.apgd(model, x, y, EPS, n_iter=20, loss="ce" if kind == "ce" else "dlr",
                       targeted=kind == "targeted", n_target_classes=3)
    assert model.training and all(p.grad is None for p in model.parameters())  # mode restored, no .grad
    model.eval()
    assert adv.shape == x.shape and adv.dtype == torch.float32 and in_ball(adv, x, EPS)
    assert accuracy(model, adv, y) < accuracy(model, x, y) - 0.3


def test_apgd_at_most_pgd20(trained_lenet):
    """APGD-CE and APGD-DLR (100 iterations) are at least as strong as PGD-20 (step eps/4) at the same
    eps, on accuracy with no slack.  At eps 0.1 PGD-20 leaves about a third of the fixture's images
    standing (at 0.05 and below it breaks none of them), so the comparison is not just 0 <= 0."""
    model, x, y = trained_lenet
    torch.manual_seed(0)
    pgd, _ = attacks.robust_accuracy(model, x, y, lambda m, a, b: attacks.pgd(m, a, b, EPS, EPS / 4, 20))
    assert 0.1 < pgd < 0.9, pgd
    for loss in ("ce", "dlr"):
        apgd, _ = attacks.robust_accuracy(model, x, y, lambda m, a, b: attacks.apgd(m, a, b, EPS, 100, loss))
        assert apgd <= pgd, (loss, apgd, pgd)


class Peak(nn.Module):
    """3 classes, label 0, on images whose mean pixel is v.  Logits (0, -1 - 10 (v - 0.53)^2, -10): the
    label always wins, and the cross-entropy peaks at v = 0.53, so the sign of its gradient flips as an
    iterate passes the peak and APGD oscillates around it.  Records the input of every forward pass."""
    PEAK = 0.53

    def __init__(self):
        super().__init__()
        self.dummy = nn.Parameter(torch.zeros(1))  # attacks look up the model's device
        self.seen = []

    def forward(self, x):
        self.seen.append(x.detach().flatten(1).mean(1))
        v = x.flatten(1).mean(1)
        return torch.stack([torch.zeros_like(v), -1 - 10 * (v - self.PEAK) ** 2, torch.full_like(v, -10.0)], 1)


def apgd_reference_1d(x0, eps, n_iter, rho=0.75, momentum=0.75):
    """Algorithm 1 of Croce & Hein 2020 on Peak, one pixel, in float64, from x^(0) = x0: returns the
    iterates x^(0..n_iter) and the step size used for each step."""
    lo, hi = max(x0 - eps, 0.0), min(x0 + eps, 1.0)
    proj = lambda v: min(max(v, lo), hi)
    loss = lambda v: math.log(1 + math.exp(-1 - 10 * (v - Peak.PEAK) ** 2) + math.exp(-10))  # CE, label 0
    sign = lambda v: 1.0 if v < Peak.PEAK else -1.0  # of d loss / d v
    checks = set(attacks.apgd_checkpoints(n_iter)[1:])
    eta, x = 2 * eps, x0
    x_prev, best = x0, x0
    best_loss = loss_prev = best_at_check = loss(x0)
    successes, halved_last, last_check = 0, False, 0
    xs, etas = [x0], []
    for k in range(n_iter):
        if k > 0:
            f = loss(x)
            successes += f > loss_prev
            loss_prev = f
            if f > best_loss:
                best, best_loss = x, f
        if k in checks:  # halve when < rho of the steps succeeded, or no progress since an unhalved checkpoint
            halve = successes < rho * (k - last_check) or (not halved_last and best_loss <= best_at_check)
            if halve:  # ... and restart from the best point, without momentum
                eta, x, x_prev, loss_prev = eta / 2, best, best, best_loss
            halved_last, best_at_check, successes, last_check = halve, best_loss, 0, k
        z = proj(x + eta * sign(x))
        x_new = z if k == 0 else proj(x + momentum * (z - x) + (1 - momentum) * (x - x_prev))
        x_prev, x = x, x_new
        xs.append(x)
        etas.append(eta)
    return xs, etas


def test_apgd_momentum_and_step_size_halving_follow_the_paper():
    """APGD's iterates on Peak equal Algorithm 1's, step by step, for four starting points (per-example
    step sizes and restarts).  From x^(0) = 0.5 at eps 0.1: x^(1) = 0.6 (step 2 eps, clipped), then z =
    0.4 and the momentum step x^(2) = 0.6 + 0.75 (0.4 - 0.6) + 0.25 (0.6 - 0.5) = 0.475 (0.4 without
    momentum).  The step size halves at the checkpoints 5, 9, 12, ... where too few steps raised the loss,
    and the attack restarts from the best point, so the iterates close in on the peak.  APGD without its
    momentum, or without the halving, leaves this trajectory."""
    eps, n_iter, starts = 0.1, 20, [0.5, 0.45, 0.58, 0.62]
    model = Peak().eval()
    x = torch.tensor(starts).view(-1, 1, 1, 1)
    adv = attacks.apgd(model, x, torch.zeros(4, dtype=torch.long), eps, n_iter, "ce", random_init=False)
    seen = torch.stack(model.seen[1:], 1)  # the first pass is the clean prediction; then x^(0..n_iter)
    assert seen.shape == (4, n_iter + 1)
    for i, x0 in enumerate(starts):
        xs, etas = apgd_reference_1d(x0, eps, n_iter)
        assert seen[i].tolist() == pytest.approx(xs, abs=1e-5), (x0, seen[i].tolist(), xs)
        assert etas[-1] <= 2 * eps / 2 ** 5  # the reference did halve, repeatedly
        best = max(range(len(xs)), key=lambda k: -abs(xs[k] - Peak.PEAK))
        assert adv[i].mean().item() == pytest.approx(xs[best], abs=1e-5)  # the result: the best iterate
    assert seen[0, :3].tolist() == pytest.approx([0.5, 0.6, 0.475], abs=1e-6)


@pytest.mark.parametrize("preset", ["quick", "standard"])
def test_headline_catches_a_model_only_the_targeted_attack_breaks(preset):
    """Both presets run APGD-T, and the per-example worst case takes it: on TargetedOnly FGSM, PGD,
    APGD-CE and APGD-DLR leave every image standing and APGD-T breaks them all."""
    model, (x, y) = TargetedOnly().eval(), targeted_only_data()
    assert (attacks.predict(model, x) == y).all()
    torch.manual_seed(0)
    args = eval_args("--preset", preset, "--apgd-iters", "20", "--square-queries", "100", "--large-eps", "0",
                     "--curve-eps", "--noise-sigmas", "--nonsense-n", "0")
    result = eval_script.evaluate(model, x, y, args, EPS, progress=False)
    acc = result["accuracy"]
    assert "apgd-t" in acc
    untargeted = [k for k in acc if k not in ("clean", "apgd-t") and not k.startswith("square")]
    assert len(untargeted) >= (3 if preset == "quick" else 5)
    assert all(acc[k] == 1.0 for k in untargeted), acc  # the trap holds every untargeted white-box attack
    assert acc["apgd-t"] == 0.0 and result["robust_accuracy"] == 0.0
    assert result["headline"].startswith("robust acc 0.0000")


# ----------------------------------------------------------------------------------------- Square
def test_square_schedule():
    assert attacks.square_p(0.8, 0, 10000) == 0.8 and attacks.square_p(0.8, 10, 10000) == 0.8
    assert attacks.square_p(0.8, 11, 10000) == 0.4 and attacks.square_p(0.8, 201, 10000) == 0.1
    assert attacks.square_p(0.8, 9999, 10000) == 0.8 / 512
    assert attacks.square_p(0.8, 100, 1000) == 0.8 / 16  # rescaled: iteration 100 of 1000 ~ 1000 of 10000


def test_square_finds_adversarials_and_is_no_stronger_than_apgd(trained_lenet):
    model, x, y = trained_lenet
    x, y = x[:64], y[:64]
    torch.manual_seed(0)
    clean = attacks.predict(model, x) == y
    adv, queries = attacks.square(model, x, y, EPS, n_queries=500, return_queries=True)
    assert in_ball(adv, x, EPS)
    fooled = attacks.predict(model, adv) != y
    square_acc = 1 - fooled.float().mean().item()
    apgd_acc = accuracy(model, attacks.apgd(model, x, y, EPS, 100, "ce"), y)
    assert square_acc >= apgd_acc
    assert square_acc <= clean.float().mean().item() - 0.3, "Square must break the undefended model"
    # queries: none for clean errors, at most the budget, fewer for the images it fooled early
    assert (queries[~clean] == 0).all() and queries.max() <= 500
    broken = clean & fooled
    assert broken.any() and queries[broken].float().mean() < 500
    assert (queries[clean & ~fooled] == 500).all()


# --------------------------------------------------------------------------------- sanity checks
# no escalation (its own test covers it): Square 5000 would take most of the test's time
CHECK_ARGS = ["--attacks", "fgsm", "pgd10", "pgd10x3", "apgd-ce", "square", "--apgd-iters", "20",
              "--square-queries", "300", "--square-escalate", "0", "--large-eps", "0.5", "--curve-steps", "10"]


def test_sanity_checks_pass_on_trained_model_and_fail_on_masked_one(trained_lenet, capsys):
    model, x, y = trained_lenet
    x, y = x[:64], y[:64]
    torch.manual_seed(0)
    ok = eval_script.evaluate(model, x, y, eval_args(*CHECK_ARGS), EPS, progress=False)
    assert {k: v["status"] for k, v in ok["sanity_checks"].items()} == {k: "PASS" for k in eval_script.CHECKS}
    assert ok["sanity_failed"] == [] and "FAILED" not in ok["headline"]

    masked = Quantised(model).eval()
    assert accuracy(masked, x, y) > 0.8  # quantisation keeps the model accurate ...
    torch.manual_seed(0)
    bad = eval_script.evaluate(masked, x, y, eval_args(*CHECK_ARGS), EPS, progress=False)
    status = {k: v["status"] for k, v in bad["sanity_checks"].items()}
    # ... but blinds gradient attacks: zero gradients, Square beats them, large eps does not reach 0
    assert status["input_gradients"] == "FAIL" and bad["input_gradients"]["mean_abs_grad"] == 0
    assert status["black_box_vs_white_box"] == "FAIL" and bad["accuracy"]["square"] < bad["accuracy"]["apgd-ce"] - 0.1
    assert status["large_eps"] == "FAIL"
    assert bad["accuracy"]["fgsm"] == bad["accuracy"]["clean"]  # sign(0) = 0: FGSM does not move
    assert "sanity checks FAILED" in bad["headline"] and "input_gradients" in bad["headline"]
    assert "FAIL  input_gradients" in capsys.readouterr().out
    # the gradient attacks sit far above the worst case that Square found: they are named in a warning
    assert any(w.startswith("apgd-ce ") for w in bad["warnings"]) and "WARNING: " in bad["headline"]
    for result in (ok, bad):  # the headline is the per-example worst case
        assert all(result["robust_accuracy"] <= a for a in result["accuracy"].values())


class Constant(nn.Module):
    """Answers class ``k`` whatever the image: a model that has not learned."""

    def __init__(self, k, classes=10):
        super().__init__()
        self.logits = nn.Parameter(F.one_hot(torch.tensor(k), classes).float())

    def forward(self, x):
        return self.logits + 0 * x.flatten(1).sum(1, keepdim=True)  # in the graph, as a real model's input


def test_a_model_at_chance_level_is_named_in_the_headline_and_a_trained_one_is_not(trained_lenet, capsys):
    model, x, y = trained_lenet
    x, y = x[:64], y[:64]
    rarest = int(torch.bincount(y, minlength=10).argmin())  # at most 1/10 of the labels
    args = eval_args("--attacks", "fgsm", "pgd10")
    at_chance = eval_script.evaluate(Constant(rarest).eval(), x, y, args, EPS, progress=False)
    assert at_chance["at_chance"] and at_chance["chance"] == 0.1 and at_chance["accuracy"]["clean"] <= 0.1
    assert "clean accuracy at chance level" in at_chance["headline"]
    assert "is at chance level (1/10)" in capsys.readouterr().out
    trained = eval_script.evaluate(model, x, y, args, EPS, progress=False)
    assert not trained["at_chance"] and "chance" not in trained["headline"]


def test_sharper_checks_fail_on_a_partly_masked_model(trained_lenet):
    """A fifth of the images has no input gradient: a share of all-zero gradients far below the half
    the old check 5 allowed, and images that only Square breaks, while Square's accuracy stays above
    the white-box attacks' (so comparing accuracies, the old check 4, passed)."""
    model, x, y = trained_lenet
    x, y = x[:64], y[:64]
    masked = PartlyBlind(model, x.mean((1, 2, 3)).quantile(0.8).item()).eval()
    torch.manual_seed(0)
    args = eval_args(*CHECK_ARGS, "--square-queries", "1000", "--square-escalate", "2000")
    result = eval_script.evaluate(masked, x, y, args, EPS, progress=False)
    checks, acc = result["sanity_checks"], result["accuracy"]
    assert 0.1 < result["input_gradients"]["zero_grad_share"] < 0.5  # the old check 5 passed ...
    assert result["input_gradients"]["mean_abs_grad"] > 1e-10
    assert checks["input_gradients"]["status"] == "FAIL"  # ... the new one fails
    assert acc["square"] >= min(v for k, v in acc.items() if k not in ("clean", "square")) - 0.01  # old 4 passed ...
    assert result["square_only_breaks"] >= 2 and checks["black_box_vs_white_box"]["status"] == "FAIL"  # ... new fails
    assert "Square alone" in checks["black_box_vs_white_box"]["detail"]


class Switch(nn.Module):
    """2 classes on 1 x 2 x 2 images: pixel (0, 0) carries the image's number i / 64, pixel (0, 1) a
    switch s; logits (0.5 - s, s - 0.5).  Clean images have s = 0 (class 0); an attack "breaks" an
    image by setting s = 1 (class 1).  The input gradient is never zero."""

    def __init__(self):
        super().__init__()
        self.dummy = nn.Parameter(torch.zeros(1))  # attacks look up the model's device

    def forward(self, x):
        s = x[:, 0, 0, 1]
        return torch.stack([0.5 - s, s - 0.5], 1)


N_SWITCH = 64


def switch_data():
    """64 images; label 1 (a clean error) for the numbers 2 mod 4, else 0."""
    x = torch.zeros(N_SWITCH, 1, 2, 2)
    ids = torch.arange(N_SWITCH)
    x[:, 0, 0, 0] = ids / N_SWITCH
    return x, (ids % 4 == 2).long()


def breaking(ids):
    """A stub attack that breaks exactly the images numbered in the bool mask ``ids`` (and no other)."""
    def attack(model, xb, yb, *args, **kwargs):
        hit = ids[(xb[:, 0, 0, 0] * N_SWITCH).round().long()]
        adv = xb.clone()
        adv[hit, 0, 0, 1] = 1.0
        return adv
    return attack


def run_stubbed(monkeypatch, attack_list, broken):
    """eval.evaluate on Switch with attacks.fgsm / attacks.pgd / attacks.apgd replaced by stubs that
    break the images ``broken[key]`` (key: fgsm, pgd{steps}x{restarts}, apgd-ce): eval.py's own attack
    table, scoring, headline and checks run on them.  No extras (basic preset)."""
    monkeypatch.setattr(attacks, "fgsm", lambda m, xb, yb, eps, **kw: breaking(broken["fgsm"])(m, xb, yb))
    monkeypatch.setattr(attacks, "pgd", lambda m, xb, yb, eps, alpha, steps, restarts=1, **kw:
                        breaking(broken[f"pgd{steps}x{restarts}"])(m, xb, yb))
    monkeypatch.setattr(attacks, "apgd", lambda m, xb, yb, eps, *a, **kw: breaking(broken["apgd-ce"])(m, xb, yb))
    x, y = switch_data()
    args = eval_args("--attacks", *attack_list, "--batch-size", "16")  # several batches
    return eval_script.evaluate(Switch().eval(), x, y, args, EPS, progress=False)


def test_the_cascade_gives_the_worst_case_of_every_attack_on_every_image(monkeypatch):
    """Two attacks break disjoint quarters of the images (FGSM the numbers 0 mod 4, PGD 1 mod 4; a third
    quarter is wrong clean).  Each attack runs only on what the earlier ones left (AutoAttack's order),
    and the headline is what running both on every image and intersecting gives: clean minus both
    sets, a quarter; each attack's accuracy is what is left after it, and standalone on the check
    subset each alone leaves half standing."""
    ids = torch.arange(N_SWITCH)
    by_fgsm, by_pgd = ids % 4 == 0, ids % 4 == 1
    _, y = switch_data()
    clean_ok = y == 0
    result = run_stubbed(monkeypatch, ["fgsm", "pgd10"], {"fgsm": by_fgsm, "pgd10x1": by_pgd})
    want = (clean_ok & ~by_fgsm & ~by_pgd).float().mean().item()
    assert result["robust_accuracy"] == want == result["accuracy"]["clean"] - (by_fgsm.sum() + by_pgd.sum()).item() / N_SWITCH
    acc = result["accuracy"]
    assert acc["fgsm"] == (clean_ok & ~by_fgsm).float().mean().item() and acc["pgd10x1"] == want
    cascade = {c["attack"]: c for c in result["cascade"]}
    assert cascade["fgsm"]["attacked"] == int(clean_ok.sum()) and cascade["fgsm"]["broken"] == int(by_fgsm.sum())
    assert cascade["pgd10x1"]["attacked"] == int((clean_ok & ~by_fgsm).sum())  # only FGSM's survivors
    assert cascade["pgd10x1"]["broken"] == int(by_pgd.sum())
    alone = result["standalone"]["accuracy"]
    assert result["standalone"]["n"] == N_SWITCH and alone["fgsm"] == alone["pgd10x1"] == 0.5
    assert result["headline"].startswith(f"robust acc {want:.4f} ")


def test_the_cascade_attacks_only_the_survivors(monkeypatch):
    ids = torch.arange(N_SWITCH)
    given = []
    result = run_stubbed(monkeypatch, ["fgsm", "pgd10"], {"fgsm": ids % 2 == 0, "pgd10x1": ids % 4 == 1})
    monkeypatch.undo()
    x, y = switch_data()
    # every image PGD saw in the cascade was still robust: correct clean and not broken by FGSM
    monkeypatch.setattr(attacks, "fgsm", lambda m, xb, yb, eps, **kw: breaking(ids % 2 == 0)(m, xb, yb))
    monkeypatch.setattr(attacks, "pgd", lambda m, xb, yb, *a, **kw: given.append(xb[:, 0, 0, 0].clone()) or xb.clone())
    args = eval_args("--attacks", "fgsm", "pgd10", "--batch-size", "16", "--check-n", "1")
    eval_script.evaluate(Switch().eval(), x, y, args, EPS, progress=False)
    numbers = (torch.cat(given[:-1]) * N_SWITCH).round().long()  # the last call: the standalone check
    assert sorted(numbers.tolist()) == [i for i in range(N_SWITCH) if i % 2 == 1 and i % 4 != 2]
    assert result["robust_accuracy"] < result["accuracy"]["fgsm"]


@pytest.mark.parametrize("fail", [False, True])
def test_more_iterations_check_fails_when_a_bigger_budget_breaks_fewer_images(monkeypatch, fail):
    """Check 2 compares every PGD run with every smaller one, and APGD-CE with the PGD runs within its
    budget.  PASS: PGD-10 x 3 and APGD-CE break a superset of what PGD-10 breaks.  FAIL: PGD-10 x 3 (or
    APGD-CE) breaks two images fewer than PGD-10 (3 points > the 1-point tolerance), which is what a
    masked gradient or a broken restart looks like."""
    ids = torch.arange(N_SWITCH)
    pgd10, more = ids % 4 == 0, ids % 4 <= 1
    for bigger in ("pgd10x3", "apgd-ce"):
        weaker = pgd10 & (ids >= 8)  # 2 of PGD-10's images (0 and 4) not broken
        broken = {"fgsm": ids % 8 == 0, "pgd10x1": pgd10, "pgd10x3": more, "apgd-ce": more}
        if fail:
            broken[bigger] = weaker
        result = run_stubbed(monkeypatch, ["fgsm", "pgd10", "pgd10x3", "apgd-ce"], broken)
        check = result["sanity_checks"]["more_iterations"]
        assert check["status"] == ("FAIL" if fail else "PASS"), (bigger, check)
        assert result["sanity_checks"]["iterative_vs_single_step"]["status"] == "PASS"
        if fail:
            assert result["sanity_failed"] == ["more_iterations"] and f"{bigger} " in check["detail"]
            assert "FAILED: more_iterations" in result["headline"]


@pytest.mark.parametrize("fail", [False, True])
def test_iterative_vs_single_step_check_fails_when_pgd_breaks_fewer_images_than_fgsm(monkeypatch, fail):
    """Check 3: an iterative attack must do at least as well as its own first step.  PASS: PGD-10
    breaks a superset of FGSM's images.  FAIL: PGD-10 breaks two images fewer than FGSM (3 points >
    the 1-point tolerance)."""
    ids = torch.arange(N_SWITCH)
    by_fgsm = ids % 4 == 0
    by_pgd = by_fgsm & (ids >= 8) if fail else ids % 4 <= 1
    result = run_stubbed(monkeypatch, ["fgsm", "pgd10"], {"fgsm": by_fgsm, "pgd10x1": by_pgd})
    check = result["sanity_checks"]["iterative_vs_single_step"]
    assert check["status"] == ("FAIL" if fail else "PASS"), check
    assert result["sanity_failed"] == (["iterative_vs_single_step"] if fail else [])
    assert result["sanity_checks"]["more_iterations"]["status"] == "SKIP"  # one PGD run, no APGD


def test_checks_2_and_3_tolerance_and_apgd_budget():
    """The accuracy tolerance of checks 2 and 3: a stronger attack may sit up to tol above a weaker one,
    not more; APGD-CE is only held to PGD runs of at most its budget (steps x restarts)."""
    pgd = {"pgd10x1": (10, 1), "pgd20x1": (20, 1)}
    status = lambda acc, budget=None, configs=pgd: {k: v["status"] for k, v in eval_script.sanity_checks(
        acc, configs, budget, None, None, 0.01).items()}
    base = {"clean": 0.9, "fgsm": 0.6, "pgd10x1": 0.4, "pgd20x1": 0.4}
    s = status(base)
    assert s["more_iterations"] == "PASS" and s["iterative_vs_single_step"] == "PASS"
    s = status({**base, "pgd20x1": 0.405})  # within tol
    assert s["more_iterations"] == "PASS"
    s = status({**base, "pgd20x1": 0.42})  # PGD-20 above PGD-10 by 2 points
    assert s["more_iterations"] == "FAIL" and "pgd20x1 0.4200 > pgd10x1 0.4000" in eval_script.sanity_checks(
        {**base, "pgd20x1": 0.42}, pgd, None, None, None, 0.01)["more_iterations"]["detail"]
    s = status({**base, "pgd10x1": 0.62, "pgd20x1": 0.3})  # PGD-10 above FGSM by 2 points
    assert s["iterative_vs_single_step"] == "FAIL" and s["more_iterations"] == "PASS"
    with_apgd = {**base, "apgd-ce": 0.45}
    assert status(with_apgd, 20)["more_iterations"] == "FAIL"  # budget 20 >= both PGD runs
    assert status(with_apgd, 10)["more_iterations"] == "FAIL"  # >= PGD-10
    assert status(with_apgd, 5)["more_iterations"] == "PASS"  # below both budgets: not compared
    one = {"pgd10x1": (10, 1)}
    assert status({"clean": 0.9, "fgsm": 0.5, "pgd10x1": 0.4}, None, one)["more_iterations"] == "SKIP"


def test_sanity_check_thresholds():
    acc = {"clean": 0.9, "apgd-ce": 0.3, "square": 0.35}
    grads = lambda share: {"mean_abs_grad": 1e-3, "zero_grad_share": share, "n": 1000}
    run = lambda only, share: {k: v["status"] for k, v in eval_script.sanity_checks(
        acc, {}, None, None, grads(share), 0.01, square_only=only).items()}
    assert run(0.002, 0.01)["black_box_vs_white_box"] == "PASS" and run(0.002, 0.01)["input_gradients"] == "PASS"
    assert run(0.003, 0.011)["black_box_vs_white_box"] == "FAIL" and run(0.003, 0.011)["input_gradients"] == "FAIL"
    assert run(None, 0.0)["black_box_vs_white_box"] == "SKIP"  # Square not compared per example


def test_attack_gap_warnings_name_attacks_far_above_the_worst_case():
    acc = {"clean": 0.77, "fgsm": 0.67, "pgd20x1": 0.361, "pgd50x10": 0.2765, "apgd-ce": 0.079, "square": 0.2895}
    warnings = eval_script.attack_gap_warnings(acc, 0.073, 0.10)
    assert [w.split()[0] for w in warnings] == ["pgd20x1", "pgd50x10", "square"]  # clean and FGSM are not attacks to trust
    assert "28.8 points above the worst case" in warnings[0]
    assert eval_script.attack_gap_warnings(acc, 0.073, 0.30) == []
    result = {"robust_accuracy": 0.073, "accuracy": acc, "sanity_failed": [], "warnings": warnings, "gap_warn": 0.1,
              "sanity_checks": {"large_eps": {"status": "PASS"}}}
    assert "[WARNING: pgd20x1, pgd50x10, square overstate robustness by > 10 points]" in eval_script.headline(result)


# ---------------------------------------------------------------------------------- noise metrics
def test_noise_and_nonsense_match_direct_computation():
    torch.manual_seed(3)
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 4 * 4, 5)).eval()
    x = torch.rand(40, 3, 4, 4)
    with torch.no_grad():
        y = model(x).argmax(1)
    y[:10] = (y[:10] + 1) % 5  # 30 of 40 right on clean images
    sigmas = [0.0, 0.1, 0.5]
    got = attacks.noise_accuracy(model, x, y, sigmas, seed=7, batch_size=64)
    z = torch.randn(x.shape, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        for s in sigmas:
            want = (model((x + s * z).clamp(0, 1)).argmax(1) == y).float().mean().item()
            assert got[s] == pytest.approx(want), s
    assert got[0.0] == pytest.approx(0.75) and got[0.5] < got[0.0]

    images = (0.5 + 0.25 * torch.randn((50, 3, 4, 4), generator=torch.Generator().manual_seed(11))).clamp(0, 1)
    with torch.no_grad():
        conf = F.softmax(model(images), 1).max(1).values
    threshold = conf.median().item()
    r = attacks.nonsense_rate(model, 50, (3, 4, 4), threshold=threshold, seed=11, batch_size=64)
    assert r["rate"] == pytest.approx((conf > threshold).float().mean().item()) and 0 < r["rate"] < 1
    assert r["mean_confidence"] == pytest.approx(conf.mean().item()) and sum(r["predicted_class_counts"]) == 50


# ---------------------------------------------------------------------------------------- eval.py
def test_attack_list_flags():
    assert eval_args().attack_list == ["fgsm", "pgd"]  # no preset, no --attacks: the basic report
    quick = eval_args("--preset", "quick", "--attacks", "+square")
    assert quick.attack_list == ["fgsm", "pgd20", "apgd-ce", "apgd-t", "square"]
    # AutoAttack's APGD iterations; APGD-T towards the 3 classes MALT ranks nearest
    assert quick.apgd_iters == 100 and quick.apgd_targets == 3 and quick.apgd_target_order == "malt"
    standard = eval_args("--preset", "standard")
    assert standard.attack_list == ["fgsm", "pgd20", "pgd50x10", "apgd-ce", "apgd-dlr", "apgd-t", "square"]
    assert standard.apgd_iters == 100 and standard.apgd_targets == 9  # AutoAttack's APGD-T budget
    args = eval_args("--preset", "standard", "--attacks", "apgd-ce,pgd50x10", "apgd-t")
    assert args.attack_list == ["apgd-ce", "pgd50x10", "apgd-t"] and args.apgd_iters == 100 and args.large_eps == 0.5
    assert eval_args("--preset", "quick", "--apgd-iters", "50").apgd_iters == 50  # the flag beats the preset
    with pytest.raises(SystemExit):
        eval_args("--attacks", "cw-l2")


def test_autoattack_missing_gives_one_line_message(trained_lenet, monkeypatch, capsys):
    for name in ("autoattack", "pyautoattack"):  # import -> ImportError, installed or not
        monkeypatch.setitem(sys.modules, name, None)
    model, x, y = trained_lenet
    result = eval_script.evaluate(model, x[:32], y[:32], eval_args("--attacks", "autoattack"), EPS, progress=False)
    assert set(result["accuracy"]) == {"clean"} and "autoattack" in result["skipped"]
    assert eval_script.AUTOATTACK_MISSING in capsys.readouterr().out


def test_autoattack_is_seeded_from_seed_and_leaves_the_global_generator_alone(trained_lenet, monkeypatch):
    seeds = []

    class FakeAutoAttack:  # the original package's interface; reseeds the global generator as it does
        def __init__(self, model, norm, eps, version, device, verbose=True, seed=None):
            seeds.append(seed)
            self.seed = seed if seed is not None else time.time()

        def run_standard_evaluation(self, x, y, bs):
            torch.manual_seed(int(self.seed))
            return x

    monkeypatch.setitem(sys.modules, "autoattack", types.SimpleNamespace(AutoAttack=FakeAutoAttack))
    model, x, y = trained_lenet
    torch.manual_seed(1)
    result = eval_script.evaluate(model, x[:32], y[:32], eval_args("--attacks", "autoattack", "--seed", "7"), EPS,
                                  progress=False)
    after = torch.rand(4)
    torch.manual_seed(1)
    assert seeds == [7] and "autoattack" in result["accuracy"]
    assert torch.equal(after, torch.rand(4))  # the global generator is where it was before AutoAttack


def test_eval_quick_preset_end_to_end(tmp_path):
    out = tmp_path / "run"
    train_fast.main(["--dataset", "synthetic", "--model", "lenet", "--epochs", "1", "--n-train", "256", "--n-eval", "64",
                     "--batch-size", "64", "--epsilon", "0.1", "--eval-pgd-steps", "2", "--device", "cpu",
                     "--out-dir", str(out)])
    path = tmp_path / "e.json"
    result = eval_script.main([str(out / "checkpoint.pt"), "--preset", "quick", "--n-eval", "64", "--apgd-iters", "10",
                               "--curve-eps", "0.05", "--curve-steps", "5", "--noise-sigmas", "0.1", "0.3",
                               "--nonsense-n", "64", "--device", "cpu", "--out", str(path)])
    acc = result["accuracy"]
    assert {"clean", "fgsm", "pgd20x1", "apgd-ce", "apgd-t", "square"} <= set(acc) and result["eps"] == pytest.approx(0.1)
    assert all(result["robust_accuracy"] <= a for a in acc.values())
    assert result["robust_accuracy"] == acc[result["cascade"][-1]["attack"]]
    assert set(result["sanity_checks"]) == set(eval_script.CHECKS)
    assert all(c["status"] in ("PASS", "FAIL", "SKIP") and c["detail"] for c in result["sanity_checks"].values())
    assert result["sanity_checks"]["black_box_vs_white_box"]["status"] != "SKIP"  # quick runs Square on survivors
    assert result["config"]["square_queries"] == 500
    assert set(result["noise_accuracy"]) == {"0.1", "0.3"} and 0 <= result["nonsense"]["rate"] <= 1
    assert set(result["accuracy_vs_eps"]["accuracy"]) == {"0.05", "0.5"} and result["large_eps"]["eps"] == 0.5
    header, row = result["markdown_header"], result["markdown_row"]
    assert "\n" not in row and row.startswith("| ") and row.count("|") == header.count("|")
    assert result["headline"].startswith("robust acc") and result["time_s"] > 0
    on_disk = json.loads(path.read_text())
    assert on_disk["accuracy"] == acc and on_disk["robust_accuracy"] == result["robust_accuracy"]
    assert on_disk["sanity_checks"] == result["sanity_checks"]


def test_eval_of_interrupted_pt_writes_its_own_json_and_an_unwritable_out_is_refused_up_front(tmp_path, capsys):
    import shutil
    import bench
    import utils
    out = tmp_path / "run"
    train_fast.main(["--dataset", "synthetic", "--model", "lenet", "--epochs", "1", "--n-train", "128", "--n-eval", "16",
                     "--batch-size", "64", "--epsilon", "0.1", "--eval-pgd-steps", "1", "--device", "cpu", "--out-dir", str(out)])
    shutil.copy(out / "checkpoint.pt", out / "interrupted.pt")  # as Ctrl-C leaves it beside the run's checkpoint
    eval_script.main([str(out / "interrupted.pt"), "--attacks", "fgsm", "--n-eval", "8", "--no-plot", "--device", "cpu"])
    assert (out / "eval_interrupted.json").exists() and not (out / "eval.json").exists()
    (tmp_path / "file").write_text("")
    for main, argv in ((eval_script.main, [str(out / "checkpoint.pt"), "--attacks", "fgsm", "--n-eval", "8", "--device", "cpu"]),
                       (bench.main, ["--device", "cpu", "--dataset", "fashionmnist", "--model", "lenet", "--acts", "relu",
                                     "--regimes", "fast", "--steps", "1", "--warmup", "0", "--no-isolate"])):
        for bad, message in ((tmp_path / "file" / "e.json", "cannot create its folder"), (tmp_path, "is a folder")):
            capsys.readouterr()
            with pytest.raises(SystemExit) as e:
                utils.main_guard(lambda: main(argv + ["--out", str(bad)]))
            captured = capsys.readouterr()
            err = [l for l in captured.err.splitlines() if l.strip()]
            assert e.value.code == 2 and len(err) == 1 and message in err[0] and captured.out == "", (main, err)
    assert not (out / "eval.json").exists()


def test_n_clean_is_the_clean_accuracy_of_the_first_n_test_images_and_the_split_is_read_once(tmp_path, monkeypatch):
    import models
    import utils
    out = tmp_path / "run"
    train_fast.main(["--dataset", "synthetic", "--model", "lenet", "--epochs", "1", "--n-train", "128", "--n-eval", "16",
                     "--batch-size", "64", "--epsilon", "0.1", "--eval-pgd-steps", "1", "--device", "cpu", "--out-dir", str(out)])
    model = models.load_checkpoint(str(out / "checkpoint.pt")).eval()
    xt, yt = data.load_split("synthetic", None, train=False)
    reads = []
    load_split = data.load_split
    monkeypatch.setattr(data, "load_split", lambda *a, **k: reads.append(a) or load_split(*a, **k))
    for n_eval, n_clean, n_expected in ((8, 24, 24), (24, 8, 8), (8, 0, len(yt))):
        reads.clear()
        r = eval_script.main([str(out / "checkpoint.pt"), "--attacks", "fgsm", "--n-eval", str(n_eval), "--n-clean", str(n_clean),
                              "--no-plot", "--device", "cpu", "--out", str(tmp_path / "e.json")])
        assert len(reads) == 1 and r["n_eval"] == n_eval and r["clean_full"]["n"] == n_expected
        assert r["clean_full"]["accuracy"] == pytest.approx(accuracy(model, xt[:n_expected].float() / 255, yt[:n_expected]))
        assert r["accuracy"]["clean"] == pytest.approx(accuracy(model, xt[:n_eval].float() / 255, yt[:n_eval]))


class Blind(nn.Module):
    """Returns its wrapped model's logits on x with no gradient reaching x: every gradient attack sees
    zero, a black-box attack sees the real model."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x):
        return self.model(x.detach()) + 0 * x.sum((1, 2, 3))[:, None]


def test_gradient_masking_escalates_square_to_its_full_budget_and_a_plain_model_does_not(trained_lenet):
    model, x, y = trained_lenet
    x, y = x[:48], y[:48]
    args = eval_args("--preset", "quick", "--apgd-iters", "10", "--apgd-targets", "2", "--square-queries", "20",
                     "--square-escalate", "200", "--large-eps", "0", "--curve-eps", "--noise-sigmas", "--nonsense-n", "0")
    torch.manual_seed(0)
    plain = eval_script.evaluate(model, x, y, args, EPS, progress=False)
    assert plain["escalation"] is None and not any(c["attack"] == "square-escalated" for c in plain["cascade"])
    torch.manual_seed(0)
    blind = eval_script.evaluate(Blind(model).eval(), x, y, args, EPS, progress=False)
    assert blind["escalation"]["queries"] == 200 and "all-zero input gradient" in blind["escalation"]["reasons"][0]
    steps = [c["attack"] for c in blind["cascade"]]
    assert steps[-3:] == ["square", "apgd-t-escalated", "square-escalated"]
    assert blind["escalation"]["apgd_t_restarts"] == 5 and blind["escalation"]["apgd_t_targets"] == 2
    restarted, escalated = blind["cascade"][-2:]
    assert restarted["attacked"] == int(round(blind["accuracy"]["square"] * len(y)))  # the survivors only
    assert escalated["attacked"] == int(round(blind["accuracy"]["apgd-t-escalated"] * len(y)))
    assert blind["robust_accuracy"] <= blind["accuracy"]["square"] <= blind["accuracy"]["apgd-t"]
    assert blind["robust_accuracy"] < blind["accuracy"]["apgd-t"] - 0.1  # the black box found what gradients hid


def test_robustbench_model_info_has_the_fields_robustbench_reads(tmp_path):
    out = tmp_path / "run"
    train_fast.main(["--dataset", "synthetic", "--model", "lenet", "--epochs", "1", "--n-train", "128", "--n-eval", "32",
                     "--batch-size", "64", "--epsilon", "0.1", "--eval-pgd-steps", "1", "--device", "cpu",
                     "--out-dir", str(out)])
    result = eval_script.main([str(out / "checkpoint.pt"), "--attacks", "fgsm", "pgd10", "--n-eval", "32", "--no-plot",
                               "--device", "cpu", "--out", str(tmp_path / "e.json"), "--robustbench", "Ours2026Relu"])
    info = json.loads((tmp_path / "model_info" / "synthetic" / "Linf" / "Ours2026Relu.json").read_text())
    fields = {"link", "name", "authors", "additional_data", "number_forward_passes", "dataset", "venue",
              "architecture", "eps", "clean_acc", "reported", "autoattack_acc", "footnote"}
    assert fields <= set(info) and info["dataset"] == "synthetic" and info["eps"] == pytest.approx(0.1)
    assert info["clean_acc"] == f"{100 * result['accuracy']['clean']:.2f}"
    assert info["autoattack_acc"] == f"{100 * result['robust_accuracy']:.2f}"
    assert "not AutoAttack" in info["footnote"] and info["evaluation"]["cascade"] == result["cascade"]


def test_malt_ranks_targets_by_the_linear_distance_to_each_boundary():
    """On a linear classifier the first-order estimate is exact: the L-inf distance from x to the
    boundary between y and k is (z_y - z_k) / ||w_y - w_k||_1.  Class 1 has the second-highest logit
    but a steep boundary far away; class 2, a lower logit with a flat weight difference, is nearer."""
    torch.manual_seed(0)
    model = nn.Linear(8, 4)
    with torch.no_grad():
        model.weight.zero_()
        model.bias.copy_(torch.tensor([3.0, 2.5, 1.0, -5.0]))
        model.weight[1] = 0.1  # boundary 0-1: margin 0.5 over 0.8: 0.6 away
        model.weight[2] = 4.0  # boundary 0-2: margin about 1.9 over 32: 0.06 away
    x, y = torch.rand(5, 8) * 0.01, torch.zeros(5, dtype=torch.long)
    z = model(x).detach()
    exact = torch.stack([(z[:, 0] - z[:, k]) / (model.weight[0] - model.weight[k]).abs().sum().detach()
                         for k in range(1, 4)], 1)
    order = attacks.malt_target_order(model, x, y)
    assert (order[:, 0] == 0).all() and torch.equal(order[:, 1:], exact.argsort(1) + 1)
    assert (order[:, 1] == 2).all() and (z.argsort(1, descending=True)[:, 1] == 1).all()  # logit order: 1
    args = eval_args("--attacks", "apgd-t", "--apgd-iters", "5", "--apgd-targets", "1", "--apgd-target-order", "malt")
    assert args.apgd_target_order == "malt"


def test_square_alone_even_escalated_is_not_judged_by_check_4(trained_lenet):
    """With no white-box attack there is nothing Square could have broken 'alone': check 4 is skipped,
    also when the escalated Square run follows the first (a gradient-blind model escalates)."""
    model, x, y = trained_lenet
    args = eval_args("--attacks", "square", "--square-queries", "10", "--square-escalate", "20", "--large-eps", "0")
    torch.manual_seed(0)
    result = eval_script.evaluate(Blind(model).eval(), x[:16], y[:16], args, EPS, progress=False)
    assert [c["attack"] for c in result["cascade"]] == ["square", "square-escalated"]
    assert result["sanity_checks"]["black_box_vs_white_box"]["status"] == "SKIP"


def test_the_standard_preset_escalates_with_apgd_t_restarts_though_its_square_is_already_full(trained_lenet,
                                                                                              monkeypatch):
    """Standard runs Square at the escalation budget already: a masking signal adds the APGD-T
    restarts alone (no second Square run), towards MALT's --escalate-targets nearest classes where
    the first APGD-T took the highest logits."""
    model, x, y = trained_lenet
    calls, apgd = [], attacks.apgd
    monkeypatch.setattr(attacks, "apgd", lambda *a, **k: calls.append((a[6], k)) or apgd(*a, **k))
    args = eval_args("--preset", "standard", "--attacks", "apgd-ce", "apgd-t", "square", "--apgd-iters", "5",
                     "--apgd-targets", "3", "--square-queries", "30", "--square-escalate", "30", "--escalate-restarts", "2",
                     "--escalate-targets", "2", "--large-eps", "0", "--curve-eps", "--noise-sigmas", "--nonsense-n", "0")
    torch.manual_seed(0)
    blind = eval_script.evaluate(Blind(model).eval(), x[:32], y[:32], args, EPS, progress=False)
    assert [c["attack"] for c in blind["cascade"]][-2:] == ["square", "apgd-t-escalated"]
    assert blind["escalation"]["queries"] is None and blind["escalation"]["apgd_t_restarts"] == 2
    assert blind["escalation"]["apgd_t_targets"] == 2
    targeted = [(restarts, k["n_target_classes"], k["target_order"]) for restarts, k in calls if k.get("targeted")]
    assert targeted[0] == (1, 3, "logit") and targeted[-1] == (2, 2, "malt")
