"""Analyse a checkpoint: learned activation shapes, pre-activation distributions, Lipschitz estimates.

  shapes     every activation of the model (per layer / channel for KAF, the one shared function of a
             network-scope PSSiLU etc.) sampled over [-R, R] (--range), with its parameters and the
             shape properties Dai et al. 2021 relate to robustness: the output on negative inputs and
             the maximum curvature (infinite for a kink).                      -> shapes.json / .png
  preacts    the inputs of every activation layer on clean test images and on their PGD neighbours
             (eps = the training epsilon), as the KAF thesis compares ReLU, k-WTA and KAF: summary
             statistics, the shift between the two and histograms.           -> preacts.json / .png
  lipschitz  the KAF thesis's "Lipschitz constant approach": a layer-wise upper bound on the L2
             Lipschitz constant of the logit map x -> z(x) (product of the layers' spectral norms and
             the activations' own constants) next to an empirical local estimate (the largest
             spectral norm of the input-output Jacobian over test points and their PGD neighbours),
             which can never exceed it.                                       -> lipschitz.json / .png

  features   Zhao & Griffin's Figure 1 claim, that noise ("nonsense") images fall outside the
             distribution of clean images' features: the penultimate features (the input of the last
             linear layer) of clean test images, noisy copies (clean + N(0, sigma^2)) and pure-noise
             images; the Mahalanobis distance of each to a Gaussian fitted to the clean features, the
             AUROC of that distance separating clean from nonsense and from noisy, and the share of
             each beyond the clean distances' 99th percentile.            -> features.json

The first three run unless some are named (features only when asked).  JSON always; PNGs when matplotlib is installed.  (run_all.sh's
tables over seeds are tables.py's.)

    python analyze.py runs/train_fast_fashionmnist_lenet_kaf/checkpoint.pt --n-eval 500
    python analyze.py CKPT --lipschitz --power-iters 300
"""
import argparse
import copy
import functools
import json
import math
import os

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import activations
import attacks
import models
import tables
import utils
from utils import tqdm


def get_args(argv=None):
    p = utils.Parser(description=__doc__.split("\n\n")[0], formatter_class=utils.HelpFormatter)
    p.add_argument("checkpoint", help="checkpoint.pt written by a training script")
    p.add_argument("--shapes", action="store_true", help="learned activation shapes (all three analyses when none is named)")
    p.add_argument("--preacts", action="store_true", help="pre-activation distributions, clean vs PGD")
    p.add_argument("--lipschitz", action="store_true", help="layer-wise Lipschitz bound vs empirical local estimate")
    p.add_argument("--features", action="store_true", help="penultimate features: clean vs noisy vs nonsense")
    p.add_argument("--n-eval", type=int, default=500, help="first N test images for --preacts, --lipschitz, --features")
    p.add_argument("--noise-sigma", type=float, default=0.1, help="--features: the noisy copies' sigma")
    p.add_argument("--out", default=None, help="output folder (default: analysis/ next to the checkpoint)")
    p.add_argument("--data-dir", default=None, help="dataset folder (default: the one used in training)")
    p.add_argument("--eps", type=utils.fraction, default=None, help="L-inf radius of the PGD neighbours (default: the training epsilon)")
    p.add_argument("--pgd-steps", type=int, default=10, help="PGD steps (step eps/4) for the adversarial inputs")
    p.add_argument("--range", type=float, default=5.0, help="activation shapes are sampled on [-R, R]")
    p.add_argument("--power-iters", type=int, default=200, help="power-iteration steps per spectral norm")
    p.add_argument("--bins", type=int, default=60, help="histogram bins of the pre-activations")
    p.add_argument("--max-samples", type=int, default=200_000, help="pre-activation values kept per layer for percentiles and histograms")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--device", default=utils.DEFAULT_DEVICE)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-plot", action="store_true", help="JSON only")
    args = p.parse_args(argv)
    problems = utils.number_problems(args)
    if problems:
        p.error("; ".join(problems))
    if args.eps is not None and not 0 < args.eps <= 1:
        p.error(f"--eps must be in (0, 1] (images are in [0, 1]), got {args.eps}")
    if min(args.n_eval, args.pgd_steps, args.power_iters, args.bins, args.max_samples, args.batch_size) < 1:
        p.error("--n-eval, --pgd-steps, --power-iters, --bins, --max-samples and --batch-size must be >= 1")
    if args.range <= 0 or (args.eps is not None and args.eps <= 0):
        p.error("--range and --eps must be > 0")
    if utils.device_problem(args.device):
        p.error(utils.device_problem(args.device))
    if args.noise_sigma <= 0:
        p.error("--noise-sigma must be > 0")
    if not (args.shapes or args.preacts or args.lipschitz or args.features):
        args.shapes = args.preacts = args.lipschitz = True
    return args


def activation_layers(model):
    """[(name, module, uses)] of the model's distinct activation modules, named after their first place;
    ``uses`` > 1 for a network-scope module shared by several layers."""
    names, uses = {}, {}
    for name, m in model.named_modules(remove_duplicate=False):
        if isinstance(m, activations.CLASSES):
            names.setdefault(id(m), name or "model")
            uses[id(m)] = uses.get(id(m), 0) + 1
    return [(names[id(m)], m, uses[id(m)]) for m in activations.activation_modules(model)]


def _floats(t, digits=6):
    """A tensor as (nested) lists of rounded floats for JSON; inf stays a float (written as Infinity)."""
    return np.round(t.detach().double().cpu().numpy(), digits).tolist()


