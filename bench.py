"""Speed benchmark: training-step time, images/s and peak memory per regime and activation.

Times the training scripts' own steps -- ``train_fast.train_step``, ``train_free.train_minibatch``
(m replays) and ``train_pgd.train_step`` on the set-up ``utils.setup`` builds from the scripts' own
flags -- so what is measured is what training runs.  The data is synthetic but shaped like
--dataset: the same image size, channels, classes, normalisation and augmentation (crop+flip on the
device for the CIFAR shapes), generated with ``data.synthetic_data`` and passed to ``utils.setup``
(or to the script's ``main``) in place of the real files, so nothing is downloaded.

Per configuration (regime x activation): --warmup steps, then --steps timed steps (a step is one
minibatch through ``train_step``: FGSM = 2 forward/backward passes, Free = m replays, PGD = k + 1;
the ``fwd`` column counts them), with ``torch.cuda.synchronize()`` around the timed block on CUDA.
Reported:

* step ms and images/s (minibatch images per second through train_step);
* peak memory: on CUDA ``torch.cuda.max_memory_allocated`` (reset per configuration; it includes
  the model, optimiser state and the small on-device dataset); on CPU the peak resident set size
  (``ru_maxrss``), which is process-wide and never goes down, so by default every configuration
  runs in its own subprocess (``--no-isolate`` runs them in this process: faster, but then only
  the first configuration's peak RSS means anything);
* saved for backward: the peak number of bytes autograd holds for backward during one extra,
  untimed step (``torch.autograd.graph.saved_tensors_hooks``, each storage counted once while it
  is alive): the memory the activations cost, free of the process's fixed overheads;
* each of these relative to the relu row of the same regime (when --acts includes relu).

``--end-to-end`` instead times whole training runs (``train_<regime>.main``) on synthetic data of
the real dataset's size (--n-train / --n-eval, defaults 50000 / 10000 for CIFAR shapes): wall time of
main() (flag parsing, model set-up, the upload of the data, every epoch with its guard
probe and checkpoint, the final clean + PGD-20 evaluation; not importing torch, initialising CUDA
or generating the synthetic data, which happen before), the
training time the script reports, and the training images/s (passes over the data x images /
training time; a pass is an epoch, or one of Free's ceil(epochs / m) passes).  --co-guard 0 is
passed so every epoch runs.

--replays goes to the Free regime only, --attack-iters to PGD only; any other flag this script
does not know goes to every training script, e.g. ``--channels-last 0``, ``--kaf-size 10``,
``--grad-clip 1``, ``--epsilon 0.1`` (regime-specific ones such as ``--loss trades``: benchmark
that regime alone).
The step benchmark trains at a constant LR of 0.01 (``--lr-schedule constant --lr-max 0.01``;
pass others to override) so that no configuration diverges while it is timed.

    python bench.py --device cpu --dataset fashionmnist --model lenet --acts relu silu kaf --regimes fast free pgd
    python bench.py --device cuda --dataset cifar10 --model preactresnet18 --batch-size 256 --acts relu kaf kaf:loop
    python bench.py --device cuda --end-to-end --regimes fast --acts relu kaf --epochs 15 --batch-size 128
"""
import argparse
import json
import math
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time

import torch

import activations
import models
import train_fast
import train_free
import train_pgd
import data
import utils
import tricks
from utils import tqdm

REGIMES = {"fast": train_fast, "free": train_free, "pgd": train_pgd}
# (images of the real training set, of its test set), for --end-to-end defaults
REAL_SIZES = {"cifar10": (50000, 10000), "cifar100": (50000, 10000), "svhn": (73257, 26032),
              "mnist": (60000, 10000), "fashionmnist": (60000, 10000), "synthetic": (2048, 512),
              "synthetic32": (2048, 512)}
RESULT_TAG = "BENCH_RESULT "  # how a worker subprocess hands its row back on stdout
MIB = 2 ** 20


