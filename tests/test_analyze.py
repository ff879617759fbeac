"""analyze.py: activation shapes, pre-activation statistics, Lipschitz bound vs empirical estimate."""
import json
import math
import os
import subprocess
import sys

import pytest
import torch
import torch.nn as nn

import activations as A
import analyze
import eval as eval_script
import models
import utils

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def numeric_max_slope(m, lo=-40.0, hi=40.0, points=400_001):
    s = torch.linspace(lo, hi, points, dtype=torch.float64)
    x = s[:, None].expand(-1, getattr(m, "channels", 1)).clone().requires_grad_(True)
    (g,) = torch.autograd.grad(m.double()(x).sum(), x)
    return g.abs().max().item()


def randomise_batchnorm(model, scale=2.0):
    """Eval-mode BatchNorm that actually rescales (running var != 1, gamma != 1), so a bound that
    forgot its factor would show."""
    g = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            c = m.num_features
            m.running_mean.copy_(0.3 * torch.randn(c, generator=g))
            m.running_var.copy_(0.2 + torch.rand(c, generator=g))
            m.weight.data.copy_(scale * (0.5 + torch.rand(c, generator=g)))
            m.bias.data.copy_(0.1 * torch.randn(c, generator=g))
    return model.eval()


# ------------------------------------------------------------------------------ activation shapes
def test_shape_properties_match_the_formula():
    a = 2.0  # exact in float32
    act = A.PSSiLU(init_a=a, init_b=0.25)
    b = (act.b_max * torch.tanh(act.b.detach().double() / act.b_max)).item()  # the shift, 0.25 up to float32 rounding
    s = torch.linspace(-5, 5, 1001, dtype=torch.float64)
    f = analyze.channel_curves(act, s)
    sig = torch.sigmoid(a * s)
    direct = s * (sig - b) / (1 - b)
    assert f.shape == (1001, 1) and torch.allclose(f[:, 0], direct, atol=1e-12)
    p = {k: v.item() for k, v in analyze.shape_properties(s, f).items()}
    neg = s < 0
    assert p["neg_mean"] == pytest.approx(direct[neg].mean().item(), rel=1e-12)
    assert p["neg_max"] == pytest.approx(direct[neg].max().item(), rel=1e-12) and p["neg_max"] > 0  # b > 0: positive on negatives
    assert p["neg_positive_share"] == pytest.approx((direct[neg] > 0).double().mean().item())
    assert p["min_value"] == pytest.approx(direct.min().item()) and p["argmin"] == pytest.approx(s[direct.argmin()].item())
    ds = sig * (1 - sig)
    slope = (sig - b + a * s * ds) / (1 - b)
    curvature = (2 * a * ds + a * a * s * ds * (1 - 2 * sig)) / (1 - b)
    assert p["max_slope"] == pytest.approx(slope.abs().max().item(), rel=1e-3)
    assert p["max_curvature"] == pytest.approx(curvature.abs().max().item(), rel=1e-3)
    assert abs(p["curvature_at"]) == pytest.approx(s[curvature.abs().argmax()].abs().item(), abs=0.011)
    # kinks are infinitely curved, smooth units are not
    assert analyze.shape_properties(s, analyze.channel_curves(A.ReLU(), s))["max_curvature"].item() == math.inf
    assert analyze.shape_properties(s, analyze.channel_curves(A.MReLU(), s))["max_curvature"].item() == math.inf
    rbf = analyze.shape_properties(s, analyze.channel_curves(A.RBF(), s))
    assert rbf["max_curvature"].item() == pytest.approx(2.0, rel=1e-3) and rbf["neg_positive_share"].item() == 1.0