# ============================================================================ activation Lipschitz constants
def _slope_extremes(derivative, lo=-30.0, hi=30.0, n=600_001):
    """(max, min) of a smooth derivative on a fine float64 grid (step 1e-4: error O(1e-8))."""
    u = torch.linspace(lo, hi, n, dtype=torch.float64)
    g = derivative(u)
    return g.max().item(), g.min().item()


# d/du [u sigma(u)] = sigma(u) (1 + u (1 - sigma(u))) lies in [-0.0998, 1.0998]; d/du [u Phi(u)] in [-0.1289, 1.1289]
SILU_SLOPE = _slope_extremes(lambda u: torch.sigmoid(u) * (1 + u * (1 - torch.sigmoid(u))))
GELU_SLOPE = _slope_extremes(lambda u: torch.special.ndtr(u) + u * torch.exp(-u * u / 2) / math.sqrt(2 * math.pi))


def kaf_lipschitz(m, points=100_001):
    """Upper bound on sup_s |f_c'(s)| for every channel c of a KAF, from its coefficients alone.

    f_c'(s) = sum_i alpha_ci k'(s - d_i) is evaluated in float64 on a uniform grid of step h over
    [-B - M, B + M] and made a bound for the whole real line: between grid points |f'| exceeds its
    grid maximum by at most (h / 2) sup|f''| <= (h / 2) sum_i |alpha_ci| sup|k''|, and past the margin
    M the kernel derivatives are monotone and small.
      gaussian  k'(u) = -2 gamma u exp(-gamma u^2): sup|k'| = sqrt(2 gamma / e) at |u| = 1/sqrt(2 gamma),
                sup|k''| = 2 gamma; M = 4/sqrt(gamma) > 1/sqrt(2 gamma), so beyond it every
                |k'(s - d_i)| <= 2 gamma M exp(-gamma M^2).  The crude bound sum_i |alpha_ci| sqrt(2 gamma / e)
                is reported too (``crude``).
      softplus  k' = sigma in (0, 1), sup|k''| = 1/4; M = 40: |f'| <= sum|alpha| sigma(-M) on the left and
                <= |sum alpha| + sum|alpha| sigma(-M) on the right.
      relu      k' is a step: f' = sum_{d_i < s} alpha_i is constant between knots, so the bound is the
                exact maximum of |partial sums| (and 0 left of the dictionary).
    Returns (per-channel bound, per-channel grid maximum, crude bound or None)."""
    alpha = m.alpha.detach().double().cpu()
    d = m.dictionary.detach().double().cpu()
    abs_sum = alpha.abs().sum(1)
    if m.kernel == "relu":
        exact = alpha.cumsum(1).abs().amax(1)
        return exact, exact, None
    gamma, boundary = m.gamma, d[-1].item()
    if m.kernel == "gaussian":
        margin = 4 / math.sqrt(gamma)
        k1 = lambda u: -2 * gamma * u * torch.exp(-gamma * u * u)
        k2_max, tail = 2 * gamma, abs_sum * 2 * gamma * margin * math.exp(-gamma * margin ** 2)
        crude = abs_sum * math.sqrt(2 * gamma / math.e)
    else:
        margin, k1, k2_max, crude = 40.0, torch.sigmoid, 0.25, None
        tail = alpha.sum(1).abs() + abs_sum * torch.sigmoid(torch.tensor(-margin, dtype=torch.float64))
    s = torch.linspace(-boundary - margin, boundary + margin, points, dtype=torch.float64)
    h = (s[1] - s[0]).item()
    grid_max = torch.zeros(alpha.shape[0], dtype=torch.float64)
    for chunk in s.split(10_000):
        grid_max = torch.maximum(grid_max, (k1(chunk[:, None] - d) @ alpha.T).abs().amax(0))
    return torch.maximum(grid_max + h / 2 * k2_max * abs_sum, tail), grid_max, crude


def activation_lipschitz(m):
    """sup_s |f'(s)| of an elementwise activation, the largest over its channels: its Lipschitz
    constant as a map R^n -> R^n in any p-norm.
      relu, elu, softplus (any beta), psoftplus, mrelu: 1;   rbf exp(-s^2): sqrt(2/e);
      silu: max d/du[u sigma(u)] = 1.0998;   gelu: max [Phi(u) + u phi(u)] = 1.1289;   prelu: max(1, |a|);
      psilu x sigma(|a| x): its slope is g(|a| x), g = d/du[u sigma(u)] in [g_min, g_max] = [-0.0998, 1.0998],
            so g_max (1/2 when a = 0);
      pssilu x (sigma(|a| x) - b)/(1 - b), b = min(|b|, b_max): slope (g(|a| x) - b)/(1 - b), so
            max(|g_max - b|, |g_min - b|) / (1 - b) (|1/2 - b| / (1 - b) when a = 0);
      kaf: :func:`kaf_lipschitz`;   kwta: not Lipschitz (it jumps where the k-th largest value changes): inf.
    Returns (constant, note)."""
    g_max, g_min = SILU_SLOPE
    if isinstance(m, (activations.ReLU, activations.ELU, activations.Softplus, activations.PSoftplus, activations.MReLU)):
        return 1.0, "analytic"
    if isinstance(m, activations.RBF):
        return math.sqrt(2 / math.e), "analytic"
    if isinstance(m, activations.SiLU):
        return g_max, "analytic"
    if isinstance(m, activations.GELU):
        return GELU_SLOPE[0], "analytic"
    if isinstance(m, activations.PReLU):
        return max(1.0, m.a.detach().abs().max().item()), "analytic"
    if isinstance(m, (activations.PSiLU, activations.PSSiLU)):
        a = m.a.detach().double().abs()
        b = (m.b_max * torch.tanh(m.b.detach().double().abs() / m.b_max)) if isinstance(m, activations.PSSiLU) else torch.zeros_like(a)  # PSSiLU.beta in float64
        wide = torch.maximum((g_max - b).abs(), (g_min - b).abs()) / (1 - b)
        return torch.where(a > 0, wide, (0.5 - b).abs() / (1 - b)).max().item(), "analytic"
    if isinstance(m, activations.KAF):
        bound, _, _ = kaf_lipschitz(m)
        return bound.max().item(), f"from the coefficients ({m.kernel} kernel)"
    if isinstance(m, activations.KWTA):
        return math.inf, "k-WTA is discontinuous: no Lipschitz constant"
    raise utils.UserError(f"no Lipschitz constant known for activation {type(m).__name__}")


