"""Research options that few runs use, each off by default, called explicitly by the training loops:

* Zhao & Griffin's random training ("R") and mean training ("M"): :class:`TrainingTricks`, whose
  ``mix(x, y)`` changes a clean minibatch before the regime perturbs it and whose ``mean_loss`` is
  added to the training loss;
* Zhao & Griffin's hybrid loss (``--hybrid-weight``): :func:`hybrid_loss`, used by every regime in
  place of the cross-entropy;
* Dai et al.'s extra (e.g. generated) training images: also mixed in by ``TrainingTricks.mix``;
* the LR range test (``--lr-find``): :func:`lr_range_test`, run instead of training.

Imports torch, numpy and utils.
"""
import math
import os
import sys

import numpy as np
import torch
import torch.nn.functional as F

import data
import tables
import utils


def add_flags(p):
    """The flags of this module, in their own --help groups."""
    g = p.add_argument_group("training-data tricks (tricks.py; off by default)")
    g.add_argument("--random-training", type=float, default=0.0, metavar="SHARE",
                   help="Zhao & Griffin's random training: perturb this share of each batch with "
                        "random noise")
    g.add_argument("--random-noise", default="uniform", choices=["uniform", "gaussian"],
                   help="random-training noise: U(-s, s) or N(0, s^2)")
    g.add_argument("--random-strength", type=utils.fraction, default=None,
                   help="s, the random-training noise strength (default: --epsilon)")
    g.add_argument("--mean-training", type=int, default=0, metavar="N",
                   help="Zhao & Griffin's mean training: N noisy copies of the mean training image "
                        "per optimiser step, trained towards uniform confidence")
    g.add_argument("--mean-noise", type=utils.fraction, default=0.1,
                   help="std of the Gaussian noise on the mean-image copies")
    g.add_argument("--mean-weight", type=float, default=1.0,
                   help="weight of the mean-training loss")
    g.add_argument("--mean-target", default="softmax", choices=["softmax", "output"],
                   help="what mean training lowers: the softmax (KL to uniform), or the raw outputs "
                        "(mean z^2: eval --confidence output)")
    g.add_argument("--hybrid-weight", type=float, default=0.0, metavar="LAMBDA",
                   help="Zhao & Griffin's hybrid loss: CE + LAMBDA * mean_k |z_k - onehot_k|^p on "
                        "the logits z (0 = plain CE; see tricks.hybrid_loss)")
    g.add_argument("--hybrid-p", type=float, default=2.0,
                   help="the order p of the hybrid loss's error term")
    g.add_argument("--extra-data", default=None, metavar="NPZ",
                   help="Dai et al.'s extra (e.g. generated) training images: .npz with images "
                        "(uint8 or float in [0,1]) and labels")
    g.add_argument("--extra-fraction", type=float, default=None,
                   help="share f of extra images in each enlarged batch: round(n f / (1 - f)) join "
                        "the n real ones (default 0.5, 1:1 as Dai et al.)")
    g = p.add_argument_group("LR range test (tricks.py)")
    g.add_argument("--lr-find", action="store_true",
                   help="LR range test instead of training: sweep the LR exponentially, write "
                        "lr_find.csv, suggest --lr-max")
    g.add_argument("--lr-find-steps", type=int, default=100, help="minibatches of the LR range test")
    g.add_argument("--lr-find-min", type=float, default=1e-4, help="first LR of the range test")
    g.add_argument("--lr-find-max", type=float, default=10.0, help="last LR of the range test")


def hybrid_loss(logits, y, weight=0.0, p=2.0):
    """Zhao & Griffin 2016's hybrid loss, batch mean of

        -log softmax(z)_y  +  weight * (1/K) sum_k |z_k - t_k|^p,    t = one-hot(y), z = logits (K
                           classes).

    The seed text survives only in words ("designed to prefer y_c large relatively and absolutely
    ... it is necessary to involve p-order errors ... [so that] nonsense samples would [get] small
    y's"): our reading is the softmax loss (y_c large *relative* to the others) plus a p-order error
    that pulls every raw output to its one-hot target (y_c large *absolutely*, the others near 0),
    so that an input far from the data gets small outputs everywhere.  The weight and p are not
    given in the text; p = 2 and weight 1 are our defaults for the study.  weight 0 is exactly
    F.cross_entropy."""
    ce = F.cross_entropy(logits, y)
    if weight == 0:
        return ce
    t = F.one_hot(y, logits.shape[1]).to(logits.dtype)
    return ce + weight * (logits - t).abs().pow(p).mean()


MAX_EXTRA_FRACTION = 0.9  # the enlarged batch is at most 10x the real one
MAX_MEAN_COPIES_PER_IMAGE = 4  # mean-training copies per step, per real image of the batch


