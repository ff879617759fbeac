"""Training-data tricks (Zhao & Griffin random / mean training, Dai et al. extra data) and KAF kernels."""
import math

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import activations
import data
import models
import train_fast
import train_free
import tricks
import utils


def trick_args(*flags):
    p = utils.parser("test")
    utils.add_shared_flags(p)
    tricks.add_flags(p)
    return utils.parse_args(p, ["--dataset", "synthetic", "--device", "cpu", *map(str, flags)], checks=[tricks.flag_problems])


def real_images(n=200, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 1, 8, 8), generator=g, dtype=torch.uint8)


# ------------------------------------------------------------------------------- random training
@pytest.mark.parametrize("noise", ["uniform", "gaussian"])
def test_random_training_perturbs_the_requested_share_within_bounds(noise):
    torch.manual_seed(0)
    s, share, n = 0.05, 0.25, 64
    tr = tricks.TrainingTricks(trick_args("--random-training", share, "--random-noise", noise, "--random-strength", s),
                                  real_images())
    x = torch.full((n, 1, 8, 8), 0.5)
    x[0], x[1] = 0.0, 1.0  # clipping at the ends of [0, 1]
    y = torch.arange(n) % 10
    out, y_out = tr.mix(x, y)
    assert torch.equal(y_out, y) and x.eq(0.5).sum() == (n - 2) * 64  # labels kept, input not modified in place
    assert out.min() >= 0 and out.max() <= 1
    changed = (out != x).flatten(1).any(1)
    assert changed.sum() == round(share * n)
    diff = (out - x)[changed & (x.flatten(1)[:, 0] == 0.5)]
    if noise == "uniform":
        assert diff.abs().max() <= s + 1e-6 and diff.abs().max() > 0.9 * s
        assert diff.std().item() == pytest.approx(s / math.sqrt(3), rel=0.1)
    else:
        assert diff.std().item() == pytest.approx(s, rel=0.1) and diff.abs().max() > 2 * s
    shares = [(tr.mix(x, y)[0] != x).flatten(1).any(1).float().mean().item() for _ in range(5)]
    assert shares == [pytest.approx(share)] * 5


def test_random_training_strength_defaults_to_epsilon_and_is_off_by_default():
    x, y = torch.rand(32, 1, 8, 8), torch.zeros(32, dtype=torch.long)
    off = tricks.TrainingTricks(trick_args(), real_images())
    assert off.mix(x, y)[0] is x and off.mean_copies == 0 and off.extra is None
    tr = tricks.TrainingTricks(trick_args("--random-training", 1, "--epsilon", 0.02), real_images())
    assert (tr.mix(x, y)[0] - x).abs().max() <= 0.02 + 1e-6


