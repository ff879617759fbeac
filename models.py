"""Image classifiers of the source documents, each taking its activation as a factory.

Every model takes images in [0, 1] (NCHW) and normalises inside ``forward`` with mean/std buffers
(the RobustBench convention), so an external attack library can attack it directly.  ``act`` is a
factory ``act(num_channels) -> nn.Module`` from :func:`activations.make_factory`, so one flag swaps
every nonlinearity.  :func:`build` makes a model from plain values and :func:`load_checkpoint`
rebuilds one from a checkpoint file alone.

Imports only torch and activations.py.
"""
import os
import pickle
import zipfile

import torch
import torch.nn as nn
import torch.nn.functional as F

import activations


class Normalized(nn.Module):
    """Wraps a network so that it takes [0, 1] images: forward(x) = net((x - mean) / std)."""

    def __init__(self, net, mean, std):
        super().__init__()
        self.net = net
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, x):
        return self.net((x - self.mean) / self.std)


# ------------------------------------------------------------------------------------------- LeNet
class LeNet(nn.Module):
    """Small LeNet-style CNN for 28x28 grey images (MNIST, Fashion-MNIST), in the spirit of the
    LeNet of Zhao & Griffin 2016: conv(16,3x3)-BN-act-pool, conv(32,3x3)-BN-act-pool, fc(256)-BN-act,
    fc.  Kept small so that adversarial training on a 2-core CPU takes about a minute.  BatchNorm
    before each activation (Zhao & Griffin found it necessary for networks of symmetric units; with
    it, 3 epochs of FGSM training on Fashion-MNIST reach about 2 points more clean accuracy)."""

    def __init__(self, act, num_classes=10, in_channels=1, image_size=28, batchnorm=True, width=16, kernel=3):
        super().__init__()
        c1, c2, hidden = width, 2 * width, 256
        norm = (lambda c: nn.BatchNorm2d(c)) if batchnorm else (lambda c: nn.Identity())
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, c1, kernel, padding=kernel // 2), norm(c1), act(c1), nn.MaxPool2d(2),
            nn.Conv2d(c1, c2, kernel, padding=kernel // 2), norm(c2), act(c2), nn.MaxPool2d(2),
        )
        flat = c2 * (image_size // 4) ** 2
        self.classifier = nn.Sequential(
            nn.Flatten(), nn.Linear(flat, hidden),
            nn.BatchNorm1d(hidden) if batchnorm else nn.Identity(), act(hidden),
            nn.Linear(hidden, num_classes),
        )

    def forward(self, x):
        return self.classifier(self.features(x))


# --------------------------------------------------------------------------------------------- VGG
VGG_CONFIGS = {
    "vgg11": [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    "vgg16": [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"],
}


class VGG(nn.Module):
    """CIFAR-style VGG with BatchNorm (Simonyan & Zisserman 2015; the KAF thesis's "VGG inspired"
    nets): 3x3 conv-BN-act blocks, max-pooling (ceil mode, so 28x28 inputs work too), linear head."""

    def __init__(self, config, act, num_classes=10, in_channels=3):
        super().__init__()
        layers, c = [], in_channels
        for v in config:
            if v == "M":
                layers.append(nn.MaxPool2d(2, ceil_mode=True))
            else:
                layers += [nn.Conv2d(c, v, 3, padding=1, bias=False), nn.BatchNorm2d(v), act(v)]
                c = v
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(c, num_classes)

    def forward(self, x):
        return self.classifier(F.adaptive_avg_pool2d(self.features(x), 1).flatten(1))


# ------------------------------------------------------------------------------------------ ResNets
class BasicBlock(nn.Module):
    """Post-activation residual block (He et al. 2016): act(BN(conv(act(BN(conv x)))) + shortcut x).
    ``conv_act`` is the activation that directly follows a convolution (act1; the SAF-insert place),
    ``act`` the one after the residual sum (act2)."""

    def __init__(self, c_in, c_out, stride, act, conv_act=None):
        super().__init__()
        conv_act = conv_act or act
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.act1 = conv_act(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.act2 = act(c_out)
        self.shortcut = nn.Sequential()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))

    def forward(self, x):
        out = self.act1(self.bn1(self.conv1(x)))
        return self.act2(self.bn2(self.conv2(out)) + self.shortcut(x))


class PreActBlock(nn.Module):
    """Pre-activation residual block (He et al. 2016b), optionally wide with dropout (Zagoruyko &
    Komodakis 2016): conv(act(BN(conv(act(BN x))))) + shortcut.  ``conv_act`` (act2, the SAF-insert
    place) directly follows conv1; ``act`` (act1) follows the previous residual sum."""

    def __init__(self, c_in, c_out, stride, act, conv_act=None, dropout=0.0):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(c_in)
        self.act1 = act(c_in)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.act2 = (conv_act or act)(c_out)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.shortcut = None
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Conv2d(c_in, c_out, 1, stride, bias=False)

    def forward(self, x):
        out = self.act1(self.bn1(x))
        shortcut = self.shortcut(out) if self.shortcut is not None else x
        out = self.conv1(out)
        out = self.conv2(self.dropout(self.act2(self.bn2(out))))
        return out + shortcut


class ResNet(nn.Module):
    """Generic CIFAR ResNet: a stem conv, stages of residual blocks, global average pooling, linear.

    * resnet20 (He et al. 2016 CIFAR net; the KAF thesis's "ResNet20 inspired"): 16-32-64 channels,
      3 basic blocks per stage, 1x1-conv shortcuts where the shape changes;
    * resnet18 (as used by Dai et al. 2021): 64-128-256-512, 2 basic blocks per stage;
    * preactresnet18 (the fast-AT reference model of Wong et al. 2020): pre-activation blocks;
    * wrn28_10 / wrn34_10 (Zagoruyko & Komodakis; Dai et al. 2021): pre-activation wide blocks,
      16*10-32*10-64*10 channels, (depth-4)/6 blocks per stage."""

    def __init__(self, block, widths, blocks, act, num_classes=10, in_channels=3, stem=16, preact=False, conv_act=None):
        super().__init__()
        self.preact = preact
        self.stem = nn.Conv2d(in_channels, stem, 3, 1, 1, bias=False)
        self.stem_bn = nn.Identity() if preact else nn.BatchNorm2d(stem)
        self.stem_act = nn.Identity() if preact else (conv_act or act)(stem)
        stages, c = [], stem
        for i, (w, n) in enumerate(zip(widths, blocks)):
            for j in range(n):
                stages.append(block(c, w, 2 if (j == 0 and i > 0) else 1, act, conv_act))
                c = w
        self.stages = nn.Sequential(*stages)
        self.final_bn = nn.BatchNorm2d(c) if preact else nn.Identity()
        self.final_act = act(c) if preact else nn.Identity()
        self.linear = nn.Linear(c, num_classes)

    def forward(self, x):
        out = self.stem_act(self.stem_bn(self.stem(x)))
        out = self.final_act(self.final_bn(self.stages(out)))
        return self.linear(F.adaptive_avg_pool2d(out, 1).flatten(1))


# Each entry: (act, conv_act, num_classes, in_channels, image_size) -> network.  conv_act is the
# activation of the places right after a convolution / hidden linear layer (the SAF-insert places).
# In lenet and vgg every activation is such a place.
ARCHS = {
    "lenet": lambda act, cact, nc, ic, size: LeNet(cact, nc, ic, size),
    "vgg11": lambda act, cact, nc, ic, size: VGG(VGG_CONFIGS["vgg11"], cact, nc, ic),
    "vgg16": lambda act, cact, nc, ic, size: VGG(VGG_CONFIGS["vgg16"], cact, nc, ic),
    "resnet20": lambda act, cact, nc, ic, size: ResNet(BasicBlock, [16, 32, 64], [3] * 3, act, nc, ic, 16, False, cact),
    "resnet18": lambda act, cact, nc, ic, size: ResNet(BasicBlock, [64, 128, 256, 512], [2] * 4, act, nc, ic, 64, False, cact),
    "preactresnet18": lambda act, cact, nc, ic, size: ResNet(PreActBlock, [64, 128, 256, 512], [2] * 4, act, nc, ic,
                                                             64, True, cact),
    "wrn28_10": lambda act, cact, nc, ic, size: ResNet(PreActBlock, [160, 320, 640], [4] * 3, act, nc, ic, 16, True, cact),
    "wrn34_10": lambda act, cact, nc, ic, size: ResNet(PreActBlock, [160, 320, 640], [5] * 3, act, nc, ic, 16, True, cact),
}
ARCH_NAMES = list(ARCHS)
SAF_UNITS = ("mrelu", "rbf")


def build(arch, act="relu", num_classes=10, in_channels=3, image_size=32, mean=None, std=None,
          act_scope=None, act_options=None, saf_insert=None):
    """Build a [0,1]-input model.

    ``saf_insert`` ('mrelu' | 'rbf'; Zhao & Griffin 2016) puts the symmetric unit right after each
    convolution (after its BatchNorm) and between the fully connected layers, replacing ``act``
    there.  In lenet and vgg that is every activation; in the ResNets the activations that follow a
    residual sum keep ``act``.  The model's ``config`` attribute holds these arguments, so a checkpoint
    saving it can rebuild the model with ``build(**config)``."""
    if arch not in ARCHS:
        raise ValueError(f"unknown model {arch!r}; choose from {', '.join(ARCH_NAMES)}")
    if saf_insert is not None and saf_insert not in SAF_UNITS:
        raise ValueError(f"unknown --saf-insert {saf_insert!r}; choose from {', '.join(SAF_UNITS)}")
    if arch == "lenet" and image_size % 4:
        raise ValueError(f"lenet needs an image size divisible by 4, got {image_size}")
    mean = list(mean) if mean is not None else [0.0] * in_channels
    std = list(std) if std is not None else [1.0] * in_channels
    if len(mean) != in_channels or len(std) != in_channels:
        raise ValueError(f"mean/std need {in_channels} values for {in_channels} input channels")
    act_options = dict(act_options or {})
    factory = activations.make_factory(act, act_scope, **act_options)
    conv_factory = activations.make_factory(saf_insert) if saf_insert else factory
    net = ARCHS[arch](factory, conv_factory, num_classes, in_channels, image_size)
    model = Normalized(net, mean, std)
    model.config = dict(arch=arch, act=act, num_classes=num_classes, in_channels=in_channels,
                        image_size=image_size, mean=mean, std=std, act_scope=act_scope,
                        act_options=act_options, saf_insert=saf_insert)
    return model


class CheckpointError(Exception):
    """A checkpoint file that is missing, unreadable or does not match its model."""


def act_label(act, saf_insert=None):
    """How a model's activation is named in run folders and tables: 'rbf-insert' for a SAF-insert model."""
    return f"{saf_insert}-insert" if saf_insert else act


def read_checkpoint(path, map_location="cpu"):
    """The dict saved in checkpoint ``path``, loaded as data (``weights_only=True``: tensors and plain
    values only, never arbitrary pickled objects, so loading cannot run code).  Problems are
    CheckpointErrors with a one-line message."""
    if os.path.isfile(path) and os.path.getsize(path) > 0 and not zipfile.is_zipfile(path):
        raise CheckpointError(f"cannot read checkpoint {path}: not a zip archive as torch.save writes "
                              f"(truncated, or another kind of file)")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint not found: {path}") from None
    except pickle.UnpicklingError:  # what weights_only refuses: anything but tensors and plain values
        raise CheckpointError(f"refusing to load {path}: it holds objects other than tensors and plain values, whose "
                              f"loading could run code (a checkpoint of an older version of this project, or one "
                              f"changed by someone)") from None
    except Exception as e:  # empty, truncated or not a torch file
        lines = str(e).strip().splitlines()
        why = f"{type(e).__name__}: {lines[0][:200]}" if lines else type(e).__name__
        empty = " (an empty file)" if os.path.isfile(path) and os.path.getsize(path) == 0 else ""
        raise CheckpointError(f"cannot read checkpoint {path}{empty}: {why}") from None
    if not isinstance(ckpt, dict):
        raise CheckpointError(f"{path} is not a checkpoint of this project")
    return ckpt


# entry -> the type a checkpoint of this project stores under it
CHECKPOINT_TYPES = {"model_config": dict, "model_state": dict, "args": dict, "dataset": dict, "script": str}


def non_finite_tensors(state):
    """Names of the floating-point tensors of ``state`` (a state dict) that hold NaN or inf, in
    order; one host sync when all are finite."""
    floats = [(k, t) for k, t in state.items() if torch.is_tensor(t) and t.is_floating_point()]
    if not floats or torch.stack([torch.isfinite(t).all() for _, t in floats]).all().item():
        return []
    return [k for k, t in floats if not torch.isfinite(t).all()]


def check_checkpoint(ckpt, path):
    """Refuse (:class:`CheckpointError`, one line) a checkpoint whose entries have the wrong type or
    whose weights are not finite: it would evaluate to a number that means nothing."""
    for key, kind in CHECKPOINT_TYPES.items():
        if key in ckpt and not isinstance(ckpt[key], kind):
            raise CheckpointError(f"{path} is not a checkpoint of this project: its {key} is a "
                                  f"{type(ckpt[key]).__name__}, not a {kind.__name__}")
    state = ckpt.get("model_state") or {}
    for name, t in state.items():
        if not isinstance(t, torch.Tensor):
            raise CheckpointError(f"{path}: model_state[{name!r}] is not a tensor")
    if bad := non_finite_tensors(state):
        raise CheckpointError(f"{path} holds non-finite weights (NaN or inf) in {bad[0]}: a diverged "
                              f"or damaged model")


def load_checkpoint(path, map_location="cpu"):
    """Rebuild the model saved in checkpoint ``path`` (written by the training scripts) and return it
    in eval mode, with no other information needed.  The file's other entries (flags, optimiser
    state, dataset) are in ``model.checkpoint``."""
    ckpt = read_checkpoint(path, map_location)
    if "model_config" not in ckpt or "model_state" not in ckpt:
        raise CheckpointError(f"{path} is not a checkpoint of this project (no model_config/model_state)")
    check_checkpoint(ckpt, path)
    config = dict(ckpt["model_config"])
    # how a KAF was computed (impl) is not part of the model: rebuild with the default for this machine
    config["act_options"] = {k: v for k, v in (config.get("act_options") or {}).items() if k != "impl"}
    try:
        model = build(**config)
        model.load_state_dict(ckpt["model_state"])
    except (RuntimeError, ValueError, TypeError) as e:
        raise CheckpointError(f"checkpoint {path} does not fit its model: {str(e).splitlines()[0][:200]}") from None
    model.checkpoint = {k: v for k, v in ckpt.items() if k != "model_state"}
    return model.eval()