def get_args(argv=None):
    p = utils.Parser(formatter_class=utils.HelpFormatter, description=__doc__.split("\n\n")[0] + " Flags it does not know go to the training scripts (an activation's own options, e.g. --kaf-kernel, to its rows only).")
    p.add_argument("--device", default=utils.DEFAULT_DEVICE, help="cuda if present, else cpu")
    p.add_argument("--dataset", default="cifar10", choices=list(data.DATASETS),
                   help="shape of the synthetic data: channels, size, classes, normalisation, augmentation (default cifar10)")
    p.add_argument("--model", default="preactresnet18", choices=models.ARCH_NAMES, help="default preactresnet18")
    p.add_argument("--acts", nargs="+", default=["relu", "kaf"],
                   help="activations to compare (default relu kaf; ratios to relu); kaf:IMPL picks "
                        "KAF's implementation (triton, loop, naive)")
    p.add_argument("--regimes", nargs="+", default=["fast"], choices=list(REGIMES), help="default fast")
    p.add_argument("--batch-size", type=int, default=256, help="default 256")
    p.add_argument("--steps", type=int, default=20, help="timed training steps per configuration (default 20)")
    p.add_argument("--warmup", type=int, default=5, help="untimed steps first: cuDNN autotuning, --compile (default 5)")
    p.add_argument("--replays", type=int, default=None, help="Free's m (default train_free.py's, 8)")
    p.add_argument("--attack-iters", type=int, default=None, help="PGD's k (default train_pgd.py's, 10)")
    p.add_argument("--amp", default="auto", choices=["auto", "bf16", "fp16", "off"],
                   help="as in the training scripts; CUDA only (default auto: bf16 where supported, else fp16)")
    p.add_argument("--compile", action="store_true", help="torch.compile the model (give it a larger --warmup)")
    p.add_argument("--no-isolate", dest="isolate", action="store_false",
                   help="run every configuration in this process instead of a fresh subprocess each (peak RSS is then cumulative)")
    p.add_argument("--end-to-end", action="store_true", help="time whole training runs instead of single steps")
    p.add_argument("--epochs", type=int, default=15, help="--end-to-end: epochs; Free: the natural-epoch budget (default 15)")
    p.add_argument("--n-train", type=int, default=None, help="--end-to-end: synthetic training images (default: the real dataset's count)")
    p.add_argument("--n-eval", type=int, default=None, help="--end-to-end: synthetic test images (default: the real dataset's count)")
    p.add_argument("--out", default=None, help="also write the results (rows, device, command, table) as JSON here")
    p.add_argument("--suite", default=None, choices=["gpu"],
                   help="gpu: every GPU measurement in one command, each part time-limited, one report "
                        "(--out: its folder); tiny sizes on a CPU")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)  # one configuration, in a subprocess
    args, extra = p.parse_known_args(argv)
    args.extra = extra
    if args.worker is not None:
        return args
    problems = utils.number_problems(args)
    problems += [f"--{name.replace('_', '-')} must be >= 1" for name in ("batch_size", "steps", "epochs")
                 if getattr(args, name) < 1]
    problems += [f"--{name.replace('_', '-')} must be >= 1" for name in ("n_train", "n_eval")
                 if getattr(args, name) is not None and getattr(args, name) < 1]
    if args.warmup < 0:
        problems.append("--warmup must be >= 0")
    if utils.device_problem(args.device):
        problems.append(utils.device_problem(args.device))
    if problems:
        p.error("; ".join(problems))
    return args


# -------------------------------------------------------------------------------------- data shape
def synthetic_images(dataset, n, seed, chunk=8192):
    """n synthetic uint8 images (and labels) shaped like ``dataset``, generated in chunks to keep
    the float temporaries small."""
    parts = [data.synthetic_data(dataset, min(chunk, n - i), seed * 100003 + i) for i in range(0, n, chunk)]
    return torch.cat([x for x, _ in parts]), torch.cat([y for _, y in parts])


def synthetic_like(dataset, n_train, n_test):
    """(x_train, y_train, x_test, y_test): synthetic data of ``dataset``'s shape, for utils.setup."""
    return (*synthetic_images(dataset, n_train, seed=0), *synthetic_images(dataset, n_test, seed=1))