def test_kaf_shapes_are_per_channel_and_match_the_kernel_sum():
    torch.manual_seed(0)
    kaf = A.KAF(channels=5, init="random")
    s = torch.linspace(-5, 5, 1001, dtype=torch.float64)
    f = analyze.channel_curves(kaf, s)
    d, alpha = kaf.dictionary.double(), kaf.alpha.detach().double()
    direct = torch.exp(-kaf.gamma * (s[:, None] - d) ** 2) @ alpha.T
    assert f.shape == (1001, 5) and torch.allclose(f, direct, atol=1e-12)
    neg = analyze.shape_properties(s, f)["neg_mean"]
    assert torch.allclose(neg, direct[s < 0].mean(0))
    model = models.build("lenet", "kaf", 10, 1, 8)
    result = analyze.analyze_shapes(model)
    kafs = result["activations"]
    assert [a["channels"] for a in kafs] == [16, 32, 256] and all(a["trainable"] for a in kafs)
    assert len(kafs[2]["properties"]["neg_mean"]) == 256 and len(kafs[2]["curves"]) == 16
    assert len(kafs[0]["params"]["alpha"]) == 16 and len(kafs[0]["dictionary"]) == 20


def test_network_scope_activation_is_listed_once_with_its_uses():
    model = models.build("lenet", "pssilu", 10, 1, 8)
    (only,) = analyze.analyze_shapes(model)["activations"]
    assert only["uses"] == 3 and only["channels"] == 1 and set(only["params"]) == {"a", "b"}
    assert only["lipschitz"] == pytest.approx(analyze.SILU_SLOPE[0], rel=1e-6)  # a = 1, b = 1e-8


# ----------------------------------------------------------------------- activation Lipschitz constants
def _activations():
    torch.manual_seed(0)
    prelu = A.PReLU(3)
    prelu.a.data = torch.tensor([0.2, -1.5, 0.7])
    return [A.ReLU(), A.ELU(), A.Softplus(10), A.SiLU(), A.GELU(), prelu, A.PSiLU(1, 3.0), A.PSoftplus(1, 0.5),
            A.PSSiLU(1, 2.0, 0.3), A.PSSiLU(1, 2.0, 0.7), A.PSSiLU(1, 0.0, 0.3), A.MReLU(), A.RBF(),
            A.KAF(4), A.KAF(4, init="random"), A.KAF(4, init="random", kernel="relu"), A.KAF(4, init="random", kernel="softplus")]


@pytest.mark.parametrize("index", range(17))
def test_activation_lipschitz_is_a_tight_upper_bound_on_the_slope(index):
    m = _activations()[index]
    bound, _ = analyze.activation_lipschitz(m)
    slope = numeric_max_slope(m)
    assert slope <= bound * (1 + 1e-9), (m, slope, bound)
    assert slope >= bound * (0.98 if isinstance(m, A.KAF) else 1 - 1e-6), (m, slope, bound)


def test_kwta_has_no_lipschitz_constant():
    assert analyze.activation_lipschitz(A.KWTA())[0] == math.inf


# ------------------------------------------------------------------------------------- spectral norms
def test_spectral_bound_is_exact_for_a_single_linear_layer():
    torch.manual_seed(0)
    layer = nn.Linear(30, 7).double()
    exact = torch.linalg.svdvals(layer.weight.detach())[0].item()
    bound, out, _ = analyze.chain_bound(analyze.chain(layer), torch.randn(1, 30, dtype=torch.float64))
    assert bound == pytest.approx(exact, rel=1e-12)
    # the power iteration (used for everything but a bare linear layer) finds the same number
    assert analyze.operator_norm(lambda v: layer(v), torch.zeros(1, 30, dtype=torch.float64)) == pytest.approx(exact, rel=1e-6)
    assert analyze.jacobian_norms(layer.float(), torch.randn(4, 30)).max().item() == pytest.approx(exact, rel=1e-5)