# ====================================================================================== activation shapes
def channel_curves(m, s):
    """f(s) for every channel function of an elementwise activation: (G, C) for G grid points."""
    channels = getattr(m, "channels", 1)
    with torch.no_grad():
        return copy.deepcopy(m).double().cpu()(s[:, None].expand(-1, channels).contiguous())


def shape_properties(s, f):
    """Shape properties (Dai et al. 2021) of functions sampled on a uniform grid s with step h, one
    column of f per channel:
      neg_mean            mean of f over s < 0         neg_max   max of f over s < 0
      neg_positive_share  share of s < 0 with f(s) > 0 (Dai et al.: positive outputs on negative inputs help)
      min_value, argmin   the lowest output and where
      max_slope           max |f'| by central differences (f(s+h) - f(s-h)) / 2h
      max_curvature       max |f''|, f'' ~ (f(s+h) - 2 f(s) + f(s-h)) / h^2, and where (curvature_at).  At a
                          kink this estimate grows like 1/h; when it is more than 1.2 x the estimate with
                          step 2h (a smooth f gives 1 + O(h^2), a kink >= 4/3) the curvature is reported as
                          inf: Dai et al. favour high but *finite* curvature.
    Returns {name: tensor (C,)}."""
    h = (s[1] - s[0]).item()
    neg = s < 0
    d1 = (f[2:] - f[:-2]) / (2 * h)
    d2 = (f[2:] - 2 * f[1:-1] + f[:-2]).abs() / h ** 2
    d2_wide = (f[4:] - 2 * f[2:-2] + f[:-4]).abs() / (4 * h ** 2)
    curvature = d2.amax(0)
    kink = curvature > 1.2 * d2_wide.amax(0)
    return {"neg_mean": f[neg].mean(0), "neg_max": f[neg].amax(0), "neg_positive_share": (f[neg] > 0).double().mean(0),
            "min_value": f.amin(0), "argmin": s[f.argmin(0)], "max_slope": d1.abs().amax(0),
            "max_curvature": torch.where(kink, math.inf, curvature), "curvature_at": s[1:-1][d2.argmax(0)]}


def analyze_shapes(model, radius=5.0, points=1001, json_points=201, json_channels=16):
    """Every distinct activation module sampled on s = linspace(-R, R, points) (step 0.01 by default),
    with its parameters, :func:`shape_properties` per channel (a summary over channels when there are
    several) and its Lipschitz constant.  k-WTA is not an elementwise function and is only listed."""
    s = torch.linspace(-radius, radius, points, dtype=torch.float64)
    every = max(1, (points - 1) // (json_points - 1))
    out = []
    for name, m, uses in activation_layers(model):
        entry = {"layer": name, "type": type(m).__name__, "uses": uses, "trainable": any(True for _ in m.parameters()),
                 "params": {k: _floats(p) for k, p in m.named_parameters()}}
        if isinstance(m, activations.KWTA):
            out.append({**entry, "note": "k-WTA is not elementwise: no shape"})
            continue
        f = channel_curves(m, s)
        props = shape_properties(s, f)
        entry.update(channels=f.shape[1], lipschitz=activation_lipschitz(m)[0],
                     properties={k: (v.item() if len(v) == 1 else _floats(v)) for k, v in props.items()})
        if f.shape[1] > 1:
            entry["summary"] = {k: {"mean": v.mean().item(), "min": v.min().item(), "max": v.max().item()} for k, v in props.items()}
        if isinstance(m, activations.KAF):
            entry.update(kernel=m.kernel, gamma=m.gamma, dictionary=_floats(m.dictionary))
        entry["curve_x"] = _floats(s[::every], 4)
        entry["curves"] = _floats(f[::every, :json_channels].T)
        out.append(entry)
    return {"range": radius, "points": points, "activations": out}


def _panel_grid(plt, n, height):
    """A figure with ``n`` panels, three to a row; returns (fig, the n axes), spare cells switched off."""
    cols = min(3, n)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, height * rows), squeeze=False)
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    return fig, list(axes.flat)[:n]


def plot_shapes(result, path, plt):
    """One panel per activation module: its channel functions (up to 16), KAF dictionary marked."""
    items = [a for a in result["activations"] if "curves" in a]
    if not items:
        return None
    fig, axes = _panel_grid(plt, len(items), 3.4)
    for ax, a in zip(axes, items):
        for y in a["curves"]:
            ax.plot(a["curve_x"], y, linewidth=0.8, alpha=0.6 if len(a["curves"]) > 1 else 1)
        if "dictionary" in a:
            ax.plot(a["dictionary"], [0] * len(a["dictionary"]), "k|", markersize=6)
        shown = f"{len(a['curves'])} of {a['channels']} channels" if a["channels"] > 1 else "shared" if a["uses"] > 1 else ""
        ax.set_title(f"{a['layer']}\n{a['type']} {shown}  L={a['lipschitz']:.3g}", fontsize=8)
        ax.axhline(0, color="grey", linewidth=0.5)
        ax.axvline(0, color="grey", linewidth=0.5)
    fig.tight_layout()
    tables.save_figure(fig, path)
    plt.close(fig)
    return path