def flag_problems(args):
    """Validation messages for this module's flags (empty when all is well)."""
    problems = []
    if args.lr_find_steps < 2:
        problems.append("--lr-find-steps must be >= 2")
    if not 0 < args.lr_find_min < args.lr_find_max:
        problems.append("--lr-find-min and --lr-find-max need 0 < min < max")
    if args.lr_find and args.resume:
        problems.append("--resume cannot be combined with --lr-find (the LR range test always "
                        "starts afresh)")
    if not 0 <= args.random_training <= 1:
        problems.append("--random-training must be a fraction in [0, 1]")
    if args.random_strength is not None and args.random_strength <= 0:
        problems.append("--random-strength must be > 0")
    if args.hybrid_weight < 0 or args.hybrid_p < 1:
        problems.append("--hybrid-weight must be >= 0 and --hybrid-p >= 1")
    if args.mean_training < 0 or args.mean_noise < 0 or args.mean_weight < 0:
        problems.append("--mean-training, --mean-noise and --mean-weight must be >= 0")
    if args.extra_fraction is not None and args.extra_data is None:
        problems.append("--extra-fraction needs --extra-data")
    # memory: the batch grows by round(n f / (1 - f)) extra images (9 per real one at 0.9), the
    # mean-training copies go through the model beside it
    if args.extra_fraction is not None and not 0 < args.extra_fraction <= MAX_EXTRA_FRACTION:
        problems.append(f"--extra-fraction must be in (0, {MAX_EXTRA_FRACTION}] (at most "
                        f"{MAX_EXTRA_FRACTION / (1 - MAX_EXTRA_FRACTION):.0f} extra images per real one: the "
                        f"batch grows {1 / (1 - MAX_EXTRA_FRACTION):.0f}-fold)")
    if args.mean_training > MAX_MEAN_COPIES_PER_IMAGE * args.batch_size:
        problems.append(f"--mean-training {args.mean_training} copies per step: at most "
                        f"{MAX_MEAN_COPIES_PER_IMAGE} x --batch-size ({MAX_MEAN_COPIES_PER_IMAGE * args.batch_size})")
    if args.extra_data is not None and not os.path.isfile(args.extra_data):
        problems.append(f"--extra-data {args.extra_data}: no such file")
    return problems



