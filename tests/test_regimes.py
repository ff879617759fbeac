"""The three regimes -- what their perturbations do, the schedule, weight decay, the guard, DDP sharding --
the LR / momentum schedules and the LR range test (CPU, tiny data)."""
import argparse
import contextlib
import csv
import json
import math

import pytest
import torch
import torch.nn.functional as F

import data
import eval as eval_script
import models
import train_fast
import train_free
import train_pgd
import tricks
import utils

TINY = ["--dataset", "synthetic", "--model", "lenet", "--n-train", "256", "--n-eval", "64", "--batch-size", "64",
        "--eval-pgd-steps", "2", "--device", "cpu"]


def tiny(tmp_path, *extra):
    return TINY + ["--out-dir", str(tmp_path), *map(str, extra)]


class Inputs:
    """Records the input of every forward pass of a model."""

    def __init__(self, model):
        self.seen = []
        model.register_forward_pre_hook(lambda module, args: self.seen.append(args[0].detach().clone()))


# ------------------------------------------------------------------------------------- schedules
TOP = 0.2
# schedule -> (total steps, extra lr_at arguments, {step: expected lr})
SCHEDULE_POINTS = {
    "piecewise": (1000, {}, {0: TOP, 499: TOP, 500: TOP / 10, 749: TOP / 10, 750: TOP / 100, 1000: TOP / 100}),
    "cyclic": (1000, {}, {0: 0.0, 200: TOP / 2, 400: TOP, 700: TOP / 2, 1000: 0.0}),
    "linear": (1000, {}, {0: TOP, 500: TOP / 2, 1000: 0.0}),
    "exponential": (1000, {}, {0: TOP, 500: TOP * 1e-3 ** 0.5, 1000: TOP / 1000}),
    "onecycle": (1000, {}, {0: TOP / 10, 450: TOP, 900: TOP / 10, 1000: TOP / 1000}),
    "onecycle-half": (600, {}, {0: TOP / 10, 200: TOP, 400: TOP / 10, 500: TOP / 2, 600: TOP / 1000}),
    "onecycle-truncated": (1000, {}, {0: TOP / 10, 300: TOP, 1000: TOP / 1000}),
    "triangular": (600, {"cycles": 3}, {0: TOP / 10, 100: TOP, 200: TOP / 10, 300: TOP, 400: TOP / 10, 500: TOP,
                                        600: TOP / 10}),
    "cosine": (1000, {}, {0: TOP, 500: TOP / 2, 1000: 0.0}),
    # three equal cycles: restarts at 1/3 and 2/3, each cycle half way down at its middle
    "sgdr": (600, {"cycles": 3}, {0: TOP, 100: TOP / 2, 200: TOP, 300: TOP / 2, 400: TOP, 600: 0.0}),
    "linear-restarts": (600, {"cycles": 3}, {0: TOP, 100: (TOP + TOP / 1000) / 2, 200: TOP, 400: TOP, 600: TOP / 1000}),
    # peaks TOP, then half and a quarter of the height above the floor TOP / 10
    "triangular-decreasing": (600, {"cycles": 3}, {0: TOP / 10, 100: TOP, 200: TOP / 10, 300: TOP / 10 + 0.45 * TOP,
                                                   400: TOP / 10, 500: TOP / 10 + 0.225 * TOP, 600: TOP / 10}),
    "sgdr-decreasing": (600, {"cycles": 3}, {0: TOP, 100: TOP / 2, 200: TOP / 2, 300: TOP / 4, 400: TOP / 4, 600: 0.0}),
    # each cycle: TOP for its first half, then linearly down to TOP / 1000
    "trapezoid": (600, {"cycles": 3}, {0: TOP, 99: TOP, 150: (TOP + TOP / 1000) / 2, 200: TOP, 300: TOP, 600: TOP / 1000}),
    "constant": (1000, {}, {0: TOP, 123: TOP, 1000: TOP}),
}


def test_every_schedule_is_covered():
    assert set(SCHEDULE_POINTS) == set(utils.LR_SCHEDULES)


@pytest.mark.parametrize("schedule", sorted(SCHEDULE_POINTS))
def test_schedule_defining_points(schedule):
    total, extra, points = SCHEDULE_POINTS[schedule]
    for step, expected in points.items():
        got = utils.lr_at(step, total, schedule, TOP, **extra)
        assert got == pytest.approx(expected, rel=1e-9, abs=1e-12), (schedule, step, got, expected)
    lrs = [utils.lr_at(s, total, schedule, TOP, **extra) for s in range(total + 1)]
    assert min(lrs) >= 0 and max(lrs) == pytest.approx(TOP)


def test_restart_schedules_restart_and_grow_with_mult():
    # cycles of relative length 1, 2, 4 over 700 steps: restarts at steps 100 and 300
    for schedule in ("sgdr", "linear-restarts"):
        lr = lambda s: utils.lr_at(s, 700, schedule, TOP, cycles=3, mult=2.0)
        for restart in (100, 300):
            assert lr(restart) == pytest.approx(TOP) and lr(restart - 1) < TOP / 10
        assert lr(0) == pytest.approx(TOP) and lr(700) == pytest.approx(0 if schedule == "sgdr" else TOP / 1000)
    assert utils.lr_at(200, 700, "sgdr", TOP, cycles=3, mult=2.0) == pytest.approx(TOP / 2)  # middle of cycle 2


def test_cyclic_and_piecewise_shapes():
    cyc = [utils.lr_at(s, 1000, "cyclic", TOP) for s in range(1001)]
    assert max(range(1001), key=cyc.__getitem__) == 400
    assert all(a <= b for a, b in zip(cyc[:400], cyc[1:401])) and all(a >= b for a, b in zip(cyc[400:], cyc[401:]))
    levels = sorted({round(utils.lr_at(s, 1000, "piecewise", TOP), 12) for s in range(1001)})
    assert levels == pytest.approx([TOP / 100, TOP / 10, TOP])  # three steps, nothing in between


def test_onecycle_momentum_is_lowest_exactly_when_the_lr_peaks():
    total = 1000
    lrs = [utils.lr_at(s, total, "onecycle", TOP) for s in range(total + 1)]
    moms = [utils.momentum_at(s, total, "onecycle") for s in range(total + 1)]
    peak = max(range(total + 1), key=lrs.__getitem__)
    assert peak == 450 and moms[peak] == pytest.approx(0.85) and min(moms) == pytest.approx(0.85)
    assert [i for i, m in enumerate(moms) if m == pytest.approx(0.85)] == [peak]
    assert moms[0] == pytest.approx(0.95) and moms[900] == pytest.approx(0.95) and moms[1000] == pytest.approx(0.95)
    assert all(utils.momentum_at(s, total, "constant", 0.9) == 0.9 for s in (0, 450, 1000))