def test_power_iteration_matches_the_exact_norm_of_a_convolution():
    torch.manual_seed(0)
    conv = nn.Conv2d(2, 3, 3, stride=2, padding=1).double()
    x = torch.zeros(1, 2, 6, 6, dtype=torch.float64)
    J = torch.autograd.functional.jacobian(lambda v: conv(v), x).reshape(3 * 3 * 3, 2 * 6 * 6)
    assert analyze.operator_norm(conv, x) == pytest.approx(torch.linalg.svdvals(J)[0].item(), rel=1e-6)


def test_merged_bound_of_a_linear_network_is_its_exact_norm():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.BatchNorm2d(4), nn.AvgPool2d(2), nn.Flatten(), nn.Linear(4 * 9, 5))
    model = models.Normalized(randomise_batchnorm(net), [0.4, 0.6], [0.2, 0.3]).eval()
    exact = analyze.jacobian_norms(model, torch.rand(3, 2, 6, 6)).max().item()
    result = analyze.lipschitz_bounds(model, torch.rand(1, 2, 6, 6))
    assert result["bound_merged"] == pytest.approx(exact, rel=1e-4)
    assert result["bound_per_layer"] >= result["bound_merged"] * (1 - 1e-9)
    assert [r["kind"] for r in result["layers"]] == ["affine", "affine", "affine", "affine", "affine", "affine"]
    assert len(result["merged_layers"]) == 1


def _small_preact_resnet(act):
    net = models.ResNet(models.PreActBlock, [8, 16], [1, 1], A.make_factory(act, "channel"), 10, 3, 8, preact=True)
    return models.Normalized(net, [0.5] * 3, [0.25] * 3)


@pytest.mark.parametrize("build", [
    lambda: models.build("lenet", "kaf", 10, 1, 8, mean=[0.3], std=[0.2], act_options={"init": "random"}),
    lambda: models.build("lenet", "relu", 10, 1, 8, saf_insert="rbf"),
    lambda: models.build("lenet", "pssilu", 10, 1, 8),
    lambda: models.build("resnet20", "pssilu", 10, 3, 8, mean=[0.5] * 3, std=[0.25] * 3),
    lambda: _small_preact_resnet("prelu"),
], ids=["lenet-kaf", "lenet-rbf", "lenet-pssilu-shared", "resnet20-pssilu", "preact-prelu"])
def test_layerwise_bound_is_at_least_the_empirical_local_estimate(build):
    torch.manual_seed(0)
    model = randomise_batchnorm(build())
    for m in A.activation_modules(model):  # off the init values: a < 0 for prelu, b > 0 for pssilu
        for p in m.parameters():
            if p.numel() < 100:
                p.data.uniform_(-1.5, -0.5) if isinstance(m, A.PReLU) else p.data.uniform_(0.3, 0.6)
    c = model.config["in_channels"] if hasattr(model, "config") else 3
    x, y = torch.rand(24, c, 8, 8), torch.randint(0, 10, (24,))
    r = analyze.analyze_lipschitz(model, x, y, eps=0.1, pgd_steps=3, iters=300)
    empirical = r["empirical"]["max"]
    assert 0 < empirical <= r["bound_merged"] <= r["bound_per_layer"] * (1 + 1e-9)
    assert r["empirical"]["max_adversarial"] > 0 and len(r["empirical"]["clean"]) == 24


def test_chain_refuses_what_it_cannot_bound():
    with pytest.raises(analyze.utils.UserError, match="no layer-wise bound for GRU"):
        analyze.chain(nn.Sequential(nn.Linear(3, 3), nn.GRU(3, 3)))
    with pytest.raises(analyze.utils.UserError, match="overlapping max-pooling"):
        analyze.chain(nn.MaxPool2d(3, stride=1))
    kwta = models.build("lenet", "kwta", 10, 1, 8)
    assert analyze.lipschitz_bounds(kwta.eval(), torch.rand(1, 1, 8, 8))["bound_per_layer"] == math.inf