# ------------------------------------------------------------------------------------ measurements
class SavedForBackward:
    """Peak bytes autograd holds for backward inside the ``with`` block.

    Every tensor saved for backward is counted by its storage (once, however many times it is
    saved) from the moment it is saved until the graph that holds it is freed (after its backward
    pass, or when it goes out of scope), so the peak is the activation memory of the largest graph
    alive at once -- parameters saved by their layers included."""

    def __init__(self):
        self.live, self.current, self.peak = {}, 0, 0
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)

    def __enter__(self):
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc):
        return self._hooks.__exit__(*exc)

    def _pack(self, t):
        try:
            storage = t.untyped_storage()
            key, nbytes = (str(t.device), storage.data_ptr()), storage.nbytes()
        except (RuntimeError, NotImplementedError):  # e.g. tensors without storage under torch.compile
            key, nbytes = ("id", id(t)), t.numel() * t.element_size()
        count, _ = self.live.get(key, (0, nbytes))
        if count == 0:
            self.current += nbytes
            self.peak = max(self.peak, self.current)
        self.live[key] = (count + 1, nbytes)
        return _Saved(t, key, self)

    @staticmethod
    def _unpack(saved):
        return saved.tensor

    def _release(self, key):
        count, nbytes = self.live[key]
        if count == 1:
            del self.live[key]
            self.current -= nbytes
        else:
            self.live[key] = (count - 1, nbytes)


class _Saved:
    """What autograd keeps instead of a saved tensor: freeing it tells the counter."""
    __slots__ = ("tensor", "key", "owner")

    def __init__(self, tensor, key, owner):
        self.tensor, self.key, self.owner = tensor, key, owner

    def __del__(self):
        self.owner._release(self.key)