# ------------------------------------------------------------------------------------------- Free
def free_run(tmp_path, *extra):
    args = train_free.get_args(tiny(tmp_path, *extra))
    run = utils.setup(args, "train_free")
    utils.set_lr(run.opt, 0.05, args.momentum)
    delta = torch.zeros((args.batch_size, 1, 28, 28))
    tr = tricks.TrainingTricks.for_run(args, run)
    return args, run, delta, lambda x, y: train_free.train_minibatch(run, tr, x, y, delta, args)


def test_free_delta_carries_over_stays_in_ball_and_handles_a_short_batch(tmp_path):
    args, run, delta, step = free_run(tmp_path, "--n-train", 200, "--replays", 3, "--epsilon", 0.1)
    eps = args.epsilon
    batches = list(run.batches)
    assert [len(y) for _, y in batches] == [64, 64, 64, 8]
    inputs = Inputs(run.model)
    steps = []
    run.opt.register_step_post_hook(lambda *a: steps.append(1))

    (x0, y0), (x1, y1) = batches[0], batches[1]
    step(x0, y0)
    assert len(inputs.seen) == 3 and len(steps) == 3  # one forward (and backward) pass and one step per replay
    assert torch.equal(inputs.seen[0], x0)  # delta starts at 0
    carried = delta.clone()
    assert carried.abs().max() > 0 and carried.abs().max() <= eps + 1e-6
    assert ((x0 + carried) >= 0).all() and ((x0 + carried) <= 1).all()
    # the 2nd minibatch starts from the delta left by the 1st
    step(x1, y1)
    assert torch.allclose(inputs.seen[3], x1 + carried)
    assert len(steps) == 6 and delta.abs().max() <= eps + 1e-6

    # a short last batch updates only its rows; the next full batch uses all of delta again
    before = delta.clone()
    xs, ys = batches[3]
    step(xs, ys)
    assert torch.allclose(inputs.seen[6], xs + before[:8])
    assert torch.equal(delta[8:], before[8:]) and not torch.equal(delta[:8], before[:8])
    assert delta.shape[0] == 64
    loss, correct, bad = step(x0, y0)
    assert torch.isfinite(loss) and 0 <= int(correct) <= 64 and not bad
    assert delta.abs().max() <= eps + 1e-6 and len(steps) == 12


def test_free_end_to_end_step_count_checkpoint_and_eval(tmp_path):
    # --epochs 4 with m = 2: 2 passes over 4 minibatches (the last one short), 2 optimiser steps each
    summary = train_free.main(tiny(tmp_path, "--n-train", 200, "--epochs", 4, "--replays", 2, "--co-guard", 0,
                                   "--lr-max", 0.05))
    assert summary["epochs_completed"] == 2
    assert summary["counts"]["optimizer_steps"] == 2 * 4 * 2
    on_disk = json.loads((tmp_path / "summary.json").read_text())
    assert on_disk["script"] == "train_free" and on_disk["counts"] == summary["counts"]
    assert on_disk["flags"]["replays"] == 2 and math.isfinite(on_disk["history"][-1]["train_loss"])
    model = models.load_checkpoint(str(tmp_path / "checkpoint.pt"))
    assert model.checkpoint["script"] == "train_free" and model.checkpoint["iteration"] == 16
    result = eval_script.main([str(tmp_path / "checkpoint.pt"), "--n-eval", "64", "--pgd-steps", "2", "--device", "cpu",
                               "--out", str(tmp_path / "eval.json")])
    assert abs(result["accuracy"]["clean"] - summary["clean_acc"]) < 1e-6


def test_free_budget_and_defaults():
    args = train_free.get_args([])
    assert (args.epochs, args.replays, train_free.passes(args)) == (80, 8, 10)
    assert args.lr_max == 0.04 and args.epsilon == pytest.approx(8 / 255) and args.batch_size == 128
    assert train_free.passes(train_free.get_args(["--epochs", "9", "--replays", "4"])) == 3


# -------------------------------------------------------------------------------------------- PGD
def pgd_run(tmp_path, *extra):
    args = train_pgd.get_args(tiny(tmp_path, *extra))
    run = utils.setup(args, "train_pgd")
    utils.set_lr(run.opt, 0.05, args.momentum)
    tr = tricks.TrainingTricks.for_run(args, run)
    return args, run, lambda x, y: train_pgd.train_step(run, tr, x, y, args)


@pytest.mark.parametrize("loss,iters", [("ce", 1), ("ce", 3), ("trades", 2)])
def test_pgd_does_exactly_attack_iters_steps_per_batch(tmp_path, loss, iters):
    args, run, train_step = pgd_run(tmp_path, "--attack-iters", iters, "--loss", loss)
    inputs = Inputs(run.model)
    steps = []
    run.opt.register_step_post_hook(lambda *a: steps.append(1))
    for b, (x, y) in enumerate(list(run.batches)[:2], 1):
        assert train_step(x, y)[3] == iters and len(steps) == b
    # forward passes per batch: the k attack steps + the training pass (TRADES: + the clean target, + f(x))
    assert len(inputs.seen) == 2 * (iters + (1 if loss == "ce" else 3))
    assert run.model.training


def test_pgd_delta_stays_in_ball_and_image_range(tmp_path):
    args, run, _ = pgd_run(tmp_path, "--epsilon", 0.1)
    x, y = next(iter(run.batches))
    start = torch.empty_like(x).uniform_(-0.1, 0.1)
    delta, steps = train_pgd.pgd_delta(run, x, lambda logits: F.cross_entropy(logits, y), 0.1, 0.04, 4, start)
    assert steps == 4 and delta.abs().max() <= 0.1 + 1e-6 and delta.abs().max() > 0.09
    assert ((x + delta) >= 0).all() and ((x + delta) <= 1).all() and not delta.requires_grad


def test_trades_loss_is_finite_bounded_below_by_ce_and_decreases(tmp_path):
    args, run, train_step = pgd_run(tmp_path, "--loss", "trades", "--attack-iters", 2, "--lr-schedule", "constant",
                                    "--lr-max", 0.05)
    x, y = next(iter(run.batches))
    run.model.train()
    with torch.no_grad():
        ce = F.cross_entropy(run.model(x), y)
        trades0, _, _ = train_pgd.trades_loss(run, x, y, args.epsilon, args.attack_step, 2, beta=0.0)
        trades6, _, _ = train_pgd.trades_loss(run, x, y, args.epsilon, args.attack_step, 2, beta=6.0)
    assert trades0 == pytest.approx(ce.item(), rel=1e-5) and trades6 >= trades0 - 1e-6  # KL >= 0
    losses = [train_step(x, y)[0].item() for _ in range(8)]
    assert all(math.isfinite(l) for l in losses)
    assert losses[-1] < losses[0], losses