# =================================================================================== pre-activations
class PreactRecorder:
    """Forward hooks on the activation modules recording each call's input (the pre-activation).  A
    module shared by several layers (network scope) is called once per layer in forward order, so the
    k-th call of a forward pass is the k-th activation layer."""

    def __init__(self, model):
        self.calls = []
        self.handles = [m.register_forward_hook(lambda mod, inp, out, name=name: self.calls.append((name, mod, inp[0].detach())))
                        for name, m, _ in activation_layers(model)]

    def run(self, model, x):
        self.calls = []
        with torch.no_grad():
            model(x)
        return self.calls

    def remove(self):
        for h in self.handles:
            h.remove()


class LayerPreacts:
    """Running statistics of one activation layer's inputs, clean (index 0) and adversarial (1): exact
    moments, extremes and the share outside a KAF dictionary over all values, plus values sampled at the
    same positions for both (percentiles, histograms, W1) and the paired shift sums."""

    def __init__(self, name, module):
        self.name, self.activation = name, type(module).__name__
        self.boundary = module.dictionary[-1].item() if isinstance(module, activations.KAF) else None
        self.n, self.shift = 0, torch.zeros(3, dtype=torch.float64)  # sum |a - c|, sum (a - c)^2, sum c^2
        self.moments = [torch.zeros(4, dtype=torch.float64) for _ in range(2)]  # sum, sum of squares, positive, outside
        self.lo, self.hi, self.samples = [math.inf] * 2, [-math.inf] * 2, [[], []]

    def add(self, clean, adv, keep, gen):
        clean, adv = clean.flatten().double().cpu(), adv.flatten().double().cpu()
        idx = torch.randperm(len(clean), generator=gen)[:keep]
        for j, v in enumerate((clean, adv)):
            outside = (v.abs() > self.boundary).sum() if self.boundary is not None else torch.zeros(())
            self.moments[j] += torch.stack([v.sum(), (v * v).sum(), (v > 0).sum().double(), outside.double()])
            self.lo[j], self.hi[j] = min(self.lo[j], v.min().item()), max(self.hi[j], v.max().item())
            self.samples[j].append(v[idx])
        d = adv - clean
        self.shift += torch.stack([d.abs().sum(), (d * d).sum(), (clean * clean).sum()])
        self.n += len(clean)

    def _summary(self, j, sample):
        total, squares, positive, outside = self.moments[j].tolist()
        mean = total / self.n
        q = torch.quantile(sample, torch.tensor([0.01, 0.5, 0.99], dtype=sample.dtype)).tolist()
        out = {"mean": mean, "std": math.sqrt(max(squares / self.n - mean * mean, 0.0)), "min": self.lo[j], "max": self.hi[j],
               "p01": q[0], "p50": q[1], "p99": q[2], "share_positive": positive / self.n}
        if self.boundary is not None:
            out["share_outside_dictionary"] = outside / self.n
        return out

    def result(self, bins):
        clean, adv = torch.cat(self.samples[0]), torch.cat(self.samples[1])
        lo, hi = torch.quantile(torch.cat([clean, adv]), torch.tensor([0.001, 0.999], dtype=clean.dtype)).tolist()
        edges = np.linspace(lo, max(hi, lo + 1e-6), bins + 1)
        abs_shift, sq_shift, sq_clean = self.shift.tolist()
        return {"layer": self.name, "activation": self.activation, "values": self.n,
                "clean": self._summary(0, clean), "adversarial": self._summary(1, adv),
                "mean_abs_shift": abs_shift / self.n, "relative_shift": math.sqrt(sq_shift / max(sq_clean, 1e-300)),
                "wasserstein1": (clean.sort().values - adv.sort().values).abs().mean().item(),
                "histogram": {"edges": np.round(edges, 6).tolist(), "clean": np.histogram(clean.numpy(), edges)[0].tolist(),
                              "adversarial": np.histogram(adv.numpy(), edges)[0].tolist()}}


