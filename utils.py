"""What the three training scripts share: data, schedules, flags, checkpoints and the epoch loop.

* Data: every dataset is loaded once into memory as uint8 tensors (on the GPU when there is one) and
  batched by :class:`Batches`, which does random crop / flip on the device itself -- no DataLoader
  workers in the hot loop (the airbench approach).
* Schedules: :func:`lr_at` / :func:`momentum_at`, stepped per iteration.
* :class:`Run`: builds device, data, model, SGD, AMP; ``run.step(loss)`` is one optimiser step;
  ``run.fit(train_step)`` runs the epochs with tqdm, the catastrophic-overfitting guard, the
  divergence stop, per-epoch atomic checkpoints that --resume continues bit for bit, the final
  clean/PGD evaluation and ``summary.json``; under torchrun it is DistributedDataParallel.
* Training-data tricks (end of the file): Zhao & Griffin's random and mean training, Dai et al.'s
  extra data, mixed into every regime's batches by :class:`TrainingTricks`.

A training script supplies only its regime: the function that turns a clean batch into a training
loss.  Imports torch, numpy, tqdm (optional) and the project's modules.
"""
import argparse
import atexit
import copy
import gzip
import json
import math
import os
import random
import struct
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F

import activations
import attacks
import models

try:
    from tqdm import tqdm
except ImportError:  # tqdm is optional: fall back to a silent iterator
    def tqdm(iterable=None, **kwargs):
        return iterable


class UserError(Exception):
    """A problem with the user's input (flag, dataset, checkpoint): printed as one line, no traceback."""


class Diverged(Exception):
    """Training produced a non-finite loss or gradient: the run stops (one-line error, exit code 1)."""

    def __init__(self, epoch, batch, batches, label="epoch", note=""):
        self.epoch, self.batch, self.batches, self.label = epoch, batch, batches, label
        super().__init__(f"training diverged: non-finite loss or gradient in {label} {epoch}, "
                         f"batch {batch} of {batches}{note}")


def main_guard(main):
    """Run ``main()``; turn user errors into a one-line message and exit code 2, a diverged run into
    exit code 1, Ctrl-C into 130."""
    try:
        return main()
    except (UserError, models.CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except Diverged as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)


def fraction(text):
    """argparse type accepting '0.03', '8/255' or '8 / 255'."""
    try:
        if "/" in text:
            num, den = text.split("/")
            return float(num) / float(den)
        return float(text)
    except (ValueError, ZeroDivisionError):
        raise argparse.ArgumentTypeError(f"expected a number or a fraction such as 8/255, got {text!r}")


# -------------------------------------------------------------------------------------------- data
# name -> (channels, size, classes, mean, std, augmentation)
DATASETS = {
    "cifar10": (3, 32, 10, (0.4914, 0.4822, 0.4465), (0.2471, 0.2435, 0.2616), "crop+flip"),
    "cifar100": (3, 32, 100, (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762), "crop+flip"),
    "svhn": (3, 32, 10, (0.4377, 0.4438, 0.4728), (0.1980, 0.2010, 0.1970), "none"),
    "mnist": (1, 28, 10, (0.1307,), (0.3081,), "none"),
    "fashionmnist": (1, 28, 10, (0.2860,), (0.3530,), "none"),
    "synthetic": (1, 28, 10, (0.5,), (0.25,), "none"),
    "synthetic32": (3, 32, 10, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25), "crop+flip"),
}
IDX_FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
             "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}


def read_idx(path):
    """Read an IDX file (MNIST format), gzipped or not, into a numpy array."""
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rb") as f:
        data = f.read()
    zero, dtype_code, ndim = struct.unpack(">HBB", data[:4])
    if zero != 0 or dtype_code != 0x08:
        raise UserError(f"{path} is not an unsigned-byte IDX file")
    shape = struct.unpack(">" + "I" * ndim, data[4:4 + 4 * ndim])
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def find_idx(data_dir, split):
    """Paths of the raw IDX images/labels of a split below data_dir, or None.  Looks in data_dir and in
    torchvision's <Name>/raw layout, gzipped or not."""
    for sub in ("", "FashionMNIST/raw", "MNIST/raw", "raw"):
        found = []
        for stem in IDX_FILES[split]:
            for name in (stem + ".gz", stem):
                if os.path.isfile(os.path.join(data_dir, sub, name)):
                    found.append(os.path.join(data_dir, sub, name))
                    break
        if len(found) == 2:
            return found
    return None


def synthetic_data(name, n, seed):
    """A learnable synthetic classification set: each class is a fixed random smooth pattern; samples
    are that pattern with random contrast, shift and pixel noise.  Deterministic given the seed; used
    by tests and benchmarks (no download)."""
    c, size, classes = DATASETS[name][:3]
    g = torch.Generator().manual_seed(1234)  # the class patterns are the same for train and test
    protos = F.interpolate(torch.rand(classes, c, 7, 7, generator=g), size=(size, size), mode="bilinear",
                           align_corners=False)
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, classes, (n,), generator=g)
    contrast = 0.6 + 0.4 * torch.rand(n, 1, 1, 1, generator=g)
    x = 0.5 + contrast * (protos[y] - 0.5) + 0.15 * torch.randn(n, c, size, size, generator=g)
    return (x.clamp(0, 1) * 255).round().to(torch.uint8), y


def load_split(name, data_dir, train):
    """(images uint8 NCHW, labels int64) of one split, from data_dir or torchvision."""
    split = "train" if train else "test"
    if name.startswith("synthetic"):
        return synthetic_data(name, 2048 if train else 512, seed=0 if train else 1)
    if name in ("mnist", "fashionmnist"):
        paths = find_idx(data_dir, split)
        if paths:
            x, y = read_idx(paths[0]), read_idx(paths[1])
            return torch.from_numpy(x.copy()).unsqueeze(1), torch.from_numpy(y.astype(np.int64))
    try:
        import torchvision.datasets as tvd
    except ImportError:
        raise UserError(f"{name} needs torchvision (pip install torchvision) or raw IDX files in --data-dir") from None
    try:
        if name == "svhn":
            ds = tvd.SVHN(data_dir, split=split, download=True)
            x = torch.from_numpy(ds.data)
            y = torch.from_numpy(np.asarray(ds.labels, dtype=np.int64))
        else:
            cls = {"cifar10": tvd.CIFAR10, "cifar100": tvd.CIFAR100, "mnist": tvd.MNIST,
                   "fashionmnist": tvd.FashionMNIST}[name]
            ds = cls(data_dir, train=train, download=True)
            x = torch.as_tensor(np.asarray(ds.data))
            x = x.permute(0, 3, 1, 2) if x.dim() == 4 else x.unsqueeze(1)
            y = torch.as_tensor(np.asarray(ds.targets, dtype=np.int64))
    except Exception as e:  # no internet, corrupt archive, ...
        reason = str(e).splitlines()[0][:120] if str(e) else type(e).__name__
        raise UserError(f"could not load {name} from {os.path.abspath(data_dir)} ({reason}); "
                        f"download it there or point --data-dir at an existing copy") from None
    return x.contiguous(), y


