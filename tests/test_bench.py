"""bench.py, and the CUDA code path of the training scripts exercised on a CPU: AMP selection, the
autocast + loss-scaler steps, channels_last data and models, and no host syncs per training step."""
import json
import math
import sys

import pytest
import torch

import activations
import bench
import data
import models
import train_fast
import utils

LENET = ["--device", "cpu", "--dataset", "fashionmnist", "--model", "lenet", "--batch-size", "16",
         "--steps", "2", "--warmup", "1"]


# ------------------------------------------------------------------------------------------- bench.py
def test_bench_isolated_run_writes_json_with_the_fields(tmp_path):
    """One configuration in its own subprocess (the default): a full row in the JSON file."""
    out = tmp_path / "bench.json"
    result = bench.main(LENET + ["--acts", "relu", "--out", str(out)])
    on_disk = json.loads(out.read_text())
    assert on_disk["rows"] == result["rows"] and "| fast | relu | lenet | 16 |" in on_disk["table"]
    assert on_disk["command"].startswith("python bench.py") and "cores" in on_disk["device"]
    (row,) = on_disk["rows"]
    assert "error" not in row, row
    for key in ("regime", "act", "model", "batch", "fwd_per_step", "step_ms", "images_per_s", "peak_mem_mib",
                "step_mem_mib", "saved_mib", "time_vs_relu", "mem_vs_relu", "saved_vs_relu", "amp", "final_loss"):
        assert key in row, key
    assert row["isolated"] and row["peak_mem_kind"] == "peak_rss" and row["amp"] == "off"
    assert row["fwd_per_step"] == 2  # FGSM: the attack's pass and the training pass
    assert row["step_ms"] > 0 and math.isclose(row["images_per_s"], 16 / (row["step_ms"] / 1000), rel_tol=1e-9)
    assert row["peak_mem_mib"] > row["saved_mib"] > 0 and row["time_vs_relu"] == 1.0


def test_bench_in_process_uses_the_scripts_steps_and_computes_ratios(monkeypatch):
    made = []
    real = train_fast.train_step
    monkeypatch.setattr(train_fast, "train_step", lambda run, tr, x, y, args: made.append(args) or real(run, tr, x, y, args))
    result = bench.main(LENET + ["--acts", "relu", "kaf", "--no-isolate", "--regimes", "fast", "pgd", "--attack-iters", "2"])
    # warm-up, timed and the saved-memory step of the two fast rows, with train_fast's own flags
    assert len(made) == 2 * (1 + 2 + 1) and len({id(a) for a in made}) == 2 and all(isinstance(a.epsilon, float) for a in made)
    rows = result["rows"]
    assert [(r["regime"], r["act"]) for r in rows] == [("fast", "relu"), ("fast", "kaf"), ("pgd", "relu"), ("pgd", "kaf")]
    assert [r["fwd_per_step"] for r in rows] == [2, 2, 3, 3]  # PGD-2: two attack passes and the training pass
    for regime in ("fast", "pgd"):
        relu, kaf = [r for r in rows if r["regime"] == regime]
        assert relu["time_vs_relu"] == relu["saved_vs_relu"] == 1.0
        assert math.isclose(kaf["time_vs_relu"], kaf["step_ms"] / relu["step_ms"])
        assert math.isclose(kaf["mem_vs_relu"], kaf["peak_mem_mib"] / relu["peak_mem_mib"])
        # the memory-efficient KAF keeps its input only (1.34x relu on lenet), not the x D kernel tensor
        assert 1.0 < kaf["saved_vs_relu"] < 1.6, kaf
    assert [r["kaf_impl"] for r in rows] == [None, "loop", None, "loop"]  # what 'auto' chose on a CPU
    assert "| pgd | kaf [loop] | lenet | 16 | 3 |" in result["table"]