# ------------------------------------------------------------------------------------ pre-activations
def test_preactivation_statistics_match_a_direct_computation():
    torch.manual_seed(0)
    model = randomise_batchnorm(models.build("lenet", "pssilu", 10, 1, 8, mean=[0.5], std=[0.25]))
    x, y = torch.rand(20, 1, 8, 8), torch.randint(0, 10, (20,))
    r = analyze.analyze_preacts(model, x, y, eps=0.1, pgd_steps=2, batch_size=8, bins=20)
    assert [L["layer"].split(":")[0] for L in r["layers"]] == ["0", "1", "2"]  # one shared module, three layers
    first = r["layers"][0]
    with torch.no_grad():
        direct = model.net.features[1](model.net.features[0]((x - 0.5) / 0.25)).double()
    c = first["clean"]
    assert first["values"] == direct.numel()
    assert c["mean"] == pytest.approx(direct.mean().item(), rel=1e-5)
    assert c["std"] == pytest.approx(direct.std(unbiased=False).item(), rel=1e-5)
    assert c["min"] == pytest.approx(direct.min().item()) and c["max"] == pytest.approx(direct.max().item())
    assert c["share_positive"] == pytest.approx((direct > 0).double().mean().item())
    assert c["p01"] <= c["p50"] <= c["p99"]
    assert first["relative_shift"] > 0 and first["wasserstein1"] > 0
    h = first["histogram"]
    assert len(h["edges"]) == 21 and len(h["clean"]) == 20 and 0.95 * direct.numel() <= sum(h["clean"]) <= direct.numel()
    tiny = analyze.analyze_preacts(model, x, y, eps=1e-7, pgd_steps=1, batch_size=8)
    assert tiny["layers"][0]["relative_shift"] < 1e-5  # no perturbation, no shift


def test_kaf_preactivations_report_the_share_outside_the_dictionary():
    model = models.build("lenet", "kaf", 10, 1, 8, mean=[0.5], std=[0.05])  # inputs up to +-10: beyond B = 3
    x, y = torch.rand(8, 1, 8, 8), torch.zeros(8, dtype=torch.long)
    first = analyze.analyze_preacts(model.eval(), x, y, eps=0.05, pgd_steps=1)["layers"][0]
    with torch.no_grad():
        direct = model.net.features[1](model.net.features[0]((x - 0.5) / 0.05))
    assert first["clean"]["share_outside_dictionary"] == pytest.approx((direct.abs() > 3).double().mean().item())
    assert first["clean"]["share_outside_dictionary"] > 0.1


# ------------------------------------------------------------------------------------------- the CLI
def _checkpoint(tmp_path, act="pssilu"):
    model = models.build("lenet", act, 10, 1, 28, mean=[0.5], std=[0.25])
    path = tmp_path / "checkpoint.pt"
    torch.save({"model_config": model.config, "model_state": model.state_dict(), "script": "test",
                "args": {"dataset": "synthetic", "epsilon": 0.1, "data_dir": None}, "dataset": {"name": "synthetic"}}, path)
    return str(path)


def test_analyze_end_to_end_writes_json_and_optional_pngs(tmp_path, capsys):
    ckpt = _checkpoint(tmp_path)
    out = tmp_path / "analysis"
    results = analyze.main([ckpt, "--n-eval", "16", "--pgd-steps", "2", "--power-iters", "50", "--out", str(out)])
    for key in ("shapes", "preacts", "lipschitz"):
        on_disk = json.loads((out / f"{key}.json").read_text())
        assert on_disk.keys() == results[key].keys()
        assert (out / f"{key}.png").exists() == (utils.pyplot() is not None)
    lip = results["lipschitz"]
    assert lip["empirical"]["n_images"] == 16 and 0 < lip["empirical"]["max"] <= lip["bound_merged"] <= lip["bound_per_layer"]
    assert len(results["preacts"]["layers"]) == 3 and results["preacts"]["eps"] == 0.1
    printed = capsys.readouterr().out
    assert "Lipschitz bound" in printed and ("matplotlib is not installed" in printed) == (utils.pyplot() is None)
    only = analyze.main([ckpt, "--shapes", "--out", str(tmp_path / "only"), "--no-plot"])
    assert list(only) == ["shapes"] and os.listdir(tmp_path / "only") == ["shapes.json"]
    feats = analyze.main([ckpt, "--features", "--n-eval", "64", "--out", str(tmp_path / "f"), "--no-plot"])
    r = feats["features"]
    assert list(feats) == ["features"] and r["n"] == 64 and json.loads((tmp_path / "f" / "features.json").read_text()) == r
    assert 0 <= r["nonsense"]["auroc_vs_clean"] <= 1 and 0 <= r["noisy"]["share_beyond_clean_q99"] <= 1


