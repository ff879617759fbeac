"""run_all.sh in a tiny mode on synthetic data: one table row per run, failures recorded, re-runs skip."""
import csv
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_run_all_tiny_matrix_writes_one_row_per_run_records_failures_and_skips_finished(tmp_path):
    out = tmp_path / "results"
    tiny = "--epochs 1 --n-train 256 --batch-size 64 --eval-pgd-steps 2 --n-eval 64"
    env = dict(os.environ, PYTHON=sys.executable, OMP_NUM_THREADS="1", DATASET="synthetic", DATA_DIR=str(tmp_path), MODEL="lenet", EPS="0.1",
               ACTS="relu rbf-insert nosuchact", REGIMES="fast free", OUT=str(out), DEVICE="cpu",
               FAST_FLAGS=tiny, FREE_FLAGS=tiny.replace("--epochs 1", "--epochs 2 --replays 2"),
               EVAL_FLAGS="--attacks fgsm pgd20 apgd-ce --apgd-iters 5 --n-eval 64 --no-plot")
    r = subprocess.run(["bash", os.path.join(ROOT, "run_all.sh")], env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "[6/6" in r.stdout
    rows = list(csv.DictReader(open(out / "results.csv")))
    assert [(row["regime"], row["activation"]) for row in rows] == [
        (g, a) for g in ("fast", "free") for a in ("relu", "rbf-insert", "nosuchact")]
    for row in rows:
        if row["activation"] == "nosuchact":
            assert row["status"] == "failed (train)" and row["clean"] == "-"
        else:
            assert row["status"] == "ok", row
            clean, pgd, worst = float(row["clean"]), float(row["PGD-20"]), float(row["worst case"])
            assert 0 <= worst <= pgd <= clean <= 100 and row["APGD-CE"] != "-" and row["PGD-50x10"] == "-"
            assert row["sanity checks"] != "-" and float(row["train time (s)"]) > 0
    assert next(r for r in rows if r["activation"] == "relu")["activation params"] == "0"
    md = (out / "results.md").read_text().strip().splitlines()
    assert len(md) == 2 + len(rows)
    # a re-run skips what is finished, retries what failed, and writes the same table
    r2 = subprocess.run(["bash", os.path.join(ROOT, "run_all.sh")], env=env, capture_output=True, text=True, timeout=600)
    assert r2.stdout.count("done before, skipped") == 4 and r2.stdout.count("FAILED in training") == 2
    assert list(csv.DictReader(open(out / "results.csv"))) == rows