def test_bench_end_to_end_mode_times_a_whole_run(tmp_path):
    result = bench.main(["--device", "cpu", "--dataset", "fashionmnist", "--model", "lenet", "--acts", "relu",
                         "--regimes", "free", "--replays", "2", "--end-to-end", "--epochs", "2", "--n-train", "64",
                         "--n-eval", "16", "--batch-size", "32", "--eval-pgd-steps", "1", "--no-isolate",
                         "--out", str(tmp_path / "e2e.json")])
    (row,) = result["rows"]
    assert row["passes"] == row["passes_completed"] == 1 and row["n_train"] == 64 and row["n_eval"] == 16
    assert row["wall_s"] >= row["train_time_s"] > 0 and row["time_vs_relu"] == 1.0
    assert math.isclose(row["images_per_s"], 64 / row["train_time_s"])
    assert 0 <= row["pgd_acc"] <= row["clean_acc"] <= 1
    assert "| free | relu | lenet | 32 | 1/1 | 64 |" in result["table"]


def test_add_ratios_and_table():
    rows = [dict(regime="fast", act="relu", model="m", dataset="d", batch=8, step_ms=10.0, peak_mem_mib=100.0, saved_mib=4.0),
            dict(regime="fast", act="kaf", model="m", dataset="d", batch=8, step_ms=15.0, peak_mem_mib=130.0, saved_mib=5.0),
            dict(regime="fast", act="kaf", model="m", dataset="d", batch=16, step_ms=30.0, peak_mem_mib=260.0, saved_mib=10.0),
            dict(regime="pgd", act="kaf", model="m", dataset="d", batch=8, error="out of memory")]
    bench.add_ratios(rows)
    assert (rows[0]["time_vs_relu"], rows[0]["mem_vs_relu"], rows[0]["saved_vs_relu"]) == (1.0, 1.0, 1.0)
    assert (rows[1]["time_vs_relu"], rows[1]["mem_vs_relu"], rows[1]["saved_vs_relu"]) == (1.5, 1.3, 1.25)
    assert rows[2]["time_vs_relu"] is None and rows[3]["mem_vs_relu"] is None  # no relu row with that batch / regime
    e2e = [dict(regime="fast", act="relu", model="m", dataset="d", batch=8, train_time_s=20.0),
           dict(regime="fast", act="kaf", model="m", dataset="d", batch=8, train_time_s=50.0)]
    assert bench.add_ratios(e2e)[1]["time_vs_relu"] == 2.5
    for r in rows[:3]:
        r.update(fwd_per_step=2, images_per_s=1.0, step_mem_mib=1.0)
    table = bench.markdown_table(rows).splitlines()
    assert len(table) == 2 + len(rows) and "| –" in table[4] and "error: out of memory" in table[5]
    assert table[3].endswith("| 1.50 | 1.30 | 1.25 |")