def checkpoint_test_set(model, path, data_dir=None, n_eval=None):
    """(dataset name, x, y): the test split of the dataset a checkpoint was trained on (``model`` from
    models.load_checkpoint of ``path``), read from ``data_dir`` or else the training run's --data-dir,
    first ``n_eval`` images (all when None), x as floats in [0, 1].  Used by eval.py and analyze.py."""
    train_args = model.checkpoint.get("args", {})
    dataset = model.checkpoint.get("dataset", {}).get("name") or train_args.get("dataset")
    if dataset not in DATASETS:
        raise UserError(f"checkpoint {path} names no known dataset ({dataset!r})")
    x, y = load_split(dataset, data_dir or train_args.get("data_dir", "./data"), train=False)
    return dataset, x[:n_eval].float().div_(255), y[:n_eval]


class Batches:
    """Iterate over (x, y) minibatches of an in-memory uint8 dataset, on its device.

    Images come out as float in [0,1] (channels_last when asked).  With ``augment`` 'crop+flip' each
    image is randomly translated by up to ``pad`` pixels (zero padding, like RandomCrop(padding=4))
    and flipped horizontally with probability 1/2, all on the device.  The last batch may be short.

    Distributed training (``world`` > 1): every rank draws the same permutation (same seed), drops
    its last ``n mod world`` entries and keeps every world-th one from position ``rank``, so the
    ranks see disjoint shards of equal size and run the same number of batches."""

    def __init__(self, x, y, batch_size, shuffle=True, augment="none", pad=4, channels_last=False, generator=None,
                 rank=0, world=1):
        self.x, self.y, self.batch_size = x, y, batch_size
        self.shuffle, self.augment, self.pad = shuffle, augment, pad
        self.channels_last, self.generator = channels_last, generator
        self.rank, self.world = rank, world

    def __len__(self):
        return math.ceil(len(self.x) // self.world / self.batch_size)

    def _augment(self, xb):
        n, _, h, w = xb.shape
        p = self.pad
        padded = F.pad(xb, (p, p, p, p))
        dev = xb.device
        off = torch.randint(0, 2 * p + 1, (2, n), device=dev, generator=self.generator)
        rows = (off[0][:, None] + torch.arange(h, device=dev))[:, None, :, None]
        cols = (off[1][:, None] + torch.arange(w, device=dev))[:, None, None, :]
        out = padded[torch.arange(n, device=dev)[:, None, None, None],
                     torch.arange(xb.shape[1], device=dev)[None, :, None, None], rows, cols]
        flip = torch.rand(n, device=dev, generator=self.generator) < 0.5
        return torch.where(flip[:, None, None, None], out.flip(3), out)

    def __iter__(self):
        n = len(self.x)
        order = (torch.randperm(n, device=self.x.device, generator=self.generator) if self.shuffle
                 else torch.arange(n, device=self.x.device))
        if self.world > 1:
            order = order[:n - n % self.world][self.rank::self.world]
            n = len(order)
        for i in range(0, n, self.batch_size):
            idx = order[i:i + self.batch_size]
            xb = self.x[idx].float().div_(255)
            if self.augment == "crop+flip":
                xb = self._augment(xb)
            if self.channels_last:
                xb = xb.contiguous(memory_format=torch.channels_last)
            yield xb, self.y[idx]


# --------------------------------------------------------------------------------------- schedules
LR_SCHEDULES = ("piecewise", "cyclic", "linear", "exponential", "onecycle", "onecycle-half",
                "onecycle-truncated", "triangular", "cosine", "sgdr", "linear-restarts", "constant")
MOMENTUM_SCHEDULES = ("constant", "onecycle")


def _restart_bounds(t, cycles, mult):
    """For t in [0,1), the position u in [0,1) inside its cycle when [0,1] is cut into ``cycles``
    cycles whose lengths grow by ``mult``."""
    lengths = [mult ** i for i in range(cycles)]
    total, start = sum(lengths), 0.0
    for i, length in enumerate(lengths):
        end = start + length / total
        if t < end or i == cycles - 1:  # the last cycle by position (with mult=1 all lengths are equal)
            return min((t - start) / (end - start), 1.0)
        start = end
    return 1.0


def lr_at(step, total_steps, schedule, lr_max, cycles=3, mult=1.0):
    """Learning rate at iteration ``step`` of ``total_steps`` (per-iteration stepping).

    piecewise   lr_max, x0.1 at 50%, x0.01 at 75% (Free AT's "3 steps")
    cyclic      triangle 0 -> lr_max at 40% -> 0 (the fast-AT default, Wong et al. 2020)
    linear      lr_max -> 0;  exponential: lr_max -> lr_max/1000 geometrically
    onecycle    lr_max/10 -> lr_max (45%) -> lr_max/10 (90%) -> lr_max/1000 (Smith 2018)
    onecycle-half       one cycle lr_max/10 -> lr_max -> lr_max/10 over the first 2/3, then a half-
                        height cycle (peak lr_max/2) annealing to lr_max/1000 (the fast-training
                        thesis's "1 Cycle & Half"; its figure is not in the text, so this is our reading)
    onecycle-truncated  lr_max/10 -> lr_max over 30%, then straight down to lr_max/1000 (the thesis's
                        "1 Cycle truncated": the cycle without its separate annealing tail; our reading)
    triangular  ``cycles`` triangles between lr_max/10 and lr_max (Smith's CLR)
    cosine      lr_max * (1 + cos(pi t)) / 2
    sgdr        cosine warm restarts (Loshchilov & Hutter), ``cycles`` cycles growing by ``mult``
    linear-restarts  linear decay lr_max -> lr_max/1000 restarted ``cycles`` times (growing by mult)
    constant    lr_max"""
    t = min(max(step / max(total_steps, 1), 0.0), 1.0)
    lo = lr_max / 10
    if schedule == "piecewise":
        return lr_max * (1.0 if t < 0.5 else 0.1 if t < 0.75 else 0.01)
    if schedule == "cyclic":
        return float(np.interp(t, [0, 0.4, 1], [0, lr_max, 0]))
    if schedule == "linear":
        return lr_max * (1 - t)
    if schedule == "exponential":
        return lr_max * 1e-3 ** t
    if schedule == "onecycle":
        return float(np.interp(t, [0, 0.45, 0.9, 1], [lo, lr_max, lo, lr_max / 1000]))
    if schedule == "onecycle-half":
        return float(np.interp(t, [0, 1 / 3, 2 / 3, 5 / 6, 1], [lo, lr_max, lo, lr_max / 2, lr_max / 1000]))
    if schedule == "onecycle-truncated":
        return float(np.interp(t, [0, 0.3, 1], [lo, lr_max, lr_max / 1000]))
    if schedule == "triangular":
        u = (t * cycles) % 1.0 if t < 1 else 1.0
        return lo + (lr_max - lo) * (1 - abs(2 * u - 1))
    if schedule == "cosine":
        return lr_max * (1 + math.cos(math.pi * t)) / 2
    if schedule == "sgdr":
        u = _restart_bounds(t, cycles, mult)
        return lr_max * (1 + math.cos(math.pi * u)) / 2
    if schedule == "linear-restarts":
        u = _restart_bounds(t, cycles, mult)
        return lr_max + (lr_max / 1000 - lr_max) * u
    if schedule == "constant":
        return lr_max
    raise ValueError(f"unknown lr schedule {schedule!r}; choose from {', '.join(LR_SCHEDULES)}")


def momentum_at(step, total_steps, schedule, momentum=0.9, high=0.95, low=0.85):
    """Momentum at ``step``: constant, or 'onecycle' (0.95 -> 0.85 at 45% -> 0.95 at 90%, then 0.95),
    moving opposite to the onecycle learning rate."""
    if schedule == "constant":
        return momentum
    if schedule == "onecycle":
        t = min(max(step / max(total_steps, 1), 0.0), 1.0)
        return float(np.interp(t, [0, 0.45, 0.9, 1], [high, low, high, high]))
    raise ValueError(f"unknown momentum schedule {schedule!r}; choose from {', '.join(MOMENTUM_SCHEDULES)}")


# ------------------------------------------------------------------------------------------- flags
class Parser(argparse.ArgumentParser):
    """ArgumentParser whose errors are one line (no usage dump): ``prog: error: ... (see --help)``."""

    def error(self, message):
        print(f"{self.prog}: error: {message} (see --help)", file=sys.stderr)
        sys.exit(2)


def base_parser(description, **defaults):
    """The flags every training script shares; ``defaults`` override per regime."""
    p = Parser(description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g = p.add_argument_group("data and model")
    g.add_argument("--dataset", default="cifar10", choices=list(DATASETS))
    g.add_argument("--data-dir", default="./data", help="dataset folder (torchvision layout, or raw IDX .gz files for (fashion)mnist)")
    g.add_argument("--model", default="preactresnet18", choices=models.ARCH_NAMES)
    g.add_argument("--act", default="relu", choices=activations.NAMES, help="activation used everywhere in the model")
    g.add_argument("--act-scope", default=None, choices=activations.SCOPES,
                   help="parameter sharing of trainable activations (default: the paper's: network for prelu/psilu/psoftplus/pssilu, channel for kaf)")
    g.add_argument("--saf-insert", default=None, choices=models.SAF_UNITS, help="Zhao & Griffin: symmetric unit after each conv / hidden fc (overrides --act)")
    g.add_argument("--kaf-size", type=int, default=None, help="KAF dictionary size D (default 20)")
    g.add_argument("--kaf-boundary", type=float, default=None, help="KAF dictionary range [-B, B] (default 3)")
    g.add_argument("--kaf-init", default=None, choices=["elu", "random"], help="KAF init (default elu: kernel ridge regression fit)")
    g.add_argument("--kaf-gamma", default=None, choices=["paper", "code"], help="KAF bandwidth 1/(6 D^2) (paper, default) or 1/(8 D^2) (reference code)")
    g.add_argument("--kaf-kernel", default=None, choices=list(activations.KAF_KERNELS),
                   help="KAF kernel (default gaussian; relu and softplus are the reference code's other kernels)")
    g.add_argument("--kaf-impl", default=None, choices=list(activations.KAF_IMPLS),
                   help="how KAF is computed, same result (default auto: fused Triton kernels on a GPU, else a loop over the kernels)")
    g.add_argument("--softplus-beta", type=float, default=None, help="softplus beta (default 1; SAT also uses 10)")
    g.add_argument("--kwta-gamma", type=float, default=None, help="k-WTA share of kept units (default 0.1)")
    g.add_argument("--n-train", type=int, default=None, help="use only the first N training images")
    g = p.add_argument_group("optimisation")
    g.add_argument("--epochs", type=int, default=15)
    g.add_argument("--batch-size", type=int, default=128)
    g.add_argument("--lr-schedule", default="cyclic", choices=LR_SCHEDULES)
    g.add_argument("--lr-max", type=float, default=0.2)
    g.add_argument("--lr-cycles", type=int, default=3, help="cycles of triangular / sgdr / linear-restarts")
    g.add_argument("--lr-mult", type=float, default=1.0, help="cycle-length multiplier of sgdr / linear-restarts")
    g.add_argument("--momentum", type=float, default=0.9)
    g.add_argument("--momentum-schedule", default="constant", choices=MOMENTUM_SCHEDULES)
    g.add_argument("--weight-decay", type=float, default=5e-4)
    g.add_argument("--grad-clip", type=float, default=0.0, help="clip the gradient norm to this (0 = off)")
    g.add_argument("--lr-find", action="store_true",
                   help="LR range test instead of training: sweep the LR exponentially, write lr_find.csv, suggest --lr-max")
    g.add_argument("--lr-find-steps", type=int, default=100, help="minibatches of the LR range test")
    g.add_argument("--lr-find-min", type=float, default=1e-4, help="first LR of the range test")
    g.add_argument("--lr-find-max", type=float, default=10.0, help="last LR of the range test")
    g = p.add_argument_group("adversary")
    g.add_argument("--epsilon", type=fraction, default=8 / 255, help="L-inf radius, e.g. 8/255 or 0.1")
    g = p.add_argument_group("training-data tricks (off by default; see TrainingTricks)")
    g.add_argument("--random-training", type=float, default=0.0, metavar="SHARE",
                   help="Zhao & Griffin's random training: perturb this share of each batch with random noise")
    g.add_argument("--random-noise", default="uniform", choices=["uniform", "gaussian"], help="random-training noise: U(-s, s) or N(0, s^2)")
    g.add_argument("--random-strength", type=fraction, default=None, help="s, the random-training noise strength (default: --epsilon)")
    g.add_argument("--mean-training", type=int, default=0, metavar="N",
                   help="Zhao & Griffin's mean training: N noisy copies of the mean training image per optimiser step, trained towards uniform confidence")
    g.add_argument("--mean-noise", type=fraction, default=0.1, help="std of the Gaussian noise on the mean-image copies")
    g.add_argument("--mean-weight", type=float, default=1.0, help="weight of the mean-training loss KL(uniform || softmax)")
    g.add_argument("--extra-data", default=None, metavar="NPZ",
                   help="Dai et al.'s extra (e.g. generated) training images: .npz with images (uint8 or float in [0,1]) and labels")
    g.add_argument("--extra-fraction", type=float, default=None, help="share of each batch drawn from --extra-data (default 0.5)")
    g = p.add_argument_group("evaluation")
    g.add_argument("--eval-pgd-steps", type=int, default=20)
    g.add_argument("--eval-pgd-restarts", type=int, default=1)
    g.add_argument("--eval-pgd-alpha", type=fraction, default=None, help="PGD step for the final evaluation (default eps/4, i.e. 2/255 at 8/255)")
    g.add_argument("--n-eval", type=int, default=None, help="evaluate on the first N test images (default: all)")
    g.add_argument("--co-guard", type=float, default=0.2,
                   help="catastrophic-overfitting guard: stop and restore the best weights when held-out PGD accuracy drops by more than this (0 = off)")
    g = p.add_argument_group("run")
    g.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    g.add_argument("--amp", default="auto", choices=["auto", "bf16", "fp16", "off"],
                   help="mixed precision on CUDA (auto: bf16 where supported, else fp16 with a loss scaler); off on CPU")
    g.add_argument("--channels-last", type=int, default=1, choices=[0, 1], help="channels_last memory format on CUDA")
    g.add_argument("--compile", action="store_true", help="torch.compile the model")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--out-dir", default=None, help="where the checkpoint and summary.json go (default runs/<script>_<dataset>_<model>_<act>)")
    g.add_argument("--resume", action="store_true",
                   help="continue from <out-dir>/checkpoint.pt (written every epoch, with optimiser, RNG and regime state); starts fresh if there is none")
    p.set_defaults(**defaults)
    return p


def parse_args(parser, argv=None):
    """Parse and validate; any problem becomes a one-line ``error: ...`` message and exit code 2."""
    args = parser.parse_args(argv)
    problems = []
    if args.epsilon <= 0:
        problems.append(f"--epsilon must be > 0, got {args.epsilon}")
    for name in ("epochs", "batch_size", "eval_pgd_steps", "eval_pgd_restarts", "lr_cycles"):
        if getattr(args, name) < 1:
            problems.append(f"--{name.replace('_', '-')} must be >= 1")
    if args.lr_max <= 0:
        problems.append("--lr-max must be > 0")
    for name in ("n_train", "n_eval"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            problems.append(f"--{name.replace('_', '-')} must be >= 1")
    if args.lr_find_steps < 2:
        problems.append("--lr-find-steps must be >= 2")
    if not 0 < args.lr_find_min < args.lr_find_max:
        problems.append("--lr-find-min and --lr-find-max need 0 < min < max")
    if args.lr_find and args.resume:
        problems.append("--resume cannot be combined with --lr-find (the LR range test always starts afresh)")
    problems += trick_problems(args)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        problems.append("--device cuda asked for but CUDA is not available; use --device cpu")
    if args.kaf_impl == "triton" and not args.device.startswith("cuda") and os.environ.get("TRITON_INTERPRET") != "1":
        problems.append("--kaf-impl triton runs on CUDA only (or under TRITON_INTERPRET=1, slowly)")
    try:
        activations.make_factory(args.act, args.act_scope, **act_options(args))
    except ValueError as e:
        problems.append(str(e))
    if problems:
        parser.error("; ".join(problems))
    return args


# flag dest -> (the activation it belongs to, its constructor option)
ACT_OPTION_FLAGS = {"kaf_size": ("kaf", "size"), "kaf_boundary": ("kaf", "boundary"), "kaf_init": ("kaf", "init"),
                    "kaf_gamma": ("kaf", "gamma_rule"), "kaf_kernel": ("kaf", "kernel"), "kaf_impl": ("kaf", "impl"),
                    "softplus_beta": ("softplus", "beta"), "kwta_gamma": ("kwta", "gamma")}


def act_options(args):
    """Activation constructor options from the flags; an option for another activation is refused."""
    options = {}
    for flag, (act, key) in ACT_OPTION_FLAGS.items():
        value = getattr(args, flag, None)
        if value is None:
            continue
        if act != args.act:
            raise ValueError(f"--{flag.replace('_', '-')} applies to --act {act}, not --act {args.act}")
        options[key] = value
    return options


# ------------------------------------------------------------------------------------- checkpoints
def save_atomic(obj, path):
    """torch.save to a temporary file, then rename: a kill never leaves a truncated checkpoint."""
    tmp = path + ".tmp"
    torch.save(obj, tmp)
    os.replace(tmp, path)


def write_json(obj, path):
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2)
    os.replace(tmp, path)


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
        raise UserError(f"--batch-size {args.batch_size} must be divisible by the {world} processes")
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
    """(autocast dtype or None, whether a loss scaler is needed) for ``--amp flag`` on a device type:
    float32 (None) on CPU or with 'off'; 'auto' picks bf16 where ``bf16_supported``, else fp16, and
    only fp16 needs the scaler (its range is too small for unscaled gradients)."""
    if device_type != "cuda" or flag == "off":
        return None, False
    if flag == "auto":
        flag = "bf16" if bf16_supported else "fp16"
    return {"bf16": torch.bfloat16, "fp16": torch.float16}[flag], flag == "fp16"


# ------------------------------------------------------------------------------------------ the run
class Run:
    """One training run: device, data, model, optimiser, AMP, schedule, logging, checkpoints.

    A training script builds a ``Run(args, script)``, writes its regime as ``train_step(x, y)``
    (returning the detached loss and number of correct predictions of the batch, as tensors, and
    calling ``run.step(loss)`` once per optimiser step), and calls ``run.fit(train_step)``.

    Hooks: ``lr_override(batch) -> lr`` replaces the schedule (the LR range test uses it);
    ``counts`` is a dict of regime counters (e.g. attack steps) copied into summary.json."""
    lr_override = None

    def __init__(self, args, script, steps_per_batch=1, epochs_budget=None):
        self.args, self.script = args, script
        self.rank, self.world = distributed_setup(args)
        seed_everything(args.seed)  # the same on every rank: Batches relies on it for disjoint shards
        self.device = torch.device(args.device)
        cuda = self.device.type == "cuda"
        if cuda:
            torch.backends.cudnn.benchmark = True
        # ---- data
        channels, size, classes, mean, std, augment = DATASETS[args.dataset]
        x_train, y_train = load_split(args.dataset, args.data_dir, train=True)
        x_test, y_test = load_split(args.dataset, args.data_dir, train=False)
        if args.n_train:
            x_train, y_train = x_train[:args.n_train], y_train[:args.n_train]
        if args.n_eval:
            x_test, y_test = x_test[:args.n_eval], y_test[:args.n_eval]
        self.channels_last = cuda and bool(args.channels_last)
        self.train_batches = Batches(x_train.to(self.device), y_train.to(self.device), args.batch_size // self.world,
                                     shuffle=True, augment=augment, channels_last=self.channels_last,
                                     rank=self.rank, world=self.world)
        self.tricks = TrainingTricks(args, self.train_batches.x, augment, self.channels_last, self.rank, self.world)
        self.x_test = x_test.to(self.device).float().div_(255)
        self.y_test = y_test.to(self.device)
        g = torch.Generator().manual_seed(args.seed + 1)
        held = torch.randperm(len(x_train), generator=g)[:min(512, len(x_train))]
        self.x_held = x_train[held].to(self.device).float().div_(255)
        self.y_held = y_train[held].to(self.device)
        # ---- model
        self.model = models.build(args.model, args.act, classes, channels, size, mean, std, args.act_scope,
                                  act_options(args), args.saf_insert).to(self.device)
        if self.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        # attacks need input gradients only: they use the bare model, the training loss the DDP one
        self.attack_forward = torch.compile(self.model) if args.compile else self.model
        self.forward = self.attack_forward
        if self.world > 1:
            ddp = torch.nn.parallel.DistributedDataParallel(self.model, device_ids=[self.device.index] if cuda else None)
            self.forward = torch.compile(ddp) if args.compile else ddp
        # ---- optimiser (no weight decay on the activations' own parameters)
        act_params = {id(p) for m in activations.activation_modules(self.model) for p in m.parameters()}
        decay = [p for p in self.model.parameters() if id(p) not in act_params]
        no_decay = [p for p in self.model.parameters() if id(p) in act_params]
        self.opt = torch.optim.SGD([{"params": decay, "weight_decay": args.weight_decay},
                                    {"params": no_decay, "weight_decay": 0.0}],
                                   lr=0.0, momentum=args.momentum, nesterov=False)
        # ---- mixed precision: bf16 where supported, else fp16 with a loss scaler; float32 on CPU
        self.amp_dtype, fp16 = amp_dtype_for(self.device.type, args.amp, cuda and torch.cuda.is_bf16_supported())
        self.scaler = torch.amp.GradScaler("cuda", enabled=fp16)
        # ---- schedule
        self.epochs = epochs_budget or args.epochs
        self.steps_per_batch = steps_per_batch
        self.total_steps = self.epochs * len(self.train_batches) * steps_per_batch
        self.it = 0
        self.counts = {}
        self._set_lr()
        self.train_time, self.best = 0.0, None  # best: the guard's {epoch, held_pgd_acc, model_state}
        self.bad_grad = None  # set by step() when --grad-clip measures the gradient norm
        name = args.saf_insert + "-insert" if args.saf_insert else args.act
        self.out_dir = args.out_dir or os.path.join("runs", f"{script}_{args.dataset}_{args.model}_{name}")
        os.makedirs(self.out_dir, exist_ok=True)
        self.history = []

    # ---- the pieces a regime uses
    def autocast(self):
        return torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None)

    def _set_lr(self):
        a = self.args
        lr = lr_at(self.it, self.total_steps, a.lr_schedule, a.lr_max, a.lr_cycles, a.lr_mult)
        mom = momentum_at(self.it, self.total_steps, a.momentum_schedule, a.momentum)
        if self.lr_override is not None:  # one LR per minibatch, also when a regime steps several times on it
            lr, mom = self.lr_override(self.it // self.steps_per_batch), a.momentum
        for group in self.opt.param_groups:
            group["lr"], group["momentum"] = lr, mom
        self.lr = lr

    def backward(self, loss):
        """Backward pass of a training loss (scaled under fp16 AMP), plus the mean-training term when on."""
        if self.tricks.mean_copies:
            loss = loss + self.tricks.mean_loss(self.model, self.forward, self.autocast)
        self.scaler.scale(loss).backward()

    def step(self, loss=None):
        """One optimiser step: backward of ``loss`` (if given), gradient clipping, SGD step, zero grads,
        and the next iteration's learning rate / momentum."""
        if loss is not None:
            self.backward(loss)
        if self.args.grad_clip > 0:
            self.scaler.unscale_(self.opt)
            norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.args.grad_clip)
            if not self.scaler.is_enabled():  # under fp16 an inf norm is the scaler's business, not divergence
                self.bad_grad = ~torch.isfinite(norm)
        self.scaler.step(self.opt)
        self.scaler.update()
        self.opt.zero_grad(set_to_none=True)
        self.it += 1
        self._set_lr()

    # ---- evaluation
    def pgd_config(self):
        a = self.args
        alpha = a.eval_pgd_alpha if a.eval_pgd_alpha is not None else a.epsilon / 4
        return dict(eps=a.epsilon, alpha=alpha, steps=a.eval_pgd_steps, restarts=a.eval_pgd_restarts)

    def held_out_robust_accuracy(self):
        """PGD-10 accuracy on a fixed batch of training images (the catastrophic-overfitting probe)."""
        eps = self.args.epsilon
        attack = lambda m, x, y: attacks.pgd(m, x, y, eps, eps / 4, 10)
        return attacks.robust_accuracy(self.model, self.x_held, self.y_held, attack)[0]

    def evaluate(self):
        """Clean and PGD accuracy on the test set (eval mode, float32)."""
        cfg = self.pgd_config()
        bar = lambda desc: (lambda it: tqdm(it, desc=desc, leave=False, dynamic_ncols=True))
        clean, _ = attacks.robust_accuracy(self.model, self.x_test, self.y_test, progress=bar("eval clean"))
        attack = lambda m, x, y: attacks.pgd(m, x, y, cfg["eps"], cfg["alpha"], cfg["steps"], cfg["restarts"])
        robust, _ = attacks.robust_accuracy(self.model, self.x_test, self.y_test, attack,
                                            progress=bar(f"eval PGD-{cfg['steps']}"))
        return clean, robust

    # ---- checkpoint and summary
    def checkpoint(self, epoch, path=None, train_step=None, guard_stopped=False):
        """Write everything needed to rebuild the model (eval.py, models.load_checkpoint) and to
        continue the run bit for bit (--resume): optimiser, scaler, iteration, RNG states, the
        regime's own state (Free's perturbation), history and the guard's best weights.  Atomic."""
        if self.rank != 0:
            return
        args = self.args
        dataset = dict(name=args.dataset, **dict(zip(("channels", "size", "classes"), DATASETS[args.dataset][:3])))
        cuda = self.device.type == "cuda"
        save_atomic({"model_config": self.model.config, "model_state": self.model.state_dict(),
                     "args": vars(args), "script": self.script, "dataset": dataset, "epoch": epoch,
                     "guard_stopped": guard_stopped, "optimizer": self.opt.state_dict(), "scaler": self.scaler.state_dict(),
                     "iteration": self.it, "counts": dict(self.counts), "history": self.history,
                     "train_time_s": self.train_time, "best": self.best,
                     "regime_state": train_step.state_dict() if hasattr(train_step, "state_dict") else None,
                     "rng": {"torch": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state_all() if cuda else None,
                             "numpy": np.random.get_state(), "python": random.getstate()}},
                    path or os.path.join(self.out_dir, "checkpoint.pt"))

    def resume(self, train_step):
        """Load <out-dir>/checkpoint.pt written by the same script for the same model and continue
        after its last completed epoch.  Returns that epoch (0 when there is nothing to resume)."""
        path = os.path.join(self.out_dir, "checkpoint.pt")
        if not os.path.exists(path):
            self.log(f"--resume: no checkpoint in {self.out_dir} yet, starting from scratch")
            return 0
        try:
            ckpt = torch.load(path, map_location=self.device, weights_only=False)
        except Exception as e:
            raise models.CheckpointError(f"cannot resume from {path}: {type(e).__name__}: {str(e).splitlines()[0][:160]}") from None
        if not isinstance(ckpt, dict) or "rng" not in ckpt or "model_config" not in ckpt:
            raise models.CheckpointError(f"cannot resume from {path}: not a resumable checkpoint of this project")
        if ckpt["script"] != self.script or ckpt["model_config"] != self.model.config:
            theirs = f"{ckpt['script']} {ckpt['model_config'].get('arch')} act={ckpt['model_config'].get('act')}"
            raise models.CheckpointError(f"cannot resume from {path}: it is a {theirs} run, not this one "
                                         f"({self.script} {self.model.config.get('arch')} act={self.model.config.get('act')}); use another --out-dir")
        self.model.load_state_dict(ckpt["model_state"])
        self.opt.load_state_dict(ckpt["optimizer"])
        self.scaler.load_state_dict(ckpt["scaler"])
        if ckpt["regime_state"] is not None and hasattr(train_step, "load_state_dict"):
            train_step.load_state_dict(ckpt["regime_state"])
        self.it, self.history, self.train_time = ckpt["iteration"], ckpt["history"], ckpt["train_time_s"]
        self.counts.update(ckpt["counts"])
        self.best = ckpt["best"]
        rng = ckpt["rng"]
        torch.set_rng_state(rng["torch"].cpu())
        if rng["cuda"] is not None and self.device.type == "cuda":
            torch.cuda.set_rng_state_all([s.cpu() for s in rng["cuda"]])
        np.random.set_state(rng["numpy"])
        random.setstate(rng["python"])
        self._set_lr()
        # a run the overfitting guard stopped stays stopped; a longer --epochs continues a finished one
        done = self.epochs if ckpt["guard_stopped"] else ckpt["epoch"]
        self.log(f"resumed from {path}: {ckpt['epoch']} epochs done{' (finished)' if done >= self.epochs else ''}, "
                 f"optimizer step {self.it}")
        return done

    def log(self, message, error=False):
        if self.rank == 0:
            print(message, file=sys.stderr if error else sys.stdout, flush=True)

    def _train_epoch(self, train_step, epoch, label):
        """One pass over the training batches.  Returns (mean loss, accuracy) or raises Diverged.

        A non-finite loss is noted on the device (index of the first bad batch) and looked at only
        where the progress bar already syncs, so the hot loop has no extra host syncs."""
        self.model.train()
        loss_sum = torch.zeros((), device=self.device)
        correct = torch.zeros((), device=self.device)
        first_bad = torch.zeros((), dtype=torch.long, device=self.device)  # 1 + index of the first bad batch, 0 = none
        seen, n = 0, len(self.train_batches)
        bar = tqdm(self.train_batches, desc=f"{label} {epoch}/{self.epochs}", leave=False, dynamic_ncols=True,
                   disable=self.rank != 0)
        for i, (x, y) in enumerate(bar):
            x, y = self.tricks.mix(x, y)  # random training / extra data (no-op when off)
            loss, n_correct = train_step(x, y)
            bad = ~torch.isfinite(loss.detach().float())
            if self.bad_grad is not None:
                bad = bad | self.bad_grad
            first_bad = torch.where((first_bad == 0) & bad, i + 1, first_bad)
            loss_sum += loss.float() * len(y)
            correct += n_correct
            seen += len(y)
            if i % 50 == 0 or i == n - 1:  # the only host syncs in the loop
                if first_bad.item():
                    raise Diverged(epoch, int(first_bad.item()), n, label)
                if hasattr(bar, "set_postfix"):
                    bar.set_postfix(loss=f"{loss_sum.item() / seen:.3f}", acc=f"{correct.item() / seen:.3f}", lr=f"{self.lr:.3g}")
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        if self.world > 1:  # every rank reports the mean over all ranks' batches
            totals = torch.stack([loss_sum, correct.float(), torch.tensor(float(seen), device=self.device)])
            torch.distributed.all_reduce(totals)
            loss_sum, correct, seen = totals[0], totals[1], totals[2].item()
        return loss_sum.item() / seen, correct.item() / seen

    def _sync_buffers(self):
        """DDP averages gradients but each rank's BatchNorm statistics drift apart: take rank 0's."""
        if self.world > 1:
            for b in self.model.buffers():
                torch.distributed.broadcast(b, 0)

    def fit(self, train_step, passes_label="epoch"):
        """Train for ``self.epochs`` epochs with ``train_step(x, y) -> (loss, n_correct)``, then evaluate
        and write checkpoint.pt and summary.json into the out dir.  Returns the summary dict.

        --resume continues from the last completed epoch.  A non-finite loss (or gradient norm, with
        --grad-clip) stops the run: checkpoint.pt keeps the last good epoch, summary.json says where it
        broke, and :class:`Diverged` is raised (one-line error, exit code 1).  Ctrl-C leaves
        checkpoint.pt at the last completed epoch (resumable) and the current weights in interrupted.pt."""
        args, model = self.args, self.model
        label = passes_label
        summary = {"script": self.script, "flags": vars(args), "device": str(self.device),
                   "amp": str(self.amp_dtype).replace("torch.", "") if self.amp_dtype else "off",
                   "world_size": self.world,
                   "activation_params": activations.activation_parameter_count(model),
                   "kaf_impl": activations.kaf_impls(model, self.device, compiled=args.compile),
                   "model_params": sum(p.numel() for p in model.parameters()),
                   "catastrophic_overfitting": None, "stopped_early": None, "diverged": None}
        start = self.resume(train_step) if args.resume else 0
        self.log(f"{self.script}: {args.dataset} {args.model} act={args.saf_insert + '-insert' if args.saf_insert else args.act} "
                 f"eps={args.epsilon:.4g} {self.epochs} {label}{'es' if label.endswith('s') else 's'} x {len(self.train_batches)} batches "
                 f"on {self.device}{f' x {self.world} processes' if self.world > 1 else ''} (amp {summary['amp']}"
                 f"{', kaf ' + '+'.join(summary['kaf_impl']) if summary['kaf_impl'] else ''}), out {self.out_dir}")
        epochs_done = start
        try:
            for epoch in range(start + 1, self.epochs + 1):
                tic = time.time()
                train_loss, train_acc = self._train_epoch(train_step, epoch, label)
                self.train_time += time.time() - tic
                self._sync_buffers()
                held = self.held_out_robust_accuracy()
                if self.world > 1:  # one decision for all ranks
                    t = torch.tensor(held, device=self.device)
                    torch.distributed.broadcast(t, 0)
                    held = t.item()
                self.history.append(dict(epoch=epoch, train_loss=train_loss, train_acc=train_acc, held_pgd_acc=held,
                                         lr=self.lr, time_s=round(self.train_time, 2)))
                self.log(f"{label} {epoch:3d}  loss {train_loss:.4f}  acc {train_acc:.4f}  "
                         f"held-out PGD-10 acc {held:.4f}  lr {self.lr:.4g}  time {self.train_time:.1f}s")
                epochs_done = epoch
                best = self.best
                if args.co_guard > 0 and best is not None and held < best["held_pgd_acc"] - args.co_guard:
                    summary["catastrophic_overfitting"] = dict(epoch=epoch, held_pgd_acc=held, best_held_pgd_acc=best["held_pgd_acc"],
                                                               restored_epoch=best["epoch"])
                    summary["stopped_early"] = f"catastrophic overfitting in {label} {epoch}"
                    self.log(f"catastrophic overfitting detected in {label} {epoch}: held-out PGD accuracy fell "
                             f"from {best['held_pgd_acc']:.3f} to {held:.3f}; restoring the weights of {label} {best['epoch']} and stopping")
                    model.load_state_dict(best["model_state"])
                    break
                if best is None or held >= best["held_pgd_acc"]:
                    self.best = dict(epoch=epoch, held_pgd_acc=held, model_state=copy.deepcopy(model.state_dict()))
                self.checkpoint(epoch, train_step=train_step)
        except Diverged as e:
            summary["stopped_early"] = summary["diverged"] = str(e)
            summary.update(self._result_fields(epochs_done, self.train_time, evaluated=False))
            if self.rank == 0:
                write_json(summary, os.path.join(self.out_dir, "summary.json"))
            raise Diverged(e.epoch, e.batch, e.batches, e.label,
                           (f"; checkpoint.pt keeps {label} {epochs_done}" if epochs_done else "; no epoch completed, no checkpoint")
                           + f", reason in {self.out_dir}/summary.json") from None
        except KeyboardInterrupt:
            summary["stopped_early"] = f"interrupted in {label} {epochs_done + 1}"
            self.checkpoint(epochs_done, path=os.path.join(self.out_dir, "interrupted.pt"))
            summary.update(self._result_fields(epochs_done, self.train_time, evaluated=False))
            if self.rank == 0:
                write_json(summary, os.path.join(self.out_dir, "summary.json"))
            self.log(f"interrupted: checkpoint.pt holds {label} {epochs_done} (continue with --resume), the current "
                     f"weights are in interrupted.pt, summary.json in {self.out_dir}", error=True)
            raise
        self.checkpoint(epochs_done, train_step=train_step, guard_stopped=summary["catastrophic_overfitting"] is not None)
        if self.world > 1:
            sums = self._rank_param_sums()
            summary["params_identical_across_ranks"] = all(s == sums[0] for s in sums[1:])
            summary["rank_param_sums"] = sums
        if self.rank != 0:  # rank 0 evaluates and writes the summary; the others wait for it
            torch.distributed.barrier()
            return summary
        clean, robust = self.evaluate()
        summary.update(self._result_fields(epochs_done, self.train_time, evaluated=True))
        summary.update(clean_acc=clean, pgd_acc=robust)
        write_json(summary, os.path.join(self.out_dir, "summary.json"))
        cfg = summary["pgd"]
        self.log(f"clean acc {clean:.4f}  PGD-{cfg['steps']}x{cfg['restarts']} (eps {cfg['eps']:.4g}, step {cfg['alpha']:.4g}) "
                 f"acc {robust:.4f}  train time {self.train_time:.1f}s  -> {self.out_dir}/summary.json")
        if self.world > 1:
            torch.distributed.barrier()
        return summary

    def _rank_param_sums(self):
        """Per-tensor float64 sums of the parameters, one list per rank (the DDP test's witness)."""
        sums = torch.stack([p.detach().double().sum() for p in self.model.parameters()])
        gathered = [torch.empty_like(sums) for _ in range(self.world)]
        torch.distributed.all_gather(gathered, sums)
        return [g.tolist() for g in gathered]

    def _result_fields(self, epochs_done, train_time, evaluated):
        return {"epochs_completed": epochs_done, "train_time_s": round(train_time, 2), "pgd": self.pgd_config(),
                "n_eval": len(self.y_test), "history": self.history, "evaluated": evaluated,
                "activation_values": activations.activation_parameter_values(self.model),
                "counts": dict(optimizer_steps=self.it, **self.counts),
                "checkpoint": os.path.join(self.out_dir, "checkpoint.pt")}


# ----------------------------------------------------------------------------------- LR range test
def _centred_mean(values, width):
    """Moving average over ``width`` points centred on each point (fewer at the ends).  Unlike an
    EMA it does not lag, so it does not shift the loss curve towards larger learning rates."""
    v = np.asarray(values, dtype=float)
    idx, half = np.arange(len(v)), width // 2
    lo, hi = np.clip(idx - half, 0, len(v)), np.clip(idx + half + 1, 0, len(v))
    c = np.concatenate([[0.0], np.cumsum(v)])
    return (c[hi] - c[lo]) / (hi - lo)


def _forever(batches):
    while True:
        yield from batches


def lr_range_test(run, train_step, beta=0.9, diverge=4.0):
    """LR range test (Smith 2017, "Cyclical learning rates"; the fast-training thesis's LR finder).

    Runs the regime's ``train_step`` for --lr-find-steps minibatches n with the learning rate rising
    geometrically, lr_i = lr_min (lr_max / lr_min)^(i / (n-1)) (--lr-find-min/--lr-find-max; one LR
    per minibatch, also for Free's m replays; constant --momentum), and records the regime's own training loss, so the
    suggestion fits the adversarial loss, not the clean one.  It stops early once the smoothed loss
    s_i (bias-corrected EMA, s = beta s + (1-beta) loss, as in fastai) exceeds ``diverge`` x its best
    or is not finite.  Suggested lr_max: the LR of the steepest descent d loss / d log(lr) of the
    centred moving average of the loss, before that average's minimum (i.e. before divergence).

    Writes lr_find.csv (and lr_find.png when matplotlib is installed) into the out dir; the trained
    weights are thrown away.  Returns {suggested_lr_max, min_loss_lr, stopped_early, csv}."""
    a = run.args
    n, lo, hi = a.lr_find_steps, a.lr_find_min, a.lr_find_max
    run.lr_override = lambda i: lo * (hi / lo) ** (min(i, n - 1) / (n - 1))
    run._set_lr()
    run.model.train()
    print(f"{run.script}: LR range test {lo:.3g} -> {hi:.3g} over {n} minibatches on {run.device}, out {run.out_dir}", flush=True)
    rows, ema, best, stopped = [], 0.0, math.inf, None
    batches = zip(range(n), _forever(run.train_batches))
    for i, (x, y) in tqdm(batches, total=n, desc="lr find", leave=False, dynamic_ncols=True):
        lr = run.lr  # the LR this minibatch trains with (run.step sets the next one)
        loss = float(train_step(*run.tricks.mix(x, y))[0])
        ema = beta * ema + (1 - beta) * loss
        smooth = ema / (1 - beta ** (i + 1))
        rows.append((i, lr, loss, smooth))
        best = min(best, smooth)
        if not math.isfinite(smooth) or smooth > diverge * best:
            stopped = f"loss {'not finite' if not math.isfinite(smooth) else f'above {diverge:g}x its minimum'} at lr {lr:.3g}"
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
        print(f"warning: the loss did not fall before the LR range test stopped; try a smaller --lr-find-min than {lo:g} "
              f"or more --lr-find-steps", file=sys.stderr)
    path = os.path.join(run.out_dir, "lr_find.csv")
    with open(path + ".tmp", "w") as f:
        f.write("iteration,lr,loss,smoothed_loss,centred_loss\n")
        for j, (i, lr, loss, smooth) in enumerate(rows):
            f.write(f"{i},{lr:.6g},{loss:.6g},{smooth:.6g},{f'{centred[j]:.6g}' if j < k else ''}\n")
    os.replace(path + ".tmp", path)
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        fig, ax = plt.subplots(figsize=(6, 4))
        ax.plot(lrs, losses, alpha=0.3, label="loss")
        ax.plot(lrs, centred, label="centred mean")
        ax.axvline(suggestion, color="k", linestyle="--", label=f"suggested lr_max {suggestion:.3g}")
        ax.set(xscale="log", xlabel="learning rate", ylabel="training loss", title=f"{run.script} LR range test")
        ax.legend()
        fig.savefig(os.path.join(run.out_dir, "lr_find.png"), dpi=120, bbox_inches="tight")
        plt.close(fig)
    except ImportError:  # the plot is optional
        pass
    print(f"LR range test: {len(rows)} minibatches{', stopped: ' + stopped if stopped else ''}; loss minimum at lr {min_lr:.3g}; "
          f"suggested --lr-max {suggestion:.3g} (steepest descent)  -> {path}", flush=True)
    return {"suggested_lr_max": suggestion, "min_loss_lr": min_lr, "stopped_early": stopped, "csv": path}


# ------------------------ training-data tricks (Zhao & Griffin random / mean training, Dai et al. extra data)
# Everything here is off by default.  The Run applies it in two places only: mix() on each clean minibatch
# before the regime sees it (so noisy and extra images are attacked and trained on like any other), and
# mean_loss() added to the loss in Run.backward (every regime's optimiser step goes through it).
EXTRA_IMAGE_KEYS, EXTRA_LABEL_KEYS = ("x", "image", "images", "data"), ("y", "label", "labels", "targets")


def trick_problems(args):
    """Validation messages for the training-data trick flags (empty when all is well)."""
    problems = []
    if not 0 <= args.random_training <= 1:
        problems.append("--random-training must be a fraction in [0, 1]")
    if args.random_strength is not None and args.random_strength <= 0:
        problems.append("--random-strength must be > 0")
    if args.mean_training < 0 or args.mean_noise < 0 or args.mean_weight < 0:
        problems.append("--mean-training, --mean-noise and --mean-weight must be >= 0")
    if args.extra_fraction is not None and args.extra_data is None:
        problems.append("--extra-fraction needs --extra-data")
    if args.extra_fraction is not None and not 0 < args.extra_fraction < 1:
        problems.append("--extra-fraction must be in (0, 1)")
    if args.extra_data is not None and not os.path.isfile(args.extra_data):
        problems.append(f"--extra-data {args.extra_data}: no such file")
    return problems


def load_extra_data(path, channels, size, classes):
    """(uint8 NCHW images, int64 labels) of an extra-data file (Dai et al. 2021 add generated images).

    The .npz holds an image array under one of the keys x / image / images / data (uint8, or float in
    [0, 1] which is rounded to uint8 like the real data; NCHW, NHWC -- the layout generated-data
    files usually have -- or NHW for one channel) and a label array under y / label / labels /
    targets.  Anything else is a UserError naming the problem."""
    try:
        f = np.load(path)
        if not isinstance(f, np.lib.npyio.NpzFile):
            raise ValueError("a single array, not an .npz archive")
        with f:
            xk = next((k for k in EXTRA_IMAGE_KEYS if k in f.files), None)
            yk = next((k for k in EXTRA_LABEL_KEYS if k in f.files), None)
            if xk is None or yk is None:
                raise UserError(f"--extra-data {path}: needs an image array ({', '.join(EXTRA_IMAGE_KEYS)}) and a label "
                                f"array ({', '.join(EXTRA_LABEL_KEYS)}); found {', '.join(f.files) or 'nothing'}")
            x, y = f[xk], f[yk]
    except (OSError, ValueError, EOFError) as e:  # not an npz, truncated, pickled objects
        raise UserError(f"--extra-data {path}: cannot read it as .npz ({str(e).splitlines()[0][:120]})") from None
    want = (channels, size, size)
    if x.ndim == 3 and channels == 1:
        x = x[:, None]
    if x.ndim == 4 and x.shape[1:] != want and x.shape[1:] == (size, size, channels):
        x = x.transpose(0, 3, 1, 2)
    if x.ndim != 4 or x.shape[1:] != want:
        raise UserError(f"--extra-data {path}: images of shape {tuple(x.shape[1:])}, the dataset needs "
                        f"{channels}x{size}x{size} (NCHW or NHWC)")
    if y.shape != (len(x),) or not np.issubdtype(y.dtype, np.integer) or len(y) == 0 or y.min() < 0 or y.max() >= classes:
        raise UserError(f"--extra-data {path}: needs one integer label in [0, {classes}) per image")
    if np.issubdtype(x.dtype, np.floating):
        if x.min() < 0 or x.max() > 1:
            raise UserError(f"--extra-data {path}: float images must lie in [0, 1], found [{x.min():.3g}, {x.max():.3g}]")
        x = np.rint(x * 255)
    elif x.dtype != np.uint8:
        raise UserError(f"--extra-data {path}: images must be uint8 or float in [0, 1], not {x.dtype}")
    return torch.from_numpy(np.ascontiguousarray(x, dtype=np.uint8)), torch.from_numpy(y.astype(np.int64))


def dataset_mean_image(x, chunk=4096):
    """Per-pixel mean of a uint8 image set, in [0, 1] (summed in chunks: no float copy of the whole set)."""
    total = torch.zeros(x.shape[1:], dtype=torch.float64, device=x.device)
    for i in range(0, len(x), chunk):
        total += x[i:i + chunk].sum(0, dtype=torch.float64)
    return (total / (255 * len(x))).float()


class TrainingTricks:
    """The training-data tricks, each off by default.

    Random training (Zhao & Griffin 2016, "R"): a share p = --random-training of each minibatch
    (round(p n) images, chosen at random) becomes clip(x + e, 0, 1), e ~ U(-s, s) or N(0, s^2)
    per pixel (--random-noise, s = --random-strength, default --epsilon); labels are kept.

    Mean training (Zhao & Griffin 2016, "M"): N = --mean-training noisy copies of the training set's
    mean image, m_j = clip(mean + sigma e_j, 0, 1), e_j ~ N(0, I), sigma = --mean-noise, drawn afresh for
    every optimiser step, are nonsense inputs the model should not be confident about.  Their loss
        L_mean = lambda * (1/N) sum_j KL(U || softmax(f(m_j))) = lambda * (1/N) sum_j (-log K - (1/K) sum_k log p_jk),
    lambda = --mean-weight, is zero exactly when the model answers uniformly.  The paper adds the
    copies to the training set under a hybrid loss that keeps nonsense outputs small; KL to uniform
    is our reading for a softmax classifier.  The copies are not attacked and go through the model in
    eval mode: in train mode BatchNorm would normalise a batch of near-identical images by its own
    tiny variance and write that into its running statistics.

    Extra data (Dai et al. 2021, who add generated images to adversarial training): round(f n) images
    of each minibatch, f = --extra-fraction, are replaced by images drawn uniformly with replacement
    from --extra-data (with the dataset's augmentation).  The batch size and the number of optimiser
    steps stay as they are, and an epoch uses about (1 - f) of the real images, a new random subset
    each epoch (the fixed real : generated ratio per batch of Gowal et al. 2021's recipe).

    Extra images replace rows first, then random training perturbs its own random rows, so noise
    reaches real and extra images alike.  Under distributed training every rank draws a different
    slice of one shared random draw, so the ranks do not train on the same extra images or copies."""

    def __init__(self, args, x_train, augment="none", channels_last=False, rank=0, world=1):
        self.random_share, self.random_noise = args.random_training, args.random_noise
        self.random_strength = args.random_strength if args.random_strength is not None else args.epsilon
        self.mean_copies, self.mean_noise, self.mean_weight = args.mean_training, args.mean_noise, args.mean_weight
        self.extra_fraction = args.extra_fraction if args.extra_fraction is not None else 0.5
        self.channels_last, self.rank, self.world = channels_last, rank, world
        self.mean_image = dataset_mean_image(x_train) if self.mean_copies else None
        self.extra = None
        if args.extra_data:
            channels, size, classes = DATASETS[args.dataset][:3]
            x, y = load_extra_data(args.extra_data, channels, size, classes)
            self.extra = Batches(x.to(x_train.device), y.to(x_train.device), 1, augment=augment)

    def _rank_part(self, draw, n):
        """This rank's n of a draw of n * world (the same draw on every rank, which share a seed)."""
        return draw(n * self.world)[self.rank * n:(self.rank + 1) * n]

    def mix(self, x, y):
        """The minibatch the regime trains on: extra images in, then random-training noise."""
        n = len(x)
        k = round(self.extra_fraction * n) if self.extra is not None else 0
        if k:
            idx = self._rank_part(lambda m: torch.randint(len(self.extra.x), (m,), device=x.device), k)
            xe = self.extra.x[idx].float().div_(255)
            if self.extra.augment == "crop+flip":
                xe = self.extra._augment(xe)
            x, y = x.clone(), y.clone()
            x[:k], y[:k] = xe, self.extra.y[idx]
        k = round(self.random_share * n)
        if k:
            rows = torch.randperm(n, device=x.device)[:k]
            e = torch.randn_like(x[rows]) if self.random_noise == "gaussian" else torch.rand_like(x[rows]).mul_(2).sub_(1)
            x = x.clone()
            x[rows] = (x[rows] + self.random_strength * e).clamp_(0, 1)
        return x, y

    def mean_batch(self):
        """N fresh noisy copies of the mean image, clip(mean + sigma e, 0, 1)."""
        noise = self._rank_part(lambda m: torch.randn((m, *self.mean_image.shape), device=self.mean_image.device),
                                self.mean_copies)
        x = (self.mean_image + self.mean_noise * noise).clamp_(0, 1)
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x

    def mean_loss(self, model, forward, autocast):
        """lambda * mean_j KL(U || softmax(forward(m_j))) on fresh copies, ``model`` in eval mode meanwhile."""
        was_training = model.training
        model.eval()
        try:
            with autocast():
                logits = forward(self.mean_batch())
        finally:
            model.train(was_training)
        logp = F.log_softmax(logits.float(), dim=1)
        return self.mean_weight * (-logp.mean(1) - math.log(logp.shape[1])).mean()
