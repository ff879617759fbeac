"""Reliability: kill -9 and --resume, divergence, bad input, and DDP with torchrun (gloo, CPU)."""
import importlib
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

import data
import models

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--dataset", "synthetic", "--model", "lenet", "--n-train", "1024", "--n-eval", "64", "--batch-size", "64",
        "--epsilon", "0.1", "--eval-pgd-steps", "2", "--device", "cpu", "--seed", "3", "--co-probe-images", "128"]
ENV = dict(os.environ, OMP_NUM_THREADS="1")  # the same thread count in every run: bit-identical float sums
ENV.pop("TRITON_INTERPRET", None)  # the scripts as a user runs them (conftest sets it for the kernel tests)


def _cmd(script, *args):
    return [sys.executable, os.path.join(ROOT, script), *args]


def _run(script, *args, timeout=300):
    return subprocess.run(_cmd(script, *args), cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=ENV)


def _run_here(script, *args):
    """``script``'s main(args) in this process, wrapped as its command line wraps it
    (utils.main_guard): exit code, stdout and stderr as a CompletedProcess, without the seconds a new
    interpreter takes to import torch.  For the runs whose process boundary is not what a test
    checks; kill -9, signals, torchrun and the command line's own output keep _run."""
    import contextlib
    import io
    import utils
    module = importlib.import_module(script[:-len(".py")])
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            utils.main_guard(lambda: module.main([str(a) for a in args]))
            code = 0
        except SystemExit as e:
            code = e.code or 0
    return subprocess.CompletedProcess([script, *args], code, out.getvalue(), err.getvalue())


def _weights(path):
    return torch.load(path, map_location="cpu", weights_only=True)["model_state"]


def _kill_during_second_epoch(script, args, out, sig=signal.SIGKILL):
    """Start a run, send it ``sig`` as soon as the checkpoint of its first epoch is on disk, i.e.
    while the second epoch is in progress.  Returns the epoch the surviving checkpoint holds."""
    ckpt = out / "checkpoint.pt"
    proc = subprocess.Popen(_cmd(script, *args), cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True)
    deadline = time.time() + 240
    while not ckpt.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(sig)
    _, err = proc.communicate()
    if sig == signal.SIGKILL:
        assert proc.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    else:  # SIGTERM, what a cluster scheduler sends: handled as Ctrl-C
        assert proc.returncode == 143 and err.strip().splitlines()[-1] == "terminated", err[-2000:]
        assert (out / "interrupted.pt").exists() and not (out / ".lock").exists()
        assert json.loads((out / "summary.json").read_text())["stopped_early"] == "interrupted in epoch 2"
    return torch.load(ckpt, map_location="cpu", weights_only=True)["epoch"]


@pytest.mark.parametrize("script,extra,sig", [
    ("train_fast.py", ["--act", "pssilu", "--epochs", "3"], signal.SIGKILL),
    ("train_free.py", ["--act", "relu", "--epochs", "6", "--replays", "2", "--lr-max", "0.05"], signal.SIGKILL),  # 3 passes
    ("train_fast.py", ["--act", "relu", "--epochs", "3"], signal.SIGTERM),
])
def test_kill_then_resume_gives_the_same_final_weights(tmp_path, script, extra, sig):
    whole, broken = tmp_path / "whole", tmp_path / "broken"
    r = _run(script, *TINY, *extra, "--out-dir", str(whole))
    assert r.returncode == 0, r.stderr
    survived = _kill_during_second_epoch(script, [*TINY, *extra, "--out-dir", str(broken)], broken, sig)
    assert survived == 1
    r = _run(script, *TINY, *extra, "--out-dir", str(broken), "--resume")
    assert r.returncode == 0, r.stderr
    assert "resumed from" in r.stdout
    a, b = _weights(whole / "checkpoint.pt"), _weights(broken / "checkpoint.pt")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    sa, sb = (json.loads((d / "summary.json").read_text()) for d in (whole, broken))
    assert sa["clean_acc"] == sb["clean_acc"] and sa["pgd_acc"] == sb["pgd_acc"]
    assert [h["train_loss"] for h in sa["history"]] == [h["train_loss"] for h in sb["history"]]