# --------------------------------------------------------------------------------- mean training
class TinyNet(nn.Module):
    """Conv-BN-linear: enough to see BatchNorm's mode and running statistics."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn, self.fc = nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.Linear(4 * 64, 10)
        self.modes = []

    def forward(self, x):
        self.modes.append(self.training)
        return self.fc(F.relu(self.bn(self.conv(x))).flatten(1))


def test_mean_training_copies_are_noisy_means_in_range():
    torch.manual_seed(0)
    x_train = real_images(300)
    tr = tricks.TrainingTricks(trick_args("--mean-training", 6, "--mean-noise", 0.02), x_train)
    mean = x_train.float().mean(0) / 255
    assert torch.allclose(tr.mean_image, mean, atol=1e-6)
    copies = torch.stack([tr.mean_batch() for _ in range(100)])  # 100 x 6 x 1 x 8 x 8
    assert copies.shape == (100, 6, 1, 8, 8) and copies.min() >= 0 and copies.max() <= 1
    inner = (mean > 0.1) & (mean < 0.9)  # no clipping there
    assert torch.allclose(copies.mean((0, 1))[inner], mean[inner], atol=0.01)
    assert copies.std((0, 1))[inner].mean().item() == pytest.approx(0.02, rel=0.1)
    assert not torch.equal(copies[0, 0], copies[0, 1]) and not torch.equal(copies[0], copies[1])


def test_mean_training_loss_is_kl_to_uniform_in_eval_mode_and_lowers_confidence():
    torch.manual_seed(0)
    tr = tricks.TrainingTricks(trick_args("--mean-training", 8, "--mean-noise", 0.05, "--mean-weight", 2), real_images())
    constant = lambda x: torch.zeros(len(x), 10)
    assert tr.mean_loss(nn.Identity(), constant, torch.enable_grad()).item() == pytest.approx(0, abs=1e-6)
    # a fixed answer with probabilities p gives 2 * KL(U || p)
    logits = torch.log(torch.tensor([0.5] + [0.5 / 9] * 9))
    kl = (-(torch.log_softmax(logits, 0)).mean() - math.log(10)).item()
    assert tr.mean_loss(nn.Identity(), lambda x: logits.expand(len(x), 10), torch.enable_grad()).item() == pytest.approx(2 * kl, rel=1e-5)

    net = TinyNet()
    with torch.no_grad():
        net.fc.bias.copy_(5 * F.one_hot(torch.tensor(0), 10))  # confident at the start
        net.bn.running_mean.fill_(0.3)
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    confidence = lambda: F.softmax(net.eval()(tr.mean_batch()), 1).max(1).values.mean().item()
    before = confidence()
    net.train()
    net.modes.clear()
    losses = []
    for _ in range(20):
        loss = tr.mean_loss(net, net, torch.enable_grad())
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert net.training and net.modes == [False] * 20  # eval mode inside, train mode restored
    assert torch.all(net.bn.running_mean == 0.3)  # the copies never touch BatchNorm's statistics
    after = confidence()
    assert before > 0.9 and after < 0.5 * before and losses[-1] < 0.5 * losses[0]


def test_mean_training_lowers_the_score_its_target_names_and_only_output_lowers_both():
    """Logits 5 + onehot: the softmax target equalises them (softmax confidence -> 1/10) but leaves
    the raw outputs near 5, so eval.py's 'output' rule still calls the copies confident; the output
    target drives every raw output (and so both scores) down."""
    scores = {}
    for target in ("softmax", "output"):
        torch.manual_seed(0)
        tr = tricks.TrainingTricks(trick_args("--mean-training", 8, "--mean-noise", 0.05, "--mean-target", target),
                                   real_images())
        net = TinyNet()
        with torch.no_grad():
            net.fc.weight.mul_(0.01)
            net.fc.bias.copy_(5 + F.one_hot(torch.tensor(0), 10).float())
        opt = torch.optim.SGD(net.parameters(), lr=0.01)
        for _ in range(200):
            loss = tr.mean_loss(net, net, torch.enable_grad())
            opt.zero_grad()
            loss.backward()
            opt.step()
        with torch.no_grad():
            z = net.eval()(tr.mean_batch())
        scores[target] = (F.softmax(z, 1).max(1).values.mean().item(), z.max(1).values.mean().item())
    assert scores["softmax"][0] < 0.11 and scores["softmax"][1] > 4  # softmax flat, raw outputs still high
    assert scores["output"][1] < 0.5 and scores["output"][0] < 0.2  # raw outputs near 0: both scores low


# ------------------------------------------------------------------------------------ extra data
def write_extra(path, n=40, layout="nhwc", value=255, label=7):
    x = np.full((n, 8, 8, 1) if layout == "nhwc" else (n, 1, 8, 8), value, dtype=np.uint8)
    x.reshape(n, -1)[:, 0] = np.arange(n)  # tell the extra images apart (first pixel in either layout)
    np.savez(path, image=x, label=np.full(n, label))
    return path


def test_extra_data_is_appended_to_the_real_batch_in_the_requested_share(tmp_path, monkeypatch):
    """f = 0.3: round(50 * 0.3 / 0.7) = 21 extra images follow the 50 real ones, which stay as they were;
    f = 0.5 is Dai et al.'s 1:1."""
    torch.manual_seed(0)
    path = write_extra(tmp_path / "extra.npz")
    monkeypatch.setitem(data.DATASETS, "synthetic", (1, 8, 10, (0.5,), (0.25,), "none"))
    tr = tricks.TrainingTricks(trick_args("--extra-data", path, "--extra-fraction", 0.3), real_images())
    x, y = torch.zeros(50, 1, 8, 8), torch.zeros(50, dtype=torch.long)
    assert tr.rows(50) == 71
    drawn = set()
    for _ in range(40):
        out, y_out = tr.mix(x, y)
        assert out.shape == (71, 1, 8, 8) and torch.equal(out[:50], x) and torch.equal(y_out[:50], y)
        assert out[50:].flatten(1)[:, 1:].eq(1).all() and torch.equal(y_out[50:], torch.full((21,), 7))
        drawn.update((out[50:, 0, 0, 0] * 255).round().long().tolist())
    assert len(drawn) == 40  # draws cover the whole extra set
    assert torch.equal(x, torch.zeros_like(x))  # the real batch is not modified in place
    half = tricks.TrainingTricks(trick_args("--extra-data", path), real_images())
    assert len(half.mix(x, y)[0]) == 100