def test_pgd_and_trades_end_to_end_checkpoint_and_eval(tmp_path):
    for loss in ("ce", "trades"):
        out = tmp_path / loss
        summary = train_pgd.main(tiny(out, "--epochs", 1, "--attack-iters", 2, "--loss", loss, "--co-guard", 0))
        assert summary["counts"] == {"optimizer_steps": 4, "attack_steps": 4 * 2}
        on_disk = json.loads((out / "summary.json").read_text())
        assert on_disk["flags"]["loss"] == loss and 0 <= on_disk["pgd_acc"] <= on_disk["clean_acc"] <= 1
        model = models.load_checkpoint(str(out / "checkpoint.pt"))
        assert model.checkpoint["script"] == "train_pgd" and not model.training
    result = eval_script.main([str(out / "checkpoint.pt"), "--n-eval", "64", "--pgd-steps", "2", "--device", "cpu",
                               "--out", str(tmp_path / "eval.json")])
    assert abs(result["accuracy"]["clean"] - summary["clean_acc"]) < 1e-6


def test_pgd_defaults_and_flags():
    args = train_pgd.get_args([])
    assert (args.attack_iters, args.attack_step, args.loss, args.trades_beta) == (10, pytest.approx(2 / 255), "ce", 6.0)
    assert (args.epochs, args.lr_max, args.lr_schedule) == (15, 0.2, "cyclic")
    assert train_pgd.get_args(["--attack-step", "1/255"]).attack_step == pytest.approx(1 / 255)
    for bad in (["--attack-iters", "0"], ["--attack-step", "0"], ["--trades-beta", "-1"]):
        with pytest.raises(SystemExit):
            train_pgd.get_args(bad)


# --------------------------------------------------------------------------------- LR range test
@pytest.mark.parametrize("script", [train_fast, train_free, train_pgd])
def test_lr_find_writes_csv_and_a_positive_suggestion(tmp_path, script):
    extra = {train_free: ["--replays", 2], train_pgd: ["--attack-iters", 1]}.get(script, [])
    result = script.main(tiny(tmp_path, "--lr-find", "--lr-find-steps", 12, "--lr-find-min", 1e-3,
                              "--lr-find-max", 1.0, *extra))
    rows = list(csv.DictReader(open(tmp_path / "lr_find.csv")))
    assert 2 <= len(rows) <= 12  # 12 minibatches: wraps around the 4 of the data
    lrs = [float(r["lr"]) for r in rows]
    assert lrs[0] == pytest.approx(1e-3) and all(b > a for a, b in zip(lrs, lrs[1:]))
    assert lrs[1] / lrs[0] == pytest.approx(1000 ** (1 / 11), rel=1e-4)  # geometric from 1e-3 to 1 in 12 steps
    assert all(math.isfinite(float(r["loss"])) for r in rows[:-1])
    assert 1e-3 <= result["suggested_lr_max"] <= 1.0
    assert not (tmp_path / "checkpoint.pt").exists() and not (tmp_path / "summary.json").exists()  # no training


def test_the_guard_probe_is_co_probe_images_fixed_training_images(tmp_path):
    runs = [utils.setup(train_fast.get_args(tiny(tmp_path / name, "--n-train", 200, *flags)), "train_fast")
            for name, flags in (("a", ["--co-probe-images", 64]), ("b", ["--co-probe-images", 64]), ("c", []))]
    assert len(runs[0].y_held) == 64 and len(runs[2].y_held) == 200  # the default 512, capped by the data
    assert torch.equal(runs[0].x_held, runs[1].x_held)  # the same images in every run of a seed
    train = runs[0].batches.x.float().div(255).flatten(1)
    assert all((train == img.flatten()).all(1).any() for img in runs[0].x_held)  # training images
    with pytest.raises(SystemExit):
        train_fast.get_args(tiny(tmp_path, "--co-probe-images", 0))


def test_lr_find_suggests_the_steepest_descent_and_stops_at_divergence(tmp_path):
    """A made-up loss of the LR: steepest descent at lr 1e-2, minimum near 1, divergence past 2."""
    args = train_fast.get_args(tiny(tmp_path, "--n-train", 64, "--lr-find", "--lr-find-steps", 101))
    run = utils.setup(args, "train_fast")
    seen = []

    def fake_step(x, y):  # no training: the loss is a function of the LR the optimiser holds
        lr = run.opt.param_groups[0]["lr"]
        seen.append(lr)
        return torch.tensor(2 - math.tanh(2 * (math.log10(lr) + 2)) + (50.0 if lr > 2 else 0.0))

    result = tricks.lr_range_test(run, args, fake_step)
    assert result["suggested_lr_max"] == pytest.approx(1e-2, rel=0.13)  # 20 LRs per decade: within one step
    assert result["stopped_early"] and 2 < seen[-1] < 3 and len(seen) < 101
    assert 0.1 < result["min_loss_lr"] <= 2
    assert result["thesis_lr_max"] == pytest.approx(result["min_loss_lr"] / 10) and result["steepest_lr_max"] == result["suggested_lr_max"]


# ------------------------------------------------------------- what each training perturbation is for
def linear_problem(seed=0, n=32, d=12, classes=4):
    """A linear classifier on [0, 1] inputs, where the input gradient of the mean cross-entropy has
    the closed form W^T (softmax(W x + b) - onehot(y)) / n, and a run-like namespace around it."""
    g = torch.Generator().manual_seed(seed)
    model = torch.nn.Linear(d, classes)
    with torch.no_grad():
        model.weight.copy_(torch.randn(classes, d, generator=g))
        model.bias.copy_(torch.randn(classes, generator=g))
    x, y = torch.rand(n, d, generator=g), torch.randint(0, classes, (n,), generator=g)
    run = argparse.Namespace(model=model, forward=model, attack_forward=model, amp=contextlib.nullcontext(), device=torch.device("cpu"),
                             scaler=torch.amp.GradScaler("cpu", enabled=False), opt=torch.optim.SGD(model.parameters(), lr=0.0),
                             pssilu_reg=0.0, shift_params=[], shift_clip=0.0, label_smoothing=0.0,
                             attack_step_scale=1.0)
    return run, x, y


def ce_grad(model, x, y):
    """The closed-form input gradient of the mean cross-entropy of a linear model."""
    p = F.softmax(model(x), 1).detach()
    return (p - F.one_hot(y, p.shape[1]).float()) @ model.weight.detach() / len(x)


def ce(model, x, y):
    return F.cross_entropy(model(x), y).item()


def in_image(x, delta):
    return (x + delta).clamp(0, 1) - x


