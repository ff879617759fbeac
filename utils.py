"""What the three training scripts share at their run and epoch boundaries; each script keeps its
own loop and its own training step (nothing here runs inside a step).

* Flags: :func:`add_shared_flags`, :func:`parse_args` (one-line errors), :func:`fraction`.
* Schedules: :func:`lr_at` / :func:`momentum_at`, tabulated once per run by :func:`lr_schedule`.
* Set-up: :func:`setup` -- device, data on it (data.py), model, SGD, the AMP context and scaler,
  DDP under torchrun, the run folder and its lock.
* Epoch boundaries: :func:`new_state` (the loop's state, restored whole by --resume),
  :func:`epoch_result`, :func:`end_epoch` (the guard probe: PGD-10 on fixed training images, the
  catastrophic-overfitting guard, best weights, checkpoint), :func:`probe` (--eval-every).
* Checkpoints: :func:`save_checkpoint` / :func:`load_for_resume` (plain data, loaded with
  ``weights_only=True``); :func:`load_for_eval` and :func:`checkpoint_test_set` for eval.py and
  analyze.py.
* The end: :func:`finish` (final evaluation, summary.json), :func:`record_stop` (divergence,
  Ctrl-C), :func:`main_guard` (one-line errors and exit codes).

Imports torch, numpy, tqdm (optional) and the project's modules.
"""
import argparse
import atexit
import contextlib
import copy
import hashlib
import json
import math
import os
import random
import signal
import socket
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F

import activations
import attacks
import data
import models

try:
    from tqdm import tqdm
except ImportError:  # tqdm is optional: fall back to a silent iterator
    class tqdm:
        def __init__(self, iterable=None, **kwargs):
            self.iterable = iterable

        def __iter__(self):
            return iter(self.iterable)

        def __len__(self):
            return len(self.iterable)

        def set_postfix(self, **kwargs):
            pass


DEFAULT_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def device_problem(device):
    """The one-line complaint about a --device that is not cpu / cuda[:N] or that this machine does
    not have, or None."""
    try:
        d = torch.device(device)
    except (RuntimeError, ValueError, TypeError):
        return f"--device {device!r} is not a device; use cpu, cuda or cuda:N"
    if d.type not in ("cpu", "cuda"):
        return f"--device {device}: only cpu and cuda (cuda:N) are supported"
    if d.type == "cuda" and not torch.cuda.is_available():
        return "--device cuda asked for but CUDA is not available; use --device cpu"
    if d.type == "cuda" and d.index is not None and d.index >= torch.cuda.device_count():
        return f"--device {device}: this machine has {torch.cuda.device_count()} CUDA device(s)"
    return None


def number_problems(args):
    """One-line complaints about numeric flags that would run but give a wrong number or a
    traceback: any float that is not finite, a seed outside numpy's range (every entry point
    checks these; each adds its own ranges)."""
    problems = [f"--{k.replace('_', '-')} must be a finite number, got {v}" for k, v in vars(args).items()
                if isinstance(v, float) and not math.isfinite(v)]
    if getattr(args, "seed", 0) is not None and not 0 <= getattr(args, "seed", 0) < 2 ** 32:
        problems.append(f"--seed must be in [0, 2^32), got {args.seed}")
    return problems


