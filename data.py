"""Data for the training scripts and eval.py, standalone (imports torch and numpy only): copy it
alone.

* :data:`DATASETS`: name -> (channels, size, classes, mean, std, augmentation).
* :func:`load_split`: one split as uint8 NCHW images and int64 labels -- raw IDX files for
(Fashion-)
  MNIST (:func:`read_idx`, checked), torchvision for the rest, :func:`synthetic_data` for tests and
  benchmarks (no download).
* :class:`Batches`: the whole dataset lives in memory (on the GPU when there is one) and is batched
  there, random crop / flip done on the device: no DataLoader workers in the hot loop (the airbench
  approach).
* :func:`load_extra_data` (Dai et al.'s extra images from an .npz) and :func:`dataset_mean_image`
  (Zhao & Griffin's mean training).

Every problem with the user's data is a :class:`DataError` with a one-line message.
"""
import gzip
import math
import os
import struct
import zipfile
import zlib

import numpy as np
import torch
import torch.nn.functional as F


class DataError(Exception):
    """A dataset, data file or extra-data file that cannot be used: one line, no traceback."""


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
    """Read an IDX file (MNIST format), gzipped or not, into a numpy array.  A truncated or corrupt
    file, a header that is not unsigned-byte IDX or a payload whose size differs from what the
    header says is a :class:`DataError`."""
    opener = gzip.open if path.endswith(".gz") else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
    # BadGzipFile is an OSError; a cut .gz ends in EOFError
    except (OSError, EOFError, zlib.error) as e:
        raise DataError(f"{path} is truncated or corrupt "
                        f"({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None
    if len(data) < 4:
        raise DataError(f"{path} is not an IDX file (only {len(data)} bytes)")
    zero, dtype_code, ndim = struct.unpack(">HBB", data[:4])
    if zero != 0 or dtype_code != 0x08 or not 1 <= ndim <= 4:
        raise DataError(f"{path} is not an unsigned-byte IDX file")
    offset = 4 + 4 * ndim
    if len(data) < offset:
        raise DataError(f"{path} is truncated: its header is cut short")
    shape = struct.unpack(">" + "I" * ndim, data[4:offset])
    if len(data) - offset != math.prod(shape):
        raise DataError(f"{path} holds {len(data) - offset} bytes of data where its header "
                        f"{tuple(shape)} "
                        f"says {math.prod(shape)} (truncated or corrupt)")
    return np.frombuffer(data, dtype=np.uint8, offset=offset).reshape(shape)


# torchvision's folder of each IDX dataset: <data-dir>/<Name>/raw
IDX_DATASETS = {"mnist": "MNIST", "fashionmnist": "FashionMNIST"}


def _named_dataset(folder):
    """The IDX dataset a folder's name says it holds ('fashionmnist', 'mnist' or None), read from
    its name (and its parent's when it is called raw), ignoring case and punctuation."""
    folder = os.path.abspath(folder)
    words = os.path.basename(folder)
    if words.lower() == "raw":
        words = os.path.basename(os.path.dirname(folder)) + words
    words = "".join(c for c in words.lower() if c.isalnum())
    return "fashionmnist" if "fashion" in words else "mnist" if "mnist" in words else None


def find_idx(data_dir, split, name="fashionmnist"):
    """Paths of the raw IDX images/labels of ``split`` of dataset ``name`` below data_dir, or None.

    Looks, gzipped or not, first in torchvision's layout of that dataset only (<data-dir>/MNIST/raw
    for mnist, <data-dir>/FashionMNIST/raw for fashionmnist), then in data_dir itself and
    <data-dir>/raw (a bare folder of IDX files, e.g. Debian's /usr/share/datasets/fashion-mnist).
    The files do not say which dataset they are, so a bare folder is taken for the named dataset
    unless its name says another one (e.g. '--dataset mnist --data-dir .../fashion-mnist'): that is
    a :class:`DataError`, not a silent switch of dataset."""
    for sub in (os.path.join(IDX_DATASETS[name], "raw"), "", "raw"):
        folder = os.path.join(data_dir, sub)
        found = []
        for stem in IDX_FILES[split]:
            for fname in (stem + ".gz", stem):
                if os.path.isfile(os.path.join(folder, fname)):
                    found.append(os.path.join(folder, fname))
                    break
        if len(found) == 2:
            said = _named_dataset(folder) if sub != os.path.join(IDX_DATASETS[name], "raw") else name
            if said not in (None, name):
                raise DataError(f"--dataset {name} but {os.path.abspath(folder)} holds "
                                f"{IDX_DATASETS[said]} by its name; "
                                f"use --dataset {said} or point --data-dir at "
                                f"{IDX_DATASETS[name]}'s files")
            return found
    return None


def read_idx_split(name, paths):
    """(images uint8 N x 1 x 28 x 28, labels int64) from the IDX files ``paths`` of dataset
    ``name``, checked: 28 x 28 images, one label per image, labels 0 .. classes - 1."""
    (x_path, y_path), (_, size, classes) = paths, DATASETS[name][:3]
    x, y = read_idx(x_path), read_idx(y_path)
    if x.ndim != 3 or x.shape[1:] != (size, size):
        raise DataError(f"{x_path} holds images of shape {tuple(x.shape[1:])}, not {size} x {size} "
                        f"({name})")
    if y.ndim != 1:
        raise DataError(f"{y_path} is not a label file (shape {tuple(y.shape)})")
    if len(x) != len(y):
        raise DataError(f"{x_path} holds {len(x)} images but {y_path} {len(y)} labels")
    if len(y) == 0:
        raise DataError(f"{x_path} holds no images")
    if y.max() >= classes:
        raise DataError(f"{y_path} holds label {int(y.max())}, outside 0 .. {classes - 1} of {name}")
    return torch.from_numpy(x.copy()).unsqueeze(1), torch.from_numpy(y.astype(np.int64))


def synthetic_data(name, n, seed):
    """A learnable synthetic classification set: each class is a fixed random smooth pattern;
    samples are that pattern with random contrast, shift and pixel noise.  Deterministic given the
    seed; used by tests and benchmarks (no download)."""
    c, size, classes = DATASETS[name][:3]
    g = torch.Generator().manual_seed(1234)  # the class patterns are the same for train and test
    protos = F.interpolate(torch.rand(classes, c, 7, 7, generator=g), size=(size, size), mode="bilinear",
                           align_corners=False)
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, classes, (n,), generator=g)
    contrast = 0.6 + 0.4 * torch.rand(n, 1, 1, 1, generator=g)
    x = 0.5 + contrast * (protos[y] - 0.5) + 0.15 * torch.randn(n, c, size, size, generator=g)
    return (x.clamp(0, 1) * 255).round().to(torch.uint8), y