@pytest.mark.parametrize("nfgsm", [False, True])
def test_fgsm_rs_and_nfgsm_are_one_signed_gradient_step_from_their_noise_and_raise_the_loss(nfgsm):
    run, x, y = linear_problem()
    eps, alpha = 0.1, 0.1 if nfgsm else 0.125
    args = argparse.Namespace(epsilon=eps, alpha=alpha, nfgsm=nfgsm, init="random", attack="fgsm", grad_align=0.0,
                              grad_clip=0, hybrid_weight=0.0, hybrid_p=2.0, label_smoothing=0.0, elle=0.0,
                              elle_adaptive=False)
    trained_on = []  # what the step's forward pass sees: x + delta
    run.forward = lambda z: trained_on.append(z.detach()) or run.model(z)
    torch.manual_seed(5)
    train_fast.train_step(run, argparse.Namespace(mean_copies=0), x, y, args)  # LR 0: the weights stay
    delta = trained_on[0] - x
    torch.manual_seed(5)  # the same noise the perturbation started from
    start = in_image(x, torch.empty_like(x).uniform_(-2 * eps, 2 * eps) if nfgsm else torch.empty_like(x).uniform_(-eps, eps))
    step = start + alpha * ce_grad(run.model, x + start, y).sign()
    expected = in_image(x, step if nfgsm else step.clamp(-eps, eps))  # N-FGSM: no projection to the eps-ball
    assert torch.allclose(delta, expected, atol=1e-6)
    assert ce(run.model, x + delta, y) > ce(run.model, x + start, y) + 0.05 > ce(run.model, x, y) - 0.5
    assert ce(run.model, x + delta, y) > ce(run.model, x, y)


def test_free_replay_moves_delta_by_one_signed_step_of_eps_and_raises_the_loss():
    run, x, y = linear_problem()
    eps = 0.05
    args = argparse.Namespace(epsilon=eps, grad_clip=0, hybrid_weight=0.0, hybrid_p=2.0, label_smoothing=0.0)
    tr = argparse.Namespace(mean_copies=0)
    delta = in_image(x, torch.empty_like(x).uniform_(-eps, eps, generator=torch.Generator().manual_seed(1)))
    start = delta.clone()
    expected = in_image(x, (start + eps * ce_grad(run.model, x + start, y).sign()).clamp(-eps, eps))
    train_free.replay_step(run, tr, x, y, delta, args)  # LR 0: the weights stay, delta moves
    assert torch.allclose(delta, expected, atol=1e-6)
    assert ce(run.model, x + delta, y) > ce(run.model, x + start, y)


def test_pgd_step_is_the_projected_signed_gradient_step_and_more_steps_raise_the_loss():
    run, x, y = linear_problem()
    eps, alpha = 0.1, 0.03
    objective = lambda logits: F.cross_entropy(logits, y)
    start = torch.empty_like(x).uniform_(-eps, eps, generator=torch.Generator().manual_seed(2))
    one, _ = train_pgd.pgd_delta(run, x, objective, eps, alpha, 1, start)
    s = in_image(x, start)
    assert torch.allclose(one, in_image(x, (s + alpha * ce_grad(run.model, x + s, y).sign()).clamp(-eps, eps)), atol=1e-6)
    five, steps = train_pgd.pgd_delta(run, x, objective, eps, alpha, 5, start)
    assert steps == 5 and ce(run.model, x + five, y) > ce(run.model, x + one, y) > ce(run.model, x + s, y)


def test_trades_attack_raises_the_kl_term_far_above_random_noise_of_the_same_size():
    run, x, y = linear_problem()
    eps, alpha = 0.1, 0.03
    torch.manual_seed(3)
    ce_only, _, _ = train_pgd.trades_loss(run, x, y, eps, alpha, 5, beta=0.0)
    torch.manual_seed(3)  # the same start: the KL term alone is the difference
    with_kl, logits_adv, steps = train_pgd.trades_loss(run, x, y, eps, alpha, 5, beta=1.0)
    kl_attack = (with_kl - ce_only).item()
    noise = eps * torch.randint(0, 2, x.shape, generator=torch.Generator().manual_seed(4)).float().mul(2).sub(1)
    p = F.softmax(run.model(x), 1)
    kl_noise = F.kl_div(F.log_softmax(run.model(x + in_image(x, noise)), 1), p, reduction="batchmean").item()
    assert steps == 5 and kl_attack > 2 * kl_noise > 0


def test_adversarial_training_beats_natural_training_where_the_natural_model_breaks(tmp_path, monkeypatch):
    """FGSM-RS training against natural training (--attack none, which must never compute an attack):
    at eps 0.1 the natural model is broken by PGD-10, the adversarially trained one much less."""
    flags = ["--dataset", "synthetic", "--model", "lenet", "--n-train", "1024", "--n-eval", "256", "--batch-size", "64",
             "--epochs", "3", "--epsilon", "0.1", "--eval-pgd-steps", "10", "--device", "cpu", "--co-guard", "0"]
    adversarial = train_fast.main(flags + ["--out-dir", str(tmp_path / "adv")])

    def no_attack(*args, **kwargs):
        raise AssertionError("natural training computed an FGSM perturbation")
    monkeypatch.setattr(train_fast, "input_gradient", no_attack)
    natural = train_fast.main(flags + ["--attack", "none", "--out-dir", str(tmp_path / "nat")])
    assert natural["regime"] == "natural" and adversarial["regime"] == "fgsm-rs"
    assert natural["clean_acc"] > 0.9 and adversarial["clean_acc"] > 0.9
    assert natural["pgd_acc"] < 0.4 and adversarial["pgd_acc"] > natural["pgd_acc"] + 0.2, (natural["pgd_acc"], adversarial["pgd_acc"])


# ------------------------------------------------------------------ schedule length, weight decay, guard
@pytest.mark.parametrize("script,extra,steps", [
    (train_fast, ["--epochs", 2], 2 * 4),
    (train_free, ["--epochs", 4, "--replays", 2], 2 * 4 * 2),  # 2 passes x 4 minibatches x 2 replays
    (train_pgd, ["--epochs", 2, "--attack-iters", 1], 2 * 4),
])
def test_the_schedule_spans_every_optimiser_step_of_the_run(tmp_path, monkeypatch, script, extra, steps):
    held = []  # the learning rate and momentum the optimiser holds at each of its steps
    real_step = torch.optim.SGD.step
    def step(opt, *a, **k):
        held.append((opt.param_groups[0]["lr"], opt.param_groups[0]["momentum"]))
        return real_step(opt, *a, **k)
    monkeypatch.setattr(torch.optim.SGD, "step", step)
    flags = ["--lr-schedule", "onecycle", "--momentum-schedule", "onecycle", "--lr-max", "0.05"]
    summary = script.main(tiny(tmp_path, "--co-guard", 0, *flags, *extra))
    assert summary["counts"]["optimizer_steps"] == steps == len(held)
    assert held == [(pytest.approx(utils.lr_at(i, steps, "onecycle", 0.05)), pytest.approx(utils.momentum_at(i, steps, "onecycle")))
                    for i in range(steps)]