@pytest.mark.parametrize("argv,message", [
    (["--acts", "sigmoid"], "invalid choice"),  # checked by the training script's own parser
    (["--steps", "0"], "--steps must be >= 1"),
    (["--regimes", "free", "--replays", "0"], "--replays must be >= 1"),
    (["--regimes", "fast", "--nonsense-flag"], "unrecognized arguments: --nonsense-flag"),
    (["--device", "cuda"], "CUDA is not available"),
    (["--acts", "relu:loop"], "--kaf-impl applies to --act kaf"),
    (["--acts", "kaf:fastest"], "invalid choice"),
])
def test_bench_bad_flags_give_one_line_errors(capsys, argv, message):
    if argv == ["--device", "cuda"] and torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    with pytest.raises(SystemExit) as e:
        bench.main((["--device", "cpu"] if "--device" not in argv else []) + argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1 and message in err[0], err


def test_regime_flags_go_to_their_regime_only():
    args = bench.get_args(["--device", "cpu", "--regimes", "fast", "free", "pgd", "--replays", "3", "--attack-iters", "4",
                           "--epsilon", "0.1"])
    argv = {cfg["regime"]: cfg["argv"] for cfg in bench.configs(args)}
    assert "--replays" not in argv["fast"] + argv["pgd"] and argv["free"][-4:-2] == ["--replays", "3"]
    assert "--attack-iters" not in argv["fast"] + argv["free"] and argv["pgd"][-4:-2] == ["--attack-iters", "4"]
    assert all(a[-2:] == ["--epsilon", "0.1"] for a in argv.values())  # unknown flags: to every script, last


def test_kaf_impl_variants_are_separate_rows_of_the_same_activation():
    args = bench.get_args(["--device", "cpu", "--acts", "relu", "kaf", "kaf:loop", "kaf:naive"])
    cfgs = list(bench.configs(args))
    assert [c["act"] for c in cfgs] == ["relu", "kaf", "kaf:loop", "kaf:naive"]  # the table's labels
    argv = [c["argv"] for c in cfgs]
    assert argv[1][argv[1].index("--act") + 1] == "kaf" and "--kaf-impl" not in argv[1]
    assert argv[2][argv[2].index("--act") + 1:argv[2].index("--act") + 2] == ["kaf"]
    assert argv[2][argv[2].index("--kaf-impl") + 1] == "loop" and argv[3][argv[3].index("--kaf-impl") + 1] == "naive"
    # one activation's options go to its rows only; other unknown flags to every row
    args = bench.get_args(["--device", "cpu", "--acts", "relu", "kaf:loop", "softplus", "--kaf-kernel", "relu",
                           "--epsilon", "0.1", "--softplus-beta=10", "--kaf-boundary", "-4"])
    argv = {c["act"]: c["argv"] for c in bench.configs(args)}
    assert argv["relu"][-2:] == ["--epsilon", "0.1"] and "--kaf-kernel" not in argv["relu"]
    assert argv["kaf:loop"][-6:] == ["--kaf-kernel", "relu", "--epsilon", "0.1", "--kaf-boundary", "-4"]
    assert argv["softplus"][-3:] == ["--epsilon", "0.1", "--softplus-beta=10"]


def test_saved_for_backward_counts_storages_once_and_frees_them():
    x = torch.randn(256, 256, requires_grad=True)  # 256 KiB
    with bench.SavedForBackward() as saved:
        y = x * x  # saves x twice: one storage
        z = torch.exp(y)  # saves its output: a second storage
        assert saved.current == 2 * x.numel() * 4
        z.sum().backward()
        assert saved.current == 0  # backward freed the graph
        w = (x * 2).sin()
        del w  # a graph dropped without backward is freed too
        assert saved.current == 0
    assert saved.peak == 2 * x.numel() * 4
    # the naive KAF keeps the x D kernel tensor; the memory-efficient one only its input, whatever
    # the kernel
    s = torch.randn(8, 4, 6, 6, requires_grad=True)
    for kernel in activations.KAF_KERNELS:
        peaks = {}
        for naive in (False, True):
            kaf = activations.KAF(4, impl="naive" if naive else "auto", kernel=kernel)
            with bench.SavedForBackward() as saved:
                kaf(s).sum().backward()
            peaks[naive] = saved.peak
        assert peaks[False] < 2 * s.numel() * 4 and peaks[True] > 15 * s.numel() * 4, (kernel, peaks)


def test_synthetic_like_gives_the_dataset_shape_without_files(tmp_path):
    x, y, xt, yt = bench.synthetic_like("cifar100", 40, 8)
    assert x.shape == (40, 3, 32, 32) and x.dtype == torch.uint8 and xt.shape == (8, 3, 32, 32)
    assert 0 <= int(y.min()) and int(y.max()) < 100 and y.dtype == torch.int64
    args = train_fast.get_args(["--dataset", "cifar100", "--model", "lenet", "--device", "cpu", "--data-dir", "/nonexistent",
                                "--out-dir", str(tmp_path)])
    run = utils.setup(args, "train_fast", arrays=(x, y, xt, yt))  # no files read
    assert torch.equal(run.batches.x, x) and len(run.y_test) == 8
    big_x, big_y = bench.synthetic_images("cifar10", 50, seed=0, chunk=16)  # generated in chunks, each its own
    assert big_x.shape == (50, 3, 32, 32) and len(big_y) == 50 and not torch.equal(big_x[:16], big_x[16:32])


# -------------------------------------------------------------------------------- the CUDA code path
@pytest.mark.parametrize("device,flag,bf16,expected", [
    ("cpu", "auto", True, (None, False)),
    ("cpu", "fp16", False, (None, False)),  # CPU runs in float32 whatever --amp says
    ("cuda", "auto", True, (torch.bfloat16, False)),
    ("cuda", "auto", False, (torch.float16, True)),  # fp16 needs the loss scaler
    ("cuda", "bf16", False, (torch.bfloat16, False)),
    ("cuda", "fp16", True, (torch.float16, True)),
    ("cuda", "off", True, (None, False)),
])
def test_amp_dtype_choice(device, flag, bf16, expected):
    assert utils.amp_dtype_for(device, flag, bf16) == expected


def test_run_on_cpu_is_float32_and_never_asks_cuda(tmp_path, monkeypatch):
    def no_cuda():
        raise AssertionError("a CPU run must not query CUDA")
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", no_cuda)
    args = train_fast.get_args(["--dataset", "synthetic", "--model", "lenet", "--n-train", "64", "--device", "cpu",
                                "--amp", "fp16", "--out-dir", str(tmp_path)])
    run = utils.setup(args, "train_fast")
    assert run.amp_dtype is None and not run.scaler.is_enabled() and not run.channels_last
    assert run.batches.x.dtype == torch.uint8  # kept as bytes; converted batch by batch


def test_batches_on_device_crop_flip_keep_shape_range_labels_and_channels_last():
    n, classes = 37, 10
    y = torch.arange(n) % classes
    x = (10 + 20 * y).to(torch.uint8).view(n, 1, 1, 1).expand(n, 3, 32, 32).contiguous()  # image value encodes label
    g = torch.Generator().manual_seed(0)
    batches = data.Batches(x, y, 8, shuffle=True, augment="crop+flip", channels_last=True, generator=g)
    seen = []
    for xb, yb in batches:
        assert xb.dtype == torch.float32 and xb.shape[1:] == (3, 32, 32) and len(xb) == len(yb)
        assert xb.is_contiguous(memory_format=torch.channels_last)
        assert 0 <= xb.min() and xb.max() <= 1
        assert torch.allclose(xb.amax((1, 2, 3)), (10 + 20 * yb).float() / 255)  # still its own image
        padded = (xb == 0).flatten(1).any(1)  # zero padding shows wherever the crop shifted
        assert padded.float().mean() > 0.5
        seen.append(yb)
    assert [len(s) for s in seen] == [8, 8, 8, 8, 5]  # the last batch is short
    assert sorted(torch.cat(seen).tolist()) == sorted(y.tolist())  # every image once per epoch
    plain = data.Batches(x, y, 8, shuffle=False, augment="none", channels_last=False)
    xb, yb = next(iter(plain))
    assert xb.is_contiguous() and torch.equal(yb, y[:8]) and torch.equal(xb, x[:8].float() / 255)


@pytest.mark.parametrize("arch", ["lenet", "resnet20", "preactresnet18"])
@pytest.mark.parametrize("act", ["relu", "kaf"])
def test_models_in_channels_last_match_nchw(arch, act):
    """What Run does on CUDA (model and batches in channels_last) computes the same function and
    gradients as NCHW; KAF keeps the layout (no hidden copies)."""
    c, size = (1, 28) if arch == "lenet" else (3, 32)
    torch.manual_seed(0)
    model = models.build(arch, act, 10, c, size, (0.5,) * c, (0.25,) * c).train().double()  # layout, not rounding
    x = torch.rand(2, c, size, size, dtype=torch.float64)
    grads = []
    for layout in (torch.contiguous_format, torch.channels_last):
        m = model.to(memory_format=layout)
        xi = x.clone(memory_format=layout).requires_grad_(True)
        out = m(xi)
        out.square().sum().backward()
        grads.append((out.detach(), xi.grad, [p.grad.clone() for p in m.parameters()]))
        m.zero_grad(set_to_none=True)
    (o1, gx1, gp1), (o2, gx2, gp2) = grads
    close = lambda a, b: (a - b).norm() <= 1e-9 * a.norm() + 1e-12
    assert close(o1, o2) and close(gx1, gx2) and all(close(a, b) for a, b in zip(gp1, gp2))
    kaf_in = torch.randn(2, 4, 5, 5).contiguous(memory_format=torch.channels_last)
    assert activations.make_factory(act)(4)(kaf_in).is_contiguous(memory_format=torch.channels_last)


def cuda_like_run(tmp_path, regime, act, amp, grad_clip=0):
    """A CPU run set up the way utils.setup sets it up on CUDA: channels_last model and batches, autocast
    (CPU autocast stands in for CUDA's) and, for fp16, an enabled loss scaler."""
    argv = ["--dataset", "synthetic32", "--model", "lenet", "--act", act, "--n-train", "32", "--batch-size", "16",
            "--device", "cpu", "--lr-schedule", "constant", "--lr-max", "0.05", "--grad-clip", str(grad_clip),
            "--out-dir", str(tmp_path)]
    argv += {"free": ["--replays", "2"], "pgd": ["--attack-iters", "2"]}.get(regime, [])
    script_args = bench.REGIMES[regime].get_args(argv)
    run = utils.setup(script_args, f"train_{regime}")
    utils.set_lr(run.opt, *[v[0] for v in utils.lr_schedule(script_args, 1)])
    run.channels_last = run.batches.channels_last = True
    run.model = run.model.to(memory_format=torch.channels_last)
    run.amp_dtype, run.amp = amp, torch.autocast("cpu", dtype=amp)
    run.scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 12, enabled=amp == torch.float16)
    return run, bench.make_train_step(regime, run, script_args)