def load_split(name, data_dir, train, download=True):
    """(images uint8 NCHW, labels int64) of one split, from data_dir or torchvision (which downloads
    into data_dir when the files are not there, unless ``download`` is False)."""
    split = "train" if train else "test"
    if name.startswith("synthetic"):
        return synthetic_data(name, 2048 if train else 512, seed=0 if train else 1)
    if name in ("mnist", "fashionmnist"):
        paths = find_idx(data_dir, split, name)
        if paths:
            return read_idx_split(name, paths)
    try:
        import torchvision.datasets as tvd
    except ImportError:
        raise DataError(f"{name} needs torchvision (pip install torchvision) or raw IDX files in "
                        "--data-dir") from None
    try:
        if name == "svhn":
            ds = tvd.SVHN(data_dir, split=split, download=download)
            x = torch.from_numpy(ds.data)
            y = torch.from_numpy(np.asarray(ds.labels, dtype=np.int64))
        else:
            cls = {"cifar10": tvd.CIFAR10, "cifar100": tvd.CIFAR100, "mnist": tvd.MNIST,
                   "fashionmnist": tvd.FashionMNIST}[name]
            ds = cls(data_dir, train=train, download=download)
            x = torch.as_tensor(np.asarray(ds.data))
            x = x.permute(0, 3, 1, 2) if x.dim() == 4 else x.unsqueeze(1)
            y = torch.as_tensor(np.asarray(ds.targets, dtype=np.int64))
    except Exception as e:  # no internet, corrupt archive, ...
        reason = str(e).splitlines()[0][:120] if str(e) else type(e).__name__
        raise DataError(f"could not load {name} from {os.path.abspath(data_dir)} ({reason}); "
                        f"download it there or point --data-dir at an existing copy") from None
    return x.contiguous(), y