def test_activation_parameters_get_their_own_weight_decay_and_lr_multiplier(tmp_path):
    """By default every parameter is decayed, the activations' too (as Dai et al.); --act-weight-decay
    and --act-lr-mult apply to exactly the activations' parameters."""
    def groups(*flags):
        args = train_fast.get_args(tiny(tmp_path, "--act", "prelu", "--act-scope", "channel", "--weight-decay", "1e-3", *flags))
        run = utils.setup(args, "train_fast")
        act = {id(p) for m in run.model.modules() if isinstance(m, models.activations.CLASSES) for p in m.parameters()}
        utils.set_lr(run.opt, 0.1, 0.9)
        by = lambda key, value: {id(p) for g in run.opt.param_groups if g[key] == value for p in g["params"]}
        return run, act, by
    run, act, by = groups()
    assert act and by("weight_decay", 1e-3) == {id(p) for p in run.model.parameters()}
    run, act, by = groups("--act-weight-decay", "0", "--act-lr-mult", "0.5")
    assert by("weight_decay", 0) == act and by("weight_decay", 1e-3) == {id(p) for p in run.model.parameters()} - act
    assert by("lr", 0.05) == act and by("lr", 0.1) == {id(p) for p in run.model.parameters()} - act


def test_act_init_sets_and_freeze_act_keeps_the_shape(tmp_path):
    summary = train_fast.main(tiny(tmp_path, "--act", "pssilu", "--act-init", "a=1.5,b=0.3", "--freeze-act",
                                   "--epochs", 1, "--co-guard", 0))
    values = summary["activation_values"]
    assert values["0:PSSiLU.a"] == [1.5] and values["0:PSSiLU.beta"] == pytest.approx([0.3], abs=1e-6)
    for bad, message in ((["--act", "relu", "--act-init", "a=1"], "applies to --act"),
                         (["--act", "pssilu", "--act-init", "c=1"], "expected a=NUMBER,b=NUMBER")):
        with pytest.raises(SystemExit):
            train_fast.get_args(tiny(tmp_path, *bad))


def test_pssilu_penalty_and_shift_clip_act_on_one_step(tmp_path):
    """The L1 penalty pulls the shift beta down; the clip bounds b's gradient norm (one SGD step of
    LR lr moves b by at most lr * clip, momentum aside on the first step)."""
    def one_step(*flags):
        args = train_fast.get_args(tiny(tmp_path, "--act", "pssilu", "--act-init", "b=0.3", "--weight-decay", "0",
                                        "--momentum", "0", *flags))
        run = utils.setup(args, "train_fast")
        utils.set_lr(run.opt, 0.1, 0.0)
        x, y = next(iter(run.batches))
        before = run.model.net.features[2].b.item()
        train_fast.train_step(run, tricks.TrainingTricks.for_run(args, run), x, y, args)
        return run.model.net.features[2].b.item() - before
    free = one_step("--pssilu-reg", "0", "--pssilu-beta-clip", "0")
    pulled = one_step("--pssilu-reg", "1", "--pssilu-beta-clip", "0")
    clipped = one_step("--pssilu-reg", "1", "--pssilu-beta-clip", "0.01")
    assert pulled < free and pulled - free == pytest.approx(-0.1 * (1 - (0.3 / 0.999) ** 2), rel=1e-3)
    assert abs(clipped) <= 0.1 * 0.01 * (1 + 1e-4) < abs(pulled)


@pytest.mark.parametrize("schedule", [s for s in utils.LR_SCHEDULES if s not in ("piecewise", "constant")])
def test_lr_min_is_the_floor_of_every_decaying_or_cycling_schedule(schedule):
    lrs = [utils.lr_at(s, 600, schedule, TOP, cycles=3, lr_min=0.004) for s in range(601)]
    assert min(lrs) == pytest.approx(0.004) and max(lrs) == pytest.approx(TOP)
    if schedule not in ("cyclic", "triangular"):  # these start at the floor, the others end there
        assert lrs[-1] == pytest.approx(0.004)


@pytest.mark.parametrize("loss,flag,training", [("ce", None, True), ("trades", None, False), ("ce", "eval", False),
                                                ("trades", "train", True)])
def test_attack_mode_sets_the_model_mode_while_the_attack_runs(tmp_path, loss, flag, training):
    args, run, train_step = pgd_run(tmp_path, "--loss", loss, "--attack-iters", 1, *(["--attack-mode", flag] if flag else []))
    modes = []
    real = train_pgd.pgd_delta
    train_pgd.pgd_delta = lambda run, *a: modes.append(run.model.training) or real(run, *a)
    try:
        train_step(*next(iter(run.batches)))
    finally:
        train_pgd.pgd_delta = real
    assert modes == [training] and run.model.training


def test_the_guard_detects_a_collapse_and_restores_the_best_weights(tmp_path, monkeypatch):
    """Held-out PGD accuracy 0.5, 0.6, then 0.1: the guard stops in epoch 3 and the run ends with the
    weights of epoch 2 (the best), which is what its checkpoint and evaluation use."""
    held = iter([0.5, 0.6, 0.1])
    monkeypatch.setattr(utils, "held_out_pgd", lambda run, eps: next(held))
    monkeypatch.setattr(utils, "held_out_clean_fgsm", lambda run, eps: (0.9, 0.7))  # a healthy FGSM gap
    saved = {}
    real_save = utils.save_checkpoint

    def save_checkpoint(run, args, path, **state):
        saved[state["epoch"]] = {k: v.clone() for k, v in run.model.state_dict().items()}
        real_save(run, args, path, **state)

    monkeypatch.setattr(utils, "save_checkpoint", save_checkpoint)
    summary = train_fast.main(tiny(tmp_path, "--epochs", 5, "--co-guard", 0.2))
    record = summary["catastrophic_overfitting"]
    assert record == dict(epoch=3, rule="pgd_drop", held_pgd_acc=0.1, held_clean_acc=0.9, held_fgsm_acc=0.7,
                          best_held_pgd_acc=0.6, restored_epoch=2)
    assert summary["epochs_completed"] == 3 and len(summary["history"]) == 3
    final = models.load_checkpoint(str(tmp_path / "checkpoint.pt")).state_dict()
    assert all(torch.equal(final[k], saved[2][k]) for k in final)
    assert not all(torch.equal(saved[1][k], saved[2][k]) for k in final)  # epoch 3 trained on: restoring mattered