class TrainingTricks:
    """The training-data tricks, each off by default.

    Random training (Zhao & Griffin 2016, "R"): a share p = --random-training of each minibatch
    (round(p n) images, chosen at random) becomes clip(x + e, 0, 1), e ~ U(-s, s) or N(0, s^2)
    per pixel (--random-noise, s = --random-strength, default --epsilon); labels are kept.

    Mean training (Zhao & Griffin 2016, "M"): N = --mean-training noisy copies of the training set's
    mean image, m_j = clip(mean + sigma e_j, 0, 1), e_j ~ N(0, I), sigma = --mean-noise, drawn
    afresh for every optimiser step, are nonsense inputs the model should not be confident about.
    Their loss
        L_mean = lambda * (1/N) sum_j KL(U || softmax(f(m_j))) = lambda * (1/N) sum_j (-log K -
        (1/K) sum_k log p_jk),
    lambda = --mean-weight, is zero exactly when the model answers uniformly.  The paper adds the
    copies to the training set under a hybrid loss that keeps nonsense outputs small; KL to uniform
    is our reading for a softmax classifier.  The copies are not attacked and go through the model
    in eval mode: in train mode BatchNorm would normalise a batch of near-identical images by its
    own tiny variance and write that into its running statistics.

    Extra data (Dai et al. 2021, who add generated images to adversarial training): k = round(n f /
    (1 - f)) images drawn uniformly with replacement from --extra-data (with the dataset's
    augmentation), f = --extra-fraction, are appended to each real minibatch of n, so f is their
    share of the enlarged batch: f = 0.5 is the authors' 1:1 (a full real batch plus a full batch of
    generated images).  An epoch still covers every real image and takes as many optimiser steps as
    without extra data; each step sees n + k images (Free's persistent perturbation has :meth:`rows`
    rows for that).

    Extra images are appended first, then random training perturbs its own random rows, so noise
    reaches real and extra images alike.  Under distributed training every rank draws a different
    slice of one shared random draw, so the ranks do not train on the same extra images or
    copies."""

    @classmethod
    def for_run(cls, args, run):
        """The tricks of a training run set up by utils.setup."""
        return cls(args, run.batches.x, run.batches.augment, run.channels_last, run.rank, run.world)

    def __init__(self, args, x_train, augment="none", channels_last=False, rank=0, world=1):
        self.random_share, self.random_noise = args.random_training, args.random_noise
        self.random_strength = args.random_strength if args.random_strength is not None else args.epsilon
        self.mean_copies, self.mean_noise = args.mean_training, args.mean_noise
        self.mean_weight = args.mean_weight
        self.mean_target = args.mean_target
        self.extra_fraction = args.extra_fraction if args.extra_fraction is not None else 0.5
        self.channels_last, self.rank, self.world = channels_last, rank, world
        self.mean_image = data.dataset_mean_image(x_train) if self.mean_copies else None
        self.extra = None
        self.mixes = bool(args.extra_data) or self.random_share > 0  # whether mix() changes a batch
        if args.extra_data:
            channels, size, classes = data.DATASETS[args.dataset][:3]
            x, y = data.load_extra_data(args.extra_data, channels, size, classes)
            self.extra = data.Batches(x.to(x_train.device), y.to(x_train.device), 1, augment=augment)

    def _rank_part(self, draw, n):
        """This rank's n of a draw of n * world (the same draw on every rank, which share a
        seed)."""
        return draw(n * self.world)[self.rank * n:(self.rank + 1) * n]

    def extra_count(self, n):
        """How many extra images join a real minibatch of n."""
        return round(n * self.extra_fraction / (1 - self.extra_fraction)) if self.extra is not None else 0

    def rows(self, batch_size):
        """The largest training batch the regime sees: batch_size real images plus their extra
        ones."""
        return batch_size + self.extra_count(batch_size)

    def mix(self, x, y):
        """The minibatch the regime trains on: extra images appended, then random-training noise."""
        k = self.extra_count(len(x))
        if k:
            idx = self._rank_part(lambda m: torch.randint(len(self.extra.x), (m,), device=x.device), k)
            xe = self.extra.x[idx].float().div_(255)
            if self.extra.augment == "crop+flip":
                xe = self.extra._augment(xe)
            if self.channels_last:
                xe = xe.contiguous(memory_format=torch.channels_last)
            x, y = torch.cat([x, xe]), torch.cat([y, self.extra.y[idx]])
        n = len(x)
        k = round(self.random_share * n)
        if k:
            rows = torch.randperm(n, device=x.device)[:k]
            if self.random_noise == "gaussian":
                e = torch.randn_like(x[rows])
            else:
                e = torch.rand_like(x[rows]).mul_(2).sub_(1)
            x = x.clone()
            x[rows] = (x[rows] + self.random_strength * e).clamp_(0, 1)
        return x, y

    def mean_batch(self):
        """N fresh noisy copies of the mean image, clip(mean + sigma e, 0, 1)."""
        image = self.mean_image
        noise = self._rank_part(lambda m: torch.randn((m, *image.shape), device=image.device),
                                self.mean_copies)
        x = (self.mean_image + self.mean_noise * noise).clamp_(0, 1)
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x

    def mean_loss(self, model, forward, amp):
        """On fresh copies m_j under the context ``amp``, ``model`` in eval mode meanwhile:
        --mean-target softmax: lambda * mean_j KL(U || softmax(z(m_j))), which leaves the logits free
        to be large and equal; output: lambda * mean_j mean_k z_k(m_j)^2, every raw output towards 0
        (the hybrid loss's target for no class).  Each lowers the score its namesake --confidence rule
        of eval.py reads; the other rule can still call the copies confident."""
        was_training = model.training
        model.eval()
        try:
            with amp:
                logits = forward(self.mean_batch())
        finally:
            model.train(was_training)
        if self.mean_target == "output":
            return self.mean_weight * logits.float().pow(2).mean()
        logp = F.log_softmax(logits.float(), dim=1)
        return self.mean_weight * (-logp.mean(1) - math.log(logp.shape[1])).mean()


# ----------------------------------------------------------------------------------- LR range test
def _centred_mean(values, width):
    """Moving average over ``width`` points centred on each point (fewer at the ends).  Unlike an
    EMA it does not lag, so it does not shift the loss curve towards larger learning rates."""
    v = np.asarray(values, dtype=float)
    idx, half = np.arange(len(v)), width // 2
    lo, hi = np.clip(idx - half, 0, len(v)), np.clip(idx + half + 1, 0, len(v))
    c = np.concatenate([[0.0], np.cumsum(v)])
    return (c[hi] - c[lo]) / (hi - lo)