def pyplot():
    """matplotlib.pyplot with the file-only Agg backend, or None when matplotlib is not
    installed."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        return plt
    except ImportError:  # plots are optional
        return None


class UserError(Exception):
    """A problem with the user's input (flag, dataset, checkpoint): printed as one line, no
    traceback."""


class Diverged(Exception):
    """Training produced a non-finite loss or gradient (in batch ``batch``), or an epoch ended with
    non-finite weights (``batch`` 0, ``what`` names them): the run stops (one-line error, exit code
    1)."""

    def __init__(self, epoch, batch, batches, label="epoch", note="", what="loss or gradient"):
        self.epoch, self.batch, self.batches, self.label, self.what = epoch, batch, batches, label, what
        where = (f"in {label} {epoch}, batch {batch} of {batches}" if batch
                 else f"at the end of {label} {epoch}")
        super().__init__(f"training diverged: non-finite {what} {where}{note}")


class Terminated(KeyboardInterrupt):
    """SIGTERM (what a cluster scheduler sends at the end of a job's time), handled as Ctrl-C is:
    interrupted.pt, a partial summary, the lock released; exit code 143."""


def _terminate(signum, frame):
    raise Terminated()


def main_guard(main):
    """Run ``main()``; turn user errors into a one-line message and exit code 2, a diverged run into
    exit code 1, Ctrl-C into 130 and SIGTERM (handled as Ctrl-C) into 143."""
    signal.signal(signal.SIGTERM, _terminate)
    try:
        return main()
    except (UserError, data.DataError, models.CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except Diverged as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt as e:
        terminated = isinstance(e, Terminated)
        print("terminated" if terminated else "interrupted", file=sys.stderr)
        sys.exit(143 if terminated else 130)


def fraction(text):
    """argparse type accepting '0.03', '8/255' or '8 / 255'; nan and inf are refused (they would
    fake results: an attack with a NaN step leaves images untouched)."""
    try:
        if "/" in text:
            num, den = text.split("/")
            value = float(num) / float(den)
        else:
            value = float(text)
    except (ValueError, ZeroDivisionError):
        raise argparse.ArgumentTypeError(f"expected a number or a fraction such as 8/255, got "
                                         f"{text!r}")
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return value


# ------------------------------------------------------------------------- checkpoints for eval.py
def load_for_eval(path, device, eps=None):
    """(model rebuilt from checkpoint ``path`` in eval mode on ``device``, its training flags, eps:
    ``eps`` or else the training epsilon) -- the preamble of eval.py and analyze.py."""
    model = models.load_checkpoint(path).to(device)
    train_args = model.checkpoint.get("args", {})
    if eps is None:
        eps = train_args.get("epsilon", 8 / 255)
        if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not 0 < eps <= 1:
            raise models.CheckpointError(f"checkpoint {path} stores epsilon {eps!r}, not a radius in "
                                         f"(0, 1]; give --eps")
    return model, train_args, float(eps)


def check_outputs_finite(model, x, path, n=256):
    """Refuse (:class:`UserError`) a model whose outputs on the first ``n`` images are not finite:
    every accuracy computed from them would be a number that means nothing."""
    device = next(model.parameters()).device
    with torch.no_grad():
        out = model(x[:n].to(device).float())
    if not torch.isfinite(out).all():
        raise UserError(f"{path}: the model's outputs on test images are not finite (NaN or inf); "
                        f"nothing can be evaluated")


def checkpoint_test_set(model, path, data_dir=None, n_eval=None):
    """(dataset name, x, y): the test split of the dataset a checkpoint was trained on (``model``
    from models.load_checkpoint of ``path``), read from ``data_dir`` or else the training run's
    --data-dir, first ``n_eval`` images (all when None), x as floats in [0, 1].  Used by eval.py and
    analyze.py."""
    train_args = model.checkpoint.get("args", {})
    dataset = model.checkpoint.get("dataset", {}).get("name") or train_args.get("dataset")
    if not isinstance(dataset, str) or dataset not in data.DATASETS:
        raise UserError(f"checkpoint {path} names no known dataset ({dataset!r})")
    if data_dir is None and not dataset.startswith("synthetic"):
        # the training run's folder is a hint only: never created, never downloaded into
        data_dir = train_args.get("data_dir")
        if not isinstance(data_dir, str) or not os.path.isdir(data_dir):
            raise UserError(f"the checkpoint's dataset folder {data_dir!r} is not on this machine; "
                            f"give --data-dir (a folder holding {dataset} or where to download it)")
        x, y = data.load_split(dataset, data_dir, train=False, download=False)
    else:
        x, y = data.load_split(dataset, data_dir, train=False)
    return dataset, x[:n_eval].float().div_(255), y[:n_eval]


# --------------------------------------------------------------------------------------- schedules
LR_SCHEDULES = ("piecewise", "cyclic", "linear", "exponential", "onecycle", "onecycle-half",
                "onecycle-truncated", "triangular", "triangular-decreasing", "cosine", "sgdr",
                "sgdr-decreasing", "linear-restarts", "trapezoid", "constant")
MOMENTUM_SCHEDULES = ("constant", "onecycle")


def _restart_bounds(t, cycles, mult):
    """For t in [0,1]: (the index i of its cycle, its position u in [0,1] inside that cycle) when
    [0,1] is cut into ``cycles`` cycles whose lengths grow by ``mult``."""
    lengths = [mult ** i for i in range(cycles)]
    total, start = sum(lengths), 0.0
    for i, length in enumerate(lengths):
        end = start + length / total
        # the last cycle by position (with mult=1 all lengths are equal)
        if t < end or i == cycles - 1:
            return i, min((t - start) / (end - start), 1.0)
        start = end
    return cycles - 1, 1.0


def lr_at(step, total_steps, schedule, lr_max, cycles=3, mult=1.0, lr_min=None):
    """Learning rate at iteration ``step`` of ``total_steps`` (per-iteration stepping).

    piecewise   lr_max, x0.1 at 50%, x0.01 at 75% (Free AT's "3 steps")
    cyclic      triangle floor -> lr_max at 40% -> floor (the fast-AT default, Wong et al. 2020;
                floor 0)
    linear      lr_max -> floor (0);  exponential: lr_max -> floor (lr_max/1000) geometrically
    onecycle    lr_max/10 -> lr_max (45%) -> lr_max/10 (90%) -> floor (lr_max/1000) (Smith 2018)
    onecycle-half       one cycle lr_max/10 -> lr_max -> lr_max/10 over the first 2/3, then a half-
                        height cycle (peak lr_max/2) annealing to floor (lr_max/1000) (the
                        fast-training thesis's "1 Cycle & Half"; its figure is not in the text, so
                        this is our reading)
    onecycle-truncated  lr_max/10 -> lr_max over 30%, then straight down to floor (lr_max/1000) (the
                        thesis's "1 Cycle truncated": the cycle without its separate annealing tail;
                        our reading)
    triangular  ``cycles`` triangles between floor (lr_max/10) and lr_max (Smith's CLR; the thesis's
                Figure 35)
    triangular-decreasing  the same with the height above the floor halved each cycle (the thesis's
                "decreasing triangular cycles", Figure 37; halving is Smith's triangular2, our
                reading)
    cosine      floor + (lr_max - floor) (1 + cos(pi t)) / 2 (floor 0; Dai et al.: lr_max 0.1, floor
                1e-3)
    sgdr        cosine warm restarts (Loshchilov & Hutter) down to floor (0), ``cycles`` cycles
                growing by ``mult`` (the thesis's Figures 38 and 39 left)
    sgdr-decreasing  the same with each restart's height above the floor halved (the thesis's
                "decreasing warm restarts", Figure 39 right; the factor 1/2 is our reading)
    linear-restarts  linear decay lr_max -> floor (lr_max/1000) restarted ``cycles`` times (growing
                     by mult)
    trapezoid   warm restarts of trapezoidal shape: each cycle holds lr_max for its first half, then
                falls linearly to floor (lr_max/1000) (the thesis lists the shape without a figure;
                our reading)
    constant    lr_max

    ``lr_min`` (--lr-min) replaces each decaying or cycling schedule's floor (its default in
    brackets)."""
    t = min(max(step / max(total_steps, 1), 0.0), 1.0)
    lo = lr_max / 10
    floor = lambda default: default if lr_min is None else lr_min
    if schedule == "piecewise":
        return lr_max * (1.0 if t < 0.5 else 0.1 if t < 0.75 else 0.01)
    if schedule == "cyclic":
        return float(np.interp(t, [0, 0.4, 1], [floor(0), lr_max, floor(0)]))
    if schedule == "linear":
        return floor(0) + (lr_max - floor(0)) * (1 - t)
    if schedule == "exponential":
        return lr_max * (1e-3 if lr_min is None else lr_min / lr_max) ** t
    if schedule == "onecycle":
        return float(np.interp(t, [0, 0.45, 0.9, 1], [lo, lr_max, lo, floor(lr_max / 1000)]))
    if schedule == "onecycle-half":
        return float(np.interp(t, [0, 1 / 3, 2 / 3, 5 / 6, 1],
                               [lo, lr_max, lo, lr_max / 2, floor(lr_max / 1000)]))
    if schedule == "onecycle-truncated":
        return float(np.interp(t, [0, 0.3, 1], [lo, lr_max, floor(lr_max / 1000)]))
    if schedule in ("triangular", "triangular-decreasing"):
        u = (t * cycles) % 1.0 if t < 1 else 1.0
        halvings = min(int(t * cycles), cycles - 1) if schedule == "triangular-decreasing" else 0
        height = (lr_max - floor(lo)) * 0.5 ** halvings
        return floor(lo) + height * (1 - abs(2 * u - 1))
    if schedule == "cosine":
        return floor(0) + (lr_max - floor(0)) * (1 + math.cos(math.pi * t)) / 2
    if schedule in ("sgdr", "sgdr-decreasing"):
        i, u = _restart_bounds(t, cycles, mult)
        height = (lr_max - floor(0)) * (0.5 ** i if schedule == "sgdr-decreasing" else 1)
        return floor(0) + height * (1 + math.cos(math.pi * u)) / 2
    if schedule == "linear-restarts":
        _, u = _restart_bounds(t, cycles, mult)
        return lr_max + (floor(lr_max / 1000) - lr_max) * u
    if schedule == "trapezoid":
        _, u = _restart_bounds(t, cycles, mult)
        return lr_max + (floor(lr_max / 1000) - lr_max) * max(0.0, 2 * u - 1)
    if schedule == "constant":
        return lr_max
    raise ValueError(f"unknown lr schedule {schedule!r}; choose from {', '.join(LR_SCHEDULES)}")


def momentum_at(step, total_steps, schedule, momentum=0.9, high=0.95, low=0.85):
    """Momentum at ``step``: constant, or 'onecycle' (0.95 -> 0.85 at 45% -> 0.95 at 90%, then
    0.95), moving opposite to the onecycle learning rate."""
    if schedule == "constant":
        return momentum
    if schedule == "onecycle":
        t = min(max(step / max(total_steps, 1), 0.0), 1.0)
        return float(np.interp(t, [0, 0.45, 0.9, 1], [high, low, high, high]))
    raise ValueError(f"unknown momentum schedule {schedule!r}; choose from "
                     f"{', '.join(MOMENTUM_SCHEDULES)}")



def set_lr(opt, lr, momentum):
    """Put a learning rate (times the group's ``lr_mult``, --act-lr-mult) and momentum into every
    parameter group of ``opt``."""
    for group in opt.param_groups:
        group["lr"], group["momentum"] = lr * group.get("lr_mult", 1.0), momentum


def lr_schedule(args, total_steps):
    """(learning rates, momenta): one value per optimiser step of the run (--lr-schedule, --lr-max,
    --lr-min, --lr-cycles, --lr-mult, --momentum-schedule), computed once at set-up; the loop sets
    entry ``it`` before step ``it``."""
    steps = range(total_steps)
    lrs = [lr_at(i, total_steps, args.lr_schedule, args.lr_max, args.lr_cycles, args.lr_mult,
                 args.lr_min) for i in steps]
    return lrs, [momentum_at(i, total_steps, args.momentum_schedule, args.momentum) for i in steps]


# ------------------------------------------------------------------------------------------- flags
class Parser(argparse.ArgumentParser):
    """ArgumentParser whose errors are one line (no usage dump): ``prog: error: ... (see
    --help)``."""

    def error(self, message):
        print(f"{self.prog}: error: {message} (see --help)", file=sys.stderr)
        sys.exit(2)


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """--help 100 characters wide whatever the terminal, help texts from column 26, each default
    shown once (not for flags that are off or whose help already says it)."""

    def __init__(self, prog):
        super().__init__(prog, max_help_position=26, width=100)

    def _get_help_string(self, action):
        if action.default in (None, False, argparse.SUPPRESS) or "default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


def parser(description):
    """A training script's parser: a one-line usage (the groups below list every flag), defaults
    shown."""
    return Parser(description=description, formatter_class=HelpFormatter,
                  usage="%(prog)s [flags]   (the regime's own flags first, then the shared ones)")


def add_shared_flags(p, **defaults):
    """The flags every training script shares, in --help groups after the script's own; ``defaults``
    override per regime."""
    g = p.add_argument_group("data and model (shared)")
    g.add_argument("--dataset", default="cifar10", choices=list(data.DATASETS), metavar="NAME",
                   help=f"{', '.join(data.DATASETS)}")
    g.add_argument("--data-dir", default="./data",
                   help="dataset folder (torchvision layout, or raw IDX .gz files for "
                        "(fashion)mnist)")
    g.add_argument("--model", default="preactresnet18", choices=models.ARCH_NAMES, metavar="ARCH",
                   help=f"{', '.join(models.ARCH_NAMES)}")
    g.add_argument("--act", default="relu", choices=activations.NAMES,
                   help="activation used everywhere in the model")
    g.add_argument("--act-scope", default=None, choices=activations.SCOPES,
                   help="parameter sharing of trainable activations (default: the paper's: network "
                        "for prelu/psilu/psoftplus/pssilu, channel for kaf)")
    g.add_argument("--saf-insert", default=None, choices=models.SAF_UNITS,
                   help="Zhao & Griffin: symmetric unit after each conv / hidden fc (overrides "
                        "--act)")
    g.add_argument("--kaf-size", type=int, default=None, help="KAF dictionary size D (default 20)")
    g.add_argument("--kaf-boundary", type=float, default=None,
                   help="KAF dictionary range [-B, B] (default 3)")
    g.add_argument("--kaf-init", default=None, choices=["elu", "random"],
                   help="KAF init (default elu: kernel ridge regression fit)")
    g.add_argument("--kaf-gamma", default=None, choices=["paper", "code"],
                   help="KAF bandwidth 1/(6 D^2) (paper, default) or 1/(8 D^2) (reference code)")
    g.add_argument("--kaf-kernel", default=None, choices=list(activations.KAF_KERNELS),
                   help="KAF kernel (default gaussian; relu and softplus are the reference code's "
                        "other kernels)")
    g.add_argument("--kaf-impl", default=None, choices=list(activations.KAF_IMPLS),
                   help="how KAF is computed, same result (default auto: fused Triton kernels on a "
                        "GPU, else a loop over the kernels)")
    g.add_argument("--softplus-beta", type=float, default=None,
                   help="softplus beta (default 1; SAT also uses 10)")
    g.add_argument("--kwta-gamma", type=float, default=None,
                   help="k-WTA share of kept units (default 0.1)")
    g.add_argument("--n-train", type=int, default=None, help="use only the first N training images")
    g = p.add_argument_group("trainable activations (shared)")
    g.add_argument("--act-init", default=None, metavar="a=A,b=B",
                   help="initial parameters: a for prelu / psilu / psoftplus / pssilu, b (the "
                        "shift beta) for pssilu, e.g. a=1.5,b=0.3 (or a=1.5:b=0.3)")
    g.add_argument("--freeze-act", action="store_true",
                   help="keep the activation's parameters at their initial values (e.g. SSiLU with "
                        "a fixed beta)")
    g.add_argument("--act-weight-decay", type=float, default=None,
                   help="weight decay of the activations' parameters (default: --weight-decay, as "
                        "Dai et al.)")
    g.add_argument("--act-lr-mult", type=float, default=1.0,
                   help="learning-rate multiplier of the activations' parameters")
    g.add_argument("--pssilu-reg", type=float, default=10.0,
                   help="PSSiLU: weight of Dai et al.'s L1 penalty on the shift beta (their "
                        "default 10; 0 = off)")
    g.add_argument("--pssilu-beta-clip", type=float, default=None,
                   help="PSSiLU: clip its shift's gradient norm to this each step (default Dai "
                        "et al.'s: 0.01, 0.1 with TRADES; 0 = off)")
    g = p.add_argument_group("optimisation (shared)")
    g.add_argument("--epochs", type=int, default=15, help="training epochs")
    g.add_argument("--batch-size", type=int, default=128, help="the global minibatch size")
    g.add_argument("--lr-schedule", default="cyclic", choices=LR_SCHEDULES,
                   help="the LR set every iteration (shapes in utils.lr_at)")
    g.add_argument("--lr-max", type=float, default=0.2, help="the schedule's peak learning rate")
    g.add_argument("--lr-cycles", type=int, default=3,
                   help="cycles of triangular / sgdr / linear-restarts")
    g.add_argument("--lr-mult", type=float, default=1.0,
                   help="cycle-length multiplier of sgdr / linear-restarts")
    g.add_argument("--momentum", type=float, default=0.9, help="SGD momentum")
    g.add_argument("--nesterov", action="store_true", help="Nesterov momentum (Dai et al.)")
    g.add_argument("--lr-min", type=float, default=None,
                   help="floor of the decaying and cycling schedules (default: each schedule's "
                        "own, see utils.lr_at)")
    g.add_argument("--momentum-schedule", default="constant", choices=MOMENTUM_SCHEDULES,
                   help="onecycle: 0.95 -> 0.85 -> 0.95, against the LR")
    g.add_argument("--weight-decay", type=float, default=5e-4, help="SGD weight decay")
    g.add_argument("--grad-clip", type=float, default=0.0,
                   help="clip the gradient norm to this (0 = off)")
    g = p.add_argument_group("adversary (shared)")
    g.add_argument("--epsilon", type=fraction, default=8 / 255,
                   help="L-inf radius, e.g. 8/255 or 0.1 (default 8/255)")
    g = p.add_argument_group("evaluation (shared)")
    g.add_argument("--eval-pgd-steps", type=int, default=20, help="PGD steps of the final evaluation")
    g.add_argument("--eval-pgd-restarts", type=int, default=1, help="PGD restarts of the final evaluation")
    g.add_argument("--eval-pgd-alpha", type=fraction, default=None,
                   help="PGD step for the final evaluation (default eps/4, i.e. 2/255 at 8/255)")
    g.add_argument("--n-eval", type=int, default=None,
                   help="evaluate on the first N test images (default: all)")
    g.add_argument("--eval-every", type=int, default=0, metavar="N",
                   help="every N optimiser steps: clean and PGD-10 accuracy on the first "
                        "--eval-every-images test images -> summary.json 'curve'")
    g.add_argument("--eval-every-images", type=int, default=500,
                   help="test images of the --eval-every probe")
    g.add_argument("--co-guard", type=float, default=0.2,
                   help="catastrophic-overfitting guard: stop and restore the best weights when "
                        "the probe's PGD accuracy drops by more than this (0 = off)")
    g.add_argument("--co-probe-images", type=int, default=512, metavar="N",
                   help="fixed training images of the guard's PGD-10 probe at each epoch's end "
                        "(default 512; a tiny run spends most of its time there)")
    g.add_argument("--co-guard-relative", type=float, default=0.0, metavar="F",
                   help="the guard also fires when the probe's PGD accuracy falls below F x the best "
                        "epoch's (0 = off)")
    g.add_argument("--co-fgsm-margin", type=float, default=0.02,
                   help="the guard also fires when the probe's FGSM accuracy exceeds its clean one by more "
                        "than this (< 0: off)")
    g.add_argument("--co-action", default="stop", choices=["stop", "recover"],
                   help="when the guard fires: stop with the best weights, or roll back to them and go on "
                        "with the attack step halved (see end_epoch)")
    g.add_argument("--co-max-recoveries", type=int, default=3,
                   help="recoveries before the guard stops the run after all (--co-action recover)")
    g.add_argument("--label-smoothing", type=float, default=0.0,
                   help="label smoothing of the training loss and attack (FastAT benchmark: 0.4)")
    g.add_argument("--ema", type=float, default=0.0, metavar="TAU",
                   help="weight averaging: ema = tau ema + (1 - tau) w per step (0 = off; the "
                        "benchmark's 0.9995 is for 40k steps)")
    g = p.add_argument_group("run (shared)")
    g.add_argument("--device", default=DEFAULT_DEVICE, help="cuda, cuda:N or cpu")
    g.add_argument("--amp", default="auto", choices=["auto", "bf16", "fp16", "off"],
                   help="mixed precision on CUDA (auto: bf16 where supported, else fp16 with a "
                        "loss scaler); off on CPU")
    g.add_argument("--channels-last", type=int, default=1, choices=[0, 1],
                   help="channels_last memory format on CUDA")
    g.add_argument("--compile", action="store_true", help="torch.compile the model")
    g.add_argument("--seed", type=int, default=0, help="seeds every random number generator")
    g.add_argument("--out-dir", default=None,
                   help="where the checkpoint and summary.json go (default runs/<script>_<dataset>_"
                        "<model>_<act>)")
    g.add_argument("--resume", action="store_true",
                   help="continue from <out-dir>/checkpoint.pt (written every epoch with the "
                        "optimiser, RNG and loop state); fresh if none")
    g.add_argument("--overwrite", action="store_true",
                   help="start afresh in an --out-dir that holds another run's checkpoint.pt (its "
                        "checkpoints, summary and eval files are deleted)")
    p.set_defaults(**defaults)
    return p


def parse_args(parser, argv=None, checks=()):
    """Parse and validate the shared flags, and with each function of ``checks`` (args -> list of
    problems) those of other modules; any problem becomes a one-line ``error: ...`` and exit code
    2."""
    args = parser.parse_args(argv)
    problems = number_problems(args)
    if not 0 < args.epsilon <= 1:
        problems.append(f"--epsilon must be in (0, 1] (images are in [0, 1]), got {args.epsilon}")
    for name in ("epochs", "batch_size", "eval_pgd_steps", "eval_pgd_restarts", "lr_cycles"):
        if getattr(args, name) < 1:
            problems.append(f"--{name.replace('_', '-')} must be >= 1")
    if args.batch_size == 1:
        problems.append("--batch-size must be >= 2: BatchNorm cannot train on one image")
    if args.lr_max <= 0:
        problems.append("--lr-max must be > 0")
    for name in ("n_train", "n_eval"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            problems.append(f"--{name.replace('_', '-')} must be >= 1")
    if args.eval_every < 0 or args.eval_every_images < 1:
        problems.append("--eval-every must be >= 0 and --eval-every-images >= 1")
    if args.lr_min is not None and not 0 <= args.lr_min < args.lr_max:
        problems.append("--lr-min must be in [0, --lr-max)")
    if args.nesterov and args.momentum <= 0:
        problems.append("--nesterov needs --momentum > 0")
    if args.eval_pgd_alpha is not None and args.eval_pgd_alpha <= 0:  # a step of 0 fakes robustness
        problems.append(f"--eval-pgd-alpha must be > 0, got {args.eval_pgd_alpha}")
    if args.co_max_recoveries < 0 or args.co_probe_images < 1:
        problems.append("--co-max-recoveries must be >= 0 and --co-probe-images >= 1")
    if not 0 <= args.label_smoothing < 1 or not 0 <= args.ema < 1:
        problems.append("--label-smoothing and --ema must be in [0, 1)")
    if not 0 <= args.co_guard_relative < 1:
        problems.append("--co-guard-relative must be in [0, 1)")
    if min(args.momentum, args.weight_decay, args.grad_clip, args.co_guard) < 0 or args.lr_mult <= 0:
        problems.append("--momentum, --weight-decay, --grad-clip and --co-guard must be >= 0, "
                        "--lr-mult > 0")
    if min(args.pssilu_reg, args.act_lr_mult, args.act_weight_decay or 0,
           args.pssilu_beta_clip or 0) < 0:
        problems.append("--pssilu-reg, --pssilu-beta-clip, --act-lr-mult and --act-weight-decay "
                        "must be >= 0")
    for check in checks:
        problems += check(args)
    if device_problem(args.device):
        problems.append(device_problem(args.device))
    if args.resume and args.overwrite:
        problems.append("--resume and --overwrite cannot be combined (continue the run, or replace "
                        "it)")
    # its ridge fit solves a D x D system per layer
    if args.kaf_size is not None and args.kaf_size > KAF_MAX_SIZE:
        problems.append(f"--kaf-size must be <= {KAF_MAX_SIZE}, got {args.kaf_size}")
    interpreted = os.environ.get("TRITON_INTERPRET") == "1"
    if args.kaf_impl == "triton" and not args.device.startswith("cuda") and not interpreted:
        problems.append("--kaf-impl triton runs on CUDA only (or under TRITON_INTERPRET=1, slowly)")
    if problems:  # before the activation is built: a bad --kaf-size would allocate first
        parser.error("; ".join(problems))
    try:
        activations.make_factory(args.act, args.act_scope, **act_options(args))
    except ValueError as e:
        parser.error(str(e))
    return args


# beyond, the ridge initialisation (a D x D solve per layer) takes minutes to hours
KAF_MAX_SIZE = 1000

# flag dest -> (the activation it belongs to, its constructor option)
ACT_OPTION_FLAGS = {"kaf_size": ("kaf", "size"), "kaf_boundary": ("kaf", "boundary"),
                    "kaf_init": ("kaf", "init"), "kaf_gamma": ("kaf", "gamma_rule"),
                    "kaf_kernel": ("kaf", "kernel"), "kaf_impl": ("kaf", "impl"),
                    "softplus_beta": ("softplus", "beta"), "kwta_gamma": ("kwta", "gamma")}


# --act-init key -> the constructor option it sets, per activation
ACT_INIT_KEYS = {"prelu": {"a": "init"}, "psilu": {"a": "init"}, "psoftplus": {"a": "init"},
                 "pssilu": {"a": "init_a", "b": "init_b"}}


def act_options(args):
    """Activation constructor options from the flags; an option for another activation is
    refused."""
    options = {}
    if getattr(args, "act_init", None):
        keys = ACT_INIT_KEYS.get(args.act)
        if keys is None:
            raise ValueError(f"--act-init applies to --act {', '.join(ACT_INIT_KEYS)}, not --act "
                             f"{args.act}")
        for item in args.act_init.replace(":", ",").split(","):  # a=1:b=0.3 in run_all.sh cells
            key, _, value = item.partition("=")
            try:
                options[keys[key.strip()]] = float(value)
            except (KeyError, ValueError):
                wanted = ",".join(k + "=NUMBER" for k in keys)
                raise ValueError(f"--act-init {args.act_init!r}: expected {wanted} for --act "
                                 f"{args.act}") from None
    for flag, (act, key) in ACT_OPTION_FLAGS.items():
        value = getattr(args, flag, None)
        if value is None:
            continue
        if act != args.act:
            raise ValueError(f"--{flag.replace('_', '-')} applies to --act {act}, not --act "
                             f"{args.act}")
        options[key] = value
    return options



# ---------------------------------------------------------------------------------------- processes
def distributed_setup(args):
    """(rank, world size).  Under ``torchrun --nproc_per_node=N`` (WORLD_SIZE > 1) this joins the
    process group -- NCCL with one GPU per process, gloo on CPU -- and points ``args.device`` at
    this rank's GPU; --batch-size stays the global batch, split evenly over the processes.
    Without torchrun: (0, 1) and nothing else happens."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if args.batch_size % world:
        raise UserError(f"--batch-size {args.batch_size} must be divisible by the {world} "
                        f"processes")
    backend = "gloo"
    if args.device.startswith("cuda"):
        torch.cuda.set_device(local)
        args.device, backend = f"cuda:{local}", "nccl"
    if not torch.distributed.is_initialized():
        torch.distributed.init_process_group(backend)
        atexit.register(torch.distributed.destroy_process_group)
    return rank, world


def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def amp_dtype_for(device_type, flag, bf16_supported):
    """(autocast dtype or None, whether a loss scaler is needed) for ``--amp flag`` on a device
    type: float32 (None) on CPU or with 'off'; 'auto' picks bf16 where ``bf16_supported``, else
    fp16, and only fp16 needs the scaler (its range is too small for unscaled gradients)."""
    if device_type != "cuda" or flag == "off":
        return None, False
    if flag == "auto":
        flag = "bf16" if bf16_supported else "fp16"
    return {"bf16": torch.bfloat16, "fp16": torch.float16}[flag], flag == "fp16"




# ------------------------------------------------------------------------------------------ set-up
def run_name(args):
    """The activation as a run is named: the SAF-insert unit (e.g. 'rbf-insert') or --act."""
    return models.act_label(args.act, args.saf_insert)


def lock_out_dir(out_dir):
    """Take <out_dir>/.lock (this process's PID and host) so that a second process cannot train into
    the same folder; released by :func:`release_out_dir` or at exit.  A lock left by a dead process
    on this host (kill -9) is taken over; a live one is a :class:`UserError`."""
    path, me = os.path.join(out_dir, ".lock"), f"{os.getpid()} {socket.gethostname()}"
    for _ in range(3):
        tmp = f"{path}.{os.getpid()}.tmp"
        with open(tmp, "w") as f:
            f.write(me + "\n")
        try:
            os.link(tmp, path)  # atomic: the lock appears with its content, or not at all
        except FileExistsError:
            try:
                holder = open(path).read().strip()
            except FileNotFoundError:  # released meanwhile
                continue
            pid, _, host = holder.partition(" ")
            if holder == me:  # this process already holds it (a second run in the same process)
                return path
            if host != socket.gethostname() or not pid.isdigit() or _alive(int(pid)):
                raise UserError(f"--out-dir {out_dir} is in use by process {pid or '?'} on "
                                f"{host or '?'} ({path}); "
                                f"wait for it, use another --out-dir, or delete {path} if that "
                                "process is gone")
            try:  # a stale lock: its process is dead
                os.remove(path)
            except FileNotFoundError:
                pass
            continue
        finally:
            os.remove(tmp)
        atexit.register(release_out_dir, out_dir)
        return path
    raise UserError(f"could not take the lock {path}; try again")


def _alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def release_out_dir(out_dir):
    """Remove <out_dir>/.lock if this process holds it."""
    path = os.path.join(out_dir, ".lock")
    try:
        if open(path).read().strip() == f"{os.getpid()} {socket.gethostname()}":
            os.remove(path)
    except OSError:
        pass


def prepare_out_dir(args, script, rank):
    """The run's folder (--out-dir or runs/<script>_<dataset>_<model>_<act>), created and checked
    before any work: a file or an unwritable folder is a :class:`UserError`; rank 0 takes its lock
    (:func:`lock_out_dir`); a folder holding another run's checkpoint.pt is refused unless --resume
    continues it or --overwrite replaces it (then its checkpoints, summary.json and eval files are
    deleted first, so that no old result stays beside the new run)."""
    name = f"{script}_{args.dataset}_{args.model}_{run_name(args)}"
    out_dir = args.out_dir or os.path.join("runs", name)
    check_writable_dir(out_dir, "--out-dir")
    for name in ("checkpoint.pt", "interrupted.pt", "summary.json"):  # written at the end: check now
        if os.path.isdir(os.path.join(out_dir, name)):
            raise UserError(f"--out-dir {out_dir}: {name} there is a folder; remove it or use another "
                            f"--out-dir")
    if rank == 0:
        lock_out_dir(out_dir)
    continues = args.resume or args.overwrite or getattr(args, "lr_find", False)
    if os.path.exists(os.path.join(out_dir, "checkpoint.pt")) and not continues:
        raise UserError(f"--out-dir {out_dir} holds another run's checkpoint.pt; continue it with "
                        "--resume, "
                        f"replace it with --overwrite, or use another --out-dir")
    if args.overwrite and rank == 0:
        for name in sorted(os.listdir(out_dir)):
            evaluation = name.startswith("eval") and name.endswith((".json", ".png"))
            if name in ("checkpoint.pt", "interrupted.pt", "summary.json") or evaluation:
                os.remove(os.path.join(out_dir, name))
    return out_dir


def setup(args, script, arrays=None):
    """Everything a training run needs before its loop, as a plain namespace ``run``:

    script, rank, world  the script's name; this process's place under torchrun ((0, 1) without it)
    device, out_dir      the device, and the folder of checkpoint.pt / summary.json (created)
    batches              the training minibatches (:class:`Batches`: uint8 data on the device, this
                         rank's shard)
    x_test, y_test       the test set (the first --n-eval images) as floats in [0, 1] on the device
    x_held, y_held       --co-probe-images (512) fixed training images: the catastrophic-overfitting
                         guard's PGD probe
    model                models.build's model (normalises inside, takes [0, 1] images)
    forward              what the training loss calls: the model, its DDP wrapper under torchrun,
                         compiled with --compile
    attack_forward       what attacks call: the bare (compiled) model -- they need input gradients
                         only
    opt, scaler          SGD, the activations' own parameters in a group of their own decayed at
                         --act-weight-decay (default --weight-decay: Dai et al.'s train.py builds
                         one SGD over model.parameters() with weight decay, so their PAF parameters
                         are decayed too), and the fp16 loss scaler (disabled unless --amp gives
                         fp16)
    amp_dtype, amp       the mixed-precision dtype (None: float32) and its context, made once here
                         and entered as ``with run.amp:`` (nanoGPT's ``ctx``): autocast, or a no-op
                         in float32
    channels_last        whether model and batches are channels_last (CUDA only)
    pssilu_reg           Dai et al.'s L1 penalty weight on PSSiLU's shift (0.0 unless --act pssilu
                         trains it)
    shift_params         PSSiLU's shift parameters whose gradient norm each step clips to
                         --pssilu-beta-clip (default Dai et al.'s 0.01; train_pgd's TRADES sets
                         0.1), [] for every other run

    Seeds every RNG with --seed first, the same on every rank (Batches relies on it for disjoint
    shards).  ``arrays`` = (x_train, y_train, x_test, y_test), uint8 images and int64 labels,
              replaces
    loading --dataset (bench.py passes synthetic data of the dataset's shape)."""
    rank, world = distributed_setup(args)
    # writable, locked, no other run's checkpoint: before any work
    out_dir = prepare_out_dir(args, script, rank)
    seed_everything(args.seed)
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    if cuda:
        torch.backends.cudnn.benchmark = True
    # ---- data: uint8 on the device, converted batch by batch
    channels, size, classes, mean, std, augment = data.DATASETS[args.dataset]
    if arrays is None:
        arrays = (*data.load_split(args.dataset, args.data_dir, train=True),
                  *data.load_split(args.dataset, args.data_dir, train=False))
    x_train, y_train, x_test, y_test = arrays
    if args.n_train:
        x_train, y_train = x_train[:args.n_train], y_train[:args.n_train]
    if args.n_eval:
        x_test, y_test = x_test[:args.n_eval], y_test[:args.n_eval]
    if len(x_train) < 2:  # a last batch of one image is dropped (BatchNorm): nothing would train
        raise UserError(f"{len(x_train)} training image(s) (--n-train or the data): at least 2 are needed")
    channels_last = cuda and bool(args.channels_last)
    batches = data.Batches(x_train.to(device), y_train.to(device), args.batch_size // world, shuffle=True,
                           augment=augment, channels_last=channels_last, rank=rank, world=world)
    held = torch.randperm(len(x_train), generator=torch.Generator().manual_seed(args.seed + 1))
    held = held[:min(args.co_probe_images, len(x_train))]
    # ---- model; attacks need input gradients only: the bare model; the training loss: the DDP one
    model = models.build(args.model, args.act, classes, channels, size, mean, std, args.act_scope,
                         act_options(args), args.saf_insert).to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    attack_forward = forward = torch.compile(model) if args.compile else model
    if world > 1:
        ddp = torch.nn.parallel.DistributedDataParallel(model,
                                                        device_ids=[device.index] if cuda else None)
        forward = torch.compile(ddp) if args.compile else ddp
    # ---- SGD; the activations' own parameters in a group of their own (--act-weight-decay,
    # --act-lr-mult, --freeze-act)
    act_params = {id(p): p for m in activations.activation_modules(model) for p in m.parameters()}
    for p in act_params.values():
        p.requires_grad_(not args.freeze_act)
    act_decay = args.weight_decay if args.act_weight_decay is None else args.act_weight_decay
    others = [p for p in model.parameters() if id(p) not in act_params]
    opt = torch.optim.SGD([{"params": others, "weight_decay": args.weight_decay},
                           {"params": list(act_params.values()), "weight_decay": act_decay,
                            "lr_mult": args.act_lr_mult}],
                          lr=0.0, momentum=args.momentum, nesterov=args.nesterov)
    # ---- mixed precision: bf16 where supported, else fp16 with a loss scaler; float32 on CPU
    amp_dtype, fp16 = amp_dtype_for(device.type, args.amp, cuda and torch.cuda.is_bf16_supported())
    run = argparse.Namespace(
        script=script, rank=rank, world=world, device=device, out_dir=out_dir, batches=batches,
        x_test=x_test.to(device).float().div_(255), y_test=y_test.to(device),
        x_held=x_train[held].to(device).float().div_(255), y_held=y_train[held].to(device),
        model=model, forward=forward, attack_forward=attack_forward, opt=opt,
        scaler=torch.amp.GradScaler("cuda", enabled=fp16), amp_dtype=amp_dtype,
        channels_last=channels_last)
    run.amp = torch.autocast(device.type, dtype=amp_dtype) if amp_dtype else contextlib.nullcontext()
    run.label_smoothing = args.label_smoothing  # of the training loss and of the training attack
    run.attack_step_scale = 1.0  # halved by each recovery from catastrophic overfitting
    pssilu = args.act == "pssilu" and not args.freeze_act  # PSSiLU-only work is set up here, once
    run.pssilu_reg = args.pssilu_reg if pssilu else 0.0
    clip = args.pssilu_beta_clip
    clip = activations.PSSILU_SHIFT_GRAD_CLIP if clip is None else clip
    run.shift_params = activations.pssilu_shift_parameters(model) if pssilu and clip > 0 else []
    run.shift_clip = clip
    return run


def log(run, message, error=False):
    """Print on rank 0 only."""
    if run.rank == 0:
        print(message, file=sys.stderr if error else sys.stdout, flush=True)


# ---------------------------------------------------------------------------------- during training
def progress(run, iterable, desc):
    """The progress bar of a loop (rank 0 only; a silent iterator without tqdm)."""
    return tqdm(iterable, desc=desc, leave=False, dynamic_ncols=True, disable=run.rank != 0)


def epoch_result(run, loss_sum, correct, seen):
    """(mean loss, accuracy) of an epoch from the loop's device sums; under DDP over all ranks."""
    if run.device.type == "cuda":
        torch.cuda.synchronize()
    if run.world > 1:
        totals = torch.stack([loss_sum, correct.float(),
                              torch.tensor(float(seen), device=run.device)])
        torch.distributed.all_reduce(totals)
        loss_sum, correct, seen = totals[0], totals[1], totals[2].item()
    return loss_sum.item() / seen, correct.item() / seen


def sync_buffers(run):
    """DDP averages gradients but each rank's BatchNorm statistics drift apart: take rank 0's."""
    if run.world > 1:
        for b in run.model.buffers():
            torch.distributed.broadcast(b, 0)


def check_weights_finite(run, epoch, label="epoch"):
    """Raise Diverged when a weight or buffer is NaN or inf at the end of an epoch.  The batch loop
    sees only the loss (and the gradient norm with --grad-clip): a BatchNorm's running variance can
    overflow while its train-mode output, normalised by the batch's own statistics, keeps the loss
    finite (a KAF resnet20 from random coefficients does, RESULTS.md), and the evaluation would then
    score a model whose every output is NaN.  One host sync per epoch."""
    if not (bad := models.non_finite_tensors(run.model.state_dict())):
        return
    raise Diverged(epoch, 0, len(run.batches), label,
                   what=f"weights (NaN or inf in {', '.join(bad[:3])}{', ...' if len(bad) > 3 else ''})")


def held_out_pgd(run, eps):
    """PGD-10 accuracy on the guard probe's fixed training images (--co-probe-images),
    rank 0's value on every rank so that all take the same decision."""
    attack = lambda m, x, y: attacks.pgd(m, x, y, eps, eps / 4, 10)
    acc = attacks.robust_accuracy(run.model, run.x_held, run.y_held, attack)[0]
    if run.world > 1:
        t = torch.tensor(acc, device=run.device)
        torch.distributed.broadcast(t, 0)
        acc = t.item()
    return acc


def held_out_clean_fgsm(run, eps):
    """(clean, FGSM) accuracy on the guard probe's images: FGSM above clean is the classic sign of
    catastrophic overfitting (Wong et al. 2020; Kurakin et al.'s label leaking), one attack's cost.
    Rank 0's values on every rank."""
    clean = attacks.robust_accuracy(run.model, run.x_held, run.y_held)[0]
    fgsm = attacks.robust_accuracy(run.model, run.x_held, run.y_held,
                                   lambda m, x, y: attacks.fgsm(m, x, y, eps))[0]
    if run.world > 1:
        t = torch.tensor([clean, fgsm], device=run.device)
        torch.distributed.broadcast(t, 0)
        clean, fgsm = t.tolist()
    return clean, fgsm


def overfitting_rule(held, clean, fgsm, best, args):
    """Which sign of catastrophic overfitting the epoch shows, or None: 'pgd_drop' (the probe's PGD
    accuracy more than --co-guard below the best epoch's), 'pgd_relative_drop' (below
    --co-guard-relative times the best epoch's: at a best probe under --co-guard an absolute drop
    cannot happen) or 'fgsm_above_clean' (the probe's FGSM accuracy more than --co-fgsm-margin above
    clean accuracy, which a collapse shows even when the PGD probe was never high).  All only while
    the guard is on (--co-guard > 0)."""
    if args.co_guard <= 0:
        return None
    if collapsed(held, best, args.co_guard):
        return "pgd_drop"
    if args.co_guard_relative > 0 and best is not None and held < args.co_guard_relative * best["held_pgd_acc"]:
        return "pgd_relative_drop"
    if fgsm is not None and fgsm > clean + args.co_fgsm_margin:
        return "fgsm_above_clean"
    return None


def update_ema(ema, model, tau):
    """ema = tau ema + (1 - tau) state, entry by entry over the model's whole state, BatchNorm's
    running statistics included, as the FastAT benchmark averages (integer counters are copied)."""
    with torch.no_grad():
        for k, v in model.state_dict().items():
            if v.is_floating_point():
                ema[k].mul_(tau).add_(v, alpha=1 - tau)
            else:
                ema[k].copy_(v)


def probe(run, args, it, lr):
    """Clean and PGD-10 (step eps/4) accuracy on the first --eval-every-images test images after
    optimiser step ``it``, for accuracy-over-iterations curves.  It leaves the training trajectory
    as it was: the RNG states are restored afterwards and the model goes back to train mode."""
    n, eps = args.eval_every_images, args.epsilon
    with torch.random.fork_rng(devices=[run.device] if run.device.type == "cuda" else []):
        clean = attacks.robust_accuracy(run.model, run.x_test[:n], run.y_test[:n])[0]
        robust = attacks.robust_accuracy(run.model, run.x_test[:n], run.y_test[:n],
                                         lambda m, x, y: attacks.pgd(m, x, y, eps, eps / 4, 10))[0]
    run.model.train()
    return dict(iteration=it, lr=lr, clean_acc=clean, pgd_acc=robust)


def recover_from_overfitting(run, state, event):
    """--co-action recover, after end_epoch restored the best epoch's weights (when there was one):
    the optimiser's momentum is dropped (it points along the path into the collapse), the weight
    average restarts at the restored weights, Free's perturbation restarts at 0, and the training
    attack's step is halved from here on (``run.attack_step_scale``; the event is appended to
    state['recoveries']).  Why the step: catastrophic overfitting sets in as the single-step
    attack's step grows relative to eps (Wong et al. 2020, Table 1: FGSM-RS at 8/255 robust with a
    step of 10/255, collapsed with 16/255; Kim et al. 2021 trace it to training only on the
    full-step point of the attack direction), while the epoch budget and LR schedule run on
    unchanged, so the run trains through the collapse instead of ending at it (Li et al. 2020,
    "Towards understanding fast adversarial training": the ability to recover is what makes fast AT
    work).  A reading of the literature, not a recipe from one paper."""
    run.opt.state.clear()
    if state.get("ema") is not None:
        for k, v in run.model.state_dict().items():
            state["ema"][k].copy_(v)
    if torch.is_tensor(state.get("delta")):
        state["delta"].zero_()
    state["recoveries"].append(dict(event))
    run.attack_step_scale = attack_step_scale(state)  # counts the recovery just recorded
    state["recoveries"][-1]["attack_step_scale"] = run.attack_step_scale


def collapsed(held, best, co_guard):
    """The catastrophic-overfitting guard: the probe's PGD accuracy fell by more than ``co_guard``
    below the best epoch's (``best`` = {epoch, held_pgd_acc, model_state} or None)."""
    return co_guard > 0 and best is not None and held < best["held_pgd_acc"] - co_guard


def new_state(run, args, passes, **extra):
    """What the loop carries, saved whole in every checkpoint and restored whole by --resume: epoch
    (completed), iteration (optimiser steps), history (a row per epoch), best (the guard's best
    epoch and its weights), guard (its record once it stopped the run), curve (the --eval-every
    probes), train_time_s, and the regime's own entries (``extra``: Free's delta, PGD's attack
    steps)."""
    state = dict(epoch=0, iteration=0, history=[], best=None, guard=None, curve=[], train_time_s=0.0,
                 **extra)
    if args.ema > 0:  # weight averaging: starts at the initial weights
        state["ema"] = {k: v.detach().clone() for k, v in run.model.state_dict().items()}
    if args.co_action == "recover":  # the guard's recoveries, one record each
        state["recoveries"] = []
    if args.resume and (ckpt := load_for_resume(run, args, passes)):
        state.update((k, ckpt[k]) for k in state)
    run.attack_step_scale = attack_step_scale(state)
    return state


def attack_step_scale(state):
    """The factor on the training attack's step: halved by each recovery from catastrophic
    overfitting (1 without one)."""
    return 0.5 ** len(state.get("recoveries", []))


def end_epoch(run, args, state, train_loss, train_acc, lr, seconds, label="epoch"):
    """The epoch-end block every regime shares: the guard probe, the history row and log
    line, the catastrophic-overfitting guard (back to the best epoch's weights, stop), the best
    weights and the checkpoint.  Returns True when the guard stopped the run."""
    state["train_time_s"] += seconds
    sync_buffers(run)
    check_weights_finite(run, state["epoch"] + 1, label)
    held = held_out_pgd(run, args.epsilon)
    clean = fgsm = None
    if args.co_guard > 0 and args.co_fgsm_margin >= 0:
        clean, fgsm = held_out_clean_fgsm(run, args.epsilon)
    epoch = state["epoch"] + 1
    state["history"].append(dict(epoch=epoch, train_loss=train_loss, train_acc=train_acc,
                                 held_pgd_acc=held, held_clean_acc=clean, held_fgsm_acc=fgsm, lr=lr,
                                 time_s=round(state["train_time_s"], 2)))
    state["epoch"] = epoch
    log(run, f"{label} {epoch:3d}  loss {train_loss:.4f}  acc {train_acc:.4f}  probe PGD-10 acc "
             f"{held:.4f}  lr {lr:.4g}  time {state['train_time_s']:.1f}s")
    best = state["best"]
    rule = overfitting_rule(held, clean, fgsm, best, args)
    if rule:  # catastrophic overfitting: back to the best epoch (if there is one); stop or recover
        event = dict(epoch=epoch, rule=rule, held_pgd_acc=held, held_clean_acc=clean,
                     held_fgsm_acc=fgsm, best_held_pgd_acc=best and best["held_pgd_acc"],
                     restored_epoch=best and best["epoch"])
        sign = (f"probe PGD accuracy fell from {best['held_pgd_acc']:.3f} to {held:.3f}"
                if rule in ("pgd_drop", "pgd_relative_drop") else
                f"probe FGSM accuracy {fgsm:.3f} is above its clean accuracy {clean:.3f}")
        recover = args.co_action == "recover" and len(state["recoveries"]) < args.co_max_recoveries
        back = f"restoring the weights of {label} {best['epoch']}" if best else "no earlier weights"
        if best:
            run.model.load_state_dict(best["model_state"])
        if recover:
            recover_from_overfitting(run, state, event)
            log(run, f"catastrophic overfitting detected in {label} {epoch}: {sign}; {back}, going on "
                     f"with the attack step x {run.attack_step_scale:g} (recovery "
                     f"{len(state['recoveries'])} of {args.co_max_recoveries})")
            save_checkpoint(run, args, os.path.join(run.out_dir, "checkpoint.pt"), **state)
            return False
        state["guard"] = event
        log(run, f"catastrophic overfitting detected in {label} {epoch}: {sign}; {back}; stopping")
        return True
    if best is None or held >= best["held_pgd_acc"]:
        state["best"] = dict(epoch=epoch, held_pgd_acc=held,
                             model_state=copy.deepcopy(run.model.state_dict()))
    save_checkpoint(run, args, os.path.join(run.out_dir, "checkpoint.pt"), **state)
    return False


# ------------------------------------------------------------------------------------- checkpoints
def save_atomic(obj, path):
    """torch.save to a temporary file of this process, then rename: a kill never leaves a truncated
    checkpoint."""
    tmp = f"{path}.{os.getpid()}.tmp"
    torch.save(obj, tmp)
    os.replace(tmp, path)


def check_writable(path, flag="--out"):
    """Refuse up front (:class:`UserError`) an output file that could not be written at the end of
    a long job: a folder, a read-only file, or one in a folder that cannot be created or written.
    Creates the missing folders."""
    folder = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        raise UserError(f"{flag} {path} is a folder, not a file")
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as e:
        raise UserError(f"{flag} {path}: cannot create its folder ({e.strerror or e})") from None
    read_only = os.path.exists(path) and not os.access(path, os.W_OK)
    if not os.access(folder, os.W_OK | os.X_OK) or read_only:
        raise UserError(f"{flag} {path} is not writable")


def check_writable_dir(folder, flag="--out"):
    """Create ``folder`` and refuse up front (:class:`UserError`) one that is a dangling link or a
    file, lies under a file, or cannot be written."""
    if os.path.islink(folder) and not os.path.exists(folder):
        raise UserError(f"{flag} {folder} is a link to {os.readlink(folder)}, which does not exist")
    if os.path.exists(folder) and not os.path.isdir(folder):
        raise UserError(f"{flag} {folder} is a file, not a folder")
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create {flag} {folder} ({e.strerror or e})") from None
    if not os.access(folder, os.W_OK | os.X_OK):
        raise UserError(f"{flag} {folder} is not writable")


def write_json(obj, path):
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2)
    os.replace(tmp, path)


def rng_states(device):
    """Every RNG's state as tensors and plain values (so the checkpoint loads with
    weights_only=True)."""
    _, key, pos, has_gauss, cached = np.random.get_state()
    return {"torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if device.type == "cuda" else None,
            "numpy": {"key": torch.from_numpy(key.astype(np.int64)), "pos": pos, "has_gauss": has_gauss,
                      "cached": cached},
            "python": random.getstate()}


def set_rng_states(rng, device):
    torch.set_rng_state(rng["torch"].cpu())
    if rng["cuda"] is not None and device.type == "cuda":
        torch.cuda.set_rng_state_all([s.cpu() for s in rng["cuda"]])
    n = rng["numpy"]
    key = n["key"].numpy().astype(np.uint32)
    np.random.set_state(("MT19937", key, n["pos"], n["has_gauss"], n["cached"]))
    random.setstate(rng["python"])


def save_checkpoint(run, args, path, **state):
    """Write what rebuilds the model (eval.py, models.load_checkpoint) and continues the run bit for
    bit (--resume): model, flags, dataset, optimiser, scaler, RNG states, and the loop's ``state``
    (epoch, iteration, history, the guard's best weights, Free's delta, ...).  Plain data only.
    Atomic; rank 0 only."""
    if run.rank != 0:
        return
    shape = dict(zip(("channels", "size", "classes"), data.DATASETS[args.dataset][:3]))
    dataset = dict(name=args.dataset, **shape)
    weights = run.model.state_dict()
    if state.get("ema") is not None:  # the average is what eval.py loads; the trained weights resume
        state = dict(state, train_model_state=weights)
        weights = state["ema"]
    save_atomic({"model_config": run.model.config, "model_state": weights, "args": vars(args),
                 "script": run.script, "dataset": dataset, "optimizer": run.opt.state_dict(),
                 "scaler": run.scaler.state_dict(), "rng": rng_states(run.device), **state}, path)


# flags a resumed run may change: more epochs, where and how it runs, how it is finally evaluated
RESUMABLE_CHANGES = {"epochs", "resume", "overwrite", "out_dir", "data_dir", "device", "compile",
                     "kaf_impl", "n_eval", "eval_pgd_steps", "eval_pgd_restarts", "eval_pgd_alpha"}
# training flags newer than some checkpoints, with the value that gives how a run saved before the
# flag existed trained (the probe was 512 images before --co-probe-images)
FLAGS_ADDED_LATER = {"co_probe_images": 512}


def load_for_resume(run, args, passes):
    """Restore model, optimiser, scaler and RNG states from <out-dir>/checkpoint.pt of the same
    script, model and training flags (only RESUMABLE_CHANGES may differ); returns the checkpoint
    (its loop state: epoch, iteration, history, ...), or None when there is none yet.  ``passes``:
    the epochs (Free: passes) the run is to train."""
    path = os.path.join(run.out_dir, "checkpoint.pt")
    if not os.path.exists(path):
        log(run, f"--resume: no checkpoint in {run.out_dir} yet, starting from scratch")
        return None
    ckpt = models.read_checkpoint(path, map_location=run.device)
    if "rng" not in ckpt or "model_config" not in ckpt:
        raise models.CheckpointError(f"cannot resume from {path}: not a resumable checkpoint of "
                                     "this project")
    models.check_checkpoint(ckpt, path)
    if ckpt["script"] != run.script or ckpt["model_config"] != run.model.config:
        config = ckpt["model_config"]
        theirs = f"{ckpt['script']} {config.get('arch')} act={config.get('act')}"
        ours = f"{run.script} {run.model.config.get('arch')} act={run.model.config.get('act')}"
        raise models.CheckpointError(f"cannot resume from {path}: it is a {theirs} run, not this one "
                                     f"({ours}); use another --out-dir")
    saved_flags = {**FLAGS_ADDED_LATER, **ckpt["args"]}
    changed = [f"--{k.replace('_', '-')} {saved_flags.get(k)!r} -> {v!r}" for k, v in vars(args).items()
               if k not in RESUMABLE_CHANGES and saved_flags.get(k) != v]
    if changed:
        raise models.CheckpointError(f"cannot resume from {path}: training flags differ from the "
                                     f"run's ({', '.join(changed)}); "
                                     f"use the run's flags or another --out-dir")
    if ckpt["epoch"] > passes and not ckpt["guard"]:
        unit = "passes" if run.script == "train_free" else "epochs"
        raise models.CheckpointError(f"cannot resume from {path}: it has done {ckpt['epoch']} {unit}, "
                                     f"more than the {passes} asked for; give at least that many")
    run.model.load_state_dict(ckpt.get("train_model_state", ckpt["model_state"]))  # --ema: raw weights
    run.opt.load_state_dict(ckpt["optimizer"])
    run.scaler.load_state_dict(ckpt["scaler"])
    set_rng_states(ckpt["rng"], run.device)
    finished = (" (stopped by the overfitting guard)" if ckpt["guard"]
                else " (finished)" if ckpt["epoch"] >= passes else "")
    log(run, f"resumed from {path}: {ckpt['epoch']} epochs done{finished}, optimizer step "
             f"{ckpt['iteration']}")
    return ckpt


# ----------------------------------------------------------------------------------- summary, end
def start_summary(run, args, passes, regime, state, label="epoch"):
    """summary.json's first fields; logs the run's first line."""
    summary = {"script": run.script, "regime": regime, "flags": vars(args), "device": str(run.device),
               "amp": str(run.amp_dtype).replace("torch.", "") if run.amp_dtype else "off",
               "world_size": run.world,
               "activation_params": activations.activation_parameter_count(run.model),
               "kaf_impl": activations.kaf_impls(run.model, run.device, compiled=args.compile),
               "model_params": sum(p.numel() for p in run.model.parameters()),
               "catastrophic_overfitting": state["guard"], "stopped_early": None, "diverged": None}
    log(run, f"{run.script}: {args.dataset} {args.model} act={run_name(args)} "
             f"eps={args.epsilon:.4g} "
             f"{passes} {label}{'es' if label.endswith('s') else 's'} x {len(run.batches)} batches "
             f"on {run.device}"
             f"{f' x {run.world} processes' if run.world > 1 else ''} (amp {summary['amp']}"
             f"{', kaf ' + '+'.join(summary['kaf_impl']) if summary['kaf_impl'] else ''}), out "
             f"{run.out_dir}")
    return summary


def pgd_config(args):
    alpha = args.eval_pgd_alpha if args.eval_pgd_alpha is not None else args.epsilon / 4
    return dict(eps=args.epsilon, alpha=alpha, steps=args.eval_pgd_steps,
                restarts=args.eval_pgd_restarts)


def results(run, args, state, evaluated):
    """summary.json's fields on where training got to."""
    counts = dict(optimizer_steps=state["iteration"])
    if "attack_steps" in state:
        counts["attack_steps"] = state["attack_steps"]
    return {"epochs_completed": state["epoch"], "train_time_s": round(state["train_time_s"], 2),
            "pgd": pgd_config(args), "n_eval": len(run.y_test), "history": state["history"],
            "curve": list(state["curve"]), "evaluated": evaluated,
            "activation_values": activations.activation_parameter_values(run.model),
            "counts": counts,
            "checkpoint": os.path.join(run.out_dir, "checkpoint.pt")}


def evaluate(run, args):
    """Clean and PGD accuracy on the test set (eval mode, float32)."""
    cfg = pgd_config(args)
    bar = lambda desc: (lambda it: tqdm(it, desc=desc, leave=False, dynamic_ncols=True))
    clean, _ = attacks.robust_accuracy(run.model, run.x_test, run.y_test, progress=bar("eval clean"))
    attack = lambda m, x, y: attacks.pgd(m, x, y, cfg["eps"], cfg["alpha"], cfg["steps"],
                                         cfg["restarts"])
    robust, _ = attacks.robust_accuracy(run.model, run.x_test, run.y_test, attack,
                                        progress=bar(f"eval PGD-{cfg['steps']}"))
    return clean, robust


def parameter_digest(model):
    """SHA-256 of the model's parameters' bytes in order: equal digests mean bit-identical weights
    (unlike float sums, whose rounding depends on the thread count)."""
    h = hashlib.sha256()
    for p in model.parameters():
        h.update(p.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def finish(run, args, summary, state, label="epoch"):
    """After training: the last checkpoint, the final clean / PGD evaluation (rank 0) and
    summary.json.  Returns the summary."""
    save_checkpoint(run, args, os.path.join(run.out_dir, "checkpoint.pt"), **state)
    if state.get("ema") is not None:  # the final evaluation judges what was saved: the average
        run.model.load_state_dict(state["ema"])
    guard = state["guard"]
    summary.update(catastrophic_overfitting=guard,
                   stopped_early=guard and f"catastrophic overfitting in {label} {guard['epoch']}")
    if "recoveries" in state:
        summary["co_recoveries"] = state["recoveries"]
    summary.update(results(run, args, state, evaluated=False))
    # the DDP test's witness: each rank's parameters as a digest of their exact bytes
    if run.world > 1:
        digest = parameter_digest(run.model)
        gathered = [None] * run.world
        torch.distributed.all_gather_object(gathered, digest)
        summary["rank_param_digests"] = gathered
        summary["params_identical_across_ranks"] = len(set(gathered)) == 1
    if run.rank != 0:  # rank 0 evaluates and writes the summary; the others wait for it
        torch.distributed.barrier()
        return summary
    try:
        clean, robust = evaluate(run, args)
    # the model is trained and in checkpoint.pt: say so in a partial summary
    except KeyboardInterrupt:
        stops = [summary.get("stopped_early"), "interrupted in the final evaluation"]
        summary["stopped_early"] = "; ".join(filter(None, stops))
        write_json(summary, os.path.join(run.out_dir, "summary.json"))
        log(run, f"interrupted in the final evaluation: checkpoint.pt holds the trained model "
                 "(--resume or eval.py "
                 f"evaluates it), partial summary.json in {run.out_dir}", error=True)
        release_out_dir(run.out_dir)
        raise
    summary.update(evaluated=True, clean_acc=clean, pgd_acc=robust)
    write_json(summary, os.path.join(run.out_dir, "summary.json"))
    release_out_dir(run.out_dir)
    cfg = summary["pgd"]
    log(run, f"clean acc {clean:.4f}  PGD-{cfg['steps']}x{cfg['restarts']} (eps {cfg['eps']:.4g}, "
             f"step {cfg['alpha']:.4g}) "
             f"acc {robust:.4f}  train time {summary['train_time_s']:.1f}s  -> "
             f"{run.out_dir}/summary.json")
    if run.world > 1:
        torch.distributed.barrier()
    return summary


def record_stop(run, args, stop, summary, state, label="epoch"):
    """A run stopped by divergence or Ctrl-C: summary.json says where, Ctrl-C also saves the current
    weights and loop state as interrupted.pt (checkpoint.pt keeps the last completed epoch,
    resumable).  Returns the exception to raise: Diverged with where its last good checkpoint is."""
    summary.update(results(run, args, state, evaluated=False))
    epochs_done = state["epoch"]
    interrupted = isinstance(stop, KeyboardInterrupt)
    summary["stopped_early"] = f"interrupted in {label} {epochs_done + 1}" if interrupted else str(stop)
    if isinstance(stop, Diverged):
        summary["diverged"] = str(stop)
    else:
        save_checkpoint(run, args, os.path.join(run.out_dir, "interrupted.pt"), **state)
    if run.rank == 0:
        write_json(summary, os.path.join(run.out_dir, "summary.json"))
        release_out_dir(run.out_dir)
    if isinstance(stop, KeyboardInterrupt):
        if os.path.exists(os.path.join(run.out_dir, "checkpoint.pt")):
            kept = f"checkpoint.pt holds {label} {epochs_done} (continue with --resume)"
        else:
            kept = f"no {label} completed, so no checkpoint.pt yet"
        log(run, f"interrupted: {kept}, the current weights are in interrupted.pt, summary.json in "
                 f"{run.out_dir}", error=True)
        return stop
    return Diverged(stop.epoch, stop.batch, stop.batches, stop.label,
                    (f"; checkpoint.pt keeps {label} {epochs_done}" if epochs_done
                     else "; no epoch completed, no checkpoint") + f", reason in {run.out_dir}/summary.json",
                    stop.what)