# ------------------------------------------------------------------------------------ DDP sharding
def test_ranks_draw_disjoint_shards_that_together_are_the_single_process_batches():
    n, world, batch = 203, 2, 16
    x, y = torch.arange(n, dtype=torch.uint8).view(n, 1, 1, 1), torch.arange(n)
    single = data.Batches(x, y, batch, generator=torch.Generator().manual_seed(7))
    ranks = [data.Batches(x, y, batch // world, generator=torch.Generator().manual_seed(7), rank=r, world=world)
             for r in range(world)]
    shards = [[set(yb.tolist()) for _, yb in b] for b in ranks]
    assert len(shards[0]) == len(shards[1]) == len(ranks[0])
    seen = set()
    for i, (_, yb) in enumerate(single):
        step = shards[0][i] | shards[1][i] if i < len(shards[0]) else set()
        assert not shards[0][i] & shards[1][i] if i < len(shards[0]) else True
        if len(yb) == batch:  # each optimiser step of the two ranks sees the single process's minibatch
            assert step == set(yb.tolist())
        seen |= step
    assert len(seen) == n - n % world  # the ranks drop the same n mod world images


def test_setup_gives_each_rank_its_own_shard_of_the_global_batch(tmp_path, monkeypatch):
    monkeypatch.setattr(utils, "distributed_setup", lambda args: (1, 2))  # as rank 1 of 2 under torchrun
    monkeypatch.setattr(torch.nn.parallel, "DistributedDataParallel", lambda model, device_ids=None: model)  # no process group
    args = train_fast.get_args(tiny(tmp_path))
    run = utils.setup(args, "train_fast")
    assert (run.rank, run.world, run.batches.rank, run.batches.world, run.batches.batch_size) == (1, 2, 1, 2, 32)


@pytest.mark.parametrize("script,extra", [(train_fast, []), (train_free, ["--replays", 2]), (train_pgd, ["--attack-iters", 2])])
def test_weights_that_turn_non_finite_in_an_epoch_stop_the_run_as_diverged(tmp_path, monkeypatch, script, extra):
    # the loss can stay finite while a weight or a BatchNorm statistic overflows: the epoch's end
    # must catch it before the evaluation scores a NaN model
    calls = []

    def overflow_in_epoch_2(run):
        name, weight = next(run.model.named_parameters())
        calls.append(name)
        if len(calls) == 2:
            with torch.no_grad():
                weight.view(-1)[0] = float("inf")

    monkeypatch.setattr(utils, "sync_buffers", overflow_in_epoch_2)
    with pytest.raises(utils.Diverged) as stop:
        script.main(tiny(tmp_path, "--epochs", 2 * (script is train_free) + 2, "--co-guard", 0, *extra))
    name = calls[-1]
    assert "non-finite weights" in str(stop.value) and name in str(stop.value), stop.value
    assert "end of" in str(stop.value) and "keeps" in str(stop.value)
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["evaluated"] is False and summary["epochs_completed"] == 1 and name in summary["diverged"]


@pytest.mark.parametrize("script,extra,steps", [(train_fast, ["--epochs", 2], 8), (train_free, ["--epochs", 4, "--replays", 2], 16)])
def test_eval_every_records_a_curve_without_changing_the_training(tmp_path, script, extra, steps):
    plain = script.main(tiny(tmp_path / "plain", "--co-guard", 0, *extra))
    probed = script.main(tiny(tmp_path / "probed", "--co-guard", 0, "--eval-every", 3, "--eval-every-images", 32, *extra))
    a = models.load_checkpoint(str(tmp_path / "plain" / "checkpoint.pt")).state_dict()
    b = models.load_checkpoint(str(tmp_path / "probed" / "checkpoint.pt")).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a) and plain["pgd_acc"] == probed["pgd_acc"]
    assert plain["curve"] == [] and [c["iteration"] for c in probed["curve"]] == list(range(3, steps + 1, 3))
    assert all(0 <= c["pgd_acc"] <= c["clean_acc"] <= 1 and c["lr"] >= 0 for c in probed["curve"])


@pytest.mark.parametrize("module", ["train_fast", "train_free", "train_pgd", "eval", "analyze", "bench"])
def test_help_shows_the_scripts_own_flags_first_and_no_help_text_over_two_lines(module, capsys):
    import importlib
    import re
    with pytest.raises(SystemExit):
        importlib.import_module(module).get_args(["--help"])
    lines = capsys.readouterr().out.splitlines()
    entries, entry = [], None
    for line in lines:  # an option line, then its help lines indented to column 26
        if re.match(r"^  -", line):
            entry = [line]
            entries.append(entry)
        elif entry is not None and line.startswith(" " * 26) and line.strip():
            entry.append(line)
        else:
            entry = None
    for entry in entries:
        inline = len(entry[0]) > 26 and entry[0][24:26] == "  " and entry[0][26:].strip()
        assert bool(inline) + len(entry) - 1 <= 2, entry
    if module.startswith("train_"):
        groups = [line for line in lines if line and not line.startswith(" ") and line.endswith(":")]
        assert "(shared)" not in groups[1] and "(shared)" in groups[2], groups  # after "options:"


# ------------------------------------------------ fast-AT as of 2026: the FGSM sign, EMA, label smoothing
def test_the_fgsm_above_clean_rule_fires_on_a_collapse_and_not_on_a_healthy_epoch(tmp_path, monkeypatch):
    args = argparse.Namespace(co_guard=0.2, co_guard_relative=0.0, co_fgsm_margin=0.02)
    best = dict(epoch=1, held_pgd_acc=0.3)
    assert utils.overfitting_rule(0.3, 0.80, 0.60, best, args) is None  # FGSM lowers accuracy: healthy
    assert utils.overfitting_rule(0.3, 0.80, 0.81, best, args) is None  # within the margin
    assert utils.overfitting_rule(0.3, 0.70, 0.90, best, args) == "fgsm_above_clean"
    assert utils.overfitting_rule(0.05, 0.70, 0.90, None, args) == "fgsm_above_clean"  # PGD never high
    assert utils.overfitting_rule(0.05, 0.8, 0.6, best, args) == "pgd_drop"
    assert utils.overfitting_rule(0.05, 0.7, 0.9, best, argparse.Namespace(co_guard=0.0, co_guard_relative=0.5, co_fgsm_margin=0.02)) is None
    # in a run: epoch 2 resists FGSM more than it classifies clean images -> back to epoch 1, stop
    probes = iter([(0.9, 0.6), (0.7, 0.95)])
    monkeypatch.setattr(utils, "held_out_clean_fgsm", lambda run, eps: next(probes))
    monkeypatch.setattr(utils, "held_out_pgd", lambda run, eps: 0.4)
    summary = train_fast.main(tiny(tmp_path, "--epochs", 4))
    record = summary["catastrophic_overfitting"]
    assert record["rule"] == "fgsm_above_clean" and record["epoch"] == 2 and record["restored_epoch"] == 1
    assert (record["held_clean_acc"], record["held_fgsm_acc"]) == (0.7, 0.95)
    assert summary["epochs_completed"] == 2 and summary["history"][1]["held_fgsm_acc"] == 0.95


def test_the_relative_drop_rule_catches_a_collapse_from_a_low_probe(tmp_path, monkeypatch, capsys):
    args = argparse.Namespace(co_guard=0.2, co_guard_relative=0.5, co_fgsm_margin=0.02)
    best = dict(epoch=4, held_pgd_acc=0.207)  # an ELLE run at eps 0.3: 20.7 -> 6.8 in two epochs
    assert utils.overfitting_rule(0.11, 0.80, 0.70, best, args) is None  # above half the best
    assert utils.overfitting_rule(0.068, 0.80, 0.70, best, args) == "pgd_relative_drop"
    args.co_guard_relative = 0.0  # off (the default): the absolute 20-point rule cannot fire here
    assert utils.overfitting_rule(0.068, 0.80, 0.70, best, args) is None
    # in a run: the probe falls from 0.2 to 0.08, under the 20-point drop -> back to epoch 1, stop
    probes = iter([0.2, 0.08])
    monkeypatch.setattr(utils, "held_out_pgd", lambda run, eps: next(probes))
    monkeypatch.setattr(utils, "held_out_clean_fgsm", lambda run, eps: (0.9, 0.6))
    summary = train_fast.main(tiny(tmp_path, "--epochs", 4, "--co-guard-relative", 0.5))
    record = summary["catastrophic_overfitting"]
    assert record["rule"] == "pgd_relative_drop" and (record["epoch"], record["restored_epoch"]) == (2, 1)
    assert summary["epochs_completed"] == 2
    with pytest.raises(SystemExit):
        train_fast.get_args(tiny(tmp_path, "--co-guard-relative", 1.5))
    assert "--co-guard-relative must be in [0, 1)" in capsys.readouterr().err