def lr_range_test(run, args, train_minibatch, beta=0.9, diverge=4.0):
    """LR range test (Smith 2017, "Cyclical learning rates"; the fast-training thesis's LR finder).

    Calls ``train_minibatch(x, y) -> loss`` (the regime's training of one minibatch, at the LR the
    optimiser holds: Free's m replays all at the same one) on --lr-find-steps minibatches n with the
    learning rate rising geometrically, lr_i = lr_min (lr_max / lr_min)^(i / (n-1))
    (--lr-find-min/--lr-find-max; constant --momentum), and records the regime's own training loss,
    so the suggestion fits the adversarial loss, not the clean one.  It stops early once the
    smoothed loss s_i (bias-corrected EMA, s = beta s + (1-beta) loss, as in fastai) exceeds
    ``diverge`` x its best or is not finite.  Two suggestions for lr_max, from the centred moving
    average of the loss: the fast-training thesis's rule, one order of magnitude below the LR of the
    loss minimum (its section 1.12.3.1: "about one order of magnitude lower than that found for the
    minimum point of the error"), and Smith's / fastai's LR of the steepest descent d loss / d
    log(lr) before that minimum.  The first is what the scripts' schedules were tuned with in the
    thesis.

    Writes lr_find.csv (and lr_find.png when matplotlib is installed) into the out dir; the trained
    weights are thrown away.  Returns {thesis_lr_max, steepest_lr_max, suggested_lr_max (=
    steepest), min_loss_lr, stopped_early, csv}."""
    n, lo, hi = args.lr_find_steps, args.lr_find_min, args.lr_find_max
    run.model.train()
    print(f"{run.script}: LR range test {lo:.3g} -> {hi:.3g} over {n} minibatches on {run.device}, "
          f"out {run.out_dir}", flush=True)
    rows, ema, best, stopped = [], 0.0, math.inf, None
    batches = zip(range(n), data.forever(run.batches))
    for i, (x, y) in utils.tqdm(batches, total=n, desc="lr find", leave=False, dynamic_ncols=True):
        lr = lo * (hi / lo) ** (i / (n - 1))
        utils.set_lr(run.opt, lr, args.momentum)
        loss = float(train_minibatch(x, y))
        ema = beta * ema + (1 - beta) * loss
        smooth = ema / (1 - beta ** (i + 1))
        rows.append((i, lr, loss, smooth))
        best = min(best, smooth)
        if not math.isfinite(smooth) or smooth > diverge * best:
            why = "not finite" if not math.isfinite(smooth) else f"above {diverge:g}x its minimum"
            stopped = f"loss {why} at lr {lr:.3g}"
            break
    # the suggestion from the finite part of the curve
    k = next((j for j, r in enumerate(rows) if not math.isfinite(r[2])), len(rows))
    lrs, losses = np.array([r[1] for r in rows[:k]]), np.array([r[2] for r in rows[:k]])
    centred = _centred_mean(losses, max(5, n // 10) | 1) if k else losses
    if k >= 3 and np.argmin(centred) > 0:
        m = int(np.argmin(centred))
        slope = np.gradient(centred[:m + 1], np.log(lrs[:m + 1]))
        suggestion, min_lr = float(lrs[int(np.argmin(slope))]), float(lrs[m])
    else:
        suggestion = min_lr = float(lrs[0]) if k else lo
        print(f"warning: the loss did not fall before the LR range test stopped; try a smaller "
              f"--lr-find-min than {lo:g} "
              f"or more --lr-find-steps", file=sys.stderr)
    path = os.path.join(run.out_dir, "lr_find.csv")
    with open(path + ".tmp", "w") as f:
        f.write("iteration,lr,loss,smoothed_loss,centred_loss\n")
        for j, (i, lr, loss, smooth) in enumerate(rows):
            f.write(f"{i},{lr:.6g},{loss:.6g},{smooth:.6g},{f'{centred[j]:.6g}' if j < k else ''}\n")
    os.replace(path + ".tmp", path)
    plt = utils.pyplot()
    if plt is not None:
        fig, ax = plt.subplots(figsize=(6, 4))
        ax.plot(lrs, losses, alpha=0.3, label="loss")
        ax.plot(lrs, centred, label="centred mean")
        ax.axvline(suggestion, color="k", linestyle="--", label=f"steepest descent {suggestion:.3g}")
        ax.axvline(min_lr / 10, color="r", linestyle=":",
                   label=f"loss minimum / 10 (thesis) {min_lr / 10:.3g}")
        ax.set(xscale="log", xlabel="learning rate", ylabel="training loss",
               title=f"{run.script} LR range test")
        ax.legend()
        tables.save_figure(fig, os.path.join(run.out_dir, "lr_find.png"), dpi=120, bbox_inches="tight")
        plt.close(fig)
    print(f"LR range test: {len(rows)} minibatches{', stopped: ' + stopped if stopped else ''}; "
          f"loss minimum at lr {min_lr:.3g}; "
          f"suggested --lr-max {min_lr / 10:.3g} (the thesis's rule: a tenth of the loss minimum's "
          "LR) or "
          f"{suggestion:.3g} (steepest descent)  -> {path}", flush=True)
    return {"thesis_lr_max": min_lr / 10, "steepest_lr_max": suggestion, "suggested_lr_max": suggestion,
            "min_loss_lr": min_lr, "stopped_early": stopped, "csv": path}