def test_resume_of_a_finished_run_only_evaluates_and_resume_of_another_model_is_refused(tmp_path):
    out = tmp_path / "run"
    assert _run_here("train_fast.py", *TINY, "--epochs", "1", "--out-dir", str(out)).returncode == 0
    before = _weights(out / "checkpoint.pt")
    r = _run_here("train_fast.py", *TINY, "--epochs", "1", "--out-dir", str(out), "--resume")
    assert r.returncode == 0 and "(finished)" in r.stdout and "epoch   1" not in r.stdout, r.stdout
    after = _weights(out / "checkpoint.pt")
    assert all(torch.equal(before[k], after[k]) for k in before)
    r = _run_here("train_fast.py", *TINY, "--act", "silu", "--epochs", "1", "--out-dir", str(out), "--resume")
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1 and "cannot resume" in lines[0] and "act=relu" in lines[0], r.stderr
    r = _run_here("train_free.py", *TINY, "--epochs", "1", "--out-dir", str(out), "--resume")
    assert r.returncode == 2 and "train_fast" in r.stderr and "Traceback" not in r.stderr


def test_divergence_stops_cleanly_and_keeps_the_last_good_checkpoint(tmp_path):
    out = tmp_path / "run"
    assert _run_here("train_fast.py", *TINY, "--epochs", "1", "--out-dir", str(out)).returncode == 0
    ckpt = torch.load(out / "checkpoint.pt", weights_only=True)  # as if the run had an exploding LR from epoch 2 on
    ckpt["args"].update(lr_schedule="constant", lr_max=1e12, co_guard=0.0)
    torch.save(ckpt, out / "checkpoint.pt")
    good = (out / "checkpoint.pt").read_bytes()
    r = _run_here("train_fast.py", *TINY, "--epochs", "3", "--out-dir", str(out), "--resume",
             "--lr-schedule", "constant", "--lr-max", "1e12", "--co-guard", "0")
    errors = [l for l in r.stderr.splitlines() if "error" in l]  # (the rest of stderr is the progress bar)
    assert r.returncode == 1, r.stderr
    assert len(errors) == 1 and "diverged" in errors[0] and "epoch 2, batch" in errors[0] and "Traceback" not in r.stderr, r.stderr
    assert (out / "checkpoint.pt").read_bytes() == good
    summary = json.loads((out / "summary.json").read_text())
    assert summary["evaluated"] is False and "epoch 2" in summary["diverged"] and summary["epochs_completed"] == 1
    fresh = tmp_path / "fresh"  # diverging in the first epoch: nothing to keep, and it says so
    r = _run_here("train_fast.py", *TINY, "--epochs", "1", "--out-dir", str(fresh), "--lr-schedule", "constant", "--lr-max", "1e12")
    assert r.returncode == 1 and "no epoch completed, no checkpoint" in r.stderr and not (fresh / "checkpoint.pt").exists()


def test_non_finite_gradient_norm_is_caught_with_grad_clip(tmp_path):
    import utils
    import tricks
    import train_fast
    # natural training: the step's one backward pass is the one whose gradients are checked
    args = train_fast.get_args([*TINY, "--epochs", "1", "--grad-clip", "1", "--attack", "none", "--out-dir", str(tmp_path)])
    run = utils.setup(args, "train_fast")
    tr = tricks.TrainingTricks.for_run(args, run)
    x, y = next(iter(run.batches))
    assert not bool(train_fast.train_step(run, tr, x, y, args)[2])

    class InfiniteGradients(torch.amp.GradScaler):  # a finite loss whose gradients are infinite
        def scale(self, loss):
            return loss * float("inf")
    run.scaler = InfiniteGradients("cpu", enabled=False)
    loss, _, bad = train_fast.train_step(run, tr, x, y, args)
    assert torch.isfinite(loss) and bool(bad)


