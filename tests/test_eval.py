"""Evaluation that cannot be fooled: APGD, the Square attack, noise / nonsense metrics, the
gradient-masking sanity checks and eval.py's presets (CPU, small)."""
import json
import sys
import time
import types

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import attacks
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
    untargeted = [k for k in acc if k not in ("clean", "apgd-t", "square")]
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
CHECK_ARGS = ["--attacks", "fgsm", "pgd10", "pgd10x3", "apgd-ce", "square", "--apgd-iters", "20",
              "--square-queries", "300", "--large-eps", "0.5", "--curve-steps", "10"]


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


def test_sharper_checks_fail_on_a_partly_masked_model(trained_lenet):
    """A fifth of the images has no input gradient: a share of all-zero gradients far below the half
    the old check 5 allowed, and images that only Square breaks, while Square's accuracy stays above
    the white-box attacks' (so comparing accuracies, the old check 4, passed)."""
    model, x, y = trained_lenet
    x, y = x[:64], y[:64]
    masked = PartlyBlind(model, x.mean((1, 2, 3)).quantile(0.8).item()).eval()
    torch.manual_seed(0)
    args = eval_args(*CHECK_ARGS, "--square-queries", "1000")
    result = eval_script.evaluate(masked, x, y, args, EPS, progress=False)
    checks, acc = result["sanity_checks"], result["accuracy"]
    assert 0.1 < result["input_gradients"]["zero_grad_share"] < 0.5  # the old check 5 passed ...
    assert result["input_gradients"]["mean_abs_grad"] > 1e-10
    assert checks["input_gradients"]["status"] == "FAIL"  # ... the new one fails
    assert acc["square"] >= min(v for k, v in acc.items() if k not in ("clean", "square")) - 0.01  # old 4 passed ...
    assert result["square_only_breaks"] >= 2 and checks["black_box_vs_white_box"]["status"] == "FAIL"  # ... new fails
    assert "Square alone" in checks["black_box_vs_white_box"]["detail"]


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
    assert quick.apgd_iters == 50 and quick.apgd_targets == 9
    standard = eval_args("--preset", "standard")
    assert standard.attack_list == ["fgsm", "pgd20", "pgd50x10", "apgd-ce", "apgd-dlr", "apgd-t", "square"]
    assert standard.apgd_iters == 100 and standard.apgd_targets == 9  # AutoAttack's APGD-T budget
    args = eval_args("--preset", "standard", "--attacks", "apgd-ce,pgd50x10", "apgd-t")
    assert args.attack_list == ["apgd-ce", "pgd50x10", "apgd-t"] and args.apgd_iters == 100 and args.large_eps == 0.5
    assert eval_args("--preset", "quick").apgd_iters == 50
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
    assert set(acc) == {"clean", "fgsm", "pgd20x1", "apgd-ce", "apgd-t"} and result["eps"] == pytest.approx(0.1)
    assert all(result["robust_accuracy"] <= a for a in acc.values())
    assert set(result["sanity_checks"]) == set(eval_script.CHECKS)
    assert all(c["status"] in ("PASS", "FAIL", "SKIP") and c["detail"] for c in result["sanity_checks"].values())
    assert result["sanity_checks"]["black_box_vs_white_box"]["status"] == "SKIP"  # quick runs no Square
    assert set(result["noise_accuracy"]) == {"0.1", "0.3"} and 0 <= result["nonsense"]["rate"] <= 1
    assert set(result["accuracy_vs_eps"]["accuracy"]) == {"0.05", "0.5"} and result["large_eps"]["eps"] == 0.5
    header, row = result["markdown_header"], result["markdown_row"]
    assert "\n" not in row and row.startswith("| ") and row.count("|") == header.count("|")
    assert result["headline"].startswith("robust acc") and result["time_s"] > 0
    on_disk = json.loads(path.read_text())
    assert on_disk["accuracy"] == acc and on_disk["robust_accuracy"] == result["robust_accuracy"]
    assert on_disk["sanity_checks"] == result["sanity_checks"]
