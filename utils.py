"""What the three training scripts share: data, schedules, flags, checkpoints and the epoch loop.

* Data: every dataset is loaded once into memory as uint8 tensors (on the GPU when there is one) and
  batched by :class:`Batches`, which does random crop / flip on the device itself -- no DataLoader
  workers in the hot loop (the airbench approach).
* Schedules: :func:`lr_at` / :func:`momentum_at`, stepped per iteration.
* :class:`Run`: builds device, data, model, SGD, AMP; ``run.step(loss)`` is one optimiser step;
  ``run.fit(train_step)`` runs the epochs with tqdm, the catastrophic-overfitting guard, per-epoch
  atomic checkpoints, the final clean/PGD evaluation and ``summary.json``.

A training script supplies only its regime: the function that turns a clean batch into a training
loss.  Imports torch, numpy, tqdm (optional) and the project's modules.
"""
import argparse
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


def main_guard(main):
    """Run ``main()``; turn user errors into a one-line message and exit code 2, Ctrl-C into 130."""
    try:
        return main()
    except (UserError, models.CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
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


class Batches:
    """Iterate over (x, y) minibatches of an in-memory uint8 dataset, on its device.

    Images come out as float in [0,1] (channels_last when asked).  With ``augment`` 'crop+flip' each
    image is randomly translated by up to ``pad`` pixels (zero padding, like RandomCrop(padding=4))
    and flipped horizontally with probability 1/2, all on the device.  The last batch may be short."""

    def __init__(self, x, y, batch_size, shuffle=True, augment="none", pad=4, channels_last=False, generator=None):
        self.x, self.y, self.batch_size = x, y, batch_size
        self.shuffle, self.augment, self.pad = shuffle, augment, pad
        self.channels_last, self.generator = channels_last, generator

    def __len__(self):
        return math.ceil(len(self.x) / self.batch_size)

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
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        problems.append("--device cuda asked for but CUDA is not available; use --device cpu")
    try:
        activations.make_factory(args.act, args.act_scope, **act_options(args))
    except ValueError as e:
        problems.append(str(e))
    if problems:
        parser.error("; ".join(problems))
    return args


def act_options(args):
    """Activation constructor options from the flags; an option for another activation is refused."""
    flag_map = {"kaf_size": ("kaf", "size"), "kaf_boundary": ("kaf", "boundary"), "kaf_init": ("kaf", "init"),
                "kaf_gamma": ("kaf", "gamma_rule"), "softplus_beta": ("softplus", "beta"), "kwta_gamma": ("kwta", "gamma")}
    options = {}
    for flag, (act, key) in flag_map.items():
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


def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


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
        seed_everything(args.seed)
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
        self.train_batches = Batches(x_train.to(self.device), y_train.to(self.device), args.batch_size,
                                     shuffle=True, augment=augment, channels_last=self.channels_last)
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
        self.forward = torch.compile(self.model) if args.compile else self.model
        # ---- optimiser (no weight decay on the activations' own parameters)
        act_params = {id(p) for m in activations.activation_modules(self.model) for p in m.parameters()}
        decay = [p for p in self.model.parameters() if id(p) not in act_params]
        no_decay = [p for p in self.model.parameters() if id(p) in act_params]
        self.opt = torch.optim.SGD([{"params": decay, "weight_decay": args.weight_decay},
                                    {"params": no_decay, "weight_decay": 0.0}],
                                   lr=0.0, momentum=args.momentum, nesterov=False)
        # ---- mixed precision: bf16 where supported, else fp16 with a loss scaler; float32 on CPU
        amp = args.amp if cuda else "off"
        if amp == "auto":
            amp = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        self.amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(amp)
        self.scaler = torch.amp.GradScaler("cuda", enabled=amp == "fp16")
        # ---- schedule
        self.epochs = epochs_budget or args.epochs
        self.steps_per_batch = steps_per_batch
        self.total_steps = self.epochs * len(self.train_batches) * steps_per_batch
        self.it = 0
        self.counts = {}
        self._set_lr()
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
        """Backward pass of a training loss (scaled under fp16 AMP)."""
        self.scaler.scale(loss).backward()

    def step(self, loss=None):
        """One optimiser step: backward of ``loss`` (if given), gradient clipping, SGD step, zero grads,
        and the next iteration's learning rate / momentum."""
        if loss is not None:
            self.backward(loss)
        if self.args.grad_clip > 0:
            self.scaler.unscale_(self.opt)
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.args.grad_clip)
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
    def checkpoint(self, epoch, path=None):
        args = self.args
        dataset = dict(name=args.dataset, **dict(zip(("channels", "size", "classes"), DATASETS[args.dataset][:3])))
        save_atomic({"model_config": self.model.config, "model_state": self.model.state_dict(),
                     "args": vars(args), "script": self.script, "dataset": dataset, "epoch": epoch,
                     "optimizer": self.opt.state_dict(), "scaler": self.scaler.state_dict(), "iteration": self.it},
                    path or os.path.join(self.out_dir, "checkpoint.pt"))

    def fit(self, train_step, passes_label="epoch"):
        """Train for ``self.epochs`` epochs with ``train_step(x, y) -> (loss, n_correct)``, then evaluate
        and write checkpoint.pt and summary.json into the out dir.  Returns the summary dict."""
        args, model = self.args, self.model
        summary = {"script": self.script, "flags": vars(args), "device": str(self.device),
                   "amp": str(self.amp_dtype).replace("torch.", "") if self.amp_dtype else "off",
                   "activation_params": activations.activation_parameter_count(model),
                   "model_params": sum(p.numel() for p in model.parameters()),
                   "catastrophic_overfitting": None, "stopped_early": None}
        print(f"{self.script}: {args.dataset} {args.model} act={args.saf_insert + '-insert' if args.saf_insert else args.act} "
              f"eps={args.epsilon:.4g} {self.epochs} {passes_label}{'es' if passes_label.endswith('s') else 's'} x {len(self.train_batches)} batches on {self.device} "
              f"(amp {summary['amp']}), out {self.out_dir}", flush=True)
        best_robust, best_state, best_epoch = -1.0, None, 0
        epochs_done, train_time = 0, 0.0
        try:
            for epoch in range(1, self.epochs + 1):
                model.train()
                start = time.time()
                loss_sum = torch.zeros((), device=self.device)
                correct = torch.zeros((), device=self.device)
                seen = 0
                bar = tqdm(self.train_batches, desc=f"{passes_label} {epoch}/{self.epochs}", leave=False, dynamic_ncols=True)
                for i, (x, y) in enumerate(bar):
                    loss, n_correct = train_step(x, y)
                    loss_sum += loss.float() * len(y)
                    correct += n_correct
                    seen += len(y)
                    if i % 50 == 0 and hasattr(bar, "set_postfix"):  # the only host sync in the loop
                        bar.set_postfix(loss=f"{loss_sum.item() / seen:.3f}", acc=f"{correct.item() / seen:.3f}", lr=f"{self.lr:.3g}")
                if self.device.type == "cuda":
                    torch.cuda.synchronize()
                train_time += time.time() - start
                train_loss, train_acc = loss_sum.item() / seen, correct.item() / seen
                if not math.isfinite(train_loss):
                    summary["stopped_early"] = f"non-finite training loss in {passes_label} {epoch}"
                    print(f"error: training diverged (non-finite loss) in {passes_label} {epoch}; "
                          f"keeping the weights of {passes_label} {best_epoch}", file=sys.stderr)
                    if best_state is not None:
                        model.load_state_dict(best_state)
                    break
                held = self.held_out_robust_accuracy()
                record = dict(epoch=epoch, train_loss=train_loss, train_acc=train_acc, held_pgd_acc=held,
                              lr=self.lr, time_s=round(train_time, 2))
                self.history.append(record)
                print(f"{passes_label} {epoch:3d}  loss {train_loss:.4f}  acc {train_acc:.4f}  "
                      f"held-out PGD-10 acc {held:.4f}  lr {self.lr:.4g}  time {train_time:.1f}s", flush=True)
                epochs_done = epoch
                if args.co_guard > 0 and best_robust >= 0 and held < best_robust - args.co_guard:
                    summary["catastrophic_overfitting"] = dict(epoch=epoch, held_pgd_acc=held, best_held_pgd_acc=best_robust,
                                                               restored_epoch=best_epoch)
                    summary["stopped_early"] = f"catastrophic overfitting in {passes_label} {epoch}"
                    print(f"catastrophic overfitting detected in {passes_label} {epoch}: held-out PGD accuracy fell "
                          f"from {best_robust:.3f} to {held:.3f}; restoring the weights of {passes_label} {best_epoch} and stopping",
                          flush=True)
                    model.load_state_dict(best_state)
                    break
                if held >= best_robust:
                    best_robust, best_epoch = held, epoch
                    best_state = copy.deepcopy(model.state_dict())
                self.checkpoint(epoch)
        except KeyboardInterrupt:
            summary["stopped_early"] = f"interrupted in {passes_label} {epochs_done + 1}"
            self.checkpoint(epochs_done)
            summary.update(self._result_fields(epochs_done, train_time, evaluated=False))
            write_json(summary, os.path.join(self.out_dir, "summary.json"))
            print(f"interrupted: checkpoint of {passes_label} {epochs_done} and summary.json saved in {self.out_dir}", file=sys.stderr)
            raise
        self.checkpoint(epochs_done)
        clean, robust = self.evaluate()
        summary.update(self._result_fields(epochs_done, train_time, evaluated=True))
        summary.update(clean_acc=clean, pgd_acc=robust)
        write_json(summary, os.path.join(self.out_dir, "summary.json"))
        cfg = summary["pgd"]
        print(f"clean acc {clean:.4f}  PGD-{cfg['steps']}x{cfg['restarts']} (eps {cfg['eps']:.4g}, step {cfg['alpha']:.4g}) "
              f"acc {robust:.4f}  train time {train_time:.1f}s  -> {self.out_dir}/summary.json", flush=True)
        return summary

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
        loss = float(train_step(x, y)[0])
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