@pytest.mark.parametrize("argv,message", [
    (["train_fast.py", "--model", "alexnet"], "invalid choice"),
    (["train_fast.py", "--dataset", "imagenet"], "invalid choice"),
    (["train_free.py", "--lr-schedule", "steps"], "invalid choice"),
    (["train_free.py", "--replays", "0"], "--replays must be >= 1"),
    (["train_pgd.py", "--attack-iters", "0"], "--attack-iters must be >= 1"),
    (["train_pgd.py", "--act", "pssilu", "--softplus-beta", "10"], "applies to --act softplus"),
    (["train_fast.py", "--epsilon", "-0.1"], "--epsilon must be in (0, 1]"),
    (["train_fast.py", "--epsilon", "2"], "--epsilon must be in (0, 1]"),
    (["train_fast.py", "--epsilon", "nan"], "expected a finite number"),
    (["train_pgd.py", "--eval-pgd-alpha", "inf"], "expected a finite number"),
    (["eval.py", "ckpt.pt", "--attacks", "pgd0"], "unknown attack 'pgd0'"),
    (["eval.py", "ckpt.pt", "--attacks", "pgd20x0"], "unknown attack 'pgd20x0'"),
    (["eval.py", "ckpt.pt", "--eps", "1.5"], "--eps must be in (0, 1]"),
    (["eval.py", "ckpt.pt", "--n-clean", "-1"], "--n-clean >= 0"),
    (["train_fast.py", "--batch-size", "0"], "--batch-size must be >= 1"),
    (["train_free.py", "--resume", "--lr-find"], "cannot be combined"),
    (["train_fast.py", "--act", "kaf", "--kaf-size", "1"], "kaf dictionary size must be >= 2"),
    (["train_fast.py", "--act", "kaf", "--kaf-size", "10000"], "--kaf-size must be <= 1000"),
    (["train_pgd.py", "--resume", "--overwrite"], "cannot be combined"),
])
def test_bad_flags_are_refused_up_front_in_one_line(argv, message, capsys):
    script = importlib.import_module(argv[0][:-3])
    with pytest.raises(SystemExit) as e:
        script.get_args(argv[1:])
    lines = [l for l in capsys.readouterr().err.strip().splitlines() if l.strip()]
    assert e.value.code == 2 and len(lines) == 1 and message in lines[0] and lines[0].endswith("(see --help)"), lines
    if message == "invalid choice":
        assert "choose from" in lines[0]  # the valid choices are listed


def test_a_bad_flag_on_the_command_line_is_one_line_without_traceback():
    r = _run("train_fast.py", "--act", "kaf", "--kaf-impl", "triton", "--device", "cpu")
    lines = [l for l in r.stderr.strip().splitlines() if l.strip()]
    assert r.returncode == 2 and len(lines) == 1 and "runs on CUDA only" in lines[0] and "Traceback" not in r.stderr, r.stderr


def test_checkpoint_of_another_kind_gives_one_line_error(tmp_path):
    other = tmp_path / "other.pt"
    torch.save({"weights": torch.zeros(3)}, other)
    r = _run("eval.py", str(other), "--device", "cpu")
    assert r.returncode == 2 and "not a checkpoint of this project" in r.stderr and "Traceback" not in r.stderr
    wrong = tmp_path / "wrong.pt"
    good = tmp_path / "run"
    assert _run_here("train_fast.py", *TINY, "--epochs", "1", "--out-dir", str(good)).returncode == 0
    ckpt = torch.load(good / "checkpoint.pt", weights_only=True)  # checkpoints are plain data
    ckpt["model_config"]["act"] = "kaf"  # the weights no longer fit the model it describes
    torch.save(ckpt, wrong)
    r = _run("eval.py", str(wrong), "--device", "cpu")
    assert r.returncode == 2 and "does not fit its model" in r.stderr and "Traceback" not in r.stderr