@pytest.mark.parametrize("regime", ["fast", "free", "pgd"])
@pytest.mark.parametrize("act,amp", [("relu", torch.bfloat16), ("kaf", torch.bfloat16), ("kaf", torch.float16)])
def test_autocast_and_scaler_steps_train(tmp_path, regime, act, amp):
    run, train_step = cuda_like_run(tmp_path, regime, act, amp, grad_clip=1 if amp == torch.float16 else 0)
    inputs = []
    run.model.register_forward_pre_hook(lambda module, args: inputs.append(args[0]))
    before = [p.detach().clone() for p in run.model.parameters()]
    for x, y in run.batches:
        assert torch.isfinite(train_step(x, y))
    assert all(t.is_contiguous(memory_format=torch.channels_last) for t in inputs)
    assert all(p.dtype == torch.float32 for p in run.model.parameters())  # autocast never changes the weights
    changed = [not torch.equal(a, p.detach()) for a, p in zip(before, run.model.parameters())]
    assert all(changed), "some parameters (e.g. KAF's alpha) did not train under autocast"
    if amp == torch.float16:
        assert run.scaler.is_enabled() and 0 < run.scaler.get_scale() <= 2.0 ** 12


class SyncCounter:
    """Counts calls that force a host-device sync on CUDA (item, tolist, cpu, numpy, bool(t), float(t),
    int(t), nonzero, cuda.synchronize), by wrapping them."""
    NAMES = ("item", "tolist", "cpu", "numpy", "__bool__", "__float__", "__int__", "__index__", "nonzero")

    def __init__(self, monkeypatch):
        self.n, self.where = 0, []
        for name in self.NAMES:
            monkeypatch.setattr(torch.Tensor, name, self._wrap(getattr(torch.Tensor, name), name))
        monkeypatch.setattr(torch.cuda, "synchronize", self._wrap(torch.cuda.synchronize, "cuda.synchronize"))

    def _wrap(self, fn, name):
        def counted(*args, **kwargs):
            self.n += 1
            self.where.append(name)
            return fn(*args, **kwargs)
        return counted




