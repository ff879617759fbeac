"""Zhao & Griffin's study: the hybrid loss against its formula, the targeted fast-gradient-sign step,
the "nonsense" threshold decision and eval.py's three curves (CPU, tiny models)."""
import json
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import attacks
import eval as eval_script
import train_fast
import tricks
import utils


def test_hybrid_loss_equals_its_formula_on_a_hand_example():
    z, y = torch.tensor([[2.0, 0.0, -1.0]]), torch.tensor([0])
    ce = -math.log(math.exp(2) / (math.exp(2) + 1 + math.exp(-1)))
    # |z - onehot|^2 = (2-1)^2, 0^2, (-1)^2 -> mean 2/3; with p = 3: 1, 0, 1 -> 2/3 as well; p = 1.5 the same
    assert tricks.hybrid_loss(z, y, 0.5, 2.0).item() == pytest.approx(ce + 0.5 * 2 / 3, abs=1e-6)
    z2 = torch.tensor([[3.0, 0.5, -2.0]])
    ce2 = -math.log(math.exp(3) / (math.exp(3) + math.exp(0.5) + math.exp(-2)))
    assert tricks.hybrid_loss(z2, y, 2.0, 3.0).item() == pytest.approx(ce2 + 2.0 * (2 ** 3 + 0.5 ** 3 + 2 ** 3) / 3, abs=1e-5)
    batch = torch.randn(8, 10)
    labels = torch.randint(0, 10, (8,))
    assert torch.equal(tricks.hybrid_loss(batch, labels), F.cross_entropy(batch, labels))  # weight 0: exactly CE


@pytest.mark.parametrize("script,extra", [("train_fast", ["--attack", "none"]), ("train_free", ["--replays", "2"]),
                                           ("train_pgd", ["--attack-iters", "1"])])
def test_every_regime_trains_on_the_hybrid_loss(tmp_path, script, extra):
    """The same run with and without the hybrid term: the recorded training loss is higher by about the
    error term, so the term is in the loss the scripts optimise."""
    module = __import__(script)
    flags = ["--dataset", "synthetic", "--model", "lenet", "--n-train", "128", "--n-eval", "32", "--batch-size", "64",
             "--epochs", "1", "--eval-pgd-steps", "1", "--device", "cpu", *extra]
    plain = module.main(flags + ["--out-dir", str(tmp_path / "plain")])
    hybrid = module.main(flags + ["--hybrid-weight", "5", "--out-dir", str(tmp_path / "hybrid")])
    assert hybrid["flags"]["hybrid_weight"] == 5 and math.isfinite(hybrid["history"][-1]["train_loss"])
    assert hybrid["history"][-1]["train_loss"] > plain["history"][-1]["train_loss"] + 0.1


def test_the_hybrid_loss_is_refused_with_trades(capsys):
    import train_pgd
    with pytest.raises(SystemExit):
        train_pgd.get_args(["--loss", "trades", "--hybrid-weight", "1"])
    assert "cannot be combined with --loss trades" in capsys.readouterr().err


def _trained_toy(seed=0):
    """A linear 3-class model on 2x2 images whose classes are bright pixels 0, 1, 2."""
    torch.manual_seed(seed)
    x = torch.rand(300, 1, 2, 2) * 0.3
    y = torch.arange(300) % 3
    x.view(300, 4)[torch.arange(300), y] += 0.7
    model = nn.Sequential(nn.Flatten(), nn.Linear(4, 3))
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    for _ in range(300):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    return model, x, y


def test_targeted_fgs_moves_towards_its_target_class():
    model, x, y = _trained_toy()
    assert (model(x).argmax(1) == y).float().mean() > 0.95
    target = (y + 1) % 3
    before = F.softmax(model(x), 1).gather(1, target[:, None]).mean()
    small, large = attacks.targeted_fgs(model, x, target, 0.1), attacks.targeted_fgs(model, x, target, 0.8)
    assert (small - x).abs().max() <= 0.1 + 1e-6 and small.min() >= 0 and large.max() <= 1
    after_small = F.softmax(model(small), 1).gather(1, target[:, None]).mean()
    assert after_small > before
    assert (model(large).argmax(1) == target).float().mean() > 0.7  # strong enough: the target mostly wins
    assert torch.equal(attacks.targeted_fgs(model, x, target, 0.0), x)


class Constant(nn.Module):
    """Logits that ignore the input: a fixed vector for every image."""

    def __init__(self, logits):
        super().__init__()
        self.logits = nn.Parameter(torch.tensor(logits))

    def forward(self, x):
        return self.logits.expand(len(x), -1) + 0 * x.flatten(1).sum(1, keepdim=True)


def test_the_threshold_decides_nonsense():
    x, y = torch.rand(20, 1, 2, 2), torch.zeros(20, dtype=torch.long)
    # softmax of (2, 0, 0) = 0.787 for class 0
    sure = attacks.saf_curves(Constant([2.0, 0.0, 0.0]), x, y, [0.0], threshold=0.7)
    unsure = attacks.saf_curves(Constant([2.0, 0.0, 0.0]), x, y, [0.0], threshold=0.8)
    assert sure["noisy"]["0"] == {"nonsense": 0.0, "accuracy": 1.0}
    assert unsure["noisy"]["0"] == {"nonsense": 1.0, "accuracy": 0.0}  # below the threshold: nonsense, not correct
    assert unsure["nonsense"]["0"]["nonsense"] == 1.0 and sure["nonsense"]["0"]["nonsense"] == 0.0