def test_label_smoothing_is_the_closed_form(tmp_path):
    args = train_fast.get_args(tiny(tmp_path, "--attack", "none", "--label-smoothing", "0.4"))
    run = utils.setup(args, "train_fast")
    x, y = next(iter(run.batches))
    with torch.no_grad():
        run.model.train()
        logp = F.log_softmax(run.model(x), 1)  # train mode, as the step (BatchNorm uses the batch)
    want = (0.6 * F.nll_loss(logp, y) + 0.4 * (-logp.mean(1)).mean()).item()
    loss = train_fast.train_step(run, argparse.Namespace(mean_copies=0), x, y, args)[0]
    assert loss.item() == pytest.approx(want, rel=1e-5)


def test_ema_is_the_hand_computed_average_and_resume_keeps_it(tmp_path, monkeypatch):
    states = []
    real_step = torch.optim.SGD.step

    def step(opt, *a, **k):
        out = real_step(opt, *a, **k)
        model = step.model
        states.append({k: v.detach().clone() for k, v in model.state_dict().items()})
        return out
    real_setup = utils.setup

    def setup(*a, **k):
        run = real_setup(*a, **k)
        step.model = run.model
        states.append({k: v.detach().clone() for k, v in run.model.state_dict().items()})  # the start
        return run
    monkeypatch.setattr(torch.optim.SGD, "step", step)
    monkeypatch.setattr(utils, "setup", setup)
    tau = 0.9
    summary = train_fast.main(tiny(tmp_path / "whole", "--epochs", 2, "--ema", tau, "--co-guard", 0))
    ema = {k: v.clone() for k, v in states[0].items()}
    for s in states[1:]:
        for k, v in s.items():
            ema[k] = ema[k] * tau + (1 - tau) * v if v.is_floating_point() else v.clone()
    saved = torch.load(tmp_path / "whole" / "checkpoint.pt", weights_only=True)
    assert summary["counts"]["optimizer_steps"] == len(states) - 1 == 8
    for k, v in saved["model_state"].items():  # the average is the saved (and evaluated) model
        assert torch.allclose(v.float(), ema[k].float(), rtol=1e-5, atol=1e-6), k
    assert all(torch.equal(saved["train_model_state"][k], states[-1][k]) for k in states[-1])
    monkeypatch.undo()
    half, calls = tmp_path / "half", []
    real_probe = utils.held_out_pgd

    def interrupt_at_the_end_of_epoch_2(run, eps):  # checkpoint.pt then holds epoch 1
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real_probe(run, eps)
    monkeypatch.setattr(utils, "held_out_pgd", interrupt_at_the_end_of_epoch_2)
    with pytest.raises(KeyboardInterrupt):
        train_fast.main(tiny(half, "--epochs", 2, "--ema", tau, "--co-guard", 0))
    monkeypatch.undo()
    train_fast.main(tiny(half, "--epochs", 2, "--ema", tau, "--co-guard", 0, "--resume"))
    resumed = torch.load(half / "checkpoint.pt", weights_only=True)
    for key in ("model_state", "train_model_state"):
        assert all(torch.equal(resumed[key][k], saved[key][k]) for k in saved[key]), key


def _probe_sequence(monkeypatch, held, start=0):
    """The guard's PGD probe reads ``held`` from index ``start``; FGSM stays healthy."""
    values = iter(held[start:])
    monkeypatch.setattr(utils, "held_out_pgd", lambda run, eps: next(values))
    monkeypatch.setattr(utils, "held_out_clean_fgsm", lambda run, eps: (0.9, 0.7))


def test_recovery_rolls_back_and_goes_on_with_the_attack_step_halved(tmp_path, monkeypatch):
    """Held-out PGD 0.5, 0.6, 0.1 (collapse in epoch 3), then 0.55, 0.6: with --co-action recover the
    run restores epoch 2's weights, drops the momentum, halves the FGSM step and trains all 5 epochs;
    with --init zero the step is visible as max |delta| (1.25 eps clipped to eps, then 0.625 eps)."""
    _probe_sequence(monkeypatch, [0.5, 0.6, 0.1, 0.55, 0.6])
    saved, deltas, clean = {}, [], []
    real_save, real_setup, real_grad = utils.save_checkpoint, utils.setup, train_fast.input_gradient

    def save_checkpoint(run, args, path, **state):
        saved[state["epoch"]] = ({k: v.clone() for k, v in run.model.state_dict().items()},
                                 len(run.opt.state_dict()["state"]))
        real_save(run, args, path, **state)

    def setup(*a, **k):
        run = real_setup(*a, **k)
        forward = run.forward
        run.forward = lambda z: (deltas.append((z - clean[-1]).abs().max().item()) if clean else None, forward(z))[1]
        return run

    def input_gradient(run, x, y, create_graph=False):
        clean.append(x.detach().clone())  # --init zero: the clean batch
        return real_grad(run, x, y, create_graph)
    monkeypatch.setattr(utils, "save_checkpoint", save_checkpoint)
    monkeypatch.setattr(utils, "setup", setup)
    monkeypatch.setattr(train_fast, "input_gradient", input_gradient)
    eps = 0.1
    summary = train_fast.main(tiny(tmp_path, "--epochs", 5, "--epsilon", eps, "--init", "zero",
                                   "--co-action", "recover"))
    assert summary["catastrophic_overfitting"] is None and summary["epochs_completed"] == 5
    (event,) = summary["co_recoveries"]
    assert event == dict(epoch=3, rule="pgd_drop", held_pgd_acc=0.1, held_clean_acc=0.9, held_fgsm_acc=0.7,
                         best_held_pgd_acc=0.6, restored_epoch=2, attack_step_scale=0.5)
    assert all(torch.equal(saved[3][0][k], saved[2][0][k]) for k in saved[2][0])  # rolled back to epoch 2
    assert saved[3][1] == 0 and saved[2][1] > 0  # no momentum carried out of the collapse
    assert not all(torch.equal(saved[4][0][k], saved[3][0][k]) for k in saved[3][0])  # and trained on
    steps = len(deltas) // 5
    assert steps == 4 and deltas[:3 * steps] == pytest.approx([eps] * 3 * steps, abs=1e-6)
    assert deltas[3 * steps:] == pytest.approx([0.625 * eps] * 2 * steps, abs=1e-6)