def tiny_run(tmp_path, regime, act, batches, batch_size=4):
    argv = ["--dataset", "synthetic", "--model", "lenet", "--act", act, "--n-train", str(batch_size * batches),
            "--batch-size", str(batch_size), "--n-eval", "8", "--eval-pgd-steps", "1", "--epochs", "1",
            "--lr-schedule", "constant", "--lr-max", "0.01", "--device", "cpu", "--out-dir", str(tmp_path)]
    argv += {"free": ["--replays", "2"], "pgd": ["--attack-iters", "2", "--grad-clip", "1"]}.get(regime, [])
    script_args = bench.REGIMES[regime].get_args(argv)
    run = utils.setup(script_args, f"train_{regime}")
    utils.set_lr(run.opt, *[v[0] for v in utils.lr_schedule(script_args, 1)])
    return run, bench.make_train_step(regime, run, script_args)


@pytest.mark.parametrize("regime,act", [("fast", "relu"), ("free", "relu"), ("pgd", "relu"), ("fast", "pssilu"),
                                        ("fast", "kwta"), ("free", "prelu"), ("fast", "kaf")])
def test_train_steps_make_no_host_sync(tmp_path, monkeypatch, regime, act):
    """A regime's training step (attack, forward, backward, optimiser step; --grad-clip for PGD)
    never waits for the device."""
    run, train_step = tiny_run(tmp_path, regime, act, batches=3)
    counter = SyncCounter(monkeypatch)
    for x, y in run.batches:
        train_step(x, y)
    assert counter.where == []