def test_extra_data_formats_and_errors(tmp_path):
    a = data.load_extra_data(write_extra(tmp_path / "a.npz"), 1, 8, 10)
    b = data.load_extra_data(write_extra(tmp_path / "b.npz", layout="nchw"), 1, 8, 10)
    assert a[0].shape == (40, 1, 8, 8) and a[0].dtype == torch.uint8 and torch.equal(a[0], b[0])
    x = a[0].numpy()[:, 0].astype(np.float32) / 255  # NHW float in [0, 1]
    np.savez(tmp_path / "c.npz", x=x, y=np.arange(40) % 10)
    c = data.load_extra_data(tmp_path / "c.npz", 1, 8, 10)
    assert torch.equal(c[0], a[0]) and c[1].dtype == torch.int64
    bad = {
        "shape": (dict(x=np.zeros((4, 3, 8, 8), np.uint8), y=np.zeros(4, int)), "the dataset needs 1x8x8"),
        "range": (dict(x=np.full((4, 8, 8), 2.0), y=np.zeros(4, int)), "must lie in [0, 1]"),
        "labels": (dict(x=np.zeros((4, 8, 8), np.uint8), y=np.full(4, 10)), "integer label in [0, 10)"),
        "keys": (dict(pictures=np.zeros((4, 8, 8), np.uint8)), "needs an image array"),
    }
    for name, (arrays, message) in bad.items():
        np.savez(tmp_path / f"{name}.npz", **arrays)
        with pytest.raises(data.DataError, match=message.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")):
            data.load_extra_data(tmp_path / f"{name}.npz", 1, 8, 10)
    np.save(tmp_path / "plain.npy", np.zeros(3))
    with pytest.raises(data.DataError, match="cannot read it as .npz"):
        data.load_extra_data(tmp_path / "plain.npy", 1, 8, 10)


@pytest.mark.parametrize("flags,message", [
    (["--extra-fraction", "0.5"], "--extra-fraction needs --extra-data"),
    (["--extra-data", "/nonexistent.npz"], "no such file"),
    (["--random-training", "1.5"], "--random-training must be a fraction"),
    (["--mean-training", "-1"], "--mean-training, --mean-noise and --mean-weight must be >= 0"),
    (["--kaf-kernel", "relu"], "applies to --act kaf"),
])
def test_bad_trick_flags_give_one_line_errors(flags, message, capsys):
    with pytest.raises(SystemExit) as e:
        train_fast.get_args(["--device", "cpu", *flags])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1 and message in err[0]


def test_bad_extra_file_gives_one_line_error(tmp_path, capsys):
    np.savez(tmp_path / "e.npz", x=np.zeros((4, 3, 32, 32), np.uint8), y=np.zeros(4, int))
    with pytest.raises(SystemExit) as e:
        utils.main_guard(lambda: train_fast.main(["--dataset", "synthetic", "--device", "cpu", "--out-dir", str(tmp_path),
                                                  "--extra-data", str(tmp_path / "e.npz")]))
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1 and "the dataset needs 1x28x28" in err[-1]


# ---------------------------------------------------------------------------- wired into training
@pytest.mark.parametrize("script", ["fast", "free"])
def test_tricks_reach_the_regime_and_its_loss(tmp_path, monkeypatch, script):
    """End to end: the regime trains (and attacks) batches holding the requested extra images, and every
    optimiser step also runs the model in eval mode on the mean-training copies."""
    path = tmp_path / "extra.npz"
    np.savez(path, x=np.full((30, 28, 28), 255, np.uint8), y=np.full(30, 3))
    seen = []
    build = models.build

    def recording_build(*a, **k):
        model = build(*a, **k)
        model.register_forward_pre_hook(lambda m, inp: seen.append((m.training, inp[0].detach().clone())))
        return model

    monkeypatch.setattr(models, "build", recording_build)
    eps = 0.05
    flags = ["--dataset", "synthetic", "--model", "lenet", "--n-train", "128", "--n-eval", "16", "--batch-size", "64",
             "--eval-pgd-steps", "1", "--device", "cpu", "--out-dir", str(tmp_path / "run"), "--epsilon", eps,
             "--extra-data", path, "--extra-fraction", 0.25, "--mean-training", 5, "--co-guard", 0]
    if script == "fast":
        train_fast.main([str(f) for f in flags + ["--epochs", 1]])
        steps = 2
    else:
        train_free.main([str(f) for f in flags + ["--epochs", 2, "--replays", 2]])
        steps = 4
    trained = [x for training, x in seen if training and len(x) == 64 + 21]  # round(64 * 0.25 / 0.75) extra images appended
    assert len(trained) >= steps
    for x in trained:  # FGSM / Free move the all-white extra images by at most eps
        assert x.flatten(1).min(1).values.ge(1 - eps - 1e-6).sum() == 21
    copies = [x for training, x in seen if not training and len(x) == 5]
    assert len(copies) == steps


# -------------------------------------------------------------------------------------- KAF kernels
@pytest.mark.parametrize("kernel,k", [("gaussian", None), ("relu", F.relu), ("softplus", F.softplus)])
def test_kaf_kernels_match_their_formula_and_fit_elu(kernel, k):
    kaf = activations.KAF(channels=3, kernel=kernel, init="random").double()
    d, gamma = kaf.dictionary.double(), kaf.gamma
    s = torch.linspace(-5, 5, 101, dtype=torch.float64)
    kern = torch.exp(-gamma * (s[:, None] - d) ** 2) if k is None else k(s[:, None] - d)
    direct = kern @ kaf.alpha.detach().T  # (points, channels)
    out = kaf(s[:, None].expand(-1, 3))
    assert torch.allclose(out, direct, atol=1e-10)
    x = torch.randn(2, 3, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(kaf, (x,))
    fit = activations.KAF(channels=2, kernel=kernel)  # ELU init
    t = torch.linspace(-2, 3, 201).view(1, 1, -1).expand(1, 2, -1)
    assert (fit(t) - F.elu(t)).abs().max() < 0.06
    if kernel != "gaussian":  # these kernels grow on the right: the fit keeps ELU's slope 1 there
        far = fit(torch.tensor([[8.0, 8.0], [12.0, 12.0]]))
        assert (far[1] - far[0]).sub(4).abs().max() < 0.2


def test_kaf_kernel_flag_builds_and_reloads(tmp_path):
    args = trick_args("--model", "lenet", "--act", "kaf", "--kaf-kernel", "softplus")
    assert utils.act_options(args) == {"kernel": "softplus"}
    model = models.build("lenet", "kaf", 10, 1, 28, act_options=utils.act_options(args))
    kafs = activations.activation_modules(model)
    assert kafs and all(m.kernel == "softplus" for m in kafs)
    again = models.build(**model.config)
    again.load_state_dict(model.state_dict())
    x = torch.rand(2, 1, 28, 28)
    assert torch.equal(model.eval()(x), again.eval()(x))