def current_rss():
    """Resident set size of this process now, in bytes (None where /proc is missing)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


def peak_rss():
    """Peak resident set size of this process so far, in bytes (ru_maxrss: KiB on Linux, bytes on macOS)."""
    value = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return value if sys.platform == "darwin" else value * 1024


def device_description(device):
    device = torch.device(device)
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)} (CUDA {torch.version.cuda})"
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            name = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), name)
    except OSError:
        pass
    return f"{name}, {os.cpu_count()} cores, torch threads {torch.get_num_threads()}"


# ------------------------------------------------------------------------------ one configuration
def flags_for(extra, act):
    """The user's extra flags without other activations' options (utils.ACT_OPTION_FLAGS), so that
    e.g. ``--acts relu kaf --kaf-kernel softplus`` compares ReLU with a softplus-kernel KAF (the
    scripts refuse --kaf-kernel for --act relu)."""
    out, i = [], 0
    while i < len(extra):
        dest = extra[i][2:].split("=")[0].replace("-", "_") if extra[i].startswith("--") else None
        owner = utils.ACT_OPTION_FLAGS.get(dest, (act,))[0]
        if owner != act:
            has_value = "=" not in extra[i] and i + 1 < len(extra) and not extra[i + 1].startswith("--")
            i += 2 if has_value else 1
            continue
        out.append(extra[i])
        i += 1
    return out


def script_argv(args, regime, act):
    """The training script's flags for one configuration (the user's extra flags last, so they win).
    ``act`` is an activation name, or kaf:IMPL for a KAF computed by IMPL (``--kaf-impl``)."""
    act, _, impl = act.partition(":")
    argv = ["--dataset", args.dataset, "--model", args.model, "--act", act, "--batch-size", str(args.batch_size),
            "--device", args.device, "--amp", args.amp] + (["--kaf-impl", impl] if impl else [])
    if args.end_to_end:
        argv += ["--epochs", str(args.epochs), "--co-guard", "0"]
    else:
        argv += ["--lr-schedule", "constant", "--lr-max", "0.01"]
    if args.compile:
        argv.append("--compile")
    if regime == "free" and args.replays is not None:
        argv += ["--replays", str(args.replays)]
    if regime == "pgd" and args.attack_iters is not None:
        argv += ["--attack-iters", str(args.attack_iters)]
    return argv + flags_for(args.extra, act)


def make_train_step(regime, run, script_args):
    """``step(x, y) -> loss``: the script's own training of one minibatch (Free: its m replays) at the
    LR the optimiser holds."""
    tr = tricks.TrainingTricks.for_run(script_args, run)
    if regime == "free":
        delta = torch.zeros((tr.rows(script_args.batch_size), *run.batches.x.shape[1:]), device=run.device)
        return lambda x, y: train_free.train_minibatch(run, tr, x, y, delta, script_args)[0]
    return lambda x, y: REGIMES[regime].train_step(run, tr, x, y, script_args)[0]


def count_forwards(run):
    """From now on count the model calls the regime makes (through run.forward and run.attack_forward);
    returns a one-element list holding the count."""
    count = [0]
    for name in ("forward", "attack_forward"):
        fn = getattr(run, name, None)
        if fn is not None:
            def counted(*args, _fn=fn, **kwargs):
                count[0] += 1
                return _fn(*args, **kwargs)
            setattr(run, name, counted)
    return count


def bench_steps(cfg):
    """Time ``cfg['steps']`` training steps of one regime x activation; returns the result row."""
    regime, device = cfg["regime"], torch.device(cfg["device"])
    cuda = device.type == "cuda"
    n_train = cfg["batch_size"] * 4  # a few full batches, cycled
    arrays = synthetic_like(cfg["dataset"], n_train, 64)
    with tempfile.TemporaryDirectory() as tmp:
        script_args = REGIMES[regime].get_args(cfg["argv"] + ["--out-dir", tmp])
        run = utils.setup(script_args, f"train_{regime}", arrays=arrays)
        train_step = make_train_step(regime, run, script_args)
    utils.set_lr(run.opt, *[v[0] for v in utils.lr_schedule(script_args, 1)])  # constant: --lr-max
    batches = data.forever(run.batches)
    run.model.train()
    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base_mem = torch.cuda.memory_allocated(device)
    base_rss = current_rss()
    for _ in range(cfg["warmup"]):
        train_step(*next(batches))
    if cuda:
        torch.cuda.synchronize(device)
    tic = time.perf_counter()
    for _ in range(cfg["steps"]):
        loss = train_step(*next(batches))
    if cuda:
        torch.cuda.synchronize(device)
    elapsed = time.perf_counter() - tic
    if cuda:
        peak, base = torch.cuda.max_memory_allocated(device), base_mem
    else:
        peak, base = peak_rss(), base_rss
    # one more, untimed step: the memory held for backward and the forward passes per step
    forwards = count_forwards(run)
    try:
        with SavedForBackward() as saved:
            train_step(*next(batches))
        saved_mib = saved.peak / MIB
    except RuntimeError as e:  # e.g. a compiled graph that refuses saved-tensor hooks
        print(f"warning: saved-for-backward not measured ({str(e).splitlines()[0][:120]})", file=sys.stderr)
        saved_mib = None
    step_s = elapsed / cfg["steps"]
    return dict(regime=regime, act=cfg["act"], model=cfg["model"], dataset=cfg["dataset"], batch=cfg["batch_size"],
                device=str(device), amp=str(run.amp_dtype).replace("torch.", "") if run.amp_dtype else "off",
                kaf_impl=",".join(activations.kaf_impls(run.model, device, compiled=bool(script_args.compile))) or None,
                channels_last=run.channels_last, compile=bool(script_args.compile),
                steps=cfg["steps"], warmup=cfg["warmup"], fwd_per_step=forwards[0] or None,
                step_ms=1000 * step_s, images_per_s=cfg["batch_size"] / step_s,
                peak_mem_mib=peak / MIB, peak_mem_kind="cuda_max_allocated" if cuda else "peak_rss",
                step_mem_mib=None if base is None else max(peak - base, 0) / MIB,
                saved_mib=saved_mib, final_loss=float(loss), isolated=cfg["isolated"])


def bench_end_to_end(cfg):
    """Time one whole training run (``train_<regime>.main``) on synthetic data; returns the result row."""
    regime, device = cfg["regime"], torch.device(cfg["device"])
    cuda = device.type == "cuda"
    arrays = synthetic_like(cfg["dataset"], cfg["n_train"], cfg["n_eval"])
    with tempfile.TemporaryDirectory() as tmp:
        if cuda:
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
        tic = time.perf_counter()
        summary = REGIMES[regime].main(cfg["argv"] + ["--out-dir", tmp], arrays=arrays)
        if cuda:
            torch.cuda.synchronize(device)
        wall = time.perf_counter() - tic
    peak = torch.cuda.max_memory_allocated(device) if cuda else peak_rss()
    train_time = summary["train_time_s"]
    flags = summary["flags"]
    planned = train_free.passes(argparse.Namespace(**flags)) if regime == "free" else flags["epochs"]
    images = summary["epochs_completed"] * cfg["n_train"]  # Free: passes over the data
    return dict(regime=regime, act=cfg["act"], model=cfg["model"], dataset=cfg["dataset"], batch=cfg["batch_size"],
                device=str(device), amp=summary["amp"], compile="--compile" in cfg["argv"],
                kaf_impl=",".join(summary["kaf_impl"]) or None,
                n_train=cfg["n_train"], n_eval=cfg["n_eval"], epochs=cfg["epochs"], passes=planned,
                passes_completed=summary["epochs_completed"], wall_s=wall, train_time_s=train_time,
                images_per_s=images / train_time if train_time > 0 else None,
                peak_mem_mib=peak / MIB, peak_mem_kind="cuda_max_allocated" if cuda else "peak_rss",
                clean_acc=summary.get("clean_acc"), pgd_acc=summary.get("pgd_acc"),
                stopped_early=summary.get("stopped_early"), isolated=cfg["isolated"])


def run_config(cfg):
    """One configuration, in this process; running out of memory or diverging gives an error row."""
    try:
        return (bench_end_to_end if cfg["mode"] == "end-to-end" else bench_steps)(cfg)
    except (torch.OutOfMemoryError, utils.Diverged) as e:
        reason = str(e).splitlines()[0][:200]
        return dict(regime=cfg["regime"], act=cfg["act"], model=cfg["model"], dataset=cfg["dataset"],
                    batch=cfg["batch_size"], device=cfg["device"],
                    error=f"out of memory: {reason}" if isinstance(e, torch.OutOfMemoryError) else reason)


def run_isolated(cfg):
    """One configuration in a fresh Python process (honest peak RSS); returns its row."""
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", json.dumps(cfg)]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=os.path.dirname(os.path.abspath(__file__)))
    rows = [line[len(RESULT_TAG):] for line in proc.stdout.splitlines() if line.startswith(RESULT_TAG)]
    if proc.returncode == 0 and rows:
        return json.loads(rows[-1])
    lines = [line for line in proc.stderr.strip().splitlines() if line.strip()]
    reason = lines[-1] if lines else f"exit code {proc.returncode}"
    return dict(regime=cfg["regime"], act=cfg["act"], model=cfg["model"], dataset=cfg["dataset"],
                batch=cfg["batch_size"], device=cfg["device"], error=reason[:300])


# --------------------------------------------------------------------------------------- reporting
RATIOS = {"time_vs_relu": None, "mem_vs_relu": "peak_mem_mib", "saved_vs_relu": "saved_mib"}


def add_ratios(rows, baseline="relu"):
    """Add time_vs_relu (step_ms, or train_time_s end to end), mem_vs_relu (peak_mem_mib) and
    saved_vs_relu (saved_mib) to every row: its value over the ``baseline`` activation's row with
    the same regime, model, dataset and batch; None where there is no such row or a value is missing."""
    key = lambda r: (r.get("regime"), r.get("model"), r.get("dataset"), r.get("batch"))
    base = {key(r): r for r in rows if r.get("act") == baseline and "error" not in r}
    for r in rows:
        ref = base.get(key(r))
        for name, field in RATIOS.items():
            field = field or ("train_time_s" if "train_time_s" in r else "step_ms")
            value, ref_value = r.get(field), (ref or {}).get(field)
            r[name] = value / ref_value if value is not None and ref_value else None
    return rows


def _fmt(value, digits=1):
    return "–" if value is None else f"{value:.{digits}f}"


def markdown_table(rows):
    """The rows as a Markdown table (step or end-to-end columns, whichever the rows are)."""
    end_to_end = any("train_time_s" in r for r in rows)
    mem = "peak CUDA MiB" if any(r.get("peak_mem_kind") == "cuda_max_allocated" for r in rows) else "peak RSS MiB"
    if end_to_end:
        head = ["regime", "act", "model", "batch", "passes", "images", "wall s", "train s", "images/s", mem, "train time x relu"]
    else:
        head = ["regime", "act", "model", "batch", "fwd", "step ms", "images/s", mem, "peak - start MiB", "saved MiB",
                "time x relu", "mem x relu", "saved x relu"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        act = r["act"] + (f" [{r['kaf_impl']}]" if r.get("kaf_impl") and ":" not in r["act"] else "")  # what auto chose
        act = act if math.isfinite(r.get("final_loss", 0.0)) else act + " (loss not finite)"
        cells = [r["regime"], act, r["model"], str(r["batch"])]
        if "error" in r:
            cells += ["error: " + r["error"]] + [""] * (len(head) - 5)
        elif end_to_end:
            cells += [f"{r['passes_completed']}/{r['passes']}", str(r["n_train"]), _fmt(r["wall_s"]), _fmt(r["train_time_s"]),
                      _fmt(r["images_per_s"], 0), _fmt(r["peak_mem_mib"], 0), _fmt(r["time_vs_relu"], 2)]
        else:
            cells += [str(r["fwd_per_step"]), _fmt(r["step_ms"]), _fmt(r["images_per_s"], 0), _fmt(r["peak_mem_mib"], 0),
                      _fmt(r["step_mem_mib"], 0), _fmt(r["saved_mib"]), _fmt(r["time_vs_relu"], 2), _fmt(r["mem_vs_relu"], 2), _fmt(r["saved_vs_relu"], 2)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


# -------------------------------------------------------------------------------------------- main
def configs(args):
    n_train, n_eval = REAL_SIZES[args.dataset]
    for regime in args.regimes:
        for act in args.acts:
            yield dict(mode="end-to-end" if args.end_to_end else "steps", regime=regime, act=act, model=args.model,
                       dataset=args.dataset, batch_size=args.batch_size, device=args.device,
                       steps=args.steps, warmup=args.warmup, epochs=args.epochs,
                       n_train=args.n_train or n_train, n_eval=args.n_eval or n_eval,
                       argv=script_argv(args, regime, act), isolated=args.isolate)


# ------------------------------------------------------------------------------- the GPU suite
def suite_parts(device, folder):
    """The GPU suite: (name, time limit s, command) per part, at full size on CUDA (about 8 minutes on
    an H100 in all) and at tiny sizes elsewhere (a minute or two on a CPU; the plumbing, not speed)."""
    py, here = sys.executable, os.path.dirname(os.path.abspath(__file__))
    bench, cuda = [py, os.path.join(here, "bench.py"), "--device", device], device.startswith("cuda")
    j = lambda name: os.path.join(folder, name)
    ckpt = os.path.join(folder, "eval_model")
    if cuda:
        steps = ["--dataset", "cifar10", "--model", "preactresnet18", "--batch-size", "256", "--regimes", "fast",
                 "free", "pgd", "--acts", "relu", "silu", "pssilu", "kaf:triton", "kaf:loop"]
        e2e = ["--dataset", "cifar10", "--model", "preactresnet18", "--end-to-end", "--regimes", "fast", "--acts",
               "relu", "kaf", "--epochs", "15", "--batch-size", "128", "--n-train", "50000", "--n-eval", "1000"]
        train = ["--model", "preactresnet18", "--n-train", "4096", "--n-eval", "512"]
        quick, standard = ["--preset", "quick", "--n-eval", "512"], ["--preset", "standard", "--n-eval", "512"]
        triton_k, timed, compiled = [], ["--steps", "20", "--warmup", "5"], ["--steps", "20", "--warmup", "15"]
    else:
        steps = ["--dataset", "synthetic32", "--model", "lenet", "--batch-size", "16", "--regimes", "fast", "free",
                 "pgd", "--acts", "relu", "kaf:loop", "--replays", "2", "--attack-iters", "2", "--no-isolate"]
        e2e = ["--dataset", "synthetic32", "--model", "lenet", "--end-to-end", "--regimes", "fast", "--acts", "relu",
               "kaf", "--epochs", "1", "--batch-size", "32", "--n-train", "128", "--n-eval", "32", "--no-isolate"]
        train = ["--model", "lenet", "--n-train", "128", "--n-eval", "16"]
        small = ["--n-eval", "16", "--apgd-iters", "4", "--apgd-targets", "2", "--square-queries", "20",
                 "--nonsense-n", "8", "--curve-eps", "--noise-sigmas", "--large-eps", "0"]
        quick, standard = ["--preset", "quick", *small], ["--preset", "standard", *small, "--attacks", "fgsm",
                                                         "pgd20", "apgd-ce", "apgd-t", "square"]
        triton_k, timed, compiled = ["-k", "bfloat16"], ["--steps", "2", "--warmup", "1"], None
    parts = [
        ("triton_kaf_tests", 90, [py, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider",
                                  os.path.join(here, "tests", "test_kaf_triton.py"), *triton_k]),
        ("step_table", 150, [*bench, *steps, *timed, "--out", j("step_table.json")]),
        ("step_table_compiled", 120, [*bench, *steps, *(compiled or []), "--compile", "--out",
                                      j("step_table_compiled.json")] if compiled else None),
        ("fgsm_rs_end_to_end", 150, [*bench, *e2e, "--out", j("end_to_end.json")]),
        ("eval_model", 40, [py, os.path.join(here, "train_fast.py"), "--dataset", "synthetic32", *train,
                            "--epochs", "1", "--epsilon", "8/255", "--device", device, "--overwrite",
                            "--out-dir", ckpt]),
        ("eval_quick", 60, [py, os.path.join(here, "eval.py"), os.path.join(ckpt, "checkpoint.pt"), *quick,
                            "--device", device, "--no-plot", "--out", j("eval_quick.json")]),
        ("eval_standard", 90, [py, os.path.join(here, "eval.py"), os.path.join(ckpt, "checkpoint.pt"), *standard,
                               "--device", device, "--no-plot", "--out", j("eval_standard.json")]),
    ]
    return [(name, limit, cmd) for name, limit, cmd in parts if cmd is not None]


def run_parts(parts, folder):
    """Run each part as a subprocess under its own time limit; one that fails or runs out of time is
    recorded as such and the rest go on.  Returns a row per part."""
    rows = []
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)  # the fused kernels as a user's GPU runs them
    for name, limit, cmd in parts:
        tic = time.perf_counter()
        log = os.path.join(folder, f"{name}.log")
        try:
            with open(log, "w") as f:
                proc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, timeout=limit, env=env,
                                      cwd=os.path.dirname(os.path.abspath(__file__)))
            status = "ok" if proc.returncode == 0 else f"failed (exit code {proc.returncode})"
        except subprocess.TimeoutExpired:
            status = f"out of time ({limit} s)"
        tail = [l for l in open(log, errors="replace").read().replace("\r", "\n").splitlines() if l.strip()]
        rows.append(dict(part=name, status=status, wall_s=round(time.perf_counter() - tic, 1), limit_s=limit,
                         command=" ".join(cmd), log=log, last_line=tail[-1][:300] if tail else ""))
        print(f"suite: {name:<22s} {status:<28s} {rows[-1]['wall_s']:7.1f} s", flush=True)
    return rows


def suite_goals(folder, full=True):
    """The GPU goals, each with its number: FGSM-RS 15 epochs of relu in 30 s, KAF within 1.5x its time
    and 1.3x its peak memory, Free and PGD step time relative to FGSM's, eval quick on 10,000 images
    extrapolated from the images it ran on.  At the tiny CPU sizes (``full`` False) nothing is judged:
    'met' is None."""
    load = lambda name: json.load(open(os.path.join(folder, name))) if os.path.exists(os.path.join(folder, name)) else None
    goals = {}
    e2e = load("end_to_end.json")
    rows = {r["act"]: r for r in (e2e or {}).get("rows", []) if "error" not in r}
    if "relu" in rows:
        t = rows["relu"]["wall_s"]
        goals["fgsm_rs_relu_s"] = dict(value=round(t, 1), goal="<= 30 s", met=t <= 30)
    if "relu" in rows and "kaf" in rows:
        rt, rm = rows["kaf"]["wall_s"] / rows["relu"]["wall_s"], rows["kaf"]["peak_mem_mib"] / rows["relu"]["peak_mem_mib"]
        goals["kaf_time_x_relu"] = dict(value=round(rt, 2), goal="<= 1.5", met=rt <= 1.5)
        goals["kaf_peak_mem_x_relu"] = dict(value=round(rm, 2), goal="<= 1.3", met=rm <= 1.3)
    steps = load("step_table.json")
    ms = {r["regime"]: r["step_ms"] for r in (steps or {}).get("rows", []) if r.get("act") == "relu" and "error" not in r}
    for regime in ("free", "pgd"):
        if regime in ms and "fast" in ms:
            goals[f"{regime}_step_x_fgsm"] = dict(value=round(ms[regime] / ms["fast"], 2), goal="reported")
    quick = load("eval_quick.json")
    if quick:
        minutes = quick["time_s"] / quick["n_eval"] * 10000 / 60
        goals["eval_quick_10000_min"] = dict(value=round(minutes, 1), goal="minutes, not hours", met=minutes < 60)
    if not full:
        for g in goals.values():
            g["met"] = None
    return goals


def run_suite(args):
    """bench.py --suite gpu: every part, then one JSON + Markdown report in --out (a folder)."""
    folder = args.out or os.path.join("runs", "bench", "suite_gpu")
    utils.check_writable_dir(folder)
    rows = run_parts(suite_parts(args.device, folder), folder)
    goals = suite_goals(folder, full=args.device.startswith("cuda"))
    device = device_description(args.device)
    lines = [f"# bench.py --suite gpu", "", f"{device}; torch {torch.__version__}", "",
             "| part | status | wall s | limit s |", "|---|---|---|---|"]
    lines += [f"| {r['part']} | {r['status']} | {r['wall_s']} | {r['limit_s']} |" for r in rows]
    lines += ["", "| goal | value | target | met |", "|---|---|---|---|"]
    judged = lambda g: "-" if g.get("met") is None else "yes" if g["met"] else "NO"
    lines += [f"| {k} | {g['value']} | {g['goal']} | {judged(g)} |" for k, g in goals.items()]
    for name in ("step_table.json", "step_table_compiled.json", "end_to_end.json"):
        if os.path.exists(os.path.join(folder, name)):
            lines += ["", f"## {name[:-5]}", "", json.load(open(os.path.join(folder, name)))["table"]]
    for name in ("eval_quick.json", "eval_standard.json"):
        if os.path.exists(os.path.join(folder, name)):
            e = json.load(open(os.path.join(folder, name)))
            lines += ["", f"## {name[:-5]} ({e['n_eval']} images, {e['time_s']} s)", "",
                      ", ".join(f"{k} {v} s" for k, v in e["time_per_attack_s"].items())]
    report = dict(device=device, torch=torch.__version__, parts=rows, goals=goals)
    utils.write_json(report, os.path.join(folder, "suite.json"))
    with open(os.path.join(folder, "suite.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print(f"-> {folder}/suite.json, suite.md", flush=True)
    return report


def main(argv=None):
    args = get_args(argv)
    if args.suite:
        return run_suite(args)
    if args.worker is not None:  # a subprocess of an isolated benchmark: one configuration, one result line
        print(RESULT_TAG + json.dumps(run_config(json.loads(args.worker))), flush=True)
        return None
    if args.out:
        utils.check_writable(args.out)  # before the benchmarks, not after them
    todo = list(configs(args))
    for cfg in todo:  # every flag checked by the training script itself, before anything runs
        REGIMES[cfg["regime"]].get_args(cfg["argv"])
    rows = []
    bar = tqdm(todo, desc="bench", dynamic_ncols=True)
    for cfg in bar:
        if hasattr(bar, "set_postfix_str"):
            bar.set_postfix_str(f"{cfg['regime']} {cfg['act']}")
        rows.append(run_isolated(cfg) if args.isolate else run_config(cfg))
    if hasattr(bar, "close"):
        bar.close()
    add_ratios(rows)
    device = device_description(args.device)
    mode = "end to end" if args.end_to_end else f"{args.steps} steps after {args.warmup} warm-up"
    table = markdown_table(rows)
    print(f"\n{device}; torch {torch.__version__}; {args.dataset}-shaped synthetic data; {mode}\n\n{table}", flush=True)
    result = {"command": "python bench.py " + " ".join(sys.argv[1:] if argv is None else argv), "device": device,
              "torch": torch.__version__, "mode": mode, "flags": {k: v for k, v in vars(args).items() if k != "worker"},
              "rows": rows, "table": table}
    if args.out:
        utils.write_json(result, args.out)
    return result


if __name__ == "__main__":
    utils.main_guard(main)