def test_training_loop_syncs_only_for_its_progress_display(tmp_path, monkeypatch):
    """Between the first and the last step of an epoch train_fast's loop syncs only to show progress
    (a few calls every 50 batches), never per step."""
    batches = 60
    argv = ["--dataset", "synthetic", "--model", "lenet", "--n-train", str(4 * batches), "--batch-size", "4",
            "--n-eval", "8", "--eval-pgd-steps", "1", "--epochs", "1", "--lr-schedule", "constant", "--lr-max", "0.01",
            "--device", "cpu", "--out-dir", str(tmp_path)]
    counter = SyncCounter(monkeypatch)
    marks = []
    step = train_fast.train_step

    def train_step(*args):
        marks.append(len(counter.where))
        return step(*args)

    monkeypatch.setattr(train_fast, "train_step", train_step)
    train_fast.main(argv)
    assert len(marks) == batches
    during = counter.where[marks[0]:marks[-1]]
    assert len(during) < batches / 4, f"{len(during)} host syncs in {batches - 1} steps: {sorted(set(during))}"


def test_fp16_loss_scaler_costs_at_most_one_sync_per_step(tmp_path, monkeypatch):
    """Under fp16 torch's GradScaler.step reads its found-inf flag on the host (one .item() per
    optimiser step, unless the optimiser is fused); bf16 -- what 'auto' picks on H100/H200 -- needs no
    scaler and has no sync at all (test_train_steps_make_no_host_sync)."""
    run, train_step = cuda_like_run(tmp_path, "fast", "relu", torch.float16, grad_clip=1)
    counter = SyncCounter(monkeypatch)
    steps = 0
    for x, y in run.batches:
        train_step(x, y)
        steps += 1
    assert set(counter.where) <= {"item"} and len(counter.where) <= steps