def test_recovery_stops_after_its_limit_and_resume_keeps_the_record_and_the_average(tmp_path, monkeypatch):
    held = [0.5, 0.6, 0.1, 0.55, 0.1, 0.6]
    flags = ["--epochs", 6, "--co-action", "recover", "--co-max-recoveries", 1]
    _probe_sequence(monkeypatch, held)
    capped = train_fast.main(tiny(tmp_path / "capped", *flags))
    assert len(capped["co_recoveries"]) == 1 and capped["catastrophic_overfitting"]["epoch"] == 5
    assert capped["catastrophic_overfitting"]["restored_epoch"] == 2 and capped["epochs_completed"] == 5
    # resume: recovering twice with --ema, interrupted at the end of epoch 5, equals the whole run
    flags = ["--epochs", 6, "--co-action", "recover", "--ema", 0.9]
    _probe_sequence(monkeypatch, held)
    whole = train_fast.main(tiny(tmp_path / "whole", *flags))
    assert [e["epoch"] for e in whole["co_recoveries"]] == [3, 5]
    assert [e["attack_step_scale"] for e in whole["co_recoveries"]] == [0.5, 0.25]
    values = iter(held[:4])

    def interrupt_at_epoch_5(run, eps):
        try:
            return next(values)
        except StopIteration:
            raise KeyboardInterrupt from None
    monkeypatch.setattr(utils, "held_out_pgd", interrupt_at_epoch_5)
    with pytest.raises(KeyboardInterrupt):
        train_fast.main(tiny(tmp_path / "half", *flags))
    _probe_sequence(monkeypatch, held, start=4)
    resumed = train_fast.main(tiny(tmp_path / "half", *flags, "--resume"))
    assert resumed["co_recoveries"] == whole["co_recoveries"]
    a = torch.load(tmp_path / "whole" / "checkpoint.pt", weights_only=True)
    b = torch.load(tmp_path / "half" / "checkpoint.pt", weights_only=True)
    for key in ("model_state", "train_model_state"):  # the average and the trained weights
        assert all(torch.equal(a[key][k], b[key][k]) for k in a[key]), key
    assert a["recoveries"] == b["recoveries"]


def test_free_and_pgd_recover_with_their_step_halved(tmp_path, monkeypatch):
    """Free's step (eps per replay) and PGD's (--attack-step) are what a recovery halves, and Free's
    persistent perturbation restarts at 0 after it."""
    steps = []
    real_replay, real_pgd = train_free.replay_step, train_pgd.pgd_delta

    def replay_step(run, tr, x, y, delta, args):
        steps.append((run.attack_step_scale, delta.abs().max().item()))
        return real_replay(run, tr, x, y, delta, args)

    def pgd_delta(run, x, objective, eps, alpha, iters, start):
        steps.append(alpha)
        return real_pgd(run, x, objective, eps, alpha, iters, start)
    monkeypatch.setattr(train_free, "replay_step", replay_step)
    monkeypatch.setattr(train_pgd, "pgd_delta", pgd_delta)
    for script, extra in ((train_free, ["--replays", 1]), (train_pgd, ["--attack-iters", 1, "--attack-step", 0.02])):
        _probe_sequence(monkeypatch, [0.5, 0.6, 0.1, 0.6])
        steps.clear()
        summary = script.main(tiny(tmp_path / script.__name__, "--epochs", 4, "--epsilon", 0.1, *extra,
                                   "--co-action", "recover"))
        assert [e["attack_step_scale"] for e in summary["co_recoveries"]] == [0.5]
        assert summary["epochs_completed"] == 4 and summary["co_recoveries"][0]["restored_epoch"] == 2
        per_epoch = len(steps) // 4
        if script is train_free:
            assert [s for s, _ in steps] == [1.0] * 3 * per_epoch + [0.5] * per_epoch
            assert steps[3 * per_epoch - 1][1] > 0 and steps[3 * per_epoch][1] == 0  # delta back to 0
        else:
            assert steps == pytest.approx([0.02] * 3 * per_epoch + [0.01] * per_epoch)


def test_elle_penalty_is_zero_on_a_linear_loss_and_the_closed_form_on_a_quadratic_one():
    run = argparse.Namespace()
    x, y, eps = torch.full((6, 1, 4, 4), 0.5), torch.zeros(6, dtype=torch.long), 0.1  # no clipping bites
    w = torch.randn(16, generator=torch.Generator().manual_seed(0))
    linear = lambda p, yy: p.flatten(1) @ w + 3.0
    assert train_fast.elle_penalty(run, x, y, eps, linear).item() == pytest.approx(0.0, abs=1e-10)
    square = lambda p, yy: (p.flatten(1) ** 2).sum(1)
    torch.manual_seed(4)
    got = train_fast.elle_penalty(run, x, y, eps, square)
    torch.manual_seed(4)  # the same draws: f(c) - (1-a) f(xa) - a f(xb) = -a (1-a) |xa - xb|^2 for f = |.|^2
    twice = torch.cat([x, x])
    x_ab = twice + eps * (2 * torch.rand_like(twice) - 1)
    a = torch.rand(6, 1, 1, 1).flatten()
    gap = ((x_ab[:6] - x_ab[6:]).flatten(1) ** 2).sum(1)
    assert got.item() == pytest.approx(((a * (1 - a) * gap) ** 2).mean().item(), rel=1e-5)


def test_elle_a_switches_the_weight_on_at_a_jump_and_decays_it_otherwise():
    st = {k: torch.zeros(()) for k in ("n", "mean", "m2", "weight")}
    for e in (1.0, 1.1, 0.9, 1.0):
        train_fast.elle_a_update(st, torch.tensor(e), 10.0)
    assert st["weight"].item() == 0.0  # no jump: 0 stays 0
    train_fast.elle_a_update(st, torch.tensor(5.0), 10.0)  # far above mean + 2 std
    assert st["weight"].item() == 10.0
    train_fast.elle_a_update(st, torch.tensor(1.0), 10.0)
    assert st["weight"].item() == pytest.approx(9.9)
    assert st["n"].item() == 6 and st["mean"].item() == pytest.approx((1 + 1.1 + 0.9 + 1 + 5 + 1) / 6)


@pytest.mark.parametrize("flags,regime", [(["--elle", "1"], "fgsm-rs+elle"),
                                          (["--elle", "1", "--elle-adaptive"], "fgsm-rs+elle-a")])
def test_elle_runs_train_and_resume_keeps_elle_a_state(tmp_path, flags, regime):
    summary = train_fast.main(tiny(tmp_path, "--epochs", 1, *flags))
    assert summary["regime"] == regime and summary["evaluated"]
    ckpt = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    if "--elle-adaptive" in flags:
        assert ckpt["elle"]["n"].item() == summary["counts"]["optimizer_steps"]