class _Payload:
    """Unpickling this creates a file: what a malicious checkpoint would do."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_a_checkpoint_holding_code_is_refused_everywhere_in_one_line(tmp_path):
    good = tmp_path / "run"
    assert _run_here("train_fast.py", *TINY, "--epochs", "1", "--out-dir", str(good)).returncode == 0
    ckpt = torch.load(good / "checkpoint.pt", weights_only=True)
    marker = tmp_path / "pwned"
    ckpt["note"] = _Payload(str(marker))
    torch.save(ckpt, good / "checkpoint.pt")
    for argv in (["eval.py", str(good / "checkpoint.pt"), "--device", "cpu", "--n-eval", "8"],
                 ["analyze.py", str(good / "checkpoint.pt"), "--device", "cpu", "--shapes", "--no-plot"],
                 ["train_fast.py", *TINY, "--epochs", "2", "--out-dir", str(good), "--resume"]):
        r = _run(*argv)
        lines = [l for l in r.stderr.strip().splitlines() if l.strip() and "%|" not in l]
        assert r.returncode == 2 and len(lines) == 1 and "refusing to load" in lines[0], (argv[0], r.stderr)
        assert not marker.exists(), argv[0]
    with pytest.raises(models.CheckpointError, match="refusing to load"):
        models.load_checkpoint(str(good / "checkpoint.pt"))
    assert not marker.exists()
    # files of another kind are said to be that, not called ones holding objects
    np.save(tmp_path / "array.npy", np.zeros(3))
    (tmp_path / "notes.txt").write_text("hello")
    for name in ("array.npy", "notes.txt"):
        with pytest.raises(models.CheckpointError, match="not a zip archive as torch.save writes") as err:
            models.read_checkpoint(str(tmp_path / name))
        assert "\n" not in str(err.value) and "objects other than tensors" not in str(err.value)


def test_resume_refuses_changed_training_flags_and_names_them(tmp_path):
    out = tmp_path / "run"
    assert _run_here("train_fast.py", *TINY, "--epochs", "1", "--out-dir", str(out)).returncode == 0
    r = _run_here("train_fast.py", *TINY, "--epochs", "2", "--out-dir", str(out), "--resume", "--epsilon", "0.2", "--batch-size", "32")
    lines = [l for l in r.stderr.strip().splitlines() if l.strip()]
    assert r.returncode == 2 and len(lines) == 1 and "--epsilon 0.1 -> 0.2" in lines[0] and "--batch-size 64 -> 32" in lines[0], r.stderr
    assert "epoch   2" not in r.stdout


def test_a_checkpoint_older_than_a_training_flag_resumes_as_that_flags_default(tmp_path):
    import train_fast
    import utils
    out, argv = tmp_path / "run", [a for a in TINY if a not in ("--co-probe-images", "128")]
    assert utils.FLAGS_ADDED_LATER == {"co_probe_images": train_fast.get_args([]).co_probe_images}

    def forget_the_flag():  # as a checkpoint written before --co-probe-images existed
        ckpt = torch.load(out / "checkpoint.pt", weights_only=True)
        del ckpt["args"]["co_probe_images"]
        torch.save(ckpt, out / "checkpoint.pt")
    assert _run_here("train_fast.py", *argv, "--epochs", "1", "--out-dir", str(out)).returncode == 0
    forget_the_flag()
    r = _run_here("train_fast.py", *argv, "--epochs", "2", "--out-dir", str(out), "--resume")
    assert r.returncode == 0 and "epoch   2" in r.stdout, r.stderr[-2000:]
    forget_the_flag()
    r = _run_here("train_fast.py", *argv, "--epochs", "3", "--out-dir", str(out), "--resume", "--co-probe-images", "64")
    assert r.returncode == 2 and "--co-probe-images 512 -> 64" in r.stderr, r.stderr


def test_resume_of_a_run_the_guard_stopped_keeps_its_record(tmp_path):
    out = tmp_path / "run"
    assert _run_here("train_fast.py", *TINY, "--epochs", "1", "--out-dir", str(out)).returncode == 0
    ckpt = torch.load(out / "checkpoint.pt", weights_only=True)
    record = dict(epoch=1, held_pgd_acc=0.0, best_held_pgd_acc=0.5, restored_epoch=1)
    ckpt["guard"] = record  # as the guard leaves a run it stopped
    torch.save(ckpt, out / "checkpoint.pt")
    r = _run_here("train_fast.py", *TINY, "--epochs", "3", "--out-dir", str(out), "--resume")
    assert r.returncode == 0 and "stopped by the overfitting guard" in r.stdout and "epoch   2" not in r.stdout, r.stdout
    summary = json.loads((out / "summary.json").read_text())
    assert summary["catastrophic_overfitting"] == record and summary["epochs_completed"] == 1
    assert summary["stopped_early"] == "catastrophic overfitting in epoch 1"
    assert torch.load(out / "checkpoint.pt", weights_only=True)["guard"] == record


@pytest.mark.parametrize("script,extra,steps", [
    ("train_fast.py", ["--epochs", "1"], 8),
    ("train_free.py", ["--epochs", "2", "--replays", "2"], 16),  # 1 pass x 8 batches x 2 replays
    ("train_pgd.py", ["--epochs", "1", "--attack-iters", "2"], 8),
    ("train_fast.py", ["--epochs", "1", "--mean-training", "2", "--random-training", "0.5"], 8),  # the tricks' extra forward
])
def test_torchrun_two_processes_gloo_keeps_parameters_identical(tmp_path, script, extra, steps):
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           os.path.join(ROOT, script), *TINY, "--n-train", "512", *extra, "--out-dir", str(out)]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300, env=ENV)
    assert r.returncode == 0, r.stderr[-3000:]
    s = json.loads((out / "summary.json").read_text())
    assert s["world_size"] == 2 and s["params_identical_across_ranks"] is True
    rank0, rank1 = s["rank_param_digests"]  # each rank's parameters, bit for bit
    import utils
    saved = utils.parameter_digest(models.load_checkpoint(str(out / "checkpoint.pt")))
    assert rank1 == rank0 == saved
    # each rank trains on its own half of the data: 512 images / 2 ranks / 32 per rank = 8 batches
    assert s["counts"]["optimizer_steps"] == steps
    assert r.stdout.count("probe PGD-10") == s["epochs_completed"]  # rank 0 alone logs


# ---------------------------------------------------------------- the run folder, in-process (fast)
QUICK = [*TINY, "--n-train", "128", "--n-eval", "16", "--eval-pgd-steps", "1", "--epochs", "1"]


def _messages(stderr):
    """The message lines of a run's stderr, found by what they say: 'error: ...', 'prog: error: ...',
    'interrupted...', 'warning: ...'.  Progress-bar redraws (whatever their rate or timing) are not
    messages."""
    lines = [l.strip() for l in stderr.replace("\r", "\n").splitlines()]
    return [l for l in lines if l.startswith(("error:", "interrupted", "warning:")) or ": error: " in l]


def _main_error(argv):
    """train_fast.main(argv) as the command line runs it, ending in an error: (exit code, its
    stderr's message lines)."""
    r = _run_here("train_fast.py", *argv)
    assert r.returncode != 0, r.stdout[-2000:]
    return r.returncode, _messages(r.stderr)


def test_a_folder_of_another_run_is_refused_without_resume_or_overwrite(tmp_path):
    import train_fast
    out = tmp_path / "run"
    out.mkdir()
    (out / "checkpoint.pt").write_bytes(b"another run")
    (out / "eval.json").write_text("{}")
    code, err = _main_error([*QUICK, "--out-dir", str(out)])
    assert code == 2 and len(err) == 1 and "holds another run's checkpoint.pt" in err[0] and "--overwrite" in err[0], err
    assert (out / "checkpoint.pt").read_bytes() == b"another run" and not (out / "summary.json").exists()
    summary = train_fast.main([*QUICK, "--out-dir", str(out), "--overwrite"])  # replaced, old results deleted
    assert summary["evaluated"] and not (out / "eval.json").exists() and not (out / ".lock").exists()
    assert torch.load(out / "checkpoint.pt", weights_only=True)["epoch"] == 1


def test_a_lock_keeps_a_second_process_out_and_a_stale_lock_is_taken_over(tmp_path):
    import socket
    import train_fast
    out = tmp_path / "run"
    out.mkdir()
    (out / ".lock").write_text(f"{os.getppid()} {socket.gethostname()}\n")  # a live process (pytest's parent)
    code, err = _main_error([*QUICK, "--out-dir", str(out)])
    assert code == 2 and len(err) == 1 and f"in use by process {os.getppid()}" in err[0], err
    assert not (out / "summary.json").exists()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (out / ".lock").write_text(f"{dead.pid} {socket.gethostname()}\n")  # left by a killed run
    assert train_fast.main([*QUICK, "--out-dir", str(out)])["evaluated"]
    assert not (out / ".lock").exists()


def test_an_out_dir_that_is_a_file_or_cannot_be_created_is_one_line_up_front(tmp_path):
    (tmp_path / "file").write_text("")
    for out, message in ((tmp_path / "file", "is a file, not a folder"), (tmp_path / "file" / "sub", "cannot create --out-dir")):
        code, err = _main_error([*QUICK, "--out-dir", str(out)])
        assert code == 2 and len(err) == 1 and message in err[0], err


def test_a_last_batch_of_one_image_is_dropped_and_lenet_trains(tmp_path):
    import train_fast
    import utils
    x, y = torch.zeros(66, 1, 4, 4, dtype=torch.uint8), torch.arange(66)
    batches = data.Batches(x[:65], y[:65], 32)
    assert len(batches) == 2 and [len(b[1]) for b in batches] == [32, 32]
    assert [len(b[1]) for b in data.Batches(x[:66], y[:66], 32)] == [32, 32, 2]
    assert len(data.Batches(x[:64], y[:64], 1)) == 64
    summary = train_fast.main([*QUICK, "--n-train", "65", "--out-dir", str(tmp_path / "run")])  # lenet: BatchNorm1d
    assert summary["evaluated"] and summary["counts"]["optimizer_steps"] == 1


def test_ctrl_c_in_the_first_held_out_check_names_no_missing_checkpoint(tmp_path, monkeypatch):
    import utils
    out = tmp_path / "run"
    def interrupt(*a, **k):
        raise KeyboardInterrupt
    monkeypatch.setattr(utils, "held_out_pgd", interrupt)
    code, err = _main_error([*QUICK, "--out-dir", str(out)])
    assert code == 130 and "no epoch completed, so no checkpoint.pt yet" in err[0] and "holds epoch" not in err[0], err
    assert not (out / "checkpoint.pt").exists() and (out / "interrupted.pt").exists()
    summary = json.loads((out / "summary.json").read_text())
    assert summary["stopped_early"] == "interrupted in epoch 1" and summary["epochs_completed"] == 0


def test_ctrl_c_in_the_final_evaluation_writes_a_partial_summary(tmp_path, monkeypatch):
    import utils
    out = tmp_path / "run"
    def interrupt(*a, **k):
        raise KeyboardInterrupt
    monkeypatch.setattr(utils, "evaluate", interrupt)
    code, err = _main_error([*QUICK, "--out-dir", str(out)])
    assert code == 130 and "interrupted in the final evaluation" in err[0], err
    summary = json.loads((out / "summary.json").read_text())
    assert summary["evaluated"] is False and summary["epochs_completed"] == 1
    assert summary["stopped_early"] == "interrupted in the final evaluation" and "clean_acc" not in summary
    assert not (out / ".lock").exists()
    monkeypatch.undo()  # --resume of the trained run only evaluates it
    r = _run("train_fast.py", *QUICK, "--out-dir", str(out), "--resume")
    assert r.returncode == 0 and "(finished)" in r.stdout and json.loads((out / "summary.json").read_text())["evaluated"]


# ------------------------------------------------- no silent wrong number, no traceback (hostile input)
@pytest.fixture(scope="module")
def a_checkpoint(tmp_path_factory):
    out = tmp_path_factory.mktemp("hostile") / "run"
    r = _run_here("train_fast.py", *TINY, "--n-train", "256", "--epochs", "1", "--out-dir", str(out))
    assert r.returncode == 0, r.stderr
    return out / "checkpoint.pt"


def _one_line_error(r, *words):
    lines = [l for l in r.stderr.splitlines() if l.strip()]
    assert r.returncode == 2 and len(lines) == 1 and "Traceback" not in r.stderr, r.stderr[-3000:]
    assert all(w in lines[0] for w in words), lines[0]


def test_a_step_of_zero_and_non_finite_numbers_are_refused_where_they_are_parsed(a_checkpoint, tmp_path):
    _one_line_error(_run_here("eval.py", str(a_checkpoint), "--attacks", "pgd", "--pgd-alpha", "0", "--no-plot",
                         "--out", str(tmp_path / "e.json")), "--pgd-alpha must be > 0")
    for script, flags, words in (("train_fast.py", ["--eval-pgd-alpha", "0"], "--eval-pgd-alpha must be > 0"),
                                 ("train_fast.py", ["--co-guard", "nan"], "--co-guard must be a finite number"),
                                 ("train_pgd.py", ["--loss", "trades", "--trades-beta", "nan"], "--trades-beta must be a finite"),
                                 ("train_fast.py", ["--seed", "-1"], "--seed must be in"),
                                 ("train_fast.py", ["--device", "tpu"], "'tpu' is not a device"),
                                 ("train_fast.py", ["--act", "kwta", "--kwta-gamma", "2"], "kwta gamma must be in (0, 1]")):
        _one_line_error(_run_here(script, *TINY, *flags, "--out-dir", str(tmp_path / "never")), words)
    assert not (tmp_path / "never" / "checkpoint.pt").exists()
    _one_line_error(_run_here("analyze.py", str(a_checkpoint), "--eps", "5", "--out", str(tmp_path / "an")), "--eps must be in (0, 1]")


def test_a_kaf_size_beyond_the_limit_is_refused_before_any_allocation(tmp_path):
    started = time.time()
    _one_line_error(_run("train_fast.py", *TINY, "--act", "kaf", "--kaf-size", "100000", "--out-dir", str(tmp_path)),
                    "--kaf-size must be <= 1000")
    assert time.time() - started < 60  # the D x D ridge fit would take minutes and 80 GB first


def test_bad_checkpoints_are_one_line_errors_in_eval_analyze_and_resume(a_checkpoint, tmp_path):
    good = torch.load(a_checkpoint, weights_only=True)
    cases = {"empty": None, "string_config": dict(good, model_config="oops"), "string_args": dict(good, args="oops")}
    nan = {k: v.clone() for k, v in good["model_state"].items()}
    nan["net.classifier.1.weight"][0, 0] = float("nan")
    cases["nan_weights"] = dict(good, model_state=nan)
    cases["eps_50"] = dict(good, args=dict(good["args"], epsilon=50.0))
    messages = {"empty": "(an empty file)", "string_config": "its model_config is a str",
                "string_args": "its args is a str", "nan_weights": "non-finite weights",
                "eps_50": "stores epsilon 50.0"}
    for name, ckpt in cases.items():
        path = tmp_path / name / "checkpoint.pt"
        path.parent.mkdir()
        if ckpt is None:
            path.write_bytes(b"")
        else:
            torch.save(ckpt, path)
        _one_line_error(_run_here("eval.py", str(path), "--no-plot", "--out", str(tmp_path / f"{name}.json")), messages[name])
        assert not (tmp_path / f"{name}.json").exists()
        if name != "eps_50":  # analyze.py has its own --eps; --resume checks flags, not the stored radius
            _one_line_error(_run_here("analyze.py", str(path), "--out", str(tmp_path / f"an_{name}")), messages[name])
            _one_line_error(_run_here("train_fast.py", *TINY, "--epochs", "1", "--n-train", "256", "--out-dir",
                                 str(path.parent), "--resume"), messages[name])


def test_the_checkpoints_data_folder_is_never_created_or_downloaded_into(a_checkpoint, tmp_path):
    ckpt = torch.load(a_checkpoint, weights_only=True)
    elsewhere = tmp_path / "no" / "such" / "folder"
    ckpt["args"] = dict(ckpt["args"], dataset="fashionmnist", data_dir=str(elsewhere))
    ckpt["dataset"] = dict(ckpt["dataset"], name="fashionmnist")
    torch.save(ckpt, tmp_path / "moved.pt")
    _one_line_error(_run_here("eval.py", str(tmp_path / "moved.pt"), "--no-plot", "--out", str(tmp_path / "e.json")),
                    "is not on this machine", "--data-dir")
    assert not (tmp_path / "no").exists()


def test_the_memory_bounds_of_extra_data_and_mean_training(tmp_path):
    import numpy as np
    extra = tmp_path / "extra.npz"
    np.savez(extra, x=np.zeros((4, 1, 28, 28), dtype=np.uint8), y=np.zeros(4, dtype=np.int64))
    _one_line_error(_run_here("train_fast.py", *TINY, "--extra-data", str(extra), "--extra-fraction", "0.999",
                         "--out-dir", str(tmp_path / "a")), "--extra-fraction must be in (0, 0.9]")
    _one_line_error(_run_here("train_fast.py", *TINY, "--mean-training", "100000", "--out-dir", str(tmp_path / "b")),
                    "--mean-training 100000 copies per step")
    np.savez(tmp_path / "nan.npz", x=np.full((4, 1, 28, 28), np.nan, dtype=np.float32), y=np.zeros(4, dtype=np.int64))
    _one_line_error(_run_here("train_fast.py", *TINY, "--extra-data", str(tmp_path / "nan.npz"), "--out-dir", str(tmp_path / "c")),
                    "pixels are NaN or inf")


def test_out_dir_traps_are_refused_before_the_run(tmp_path):
    (tmp_path / "run" / "summary.json").mkdir(parents=True)
    _one_line_error(_run_here("train_fast.py", *TINY, "--out-dir", str(tmp_path / "run")), "summary.json there is a folder")
    os.symlink(tmp_path / "nowhere", tmp_path / "dangling")
    _one_line_error(_run_here("train_fast.py", *TINY, "--out-dir", str(tmp_path / "dangling")), "which does not exist")
    _one_line_error(_run_here("train_fast.py", *TINY, "--n-train", "1", "--out-dir", str(tmp_path / "one")), "at least 2")
    out = tmp_path / "two"
    assert _run("train_fast.py", *TINY, "--epochs", "2", "--n-train", "128", "--out-dir", str(out)).returncode == 0
    _one_line_error(_run_here("train_fast.py", *TINY, "--epochs", "1", "--n-train", "128", "--out-dir", str(out), "--resume"),
                    "it has done 2 epochs, more than the 1 asked for")