@pytest.mark.parametrize("kernel", ["gaussian", "relu"])
def test_compiled_kaf_model_matches_eager(kernel):
    """--compile traces the KAF autograd function (its Python loop unrolled) and gives the same step."""
    torch.manual_seed(0)
    model = models.build("lenet", "kaf", 10, 1, 28, act_options={"size": 4, "kernel": kernel})
    x, y = torch.rand(16, 1, 28, 28), torch.randint(0, 10, (16,))
    results = []
    for forward in (torch.compile(model), model):
        model.zero_grad()
        loss = torch.nn.functional.cross_entropy(forward(x), y)
        loss.backward()
        results.append((loss.detach(), [p.grad.clone() for p in model.parameters()]))
    (compiled_loss, compiled_grads), (loss, grads) = results
    assert torch.allclose(compiled_loss, loss, atol=1e-5)
    for a, b in zip(compiled_grads, grads):
        assert torch.allclose(a, b, atol=1e-5 + 1e-4 * b.abs().max().item())


def test_suite_parts_that_fail_or_run_out_of_time_are_reported_and_the_rest_go_on(tmp_path):
    py = sys.executable
    parts = [("fails", 30, [py, "-c", "import sys; print('bad'); sys.exit(3)"]),
             ("hangs", 1, [py, "-c", "import time; time.sleep(30)"]),
             ("works", 30, [py, "-c", "print('fine')"])]
    rows = bench.run_parts(parts, str(tmp_path))
    assert [r["status"] for r in rows] == ["failed (exit code 3)", "out of time (1 s)", "ok"]
    assert rows[0]["last_line"] == "bad" and rows[2]["last_line"] == "fine" and rows[1]["wall_s"] < 20


def test_the_gpu_suite_runs_at_tiny_sizes_on_a_cpu_and_writes_one_report(tmp_path):
    report = bench.main(["--suite", "gpu", "--device", "cpu", "--out", str(tmp_path)])
    assert [r["part"] for r in report["parts"]] == ["triton_kaf_tests", "step_table", "fgsm_rs_end_to_end",
                                                     "eval_model", "eval_quick", "eval_standard"]
    assert all(r["status"] == "ok" for r in report["parts"]), report["parts"]
    assert set(report["goals"]) >= {"fgsm_rs_relu_s", "kaf_time_x_relu", "kaf_peak_mem_x_relu", "eval_quick_10000_min"}
    assert all(g["met"] is None for g in report["goals"].values())  # tiny sizes judge nothing
    text = (tmp_path / "suite.md").read_text()
    assert "| step_table | ok |" in text and "## end_to_end" in text and "apgd-t" in text
    assert json.loads((tmp_path / "suite.json").read_text())["parts"] == report["parts"]


def test_free_replays_and_passes_do_not_recompile_the_compiled_model(tmp_path, monkeypatch):
    """--compile: the graphs compiled for a Free run are as many with 4 replays over 2 passes as with
    2 replays over 1 pass (the replays and later passes reuse them: no recompilation per step).
    Counted with a backend that records each graph and runs it eagerly (no C++ build needed)."""
    import train_free
    compiled = []

    def counting_backend(gm, example_inputs):
        compiled.append(len(gm.graph.nodes))
        return gm.forward
    real_compile = torch.compile
    monkeypatch.setattr(torch, "compile", lambda model, **k: real_compile(model, backend=counting_backend))
    counts = []
    for replays, epochs in ((2, 2), (4, 8)):  # 1 pass x 2 replays, 2 passes x 4 replays
        torch._dynamo.reset()
        compiled.clear()
        summary = train_free.main(["--dataset", "synthetic", "--model", "lenet", "--n-train", "128", "--n-eval", "32",
                                   "--batch-size", "64", "--eval-pgd-steps", "1", "--device", "cpu", "--compile",
                                   "--replays", str(replays), "--epochs", str(epochs),
                                   "--out-dir", str(tmp_path / f"m{replays}")])
        assert summary["counts"]["optimizer_steps"] == 2 * replays * (epochs // replays)
        counts.append(len(compiled))
    torch._dynamo.reset()
    assert counts[0] >= 1 and counts[0] == counts[1], counts