class Batches:
    """Iterate over (x, y) minibatches of an in-memory uint8 dataset, on its device.

    Images come out as float in [0,1] (channels_last when asked).  With ``augment`` 'crop+flip' each
    image is randomly translated by up to ``pad`` pixels (zero padding, like RandomCrop(padding=4))
    and flipped horizontally with probability 1/2, all on the device.  The last batch may be short;
    a last batch of a single image is dropped (when ``batch_size`` > 1): BatchNorm cannot train on
    one image (lenet's BatchNorm1d fails on it), and the next epoch's shuffle covers that image.

    Distributed training (``world`` > 1): every rank draws the same permutation (same seed), drops
    its last ``n mod world`` entries and keeps every world-th one from position ``rank``, so the
    ranks see disjoint shards of equal size and run the same number of batches."""

    def __init__(self, x, y, batch_size, shuffle=True, augment="none", pad=4, channels_last=False,
                 generator=None, rank=0, world=1):
        self.x, self.y, self.batch_size = x, y, batch_size
        self.shuffle, self.augment, self.pad = shuffle, augment, pad
        self.channels_last, self.generator = channels_last, generator
        self.rank, self.world = rank, world

    def __len__(self):
        n = len(self.x) // self.world
        return n // self.batch_size + (n % self.batch_size > 1)

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
            if len(idx) == 1 < self.batch_size:  # a last batch of one image: dropped (see above)
                break
            xb = self.x[idx].float().div_(255)
            if self.augment == "crop+flip":
                xb = self._augment(xb)
            if self.channels_last:
                xb = xb.contiguous(memory_format=torch.channels_last)
            yield xb, self.y[idx]



def forever(batches):
    """The batches over and over, reshuffled each pass."""
    while True:
        yield from batches



EXTRA_IMAGE_KEYS, EXTRA_LABEL_KEYS = ("x", "image", "images", "data"), ("y", "label", "labels", "targets")


def load_extra_data(path, channels, size, classes):
    """(uint8 NCHW images, int64 labels) of an extra-data file (Dai et al. 2021 add generated
    images).

    The .npz holds an image array under one of the keys x / image / images / data (uint8, or float
    in [0, 1] which is rounded to uint8 like the real data; NCHW, NHWC -- the layout generated-data
    files usually have -- or NHW for one channel) and a label array under y / label / labels /
    targets.  Anything else is a DataError naming the problem."""
    try:
        f = np.load(path)
        if not isinstance(f, np.lib.npyio.NpzFile):
            raise ValueError("a single array, not an .npz archive")
        with f:
            xk = next((k for k in EXTRA_IMAGE_KEYS if k in f.files), None)
            yk = next((k for k in EXTRA_LABEL_KEYS if k in f.files), None)
            if xk is None or yk is None:
                raise DataError(f"--extra-data {path}: needs an image array "
                                f"({', '.join(EXTRA_IMAGE_KEYS)}) and a label "
                                f"array ({', '.join(EXTRA_LABEL_KEYS)}); found "
                                f"{', '.join(f.files) or 'nothing'}")
            x, y = f[xk], f[yk]
    except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile) as e:  # not an npz,
        # truncated (a cut archive fails when an array is read), pickled objects
        lines = str(e).strip().splitlines()
        why = lines[0][:120] if lines else type(e).__name__
        raise DataError(f"--extra-data {path}: cannot read it as .npz ({why})") from None
    want = (channels, size, size)
    if x.ndim == 3 and channels == 1:
        x = x[:, None]
    if x.ndim == 4 and x.shape[1:] != want and x.shape[1:] == (size, size, channels):
        x = x.transpose(0, 3, 1, 2)
    if x.ndim != 4 or x.shape[1:] != want:
        raise DataError(f"--extra-data {path}: images of shape {tuple(x.shape[1:])}, the dataset "
                        f"needs {channels}x{size}x{size} (NCHW or NHWC)")
    labels_ok = y.shape == (len(x),) and np.issubdtype(y.dtype, np.integer) and len(y) > 0
    if not labels_ok or y.min() < 0 or y.max() >= classes:
        raise DataError(f"--extra-data {path}: needs one integer label in [0, {classes}) per image")
    if np.issubdtype(x.dtype, np.floating):
        if not np.isfinite(x).all():  # NaN would silently become 0 in the uint8 cast
            raise DataError(f"--extra-data {path}: {int((~np.isfinite(x)).sum())} pixels are NaN or inf")
        if x.min() < 0 or x.max() > 1:
            raise DataError(f"--extra-data {path}: float images must lie in [0, 1], found "
                            f"[{x.min():.3g}, {x.max():.3g}]")
        x = np.rint(x * 255)
    elif x.dtype != np.uint8:
        raise DataError(f"--extra-data {path}: images must be uint8 or float in [0, 1], not "
                        f"{x.dtype}")
    return torch.from_numpy(np.ascontiguousarray(x, dtype=np.uint8)), torch.from_numpy(y.astype(np.int64))


def dataset_mean_image(x, chunk=4096):
    """Per-pixel mean of a uint8 image set, in [0, 1] (summed in chunks: no float copy of the whole
    set)."""
    total = torch.zeros(x.shape[1:], dtype=torch.float64, device=x.device)
    for i in range(0, len(x), chunk):
        total += x[i:i + chunk].sum(0, dtype=torch.float64)
    return (total / (255 * len(x))).float()
