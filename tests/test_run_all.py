"""run_all.sh in a tiny mode on synthetic data: one table row per run, bad settings refused before the
first run, failures recorded (non-zero exit), re-runs skip what is done with the same configuration,
Ctrl-C stops the whole matrix."""
import csv
import os
import signal
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = "--epochs 1 --n-train 256 --batch-size 64 --eval-pgd-steps 2 --n-eval 64"


def _env(tmp_path, **changes):
    env = dict(os.environ, PYTHON=sys.executable, OMP_NUM_THREADS="1", DATASET="synthetic", DATA_DIR=str(tmp_path), MODEL="lenet",
               EPS="0.1", ACTS="relu rbf-insert", REGIMES="fast free", OUT=str(tmp_path / "results"), DEVICE="cpu",
               FAST_FLAGS=TINY,  # Free diverges: an exploding learning rate, a run that fails
               FREE_FLAGS=TINY.replace("--epochs 1", "--epochs 2 --replays 2") + " --lr-schedule constant --lr-max 1e12",
               EVAL_FLAGS="--attacks fgsm pgd20 apgd-ce --apgd-iters 5 --n-eval 64 --no-plot")
    env.pop("TRITON_INTERPRET", None)
    env.update(changes)
    return env


def _run_all(env, **kwargs):
    return subprocess.run(["bash", os.path.join(ROOT, "run_all.sh")], env=env, capture_output=True, text=True, timeout=600, **kwargs)


def test_run_all_tiny_matrix_writes_one_row_per_run_records_failures_and_skips_finished(tmp_path):
    env, out = _env(tmp_path), tmp_path / "results"
    r = _run_all(env)
    assert r.returncode == 1 and "2 run(s) failed" in r.stderr, r.stdout + r.stderr
    assert "[4/4" in r.stdout
    rows = list(csv.DictReader(open(out / "results.csv")))
    assert [(row["regime"], row["activation"]) for row in rows] == [(g, a) for g in ("fast", "free") for a in ("relu", "rbf-insert")]
    for row in rows:
        assert row["eps"] == "0.1"
        if row["regime"] == "free":
            assert row["status"].startswith("failed (train)") and row["clean"] == "-"
        else:
            assert row["status"] == "ok", row
            clean, pgd, worst = float(row["clean"]), float(row["PGD-20"]), float(row["worst case"])
            assert 0 <= worst <= pgd <= clean <= 100 and row["APGD-CE"] != "-" and row["PGD-50x10"] == "-"
            assert row["sanity checks"] != "-" and float(row["train time (s)"]) > 0
    assert next(r for r in rows if r["activation"] == "relu")["activation params"] == "0"
    md = (out / "results.md").read_text().strip().splitlines()
    assert len(md) == 2 + len(rows)
    # a re-run skips what is finished, retries what failed, and writes the same table
    r2 = _run_all(env)
    assert r2.returncode == 1 and r2.stdout.count("done before, skipped") == 2 and r2.stdout.count("FAILED in training") == 2
    assert list(csv.DictReader(open(out / "results.csv"))) == rows
    # another EPS (or other training flags) in the same OUT: refused before any run, nothing changed
    r3 = _run_all(_env(tmp_path, EPS="0.2", REGIMES="fast"))
    assert r3.returncode == 2 and "another training configuration: fast_relu fast_rbf-insert" in r3.stderr and "[1/" not in r3.stdout
    # other EVAL_FLAGS: the finished runs are evaluated again, not skipped
    r4 = _run_all(_env(tmp_path, REGIMES="fast", ACTS="relu", EVAL_FLAGS="--attacks fgsm --n-eval 32 --no-plot"))
    assert r4.returncode == 0 and "done before, skipped" not in r4.stdout
    assert list(csv.DictReader(open(out / "results.csv")))[0]["PGD-20"] == "-"


def test_run_all_refuses_bad_settings_before_the_first_run(tmp_path):
    (tmp_path / "file").write_text("")
    for changes, message in ((dict(ACTS="relu nosuchact"), "fast nosuchact: train_fast.py: error: argument --act: invalid choice"),
                             (dict(REGIMES="fast slow"), "unknown regime 'slow'"),
                             (dict(FAST_FLAGS="--epochs 0"), "--epochs must be >= 1"),
                             (dict(EVAL_FLAGS="--attacks pgd0"), "EVAL_FLAGS: eval.py: error: unknown attack"),
                             (dict(OUT=str(tmp_path / "file" / "out")), "cannot be created or written")):
        r = _run_all(_env(tmp_path, **changes))
        lines = [l for l in r.stderr.splitlines() if l.strip()]
        assert r.returncode == 2 and len(lines) == 1 and message in lines[0] and "[1/" not in r.stdout, (changes, r.stderr)
    assert not (tmp_path / "results" / "runs" / "fast_relu").exists()


def test_ctrl_c_stops_the_whole_matrix_marks_the_run_interrupted_and_writes_the_table(tmp_path):
    env, out = _env(tmp_path, FAST_FLAGS=TINY.replace("--epochs 1", "--epochs 200")), tmp_path / "results"
    # as from a terminal: SIGINT handled by default (a test run started in the background of a
    # non-interactive shell inherits it ignored, and then neither bash nor python could see Ctrl-C)
    proc = subprocess.Popen(["bash", os.path.join(ROOT, "run_all.sh")], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    ckpt, deadline = out / "runs" / "fast_relu" / "checkpoint.pt", time.time() + 240
    while not ckpt.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C reaches the whole foreground process group
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130 and "interrupted in training" in stdout and "[2/" not in stdout, stdout + stderr
    rows = list(csv.DictReader(open(out / "results.csv")))
    assert rows[0]["status"] == "interrupted in train (resumable); interrupted in epoch 2" or rows[0]["status"].startswith("interrupted in train"), rows[0]
    assert all(row["status"] == "not run" for row in rows[1:])
    assert not (out / "runs" / "fast_rbf-insert").exists()