def test_the_output_confidence_reads_the_raw_scores():
    x, y = torch.rand(20, 1, 2, 2), torch.zeros(20, dtype=torch.long)
    # raw outputs (1.0, 0, 0): softmax confidence 0.58, output confidence 1.0
    model = Constant([1.0, 0.0, 0.0])
    assert attacks.saf_curves(model, x, y, [0.0], threshold=0.9)["noisy"]["0"]["accuracy"] == 0.0
    result = attacks.saf_curves(model, x, y, [0.0], threshold=0.9, confidence="output")
    assert result["noisy"]["0"]["accuracy"] == 1.0 and result["confidence"] == "output"


class Scaled(nn.Module):
    """Logits s * (x_0, -x_0, ...): the score grows with the first pixel, its scale set by s."""

    def __init__(self, scale, classes=3):
        super().__init__()
        self.scale, self.classes = nn.Parameter(torch.tensor(scale)), classes

    def forward(self, x):
        v = x.flatten(1)[:, :1]
        return self.scale * torch.cat([v, -v.expand(-1, self.classes - 1)], 1)


def test_accept_clean_sets_each_models_threshold_where_that_share_of_clean_images_passes():
    x, y = torch.rand(200, 1, 2, 2), torch.zeros(200, dtype=torch.long)
    x[:, 0, 0, 0] = torch.linspace(0.01, 1, 200)
    # a fixed 0.9 accepts almost everything of the sharp model and nothing of the flat one (softmax <= 0.58)
    sharp, flat = Scaled(20.0), Scaled(0.5)
    assert attacks.saf_curves(sharp, x, y, [0.0], threshold=0.9)["noisy"]["0"]["accuracy"] > 0.8
    assert attacks.saf_curves(flat, x, y, [0.0], threshold=0.9)["noisy"]["0"]["accuracy"] == 0.0
    for model in (sharp, flat):
        for confidence in ("softmax", "output"):
            r = attacks.saf_curves(model, x, y, [0.0], threshold=0.9, confidence=confidence, accept_clean=0.95)
            # the 10 images with the smallest first pixel (the lowest scores) are rejected, the rest pass
            assert r["noisy"]["0"] == {"nonsense": 0.05, "accuracy": 0.95} and r["accept_clean"] == 0.95
            if model is flat:  # its best softmax (0.58) and output (0.5) stay below 0.9: the threshold follows
                assert r["threshold"] < 0.58
    with pytest.raises(ValueError):
        attacks.saf_curves(flat, x, y, [0.0], accept_clean=0.0)


def test_saf_curves_on_a_trained_toy_have_the_expected_shapes():
    model, x, y = _trained_toy()
    r = attacks.saf_curves(model, x, y, [0.0, 0.2, 0.8], threshold=0.5)
    adv, noisy = r["adversarial"], r["noisy"]
    assert adv["0"]["accuracy"] > 0.9 and adv["0.8"]["accuracy"] < 0.1 and adv["0.8"]["fooled"] > 0.7
    assert noisy["0"]["accuracy"] == adv["0"]["accuracy"]  # beta 0: the clean images in both
    assert noisy["0.8"]["accuracy"] < noisy["0"]["accuracy"]
    assert r["nonsense"]["0.8"]["fooled"] >= r["nonsense"]["0"]["fooled"]


def test_eval_saf_curves_end_to_end(tmp_path):
    ckpt_dir = tmp_path / "run"
    train_fast.main(["--dataset", "synthetic", "--model", "lenet", "--n-train", "128", "--n-eval", "32", "--batch-size", "64",
                     "--epochs", "1", "--eval-pgd-steps", "1", "--device", "cpu", "--attack", "none", "--saf-insert", "mrelu",
                     "--out-dir", str(ckpt_dir)])
    out = tmp_path / "e.json"
    result = eval_script.main([str(ckpt_dir / "checkpoint.pt"), "--attacks", "fgsm", "--n-eval", "32", "--saf-curves",
                               "--saf-betas", "0", "0.1", "0.3", "--nonsense-threshold", "0.6", "--out", str(out)])
    saved = json.load(open(out))["saf_curves"]
    png = tmp_path / "e.png"  # the curves' panels, when matplotlib is installed (requirements-dev.txt has it)
    assert result.get("plot") == (str(png) if utils.pyplot() else None)
    assert not utils.pyplot() or png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert saved["confidence"] == "softmax"  # one rule for every model by default
    assert saved == json.loads(json.dumps(result["saf_curves"]))
    assert set(saved) >= {"adversarial", "nonsense", "noisy"} and saved["threshold"] == 0.6
    for kind in ("adversarial", "nonsense", "noisy"):
        assert list(saved[kind]) == ["0", "0.1", "0.3"]
        for row in saved[kind].values():
            assert all(0 <= v <= 1 for v in row.values())
    # --accept-clean: the threshold read from the clean images (32: at least 29 of them pass at beta 0)
    again = eval_script.main([str(ckpt_dir / "checkpoint.pt"), "--attacks", "fgsm", "--n-eval", "32", "--saf-curves",
                              "--saf-betas", "0", "--accept-clean", "0.9", "--no-plot"])["saf_curves"]
    assert again["accept_clean"] == 0.9 and again["noisy"]["0"]["nonsense"] <= 3 / 32
    with pytest.raises(SystemExit) as bad:
        eval_script.main([str(ckpt_dir / "checkpoint.pt"), "--saf-curves", "--accept-clean", "1.5"])
    assert bad.value.code == 2