def analyze_preacts(model, x, y, eps, pgd_steps=10, batch_size=128, bins=60, max_samples=200_000, seed=0):
    """Distribution of every activation layer's input on clean images x and on their PGD neighbours
    (L-inf eps, ``pgd_steps`` steps of eps/4, random start; eval mode, float32).

    Per layer and per input kind: mean, std, min, max (over all values), 1/50/99th percentiles and the
    share of positive values (ReLU's active units), plus for KAF the share outside the dictionary
    [-B, B], where a Gaussian KAF decays to 0.  The clean/adversarial pairs are compared directly:
    mean |s_adv - s| and the relative shift ||s_adv - s|| / ||s|| (how much the perturbation has grown
    by that layer), and the 1-Wasserstein distance between the two distributions.  Percentiles,
    W1 and the histograms (``bins`` common bins over the 0.1-99.9th percentiles) use up to
    ``max_samples`` values per layer (all of them when they fit), at the same positions for both kinds."""
    device = next(model.parameters()).device
    rec = PreactRecorder(model)
    gen = torch.Generator().manual_seed(seed)
    layers = []
    starts = range(0, len(x), batch_size)
    keep = max(1, max_samples // len(starts))
    try:
        for i in tqdm(starts, desc="pre-activations", leave=False, dynamic_ncols=True):
            xb, yb = x[i:i + batch_size].to(device).float(), y[i:i + batch_size].to(device)
            x_adv = attacks.pgd(model, xb, yb, eps, eps / 4, pgd_steps)
            with attacks.eval_float32(model):
                clean_calls, adv_calls = rec.run(model, xb), rec.run(model, x_adv)
            for k, ((name, module, clean), (_, _, adv)) in enumerate(zip(clean_calls, adv_calls)):
                if k == len(layers):
                    layers.append(LayerPreacts(f"{k}:{name}", module))
                layers[k].add(clean, adv, keep, gen)
    finally:
        rec.remove()
    return {"eps": eps, "pgd_steps": pgd_steps, "n_images": len(x), "layers": [L.result(bins) for L in layers]}


def plot_preacts(result, path, plt):
    """One panel per activation layer: clean and PGD pre-activation histograms (log counts)."""
    layers = result["layers"]
    if not layers:
        return None
    fig, axes = _panel_grid(plt, len(layers), 3.2)
    for ax, L in zip(axes, layers):
        h = L["histogram"]
        for kind, color in (("clean", "C0"), ("adversarial", "C3")):
            ax.stairs(h[kind], h["edges"], color=color, label=kind)
        ax.set_title(f"{L['layer']} ({L['activation']})\nW1 {L['wasserstein1']:.3g}, shift {L['relative_shift']:.3g}", fontsize=8)
        ax.set_yscale("log")
    axes[0].legend(fontsize=7)
    fig.suptitle(f"pre-activations, clean vs PGD (eps {result['eps']:.4g})", fontsize=9)
    fig.tight_layout()
    tables.save_figure(fig, path)
    plt.close(fig)
    return path


# ========================================================================================= Lipschitz
AFFINE = (nn.Conv2d, nn.Linear, nn.BatchNorm1d, nn.BatchNorm2d, nn.Flatten, nn.Identity, nn.Dropout,
          nn.AvgPool2d, nn.AdaptiveAvgPool2d)


def _global_pool(v):
    """The global average pooling + flatten that VGG and the ResNets do inside forward (linear)."""
    return F.adaptive_avg_pool2d(v, 1).flatten(1)


def _pair(v):
    return tuple(v) if isinstance(v, (tuple, list)) else (v, v)


def chain(module, name="model"):
    """The model as the list of steps of the layer-wise bound, in forward order:
      ("affine", fn, name)  a map affine in its input: convolution, linear, BatchNorm in eval mode (a
                            per-channel scale gamma / sqrt(var + eps)), the input normalisation
                            (per-channel 1/std), average pooling, flatten, dropout / identity (eval);
      ("act", module, name) an elementwise activation;
      ("pool", module, name) max-pooling with non-overlapping windows: 1-Lipschitz in L2;
      ("sum", main, name, shortcut) a residual sum main(x) + shortcut(x): Lipschitz <= L(main) +
                            L(shortcut), an empty shortcut being the identity (1).  A post-activation
                            block is [sum, act2]; a pre-activation block whose shortcut convolution
                            reads act1(bn1(x)) is [bn1, act1, sum].
    Modules outside models.py's architectures raise UserError rather than give a wrong bound."""
    c = lambda child: chain(getattr(module, child), f"{name}.{child}")
    if isinstance(module, models.Normalized):
        return [("affine", lambda v: (v - module.mean) / module.std, f"{name}.normalize")] + c("net")
    if isinstance(module, activations.CLASSES):
        return [("act", module, name)]
    if isinstance(module, AFFINE):
        return [("affine", module, name)]
    if isinstance(module, nn.MaxPool2d):
        k, s, dil = _pair(module.kernel_size), _pair(module.stride), _pair(module.dilation)
        if s[0] < k[0] or s[1] < k[1] or dil != (1, 1):
            raise utils.UserError(f"lipschitz: overlapping max-pooling at {name} is not supported")
        return [("pool", module, name)]
    if isinstance(module, nn.Sequential):  # not named_children(): it skips a shared (network-scope) module's repeats
        return [step for key, m in module._modules.items() for step in chain(m, f"{name}.{key}")]
    if isinstance(module, models.LeNet):
        return c("features") + c("classifier")
    if isinstance(module, models.VGG):
        return c("features") + [("affine", _global_pool, f"{name}.avgpool")] + c("classifier")
    if isinstance(module, models.ResNet):
        return (c("stem") + c("stem_bn") + c("stem_act") + c("stages") + c("final_bn") + c("final_act")
                + [("affine", _global_pool, f"{name}.avgpool")] + c("linear"))
    if isinstance(module, models.BasicBlock):
        main = c("conv1") + c("bn1") + c("act1") + c("conv2") + c("bn2")
        return [("sum", main, name, c("shortcut"))] + c("act2")
    if isinstance(module, models.PreActBlock):
        pre, main = c("bn1") + c("act1"), c("conv1") + c("bn2") + c("act2") + c("dropout") + c("conv2")
        if module.shortcut is None:
            return [("sum", pre + main, name, [])]
        return pre + [("sum", main, name, c("shortcut"))]
    raise utils.UserError(f"lipschitz: no layer-wise bound for {type(module).__name__} at {name}")


def operator_norm(f, x, iters=200, tol=1e-9, seed=0):
    """Spectral norm ||J||_2 of an affine map f(v) = J v + b (``x`` gives the input shape).  A single
    nn.Linear is exact (largest singular value of its weight); anything else (convolutions with their
    padding and stride, BatchNorm, pooling and their compositions) by power iteration on J^T J:
    v <- J^T J v / ||J^T J v||, sigma = ||J v|| for unit v, with J v = f(v) - f(0) (exact for an affine
    map; float64 keeps the subtraction accurate) and J^T u by a backward pass.  sigma rises towards
    ||J||_2 from below; it stops after ``iters`` steps or when sigma changes by less than tol (relative)."""
    if isinstance(f, nn.Linear):
        return torch.linalg.matrix_norm(f.weight.detach().double(), 2).item()
    g = torch.Generator().manual_seed(seed)
    v = torch.randn(x.shape, generator=g, dtype=torch.float64).to(x)
    v /= v.norm()
    zero = torch.zeros_like(x, requires_grad=True)
    with torch.enable_grad():
        base = f(zero)
    sigma = 0.0
    for _ in range(iters):
        with torch.no_grad():
            u = f(v) - base
        (w,) = torch.autograd.grad(base, zero, u, retain_graph=True)
        new, norm = u.norm().item(), w.norm()
        if norm == 0:
            return 0.0
        v = w / norm
        converged = abs(new - sigma) <= tol * new
        sigma = new
        if converged:
            break
    return sigma


def chain_bound(steps, x, merge=False, iters=200):
    """Walk the steps of :func:`chain` from input x: the product of the steps' Lipschitz constants
    (sums of branches for residual sums).  ``merge`` composes each run of consecutive affine steps
    into one map and takes its spectral norm, ||A_2 A_1|| <= ||A_2|| ||A_1||: a tighter bound that is
    still an upper bound.  Returns (bound, output, [{layer, kind, lipschitz}])."""
    bound, records, i = 1.0, [], 0
    while i < len(steps):
        kind, obj, name = steps[i][:3]
        if kind == "affine":
            j = i + 1
            while merge and j < len(steps) and steps[j][0] == "affine":
                j += 1
            fns = [step[1] for step in steps[i:j]]
            fn = fns[0] if len(fns) == 1 else (lambda v, fns=fns: functools.reduce(lambda a, f: f(a), fns, v))
            const, x = operator_norm(fn, x, iters), fn(x)
            name = " + ".join(step[2] for step in steps[i:j])
            i = j
        elif kind == "sum":
            main, x_main, _ = chain_bound(obj, x, merge, iters)
            short, x_short, _ = chain_bound(steps[i][3], x, merge, iters)
            const, x = main + short, x_main + x_short
            i += 1
        else:
            const = activation_lipschitz(obj)[0] if kind == "act" else 1.0
            x = obj(x)
            i += 1
        bound *= const
        records.append({"layer": name, "kind": kind, "lipschitz": const})
    return bound, x, records


def lipschitz_bounds(model, x, iters=200):
    """Layer-wise upper bounds on the L2 -> L2 Lipschitz constant of the logit map of ``model`` (eval
    mode, float64 copy), from one input x (1 x C x H x W, for the shapes): per layer (every
    convolution, BatchNorm, normalisation ... separately) and with consecutive affine layers merged.
    The chain is checked to reproduce the model's output, so a model the chain misreads fails loudly."""
    model = copy.deepcopy(model).double().eval().requires_grad_(False)
    x = x.double()
    steps = chain(model)
    per_layer, out, records = chain_bound(steps, x, False, iters)
    expected = model(x)
    if not torch.allclose(out, expected, rtol=1e-6, atol=1e-6 * expected.abs().max().item()):
        raise utils.UserError("lipschitz: the layer chain does not reproduce the model's output; bound not computed")
    merged, _, merged_records = chain_bound(steps, x, True, iters)
    return {"bound_per_layer": per_layer, "bound_merged": merged, "layers": records, "merged_layers": merged_records}


def jacobian_norms(model, x, batch_size=128):
    """||J(x)||_2 for every example, J = d logits / d x (K x D): the exact largest singular value of the
    Jacobian, assembled from its K rows (one backward pass per class, batched: in eval mode the
    examples do not interact).  sup_x ||J(x)||_2 is the L2 Lipschitz constant of the logit map, so
    each value is a lower bound on it -- and can never exceed the layer-wise upper bound."""
    device = next(model.parameters()).device
    norms = []
    with attacks.eval_float32(model):
        for i in range(0, len(x), batch_size):
            xb = x[i:i + batch_size].to(device).float().requires_grad_(True)
            z = model(xb)
            rows = [torch.autograd.grad(z[:, k].sum(), xb, retain_graph=k < z.shape[1] - 1)[0].flatten(1)
                    for k in range(z.shape[1])]
            norms.append(torch.linalg.matrix_norm(torch.stack(rows, 1).double(), ord=2).cpu())
    return torch.cat(norms)


def analyze_lipschitz(model, x, y, eps, pgd_steps=10, batch_size=128, iters=200):
    """The KAF thesis's "Lipschitz constant approach", both ways:
      bound      :func:`lipschitz_bounds` (product of per-layer spectral norms by power iteration, linear
                 layers exactly, eval BatchNorm as |gamma|/sqrt(var + eps), the input normalisation as
                 1/std, activations by :func:`activation_lipschitz`, residual blocks as L(main) +
                 L(shortcut)), per layer and with affine layers merged;
      empirical  max over the test points x and their PGD neighbours (L-inf eps, ``pgd_steps`` steps of
                 eps/4) of ||J(x)||_2, the local Lipschitz constant of the same logit map in the same
                 L2 norm (:func:`jacobian_norms`); PGD looks for steep places near the data.
    empirical <= bound always holds; their ratio says how loose the layer-wise bound is."""
    device = next(model.parameters()).device
    bounds = lipschitz_bounds(model, x[:1].to(device), iters)
    clean, adv = [], []
    for i in tqdm(range(0, len(x), batch_size), desc="Jacobian norms", leave=False, dynamic_ncols=True):
        xb, yb = x[i:i + batch_size].to(device).float(), y[i:i + batch_size].to(device)
        clean.append(jacobian_norms(model, xb, batch_size))
        adv.append(jacobian_norms(model, attacks.pgd(model, xb, yb, eps, eps / 4, pgd_steps), batch_size))
    clean, adv = torch.cat(clean), torch.cat(adv)
    empirical = max(clean.max().item(), adv.max().item())
    acts = [{"layer": name, "type": type(m).__name__, "lipschitz": activation_lipschitz(m)[0], "how": activation_lipschitz(m)[1]}
            for name, m, _ in activation_layers(model)]
    return {**bounds, "activations": acts,
            "empirical": {"max": empirical, "max_clean": clean.max().item(), "max_adversarial": adv.max().item(),
                          "mean_clean": clean.mean().item(), "mean_adversarial": adv.mean().item(),
                          "n_images": len(x), "eps": eps, "pgd_steps": pgd_steps,
                          "clean": _floats(clean), "adversarial": _floats(adv)},
            "ratio_per_layer": bounds["bound_per_layer"] / empirical if empirical > 0 else math.inf,
            "ratio_merged": bounds["bound_merged"] / empirical if empirical > 0 else math.inf,
            "definition": "L2->L2 Lipschitz constant of x -> logits on [0,1] inputs; empirical = max ||d logits/dx||_2"}


def plot_lipschitz(result, path, plt):
    """Per-layer constants of the bound, and the local estimates ||J(x)||_2 against both bounds."""
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    layers = result["layers"]
    colors = {"affine": "C0", "act": "C1", "pool": "C7", "sum": "C2"}
    ax1.bar(range(len(layers)), [min(r["lipschitz"], 1e12) for r in layers], color=[colors[r["kind"]] for r in layers])
    ax1.set_xticks(range(len(layers)), [".".join(r["layer"].split(".")[-2:]) for r in layers], rotation=90, fontsize=6)
    ax1.set(yscale="log", ylabel="Lipschitz constant", title="per layer (blue affine, orange activation, grey pool, green block)")
    emp = result["empirical"]
    values = emp["clean"] + emp["adversarial"]
    lo, hi = max(min(values), 1e-12), max(max(values), 2e-12)
    ax2.hist([emp["clean"], emp["adversarial"]], bins=np.geomspace(lo, hi * 1.001, 30), label=["clean", "PGD"], color=["C0", "C3"], histtype="step")
    for key, style in (("bound_per_layer", "--"), ("bound_merged", ":")):
        if math.isfinite(result[key]):
            ax2.axvline(result[key], color="k", linestyle=style, label=f"{key} {result[key]:.3g}")
    ax2.set(xscale="log", xlabel="||J(x)||_2", ylabel="images", title="local Lipschitz estimates vs bounds")
    ax2.legend(fontsize=7)
    fig.tight_layout()
    tables.save_figure(fig, path)
    plt.close(fig)
    return path


# ============================================================================================== main
def penultimate_features(model, x, batch_size=256):
    """The input of the model's last nn.Linear (the features the classifier reads), in eval mode and
    float32, for images x."""
    last = [m for m in model.modules() if isinstance(m, nn.Linear)][-1]
    seen = []
    hook = last.register_forward_pre_hook(lambda m, inp: seen.append(inp[0].detach().float().flatten(1).cpu()))
    try:
        with attacks.eval_float32(model), torch.no_grad():
            device = next(model.parameters()).device
            for i in range(0, len(x), batch_size):
                model(x[i:i + batch_size].to(device).float())
    finally:
        hook.remove()
    return torch.cat(seen)


def auroc(inside, outside):
    """P(score of an ``outside`` sample > score of an ``inside`` one), ties counted half: the area
    under the ROC curve of the score as a detector of ``outside`` (0.5 = no separation)."""
    scores = torch.cat([inside, outside]).double()
    ranks = torch.empty_like(scores)
    order = scores.argsort()
    ranks[order] = torch.arange(1, len(scores) + 1, dtype=torch.double)
    for v in scores.unique():  # average ranks over ties
        tie = scores == v
        ranks[tie] = ranks[tie].mean()
    n_in, n_out = len(inside), len(outside)
    return ((ranks[n_in:].sum() - n_out * (n_out + 1) / 2) / (n_in * n_out)).item()


def feature_outliers(clean, others, ridge=1e-3):
    """Mahalanobis distances to a Gaussian fitted to the ``clean`` features (n x d; its covariance plus
    ``ridge`` times its mean variance on the diagonal, so that dead features do not make it singular),
    for the clean features themselves and each of ``others`` ({name: features}); per name the AUROC
    of the distance separating it from clean and its share beyond the clean 99th percentile."""
    mu = clean.double().mean(0)
    centred = clean.double() - mu
    cov = centred.T @ centred / max(len(clean) - 1, 1)
    cov += ridge * cov.diagonal().mean().clamp(min=1e-12) * torch.eye(len(mu), dtype=torch.double)
    precision = torch.linalg.inv(cov)
    dist = lambda f: ((f.double() - mu) @ precision * (f.double() - mu)).sum(1).clamp(min=0).sqrt()
    d_clean = dist(clean)
    q99 = torch.quantile(d_clean, 0.99).item()
    out = {"clean": {"mean_distance": d_clean.mean().item(), "share_beyond_clean_q99": (d_clean > q99).float().mean().item()}}
    for name, f in others.items():
        d = dist(f)
        out[name] = {"mean_distance": d.mean().item(), "share_beyond_clean_q99": (d > q99).float().mean().item(),
                     "auroc_vs_clean": auroc(d_clean, d)}
    return {"clean_q99": q99, "ridge": ridge, "dims": len(mu), **out}


def analyze_features(model, x, sigma=0.1, nonsense_std=0.25, seed=0, batch_size=256):
    """Zhao & Griffin's Figure 1 test on penultimate features: clean x, noisy clip(x + N(0, sigma^2)),
    nonsense clip(0.5 + nonsense_std z) (eval.py's nonsense images), scored by feature_outliers."""
    g = torch.Generator().manual_seed(seed)
    noisy = (x + sigma * torch.randn(x.shape, generator=g)).clamp(0, 1)
    nonsense = (0.5 + nonsense_std * torch.randn(x.shape, generator=g)).clamp(0, 1)
    feats = {k: penultimate_features(model, v, batch_size) for k, v in
             (("clean", x), ("noisy", noisy), ("nonsense", nonsense))}
    result = feature_outliers(feats["clean"], {"noisy": feats["noisy"], "nonsense": feats["nonsense"]})
    return {"n": len(x), "noise_sigma": sigma, "nonsense_std": nonsense_std, **result}


def main(argv=None):
    """Run the analyses asked for; returns {name: result} as written to the JSON files."""
    args = get_args(argv)
    utils.seed_everything(args.seed)
    model, _, eps = utils.load_for_eval(args.checkpoint, args.device, args.eps)
    out_dir = args.out or os.path.join(os.path.dirname(os.path.abspath(args.checkpoint)), "analysis")
    utils.check_writable_dir(out_dir)  # before the analyses, not after them
    plt = None if args.no_plot else utils.pyplot()
    if plt is None and not args.no_plot:
        print("matplotlib is not installed: writing JSON only (pip install matplotlib for the PNGs)")
    cfg = model.config
    print(f"analyze: {cfg['arch']} {models.act_label(cfg['act'], cfg.get('saf_insert'))} from {args.checkpoint} on {args.device} -> {out_dir}", flush=True)
    results = {}
    save = lambda key, result, plot: (utils.write_json(result, os.path.join(out_dir, f"{key}.json")),
                                      plt and plot(result, os.path.join(out_dir, f"{key}.png"), plt))

    if args.shapes:
        results["shapes"] = r = analyze_shapes(model, args.range)
        save("shapes", r, plot_shapes)
        for a in r["activations"]:
            if "properties" in a:
                p = a.get("summary") or {k: {"mean": v} for k, v in a["properties"].items()}
                print(f"  shape {a['layer']:<28} {a['type']:<9} neg_mean {p['neg_mean']['mean']:+.3f}  "
                      f"neg_max {p['neg_max']['mean']:+.3f}  max_curvature {p['max_curvature']['mean']:.3g}  "
                      f"Lipschitz {a['lipschitz']:.3f}" + (f"  (means over {a['channels']} channels)" if a["channels"] > 1 else ""))

    if args.preacts or args.lipschitz or args.features:
        _, x, y = utils.checkpoint_test_set(model, args.checkpoint, args.data_dir, args.n_eval)
        utils.check_outputs_finite(model, x, args.checkpoint)
        if args.preacts:
            results["preacts"] = r = analyze_preacts(model, x, y, eps, args.pgd_steps, args.batch_size, args.bins,
                                                     args.max_samples, args.seed)
            save("preacts", r, plot_preacts)
            for L in r["layers"]:
                c, a = L["clean"], L["adversarial"]
                print(f"  preact {L['layer']:<28} clean {c['mean']:+.3f}+-{c['std']:.3f}  PGD {a['mean']:+.3f}+-{a['std']:.3f}  "
                      f"W1 {L['wasserstein1']:.4f}  relative shift {L['relative_shift']:.3f}"
                      + (f"  outside dict {c['share_outside_dictionary']:.3f}/{a['share_outside_dictionary']:.3f}"
                         if "share_outside_dictionary" in c else ""))
        if args.lipschitz:
            results["lipschitz"] = r = analyze_lipschitz(model, x, y, eps, args.pgd_steps, args.batch_size, args.power_iters)
            save("lipschitz", r, plot_lipschitz)
            e = r["empirical"]
            print(f"  Lipschitz bound {r['bound_per_layer']:.4g} per layer, {r['bound_merged']:.4g} merged; empirical "
                  f"max ||J||_2 {e['max']:.4g} (clean {e['max_clean']:.4g}, PGD {e['max_adversarial']:.4g}); "
                  f"bound / empirical {r['ratio_per_layer']:.3g} / {r['ratio_merged']:.3g}")
        if args.features:
            results["features"] = r = analyze_features(model, x, args.noise_sigma, seed=args.seed,
                                                       batch_size=args.batch_size)
            utils.write_json(r, os.path.join(out_dir, "features.json"))
            print(f"  features ({r['dims']} dims): Mahalanobis distance to the clean features' Gaussian: "
                  + "  ".join(f"{k} {r[k]['mean_distance']:.2f}" for k in ("clean", "noisy", "nonsense"))
                  + f"; AUROC vs clean: noisy {r['noisy']['auroc_vs_clean']:.3f}, nonsense "
                  f"{r['nonsense']['auroc_vs_clean']:.3f}")
    print(f"-> {', '.join(f'{k}.json' for k in results)} in {out_dir}" + (" (+ PNGs)" if plt else ""), flush=True)
    return results


if __name__ == "__main__":
    utils.main_guard(main)