def test_without_matplotlib_analyze_and_eval_write_json_only(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(utils, "pyplot", lambda: None)  # what utils.pyplot returns when the import fails
    ckpt = _checkpoint(tmp_path)
    out = tmp_path / "analysis"
    analyze.main([ckpt, "--shapes", "--out", str(out)])
    assert os.listdir(out) == ["shapes.json"] and "matplotlib is not installed" in capsys.readouterr().out
    result = eval_script.main([ckpt, "--attacks", "fgsm", "--noise-sigmas", "0.1", "--n-eval", "8", "--device", "cpu", "--out", str(tmp_path / "e.json")])
    assert result["plot"] is None and not (tmp_path / "e.png").exists()


def test_analyze_bad_input_gives_one_line_error(tmp_path):
    for argv, message in [([str(tmp_path / "missing.pt")], "checkpoint not found"),
                          ([_checkpoint(tmp_path), "--n-eval", "0"], "--n-eval")]:
        r = subprocess.run([sys.executable, "analyze.py", *argv], cwd=ROOT, capture_output=True, text=True, timeout=120)
        lines = [l for l in r.stderr.strip().splitlines() if l.strip()]
        assert r.returncode == 2 and len(lines) == 1 and message in lines[0] and "Traceback" not in r.stderr, r.stderr


def test_feature_outlier_score_separates_nonsense_only_where_it_is_separable():
    """A toy: features are the input itself (the last linear layer reads it unchanged).  Clean
    features ~ N(m, 0.05^2) per dimension; nonsense far from m is found (AUROC ~ 1, nearly all beyond
    the clean 99th percentile); 'nonsense' drawn from the clean distribution is not (AUROC ~ 0.5)."""
    torch.manual_seed(0)
    d, n = 8, 400
    model = nn.Sequential(nn.Flatten(), nn.Linear(d, 3)).eval()
    m = torch.rand(d)
    clean = (m + 0.05 * torch.randn(n, d)).view(n, 1, 1, d)
    far = (m + 0.05 * torch.randn(n, d) + 0.3).view(n, 1, 1, d)
    same = (m + 0.05 * torch.randn(n, d)).view(n, 1, 1, d)
    feats = {k: analyze.penultimate_features(model, v) for k, v in (("clean", clean), ("far", far), ("same", same))}
    assert torch.allclose(feats["clean"], clean.flatten(1))
    r = analyze.feature_outliers(feats["clean"], {"far": feats["far"], "same": feats["same"]})
    assert r["far"]["auroc_vs_clean"] > 0.99 and r["far"]["share_beyond_clean_q99"] > 0.95
    assert 0.4 < r["same"]["auroc_vs_clean"] < 0.6 and r["same"]["share_beyond_clean_q99"] < 0.05
    assert r["clean"]["share_beyond_clean_q99"] == pytest.approx(0.01, abs=0.005)
    assert analyze.auroc(torch.tensor([0.0, 1.0]), torch.tensor([2.0, 3.0])) == 1.0
    assert analyze.auroc(torch.tensor([1.0, 1.0]), torch.tensor([1.0, 1.0])) == 0.5  # ties count half
