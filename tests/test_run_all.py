"""run_all.sh in a tiny mode on synthetic data: one table row per regime x activation over seeds,
bad settings refused before the first run, failures recorded (non-zero exit) and flagged, re-runs skip
what is done with the same configuration, JOBS=2 gives the JOBS=1 table, Ctrl-C stops the whole
matrix; and the table's statistics against hand-computed values."""
import csv
import json
import math
import os
import signal
import subprocess
import sys
import time

import pytest

import tables

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = "--epochs 1 --n-train 256 --batch-size 64 --eval-pgd-steps 2 --n-eval 64 --co-probe-images 128"


def _env(tmp_path, **changes):
    env = dict(os.environ, PYTHON=sys.executable, DATASET="synthetic", DATA_DIR=str(tmp_path), MODEL="lenet", THREADS="1",
               EPS="0.1", ACTS="relu rbf-insert", REGIMES="fast free", SEEDS="0", OUT=str(tmp_path / "results"), DEVICE="cpu",
               FAST_FLAGS=TINY,  # Free diverges: an exploding learning rate, a run that fails
               FREE_FLAGS=TINY.replace("--epochs 1", "--epochs 2 --replays 2") + " --lr-schedule constant --lr-max 1e12",
               EVAL_FLAGS="--attacks fgsm pgd20 apgd-ce --apgd-iters 5 --n-eval 64 --n-clean 128 --no-plot")
    env.pop("TRITON_INTERPRET", None)
    env.pop("OMP_NUM_THREADS", None)
    env.update(changes)
    return env


def _run_all(env, **kwargs):
    return subprocess.run(["bash", os.path.join(ROOT, "run_all.sh")], env=env, capture_output=True, text=True, timeout=900, **kwargs)


def test_run_all_tiny_matrix_writes_one_row_per_cell_records_failures_and_skips_finished(tmp_path):
    env, out = _env(tmp_path, SEEDS="0 1", FIGURES=str(tmp_path / "figures" / "tiny")), tmp_path / "results"
    r = _run_all(env)
    assert r.returncode == 1 and "4 run(s) failed" in r.stderr, r.stdout + r.stderr
    assert "[8/8" in r.stdout
    # the figure and the tables' data, copied where RESULTS.md can show them
    copied = sorted(os.listdir(tmp_path / "figures" / "tiny"))
    wanted = ["results.csv", "results.md", "results_seeds.csv"] + (["results.png"] if tables.pyplot() else [])
    assert copied == sorted(wanted) and all((tmp_path / "figures" / "tiny" / f).read_bytes() == (out / f).read_bytes()
                                            for f in copied)
    assert not tables.pyplot() or (out / "results.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rows = list(csv.DictReader(open(out / "results.csv")))
    assert [(row["regime"], row["activation"]) for row in rows] == [(g, a) for g in ("fast", "free") for a in ("relu", "rbf-insert")]
    seeds = list(csv.DictReader(open(out / "results_seeds.csv")))
    assert len(seeds) == 8 and {s["seed"] for s in seeds} == {"0", "1"}
    for row in rows:
        assert row["eps"] == "0.1"
        if row["regime"] == "free":
            assert row["seeds ok"] == "0/2" and row["clean"] == "-" and row["flags"] == "s0: failed (train), diverged; s1: failed (train), diverged"
            continue
        # no trouble but, at 4 steps, a seed that has not learned (eval.py's at-chance flag)
        trouble = [f for f in row["flags"].split("; ") if f != "-" and "clean accuracy at chance" not in f]
        assert row["seeds ok"] == "2/2" and not trouble, row
        per = [s for s in seeds if (s["regime"], s["activation"]) == ("fast", row["activation"])]
        for col in ("clean", "PGD-20", "APGD-CE", "worst case"):
            values = [float(s[col]) for s in per]
            mean, std = tables.mean_std(values)
            shown_mean, shown_std = (float(v) for v in row[col].split(" ± "))  # from the per-seed CSV's 2 decimals
            assert shown_mean == pytest.approx(mean, abs=0.011) and shown_std == pytest.approx(std, abs=0.011)
        for s in per:
            assert 0 <= float(s["worst case"]) <= float(s["PGD-20"]) <= 100 and s["n_clean"] == "128" and s["n_eval"] == "64"
        assert "PGD-50x10" not in row and row["sanity checks"] != "-"
    relu, rbf = rows[0], rows[1]
    assert relu["worst - relu (95% CI)"] == "-" and relu["activation params"] == "0"
    d = [float(b["worst case"]) - float(a["worst case"]) for a, b in zip(
        [s for s in seeds if s["regime"] == "fast" and s["activation"] == "relu"],
        [s for s in seeds if s["regime"] == "fast" and s["activation"] == "rbf-insert"])]
    assert rbf["worst - relu (95% CI)"].startswith(f"{sum(d) / 2:+.2f} [")
    md = (out / "results.md").read_text().strip().splitlines()
    assert len([l for l in md if l.startswith("| ")]) == 1 + len(rows)
    # a re-run skips what is finished, retries what failed, and writes the same table
    r2 = _run_all(env)
    assert r2.returncode == 1 and r2.stdout.count("done before, skipped") == 4 and r2.stdout.count("FAILED in training") == 4
    assert list(csv.DictReader(open(out / "results.csv"))) == rows
    # another EPS (or other training flags) in the same OUT: refused before any run, nothing changed
    r3 = _run_all(_env(tmp_path, EPS="0.2", REGIMES="fast"))
    assert r3.returncode == 2 and "another training configuration: fast_relu_s0 fast_rbf-insert_s0" in r3.stderr and "[1/" not in r3.stdout
    # other EVAL_FLAGS: the finished runs are evaluated again, not skipped
    r4 = _run_all(_env(tmp_path, REGIMES="fast", ACTS="relu", EVAL_FLAGS="--attacks fgsm --n-eval 32 --no-plot"))
    assert r4.returncode == 0 and "done before, skipped" not in r4.stdout
    assert "PGD-20" not in list(csv.DictReader(open(out / "results.csv")))[0]


def test_two_jobs_give_the_table_of_one_job(tmp_path):
    tables = {}
    for jobs in ("1", "2"):
        env = _env(tmp_path, JOBS=jobs, REGIMES="fast", OUT=str(tmp_path / f"jobs{jobs}"))  # two runs
        r = _run_all(env)
        assert r.returncode == 0, r.stdout + r.stderr
        rows = list(csv.DictReader(open(tmp_path / f"jobs{jobs}" / "results_seeds.csv")))
        tables[jobs] = [{k: v for k, v in row.items() if k != "train_time"} for row in rows]
    assert len(tables["1"]) == 2 and tables["1"] == tables["2"]


def test_the_saf_study_runs_natural_training_the_tricks_and_writes_the_curves(tmp_path):
    cells = "natural:relu natural:mrelu-insert+H+R+M fast:rbf-insert+H"
    env = _env(tmp_path, STUDY="saf", CELLS=cells, NATURAL_FLAGS=TINY,
               EVAL_FLAGS="--attacks fgsm apgd-ce --apgd-iters 5 --n-eval 64 --saf-curves --saf-betas 0 0.2 --accept-clean 0.9 --no-plot",
               ANALYZE_FLAGS="--features --n-eval 64 --no-plot --noise-sigma 0.2")
    out = tmp_path / "results"
    bad = _run_all(dict(env, ANALYZE_FLAGS="--features --n-eval 0"))  # refused before any run
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1 and "ANALYZE_FLAGS" in bad.stderr, bad.stderr
    assert not (out / "runs" / "natural_relu_s0").exists()
    r = _run_all(env)
    assert r.returncode == 0, r.stdout + r.stderr
    config = (out / "runs" / "natural_mrelu-insert+H+R+M_s0" / "run_config.txt").read_text()
    for flag in ("train_fast.py", "--saf-insert mrelu", "--attack none", "--hybrid-weight 1", "--random-training 0.5",
                 "--mean-training 8"):
        assert flag in config, config
    regimes = {d.name: json.load(open(d / "summary.json"))["regime"] for d in (out / "runs").iterdir()}
    assert regimes == {"natural_relu_s0": "natural", "natural_mrelu-insert+H+R+M_s0": "natural", "fast_rbf-insert+H_s0": "fgsm-rs"}
    rows = list(csv.DictReader(open(out / "results.csv")))
    assert [(row["regime"], row["activation"]) for row in rows] == [tuple(c.split(":")) for c in cells.split()]
    curves = json.load(open(out / "saf_curves.json"))
    assert curves["betas"] == ["0", "0.2"] and len(curves["cells"]) == 3 * 3
    md = (out / "saf_curves.md").read_text()
    # one confidence rule for every model (the max softmax)
    assert md.count("| natural | mrelu-insert+H+R+M | softmax | 1 |") == 3 and md.count("| natural | relu | softmax | 1 |") == 3
    assert "beta 0.2" in md and md.count("below the threshold that 90% of its clean images reach, per model") == 3
    assert (out / "saf_curves.png").exists() == (tables.pyplot() is not None)
    # Figure 1's feature test (ANALYZE_FLAGS: analyze.py --features after each evaluation): a row per cell,
    # read from the runs' JSON
    found = json.load(open(out / "runs" / "natural_relu_s0" / "analysis" / "features.json"))
    assert found["n"] == 64 and found["noise_sigma"] == 0.2
    row = next(l for l in md.splitlines() if l.startswith("| natural | relu | 1 | "))
    shown = [float(v) for v in row.strip("| ").split(" | ")[3:]]
    assert shown == pytest.approx([100 * found["noisy"]["auroc_vs_clean"], 100 * found["nonsense"]["auroc_vs_clean"],
                                   100 * found["nonsense"]["share_beyond_clean_q99"]], abs=0.051)
    assert [f["activation"] for f in json.load(open(out / "saf_curves.json"))["features"]] == \
        ["relu", "mrelu-insert+H+R+M", "rbf-insert+H"]
    # the same per run in saf_seeds.csv, from which --compare --column reads a family
    per = list(csv.DictReader(open(out / "saf_seeds.csv")))
    assert [(p["regime"], p["activation"], p["seed"]) for p in per] == [(*c.split(":"), "0") for c in cells.split()]
    relu_eval = json.load(open(out / "runs" / "natural_relu_s0" / "eval.json"))["saf_curves"]
    assert float(per[0]["nonsense beta 0.2"]) == pytest.approx(100 * relu_eval["nonsense"]["0.2"]["nonsense"], abs=0.006)
    assert float(per[0]["threshold"]) == pytest.approx(relu_eval["threshold"], rel=1e-3) and relu_eval["accept_clean"] == 0.9
    assert float(per[0]["adversarial beta 0"]) == pytest.approx(100 * relu_eval["adversarial"]["0"]["accuracy"], abs=0.006)
    assert float(per[0]["auroc nonsense"]) == pytest.approx(100 * found["nonsense"]["auroc_vs_clean"], abs=0.006)
    # a re-run skips every finished run; other ANALYZE_FLAGS redo the analysis only, not the evaluation
    assert _run_all(env).stdout.count("done before, skipped") == 3
    evaluated = (out / "runs" / "natural_relu_s0" / "eval.json").stat().st_mtime_ns
    r3 = _run_all(dict(env, ANALYZE_FLAGS="--features --n-eval 32 --no-plot"))
    assert r3.returncode == 0 and "done before" not in r3.stdout, r3.stdout + r3.stderr
    assert json.load(open(out / "runs" / "natural_relu_s0" / "analysis" / "features.json"))["n"] == 32
    assert (out / "runs" / "natural_relu_s0" / "eval.json").stat().st_mtime_ns == evaluated


def test_cell_options_and_the_schedule_study_write_accuracy_over_iterations(tmp_path):
    cells = "free:relu,lr-schedule=onecycle,momentum-schedule=onecycle free:relu,lr-schedule=constant,epochs=2"
    baseline = "relu,lr-schedule=constant,epochs=2"
    env = _env(tmp_path, STUDY="schedules", CELLS=cells, FREE_FLAGS=TINY.replace("--epochs 1", "--epochs 4 --replays 2") + " --eval-every 2",
               EVAL_FLAGS="--attacks fgsm --n-eval 32 --no-plot", BASELINE=baseline)
    out = tmp_path / "results"
    r = _run_all(env)
    assert r.returncode == 0, r.stdout + r.stderr
    run = out / "runs" / "free_relu,lr-schedule=constant,epochs=2_s0"
    config = (run / "run_config.txt").read_text()
    assert config.strip().endswith("--lr-schedule constant --epochs 2 --seed 0"), config
    flags = json.load(open(run / "summary.json"))["flags"]
    assert flags["lr_schedule"] == "constant" and flags["epochs"] == 2 and flags["eval_every"] == 2
    curves = json.load(open(out / "curves.json"))
    assert [c["activation"] for c in curves["cells"]] == [c.split(":")[1] for c in cells.split()]
    assert curves["cells"][0]["steps"] == 2 * curves["cells"][1]["steps"]  # 4 natural epochs against 2
    assert "steps to 95% of the best final PGD-10" in (out / "curves.md").read_text()
    assert (out / "curves.png").exists() == (tables.pyplot() is not None)
    rows = list(csv.DictReader(open(out / "results.csv")))  # every cell paired with BASELINE's, not relu's
    assert rows[0][f"worst - {baseline} (95% CI)"] not in ("", "-") and rows[1][f"worst - {baseline} (95% CI)"] == "-"


def _fake_curve(folder, points):
    os.makedirs(folder)
    json.dump({"curve": [{"iteration": i, "lr": 0.1, "clean_acc": 0.9, "pgd_acc": p} for i, p in points]},
              open(os.path.join(folder, "summary.json"), "w"))


def test_curve_table_counts_the_steps_to_95_percent_of_the_best_final_accuracy(tmp_path):
    runs = tmp_path / "runs"
    _fake_curve(runs / "free_a_s0", [(10, 0.2), (20, 0.5), (30, 0.6)])    # best final 0.6 -> target 0.57
    _fake_curve(runs / "free_a_s1", [(10, 0.2), (20, 0.58), (30, 0.6)])
    _fake_curve(runs / "free_b_s0", [(10, 0.3), (20, 0.4), (30, 0.5)])    # never reaches 0.57
    _fake_curve(runs / "free_b_s1", [(10, 0.57), (20, 0.4), (30, 0.5)])   # reaches it at 10
    tables.curve_table(str(tmp_path), [("free", "a"), ("free", "b")], [0, 1])
    result = json.load(open(tmp_path / "curves.json"))
    assert result["target_pgd_acc"] == pytest.approx(0.95 * 0.6)
    a, b = result["cells"]
    assert a["steps_to_target_per_seed"] == {"0": 30, "1": 20} and a["steps_to_target"] == "25 ± 7"
    assert b["steps_to_target_per_seed"] == {"0": None, "1": 10} and b["steps_to_target"] == "10 (s0 never)"
    assert a["final_pgd"] == "60.00 ± 0.00" and b["best_pgd"] == "53.50 ± 4.95"
    assert [p["pgd_acc"] for p in a["curve"]] == pytest.approx([0.2, 0.54, 0.6])


def _fake_fastat_run(folder, worst, clean, fgsm, time_s, guard=None, recoveries=None):
    os.makedirs(folder)
    summary = {"epochs_completed": 4, "train_time_s": time_s, "catastrophic_overfitting": guard}
    if recoveries is not None:
        summary["co_recoveries"] = recoveries
    json.dump(summary, open(os.path.join(folder, "summary.json"), "w"))
    json.dump({"accuracy": {"clean": clean, "fgsm": fgsm}, "robust_accuracy": worst, "eps": 0.2, "n_eval": 100},
              open(os.path.join(folder, "eval.json"), "w"))


def test_fastat_table_counts_collapses_recoveries_and_the_cost(tmp_path):
    runs = tmp_path / "runs"
    stop, rec = "relu,co-action=stop", "relu,co-action=recover"
    _fake_fastat_run(runs / f"fast_{stop}_s0", 0.40, 0.80, 0.60, 10.0)
    _fake_fastat_run(runs / f"fast_{stop}_s1", 0.05, 0.70, 0.90, 10.0)  # collapsed, the guard missed it
    _fake_fastat_run(runs / f"fast_{rec}_s0", 0.42, 0.80, 0.60, 15.0, recoveries=[{"epoch": 3}])
    _fake_fastat_run(runs / f"fast_{rec}_s1", 0.38, 0.78, 0.60, 20.0, recoveries=[])
    tables.fastat_table(str(tmp_path), [("fast", stop), ("fast", rec)], [0, 1], stop)
    a, b = json.load(open(tmp_path / "fastat.json"))["cells"]
    assert (a["collapse detected"], a["collapsed at the end"], a["recoveries"]) == (0, 1, 0)
    assert (b["collapse detected"], b["collapsed at the end"], b["recoveries"]) == (1, 0, 1)
    assert b["time / " + stop] == "1.75 ± 0.35" and a["worst case"] == "22.50 ± 24.75"
    assert tables.fastat_table(str(tmp_path), [("fast", "relu")], [0], "relu") is None  # no --co-action cell


def test_the_relative_drop_is_found_in_a_run_history(tmp_path):
    history = [dict(epoch=1, held_pgd_acc=0.14), dict(epoch=2, held_pgd_acc=0.21), dict(epoch=3, held_pgd_acc=0.11),
               dict(epoch=4, held_pgd_acc=0.10), dict(epoch=5, held_pgd_acc=0.02)]
    assert tables.relative_drop_epoch(history, 0.5) == 4  # 0.10 < 0.5 x 0.21; 0.11 is not
    assert tables.relative_drop_epoch(history, 0.05) is None
    assert tables.relative_drop_epoch([], 0.5) is None  # no summary.json (matrix_run: history [])
    json.dump({"epochs_completed": 5, "train_time_s": 1.0, "history": history}, open(tmp_path / "summary.json", "w"))
    assert tables.matrix_run(str(tmp_path))["history"] == history  # what fastat_table passes


def test_fastat_effects_pair_recovery_with_stopping_and_averaging_with_plain(tmp_path):
    runs = tmp_path / "runs"
    stop, rec, avg = "relu,co-action=stop", "relu,co-action=recover", "relu,co-action=stop,ema=0.97,label-smoothing=0.4"
    never, never_stop = "relu,nfgsm,co-action=recover", "relu,nfgsm,co-action=stop"  # no guard event: no pair
    for seed, (w_stop, w_rec, w_avg) in enumerate([(0.10, 0.30, 0.12), (0.20, 0.30, 0.20), (0.30, 0.60, 0.31)]):
        _fake_fastat_run(runs / f"fast_{stop}_s{seed}", w_stop, 0.8, 0.6, 10.0)
        _fake_fastat_run(runs / f"fast_{rec}_s{seed}", w_rec, 0.8, 0.6, 10.0, recoveries=[{"epoch": 3}] if seed else [])
        _fake_fastat_run(runs / f"fast_{avg}_s{seed}", w_avg, 0.8, 0.6, 10.0)
        _fake_fastat_run(runs / f"fast_{never}_s{seed}", w_stop, 0.8, 0.6, 10.0, recoveries=[])
        _fake_fastat_run(runs / f"fast_{never_stop}_s{seed}", w_stop, 0.8, 0.6, 10.0)
    cells = [("fast", stop), ("fast", rec), ("fast", avg), ("fast", never_stop), ("fast", never)]
    text = tables.fastat_table(str(tmp_path), cells, [0, 1, 2], stop)
    effects = json.load(open(tmp_path / "fastat.json"))["effects"]
    assert [(e["effect"], e["cell"]) for e in effects] == [("recover - stop", rec), ("averaging + smoothing - plain", avg)]
    # recover - stop: 20, 10, 30 points; mean 20, std 10, t = 20 / (10 / sqrt 3) = 3.46 on 2 df
    assert effects[0]["mean"] == pytest.approx(20.0) and effects[0]["p_value"] == pytest.approx(0.0742, abs=1e-3)
    assert effects[0]["difference"] == "+20.00 [-4.84, +44.84]" and effects[0]["holm"] == "no"
    assert effects[1]["mean"] == pytest.approx(1.0) and effects[1]["n"] == 3
    assert "| recover - stop | relu,co-action=recover | 3 |" in text


def test_the_default_settings_pass_the_checks(tmp_path):
    """QUICK and STUDY=saf with nothing else set reach the EVAL_FLAGS check (their own defaults are valid)."""
    for mode in (dict(QUICK="1"), dict(STUDY="saf"), dict(STUDY="schedules"), dict(STUDY="fastat"), dict(STUDY="paf")):
        env = {k: v for k, v in _env(tmp_path, EVAL_FLAGS="--attacks pgd0", **mode).items()
               if k not in ("DATASET", "DATA_DIR", "MODEL", "EPS", "ACTS", "REGIMES", "SEEDS", "FAST_FLAGS", "FREE_FLAGS")}
        r = _run_all(env)
        assert r.returncode == 2 and "EVAL_FLAGS: eval.py: error: unknown attack" in r.stderr, (mode, r.stderr)


def test_run_all_refuses_bad_settings_before_the_first_run(tmp_path):
    (tmp_path / "file").write_text("")
    for changes, message in ((dict(ACTS="relu nosuchact"), "fast nosuchact: train_fast.py: error: argument --act: invalid choice"),
                             (dict(REGIMES="fast slow"), "unknown regime 'slow'"),
                             (dict(FAST_FLAGS="--epochs 0"), "--epochs must be >= 1"),
                             (dict(EVAL_FLAGS="--attacks pgd0"), "EVAL_FLAGS: eval.py: error: unknown attack"),
                             (dict(SEEDS="0 x"), "SEEDS must be non-negative integers"),
                             (dict(CELLS="fast:relu+X"), "bad cell 'fast:relu+X'"),
                             (dict(CELLS="fast:relu,=1"), "bad cell 'fast:relu,=1'"),
                             (dict(CELLS="fast:relu,epochs"), "fast relu,epochs: train_fast.py: error: argument --epochs: expected one argument"),
                             (dict(CELLS="fast:relu,no-such-flag=1"), "fast relu,no-such-flag=1: train_fast.py: error: unrecognized arguments"),
                             (dict(STUDY="nosuch"), "unknown STUDY 'nosuch'"),
                             (dict(JOBS="0"), "JOBS and THREADS must be positive integers"),
                             (dict(BASELINE="rellu"), "BASELINE 'rellu' is the ACT of no cell"),
                             (dict(TRAIN_FLAGS="--seed 3"), "give the seeds with SEEDS"),
                             (dict(OUT=str(tmp_path / "file" / "out")), "cannot be created or written")):
        r = _run_all(_env(tmp_path, **changes))
        lines = [l for l in r.stderr.splitlines() if l.strip()]
        assert r.returncode == 2 and len(lines) == 1 and message in lines[0] and "[1/" not in r.stdout, (changes, r.stderr)
    assert not (tmp_path / "results" / "runs" / "fast_relu_s0").exists()


def test_ctrl_c_stops_the_whole_matrix_marks_the_runs_interrupted_and_writes_the_table(tmp_path):
    env = _env(tmp_path, FAST_FLAGS=TINY.replace("--epochs 1", "--epochs 200"), REGIMES="fast", JOBS="2")
    out = tmp_path / "results"
    # as from a terminal: SIGINT handled by default (a test run started in the background of a
    # non-interactive shell inherits it ignored, and then neither bash nor python could see Ctrl-C)
    proc = subprocess.Popen(["bash", os.path.join(ROOT, "run_all.sh")], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    ckpts, deadline = [out / "runs" / f"fast_{a}_s0" / "checkpoint.pt" for a in ("relu", "rbf-insert")], time.time() + 240
    while not all(c.exists() for c in ckpts) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C reaches the whole foreground process group
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130 and stdout.count("interrupted in training") == 2, stdout + stderr
    rows = list(csv.DictReader(open(out / "results.csv")))
    assert len(rows) == 2 and all(row["flags"].startswith("s0: interrupted in train (resumable)") for row in rows), rows
    for c in ckpts:
        assert (c.parent / "INTERRUPTED").read_text().strip() == "train"
        assert "interrupted" in json.load(open(c.parent / "summary.json"))["stopped_early"]


# ------------------------------------------------------------------ the statistics, by hand
def test_mean_std_and_paired_difference_match_hand_computed_values():
    assert tables.mean_std([2.0]) == (2.0, 0.0)
    mean, std = tables.mean_std([1.0, 2.0, 6.0])
    assert mean == 3.0 and std == pytest.approx(math.sqrt(((1 - 3) ** 2 + (2 - 3) ** 2 + (6 - 3) ** 2) / 2))
    # differences 1, 2, 3: mean 2, std 1, 95% t-interval 2 +- 4.303 / sqrt(3) -> includes 0, same sign
    d = tables.paired_difference([11.0, 12.0, 13.0], [10.0, 10.0, 10.0])
    assert d["mean"] == 2.0 and d["half_width"] == pytest.approx(4.303 / math.sqrt(3), abs=1e-9)
    assert not d["significant"] and d["same_sign"] and d["low"] == pytest.approx(2 - 2.4843, abs=1e-4)
    # differences 2, 3, 4: the interval 3 +- 2.484 excludes 0
    d = tables.paired_difference([12.0, 13.0, 14.0], [10.0, 10.0, 10.0])
    assert d["significant"] and d["low"] > 0
    # mixed signs, df 1: 0.5 +- 12.706 * 2.1213 / sqrt(2)
    d = tables.paired_difference([11.0, 9.0], [10.0, 10.0])
    assert d["mean"] == 0.0 and not d["same_sign"] and d["half_width"] == pytest.approx(12.706 * math.sqrt(2) / math.sqrt(2))
    assert tables.paired_difference([1.0], [0.0])["half_width"] is None


def test_t_test_p_values_and_holm_match_tables():
    # the two-sided 5% points of Student's t (tables.T975) have p = 0.05, for odd and even df
    for df, t in ((1, 12.706), (2, 4.303), (3, 3.182), (4, 2.776), (9, 2.262), (30, 2.042)):
        assert tables.t_two_sided_p(t, df) == pytest.approx(0.05, abs=2e-4), df
    assert tables.t_two_sided_p(0.0, 5) == pytest.approx(1.0) and tables.t_two_sided_p(1.0, 1) == pytest.approx(0.5)
    # Holm: sorted 0.005 <= 0.05/4, 0.01 <= 0.05/3, then 0.03 > 0.05/2 stops (0.04 is not reached)
    assert tables.holm({"a": 0.01, "b": 0.04, "c": 0.03, "d": 0.005}) == {"a", "d"}
    assert tables.holm({"a": 0.04}) == {"a"} and tables.holm({}) == set()
    # what can be tested: >= 3 pairs with some spread (equal differences make t infinite)
    assert tables.judged(tables.paired_difference([2, 4, 3], [0, 1, 0]))
    assert not tables.judged(tables.paired_difference([2, 4], [0, 1]))
    assert not tables.judged(tables.paired_difference([61.4, 58.4, 60.6], [61.0, 58.0, 60.2]))


def test_many_comparisons_and_two_seeds_are_not_called_significant(tmp_path):
    """Ten cells each nominally significant at p ~ 0.035 (3 seeds): Holm keeps none; two seeds are
    not judged."""
    runs = tmp_path / "runs"
    cells = [("fast", "relu")] + [("fast", f"act{i}") for i in range(10)] + [("fast", "two")]
    for s, r in enumerate([0.60, 0.61, 0.59]):
        _fake_run(runs / f"fast_relu_s{s}", r)
        for i in range(10):
            _fake_run(runs / f"fast_act{i}_s{s}", r + (0.02, 0.03, 0.04)[s])
        if s < 2:
            _fake_run(runs / f"fast_two_s{s}", r + 0.05)
    text = tables.matrix_table(str(tmp_path), cells, [0, 1, 2])
    rows = {r["activation"]: r for r in csv.DictReader(open(tmp_path / "results.csv"))}
    assert all(rows[f"act{i}"]["significant"].startswith("no after Holm (p 0.0351)") for i in range(10))
    assert rows["two"]["significant"].startswith("not judged (n=2)")
    assert "Holm's correction over the table's 10 comparisons" in text


def _fake_run(folder, worst, clean=0.8, summary_extra=None, failed=None, fgsm=None, at_chance=False):
    os.makedirs(folder)
    json.dump({"epochs_completed": 1, "train_time_s": 10.0, "activation_params": 0, **(summary_extra or {})},
              open(os.path.join(folder, "summary.json"), "w"))
    if failed:
        open(os.path.join(folder, "FAILED"), "w").write(failed)
        return
    json.dump({"eps": 0.1, "n_eval": 1000, "accuracy": {"clean": clean, "fgsm": worst + 0.1 if fgsm is None else fgsm,
                                                         "pgd20x1": worst + 0.01}, "robust_accuracy": worst,
               "clean_full": {"n": 10000, "accuracy": clean}, "sanity_checks": {}, "sanity_failed": [],
               "at_chance": at_chance},
              open(os.path.join(folder, "eval.json"), "w"))


def test_matrix_table_flags_a_model_that_resists_fgsm_far_more_than_the_worst_case(tmp_path):
    runs = tmp_path / "runs"
    for s in range(2):
        _fake_run(runs / f"fast_relu_s{s}", 0.80, clean=0.95, fgsm=0.95)  # FGSM >= clean, but a gap of 15 points
    _fake_run(runs / "fast_gelu_s0", 0.30, clean=0.95, fgsm=0.94)  # a gap of 64 points, FGSM below clean
    _fake_run(runs / "fast_gelu_s1", 0.35, clean=0.60, fgsm=0.60)  # FGSM = clean, a gap of 25 points
    _fake_run(runs / "fast_rbf-insert_s0", 0.30)
    _fake_run(runs / "fast_rbf-insert_s1", 0.0, clean=0.685, fgsm=0.922)  # FGSM above clean, PGD at 0
    tables.matrix_table(str(tmp_path), [("fast", "relu"), ("fast", "gelu"), ("fast", "rbf-insert")], [0, 1])
    rows = {r["activation"]: r for r in csv.DictReader(open(tmp_path / "results.csv"))}
    assert rows["relu"]["flags"] == rows["gelu"]["flags"] == "-" and rows["rbf-insert"]["seeds ok"] == "2/2"
    assert rows["rbf-insert"]["flags"] == "s1: catastrophically overfitted model (clean 68.5, FGSM 92.2, worst case 0.0)"
    per = {(p["activation"], p["seed"]): p for p in csv.DictReader(open(tmp_path / "results_seeds.csv"))}
    assert per[("rbf-insert", "1")]["status"] == "ok" and per[("rbf-insert", "1")]["flags"].startswith("catastrophically")
    assert per[("rbf-insert", "0")]["flags"] == ""


def test_matrix_table_leaves_out_an_evaluation_made_with_other_eval_flags(tmp_path):
    runs = tmp_path / "runs"
    for s, (worst, flags) in enumerate([(0.60, "--preset quick\n"), (0.62, "--preset quick\n"), (0.90, "--preset basic\n")]):
        _fake_run(runs / f"fast_relu_s{s}", worst)
        (runs / f"fast_relu_s{s}" / "eval_config.txt").write_text(flags)
    tables.matrix_table(str(tmp_path), [("fast", "relu")], [0, 1, 2], eval_flags="--preset quick")
    row = next(csv.DictReader(open(tmp_path / "results.csv")))
    assert row["seeds ok"] == "2/3" and row["worst case"] == "61.00 ± 1.41"
    assert row["flags"] == "s2: evaluated with other EVAL_FLAGS (redone by the next run_all.sh)"
    tables.matrix_table(str(tmp_path), [("fast", "relu")], [0, 1, 2])  # without eval_flags every evaluation counts
    assert next(csv.DictReader(open(tmp_path / "results.csv")))["seeds ok"] == "3/3"


def test_matrix_table_aggregates_seeds_flags_a_failed_seed_and_pairs_with_relu(tmp_path):
    runs = tmp_path / "runs"
    for s, (r, k) in enumerate([(0.60, 0.62), (0.61, 0.64), (0.59, 0.63)]):
        _fake_run(runs / f"fast_relu_s{s}", r)
        _fake_run(runs / f"fast_kaf_s{s}", k, summary_extra={"catastrophic_overfitting": {"epoch": 3}} if s == 1 else
                  {"activation_values": {"0:PSSiLU.a": [1.5 + s], "0:PSSiLU.beta": [0.25]}})
    _fake_run(runs / "fast_gelu_s0", 0.09, clean=0.1, at_chance=True)  # as eval.py marks a model at chance
    _fake_run(runs / "fast_gelu_s1", 0.5, failed="train")  # seed 2 never ran
    for s, r in enumerate([0.60, 0.61, 0.59]):  # 1 point above relu in every seed: a degenerate t-test
        _fake_run(runs / f"fast_elu_s{s}", r + 0.01)
    tables.matrix_table(str(tmp_path), [("fast", "relu"), ("fast", "elu")], [0, 1, 2])
    elu = list(csv.DictReader(open(tmp_path / "results.csv")))[1]
    assert elu["worst - relu (95% CI)"] == "+1.00 [+1.00, +1.00]"
    assert elu["significant"] == "not judged (equal in every seed); same sign in 3/3"
    text = tables.matrix_table(str(tmp_path), [("fast", "relu"), ("fast", "kaf"), ("fast", "gelu")], [0, 1, 2])
    rows = {r["activation"]: r for r in csv.DictReader(open(tmp_path / "results.csv"))}
    assert rows["relu"]["worst case"] == "60.00 ± 1.00" and rows["relu"]["seeds ok"] == "3/3"
    assert rows["kaf"]["worst case"] == "63.00 ± 1.00"
    # paired differences 2, 3, 4 -> +3.00 [+0.52, +5.48], significant, same sign
    # t = 3 / (1 / sqrt 3) = 5.196 with 2 degrees of freedom: p = 1 - t / sqrt(2 + t^2) = 0.0351; one comparison
    assert rows["kaf"]["worst - relu (95% CI)"] == "+3.00 [+0.52, +5.48]"
    assert rows["kaf"]["significant"] == "yes (p 0.0351); same sign in 3/3"
    assert rows["kaf"]["flags"] == "s1: catastrophic overfitting"
    assert rows["gelu"]["seeds ok"] == "1/3" and rows["gelu"]["worst case"] == "9.00"
    assert rows["gelu"]["flags"] == "s0: clean accuracy at chance (10.0); s1: failed (train); s2: not run"
    assert rows["gelu"]["significant"] == "n=1"
    assert "| fast | gelu |" in text and "mean ± std over seeds 0 1 2" in text
    per = list(csv.DictReader(open(tmp_path / "results_seeds.csv")))
    assert len(per) == 9 and [p["status"] for p in per if p["activation"] == "gelu"] == ["ok", "failed (train)", "not run"]
    # the learned parameters travel with the per-seed CSV, as JSON; a run without them leaves the cell empty
    learned = [p["activation_values"] for p in per if p["activation"] == "kaf"]
    assert json.loads(learned[2]) == {"0:PSSiLU.a": [3.5], "0:PSSiLU.beta": [0.25]} and learned[1] == ""


def test_compare_reads_a_family_from_the_per_seed_csv_pairs_by_seed_and_applies_holm(tmp_path, capsys):
    path = tmp_path / "results_seeds.csv"
    rows = [("relu", s, w) for s, w in enumerate([60.0, 61.0, 59.0])]
    rows += [("psilu", s, w) for s, w in enumerate([62.0, 64.0, 63.0])]  # +2, +3, +4: p 0.0351 alone
    rows += [("pssilu", s, w) for s, w in enumerate([60.0, 60.0, 61.0])]  # 0, -1, +2
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["regime", "activation", "seed", "worst case", "status"])
        w.writerows([("pgd", a, s, v, "ok") for a, s, v in rows] + [("pgd", "pssilu", 3, 99.0, "failed (train)")])
    assert tables.main(["--compare", str(path), "pgd:relu", "pgd:psilu"]) == 0
    one = capsys.readouterr().out
    assert "| pgd:psilu | 63.00 ± 1.00 | +3.00 [+0.52, +5.48] (n=3) | 0.035 | yes | 3/3 |" in one
    # two comparisons: 0.035 > 0.05 / 2, so Holm keeps neither; the failed seed 3 is left out
    assert tables.main(["--compare", str(path), "pgd:relu", "pgd:psilu", "pgd:pssilu"]) == 0
    two = capsys.readouterr().out
    assert "| pgd:psilu | 63.00 ± 1.00 | +3.00 [+0.52, +5.48] (n=3) | 0.035 | no | 3/3 |" in two
    assert "| pgd:pssilu | 60.33 ± 0.58 | +0.33 " in two and "(n=3)" in two.splitlines()[-1]
    # two paired seeds: shown, not judged, and left out of Holm's family
    with open(path, "a", newline="") as f:
        csv.writer(f).writerows([("pgd", "gelu", 0, 70.0, "ok"), ("pgd", "gelu", 1, 71.0, "ok")])
    assert tables.main(["--compare", str(path), "pgd:relu", "pgd:gelu", "pgd:psilu"]) == 0
    out = capsys.readouterr().out
    assert "| pgd:gelu | 70.50 ± 0.71 | +10.00 [" in out and "(n=2) | " in out and "| not judged | 2/2 |" in out
    assert "| pgd:psilu | 63.00 ± 1.00 | +3.00 [+0.52, +5.48] (n=3) | 0.035 | yes | 3/3 |" in out
    # the same difference in every seed: t is infinite, the test says nothing; not judged
    with open(path, "a", newline="") as f:
        csv.writer(f).writerows([("pgd", "elu", s, w + 0.4, "ok") for s, w in enumerate([60.0, 61.0, 59.0])])
    assert tables.main(["--compare", str(path), "pgd:relu", "pgd:elu", "pgd:psilu"]) == 0
    out = capsys.readouterr().out
    assert "| pgd:elu | 60.40 ± 1.00 | +0.40 [+0.40, +0.40] (n=3) | - (equal in every seed) | not judged | 3/3 |" in out
    assert "| pgd:psilu | 63.00 ± 1.00 | +3.00 [+0.52, +5.48] (n=3) | 0.035 | yes | 3/3 |" in out
    assert tables.main(["--compare", str(path), "pgd:relu", "pgd:kaf"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no finished run of pgd:kaf" in err[0]
    # --column (anywhere after the CSV): the same pairing on another column; one the file lacks is one line
    other = tmp_path / "saf_seeds.csv"
    with open(other, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["regime", "activation", "seed", "status", "nonsense beta 0.1"])
        w.writerows([("natural", a, s, "ok", v) for a, vs in (("relu", [70, 72, 74]), ("rbf", [40, 41, 45]))
                     for s, v in enumerate(vs)])
    assert tables.main(["--compare", str(other), "--column", "nonsense beta 0.1", "natural:relu", "natural:rbf"]) == 0
    out = capsys.readouterr().out
    assert "| cell | nonsense beta 0.1 |" in out and "| natural:rbf | 42.00 ± 2.65 | -30.00 [" in out and "| yes | 3/3 |" in out
    assert tables.main(["--compare", str(path), "pgd:relu", "pgd:psilu", "--column", "clean"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no column 'clean'" in err[0]


def _write_csv(path, cols, rows):
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(cols)
        w.writerows(rows)


def test_grid_puts_regimes_side_by_side_bolds_what_survives_holm_and_says_how_far_cells_moved(tmp_path, capsys):
    write = lambda path, rows: _write_csv(path, ["regime", "activation", "clean", "worst case", "worst - relu (95% CI)",
                                                 "significant"], rows)
    write(tmp_path / "fast.csv", [("fast", "relu", "83.16 ± 0.10", "66.17 ± 0.81", "-", "-"),
                                  ("fast", "kaf", "83.78 ± 0.33", "60.00 ± 1.00", "-6.17 [-8.00, -4.34]", "yes (p 0.003)")])
    write(tmp_path / "free.csv", [("free", "relu", "85.71 ± 0.14", "53.77 ± 0.35", "-", "-"),
                                  ("free", "kaf", "85.14 ± 0.08", "62.17 ± 0.87", "+8.40 [+6.77, +10.03]", "no after Holm (p 0.002)"),
                                  ("free", "kwta", "86.14 ± 0.18", "28.80 ± 1.51", "-24.97 [-28.95, -20.98]", "yes (p 0.0014)")])
    write(tmp_path / "before.csv", [("fast", "kaf", "83.78 ± 0.33", "67.10 ± 1.35", "+0.93 [-0.86, +2.73]", "no (p 0.16)")])
    assert tables.main(["--grid", str(tmp_path / "fast.csv"), str(tmp_path / "free.csv"),
                        "--against", str(tmp_path / "before.csv")]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("| activation | FGSM-RS: worst case (clean) | worst - relu [95% CI] | Free: worst case")
    assert lines[2:] == ["| relu | 66.17 ± 0.81 (83.2) | - | 53.77 ± 0.35 (85.7) | - |",
                         "| kaf | 60.00 ± 1.00 (83.8; -7.1) | **-6.17 [-8.00, -4.34]** | 62.17 ± 0.87 (85.1) | +8.40 [+6.77, +10.03] |",
                         "| kwta | - | - | 28.80 ± 1.51 (86.1) | **-24.97 [-28.95, -20.98]** |"]
    # a matrix re-run in parts: the earlier table first, the re-run part after it; only re-run cells say how
    # far they moved
    assert tables.main(["--grid", str(tmp_path / "before.csv"), str(tmp_path / "fast.csv"), str(tmp_path / "free.csv"),
                        "--against", str(tmp_path / "before.csv")]) == 0
    assert "| kaf | 60.00 ± 1.00 (83.8; -7.1) |" in capsys.readouterr().out
    write(tmp_path / "before.csv", [("fast", "kaf", "83.78 ± 0.33", "67.10 ± 1.35", "+0.93 [-0.86, +2.73]", "no (p 0.16)"),
                                    ("free", "kaf", "85.14 ± 0.08", "62.17 ± 0.87", "+8.40 [+6.77, +10.03]", "no")])
    assert tables.main(["--grid", str(tmp_path / "before.csv"), str(tmp_path / "fast.csv"),
                        "--against", str(tmp_path / "before.csv")]) == 0
    kaf = next(l for l in capsys.readouterr().out.splitlines() if l.startswith("| kaf "))
    # the cell still read from the earlier table is marked as not re-run
    assert kaf == "| kaf | 60.00 ± 1.00 (83.8; -7.1) | **-6.17 [-8.00, -4.34]** | 62.17 ± 0.87 (85.1) † | +8.40 [+6.77, +10.03] |"
    assert tables.main(["--grid", str(tmp_path / "missing.csv")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "missing.csv" in err[0]


def test_shape_sweep_figure_reads_curvature_and_shift_from_the_cell_names(tmp_path, monkeypatch):
    run = lambda act, seed, worst: {"regime": "pgd", "activation": act, "seed": seed, "worst case": worst, "status": "ok"}
    per_seed = [run("relu", 0, 61.0), run("psilu,freeze-act,act-init=a=1", 0, 58.0), run("psilu,freeze-act,act-init=a=1", 1, 58.4),
                run("psilu,freeze-act,act-init=a=40", 0, 62.0), run("pssilu,freeze-act,act-init=a=1:b=0.5", 0, 54.0),
                run("pssilu,pssilu-reg=0", 0, 60.0), dict(run("psilu,freeze-act,act-init=a=2", 0, 99.0), status="failed (train)"),
                dict(run("relu", 0, 10.0), regime="fast")]  # another regime's relu: not the reference line
    seen, lines = [], []
    real = tables.pyplot()
    if real is None:
        pytest.skip("matplotlib is not installed")

    class Recorder:  # what the figure plots, panel by panel, as (x values, y values)
        def __getattr__(self, name):
            return getattr(real, name)

        def subplots(self, *args, **kwargs):
            fig, axes = real.subplots(*args, **kwargs)
            for ax in axes:
                plot, axhline = ax.plot, ax.axhline
                ax.plot = lambda x, y, *a, _plot=plot, _ax=ax, **k: (seen.append((id(_ax), list(x), list(y))), _plot(x, y, *a, **k))[1]
                ax.axhline = lambda y, *a, _line=axhline, **k: (lines.append(y), _line(y, *a, **k))[1]
            return fig, axes
    monkeypatch.setattr(tables, "pyplot", lambda: Recorder())
    path = tables.shape_sweep_figure(per_seed, str(tmp_path / "shape_sweeps.png"))
    assert path and open(path, "rb").read()[:8] == b"\x89PNG\r\n\x1a\n"
    panels = list(dict.fromkeys(p for p, _, _ in seen))
    curvature = [(x, y) for p, x, y in seen if p == panels[0]]
    shift = [(x, y) for p, x, y in seen if p == panels[1]]
    # max f'' = a / 2; the failed run is left out; the means are joined
    assert ([0.5, 0.5], [58.0, 58.4]) in curvature and ([20.0], [62.0]) in curvature
    assert curvature[-1][0] == [0.5, 20.0] and curvature[-1][1] == pytest.approx([58.2, 62.0])
    assert shift == [([0.5], [54.0]), ([0.5], [54.0])]
    assert lines == [61.0, 61.0]  # the same regime's relu mean, in both panels
    assert tables.shape_sweep_figure([run("relu", 0, 61.0)], str(tmp_path / "none.png")) is None


def test_one_matrix_per_out_at_a_time_and_eps_compared_by_value(tmp_path):
    env = _env(tmp_path, ACTS="relu", REGIMES="fast", FAST_FLAGS=TINY.replace("--epochs 1", "--epochs 200"))
    out = tmp_path / "results"
    first = subprocess.Popen(["bash", os.path.join(ROOT, "run_all.sh")], env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, start_new_session=True,
                             preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    ckpt, deadline = out / "runs" / "fast_relu_s0" / "checkpoint.pt", time.time() + 240
    while not ckpt.exists() and first.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    second = _run_all(env)
    os.killpg(first.pid, signal.SIGINT)
    first.communicate(timeout=120)
    lines = [l for l in second.stderr.splitlines() if l.strip()]
    assert second.returncode == 2 and len(lines) == 1 and "is in use by another run_all.sh" in lines[0], second.stderr
    assert "[1/" not in second.stdout and not (ckpt.parent / "FAILED").exists()
    assert not (out / ".run_all.lock").exists()  # released by the first at its exit
    # a finished run of EPS 0.1 is the same configuration as EPS 1/10, not as 0.2
    env = _env(tmp_path, ACTS="relu", REGIMES="fast", OUT=str(tmp_path / "eps"))
    assert _run_all(env).returncode == 0
    again = _run_all(dict(env, EPS="1/10"))
    assert again.returncode == 0 and "done before, skipped" in again.stdout, again.stdout + again.stderr
    other = _run_all(dict(env, EPS="0.2"))
    assert other.returncode == 2 and "another training configuration" in other.stderr


def test_devices_give_each_concurrent_run_its_own_device(tmp_path):
    # two fake devices a CPU has: "cpu" and "cpu:0" (the runs' logs name the one they got)
    env = _env(tmp_path, REGIMES="fast", DEVICE="", DEVICES="cpu cpu:0", FAST_FLAGS=TINY.replace("--epochs 1", "--epochs 2"))
    env.pop("DEVICE")
    r = _run_all(env)
    assert r.returncode == 0, r.stdout + r.stderr
    runs = tmp_path / "results" / "runs"
    devices = sorted((runs / f"fast_{a}_s0" / "device.txt").read_text().strip() for a in ("relu", "rbf-insert"))
    assert devices == ["cpu", "cpu:0"]  # JOBS defaults to 2: both slots, one device each
    for a in ("relu", "rbf-insert"):
        d = (runs / f"fast_{a}_s0" / "device.txt").read_text().strip()
        assert f"on {d} " in (runs / f"fast_{a}_s0" / "train.log").read_text()
    both = _run_all(dict(env, DEVICE="cpu"))
    assert both.returncode == 2 and "give DEVICE or DEVICES, not both" in both.stderr


def test_array_mode_lists_the_runs_runs_one_each_in_parallel_then_the_usual_command_writes_the_table(tmp_path):
    env = _env(tmp_path, REGIMES="fast", SEEDS="0 1")
    listed = subprocess.run(["bash", os.path.join(ROOT, "run_all.sh"), "--list"], env=env, capture_output=True, text=True)
    lines = listed.stdout.splitlines()
    assert listed.returncode == 0 and [l.split()[:4] for l in lines] == [
        ["0", "fast", "relu", "0"], ["1", "fast", "rbf-insert", "0"], ["2", "fast", "relu", "1"], ["3", "fast", "rbf-insert", "1"]]
    tasks = [subprocess.Popen(["bash", os.path.join(ROOT, "run_all.sh")], env=dict(env, CELL=str(k)),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for k in range(4)]
    for t in tasks:
        out, err = t.communicate(timeout=600)
        assert t.returncode == 0, out + err
    out = tmp_path / "results"
    assert not (out / "results.md").exists()  # array tasks write their own folders only
    assert all((out / "runs" / l.split()[4].split("/runs/")[1] / "eval.json").exists() for l in lines)
    r = _run_all(env)
    assert r.returncode == 0 and r.stdout.count("done before, skipped") == 4, r.stdout + r.stderr
    rows = list(csv.DictReader(open(out / "results.csv")))
    assert [row["seeds ok"] for row in rows] == ["2/2", "2/2"]
    bad = _run_all(dict(env, CELL="4"))
    assert bad.returncode == 2 and "there are 4 runs" in bad.stderr


def test_the_schedules_study_runs_the_thesis_table_1_shapes_at_their_key_points():
    """STUDY=schedules' cells, as train_free.py reads them: FAT's 3 steps 0.1 -> 0.01 -> 0.001 over
    twice the others' budget; 1cycle lr_max/10 -> lr_max (45%) -> lr_max/10 (90%) -> lr_max/1000
    (with momentum 0.95 -> 0.85 -> 0.95 in one cell); linear and its warm restarts down to lr_max/1000;
    sinusoidal warm restarts to lr_max/10 and lr_max/100 (the thesis's two 'Warm Restarts' rows);
    m = 8 and weight decay 2e-4 everywhere."""
    import train_free
    import utils
    env = {k: v for k, v in os.environ.items() if k not in ("CELLS", "FREE_FLAGS", "STUDY", "SCHED_LR")}
    listing = subprocess.run(["bash", os.path.join(ROOT, "run_all.sh"), "--list"], env=dict(env, STUDY="schedules"),
                             capture_output=True, text=True, timeout=60)
    acts = sorted({line.split()[2] for line in listing.stdout.splitlines()})
    free_flags = "--epochs 8 --replays 8 --momentum 0.9 --weight-decay 2e-4 --n-train 20000"
    seen, lr = {}, 0.047
    # the last step's LR is one step short of the floor: within 4 steps' worth of the steepest fall
    near_floor = lambda lrs, floor: min(lrs) >= floor * (1 - 1e-9) and lrs[-1] - floor < 4 * 3 * lr / len(lrs)
    for act in acts:
        options = [f"--{o.replace('=', ' ')}".split() for o in act.split(",")[1:]]
        args = train_free.get_args(["--dataset", "synthetic", *free_flags.split(), *sum(options, [])])
        assert args.replays == 8 and args.weight_decay == 2e-4
        steps = -(-args.epochs // args.replays) * 100 * args.replays  # passes x 100 batches x m
        lrs, momenta = utils.lr_schedule(args, steps)
        seen[(args.lr_schedule, args.momentum_schedule, args.lr_min)] = (args, lrs, momenta)
    base, lrs, _ = seen[("piecewise", "constant", None)]
    assert base.lr_max == 0.1 and base.epochs == 16 and len(lrs) == 1600
    assert (lrs[799], lrs[800], lrs[1199], lrs[1200], lrs[-1]) == pytest.approx((0.1, 0.01, 0.01, 0.001, 0.001))
    for mom in ("constant", "onecycle"):
        _, lrs, momenta = seen[("onecycle", mom, lr / 1000)]
        assert len(lrs) == 800 and (lrs[0], lrs[360], lrs[720]) == pytest.approx((lr / 10, lr, lr / 10), rel=0.02)
        assert near_floor(lrs, lr / 1000)
        assert (momenta[0], momenta[360]) == ((0.95, 0.85) if mom == "onecycle" else (0.9, 0.9))
    for sched in ("linear", "linear-restarts", "onecycle-truncated", "onecycle-half"):
        _, lrs, _ = seen[(sched, "constant", lr / 1000)]
        assert near_floor(lrs, lr / 1000) and max(lrs) == pytest.approx(lr, rel=0.02), sched
    for div in (10, 100):
        (lrs,) = [v[1] for k, v in seen.items() if k[0] == "sgdr" and k[2] == pytest.approx(lr / div)]
        assert min(lrs) == pytest.approx(lr / div, rel=0.05) and lrs.count(max(lrs)) >= 1
        restarts = sum(1 for a, b in zip(lrs, lrs[1:]) if b > a + lr / 4)
        assert restarts == 2  # three cycles
    assert seen[("exponential", "constant", None)][1][-1] == pytest.approx(lr / 1000, rel=0.01)
    assert set(seen[("constant", "constant", None)][1]) == {lr}


def test_the_paf_study_runs_dai_et_al_regime_and_spans_the_curvature_it_claims():
    """STUDY=paf's cells as train_pgd.py reads them: TRADES beta 6 with the attack in eval mode,
    Nesterov, cosine to 1e-3, batch 256 in every cell; the fixed PSiLU cells' maximum curvature
    max |f''| = a / 2 spans 0.5 to 20 (measured on the built unit by finite differences); the fixed
    PSSiLU cells keep a = 1 and the asked shift; the --pssilu-reg sweep."""
    import torch
    import models as M
    import train_pgd
    import utils
    env = {k: v for k, v in os.environ.items() if k not in ("CELLS", "PGD_FLAGS", "STUDY")}
    listing = subprocess.run(["bash", os.path.join(ROOT, "run_all.sh"), "--list"], env=dict(env, STUDY="paf"),
                             capture_output=True, text=True, timeout=60)
    acts = list(dict.fromkeys(line.split()[2] for line in listing.stdout.splitlines()))
    flags = ("--loss trades --trades-beta 6 --attack-mode eval --attack-iters 3 --attack-step 0.04 --nesterov "
             "--lr-schedule cosine --lr-max 0.1 --lr-min 1e-3 --batch-size 256 --epochs 3").split()
    curvature, shifts, regs = {}, {}, set()
    x = torch.linspace(-3, 3, 60001, dtype=torch.float64)
    h = x[1] - x[0]
    for act in acts:
        options = sum(([f"--{o.split('=', 1)[0]}", *o.split("=", 1)[1:]] for o in act.split(",")[1:]), [])
        args = train_pgd.get_args(["--dataset", "synthetic", "--act", act.split(",")[0], *flags, *options])
        assert (args.loss, args.trades_beta, args.attack_mode, args.nesterov) == ("trades", 6, "eval", True)
        assert (args.lr_schedule, args.lr_min, args.batch_size) == ("cosine", 1e-3, 256)
        if args.freeze_act:
            unit = M.build("lenet", act=args.act, in_channels=1, image_size=28, act_options=utils.act_options(args))
            f = [m for m in unit.modules() if type(m).__name__ in ("PSiLU", "PSSiLU")][0]
            if args.act == "psilu":  # the built unit is x sigmoid(a x); that curve's curvature, in float64
                a = f.a.abs().item()
                with torch.no_grad():
                    xf = x.float()
                    assert torch.allclose(f(xf.view(1, -1)).view(-1), xf * torch.sigmoid(a * xf), atol=1e-5)
                y = x * torch.sigmoid(a * x)
                second = (y[2:] - 2 * y[1:-1] + y[:-2]) / h ** 2
                curvature[a] = second.abs().max().item()
            else:
                shifts[round(float(utils.act_options(args)["init_b"]), 3)] = f.a.abs().item()
        elif args.act == "pssilu":
            regs.add(args.pssilu_reg)
    assert sorted(curvature) == [1, 2, 5, 10, 20, 40]
    assert curvature == {a: pytest.approx(a / 2, rel=0.01) for a in curvature}
    assert sorted(shifts) == [0, 0.1, 0.3, 0.5, 0.7] and set(shifts.values()) == {1.0}
    assert regs == {0, 0.1, 1, 10}  # 10: the default cell


def test_grid_pools_per_seed_files_into_one_holm_family_per_regime(tmp_path, capsys, monkeypatch):
    """A regime re-run in parts: the per-seed CSVs are pooled (a run given twice: the later file's, a
    failed run left out) and the regime's comparisons corrected as one family, so two p of about 0.044,
    each significant alone, do not survive Holm over two."""
    write = lambda path, rows: _write_csv(path, ["regime", "activation", "seed", "clean", "worst case", "status"], rows)
    relu = [60.0, 61.0, 62.0]
    write(tmp_path / "a.csv", [("fast", "relu", s, 80.0, relu[s], "ok") for s in range(3)]
          + [("fast", "kaf", s, 81.0, relu[s] + d, "ok") for s, d in enumerate([5.0, 2.0, 1.2])])
    write(tmp_path / "b.csv", [("fast", "silu", s, 79.0, relu[s] + d, "ok") for s, d in enumerate([-1.0, -2.0, -1.2])]
          + [("fast", "kaf", 0, 81.0, relu[0] + 1.0, "ok"), ("fast", "kwta", 0, 70.0, 5.0, "failed")])
    _write_csv(tmp_path / "wb.csv", ["regime", "activation", "clean", "worst case", "worst - relu (95% CI)", "significant"],
               [("fast", "kaf", "81.00 ± 0.00", "70.00 ± 1.00", "+8.83 [+7.00, +10.00]", "yes (p 0.001)"),
                ("fast", "kwta", "70.00 ± 0.00", "30.00 ± 1.00", "-31.00 [-33.00, -29.00]", "yes (p 0.001)")])
    assert tables.main(["--grid", str(tmp_path / "wb.csv"), str(tmp_path / "a.csv"), str(tmp_path / "b.csv"),
                        "--against", str(tmp_path / "wb.csv")]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[2:] == ["| kaf | 62.40 ± 1.22 (81.0; -7.6) | +1.40 [+0.09, +2.71] |",
                         "| kwta | 30.00 ± 1.00 (70.0) † | **-31.00 [-33.00, -29.00]** |",
                         "| relu | 61.00 ± 1.00 (80.0) | - |",
                         "| silu | 59.60 ± 1.04 (79.0) | -1.40 [-2.71, -0.09] |"]
    # alone, a comparison is a family of one and survives
    write(tmp_path / "c.csv", [("fast", "relu", s, 80.0, relu[s], "ok") for s in range(3)]
          + [("fast", "silu", s, 79.0, relu[s] + d, "ok") for s, d in enumerate([-1.0, -2.0, -1.2])])
    assert tables.main(["--grid", str(tmp_path / "c.csv")]) == 0
    assert "| silu | 59.60 ± 1.04 (79.0) | **-1.40 [-2.71, -0.09]** |" in capsys.readouterr().out
    # --plot draws the pooled seeds (the figure needs matplotlib, which requirements-dev.txt installs)
    pytest.importorskip("matplotlib")
    assert tables.main(["--grid", str(tmp_path / "a.csv"), str(tmp_path / "b.csv"), "--plot", str(tmp_path / "m.png")]) == 0
    assert capsys.readouterr().out.endswith(f"-> {tmp_path / 'm.png'}\n")
    from PIL import Image
    with Image.open(tmp_path / "m.png") as drawn_png:  # a drawn figure, not a blank canvas
        assert drawn_png.width > 300 and len(drawn_png.convert("RGB").getcolors(256)) > 8
    drawn = []
    monkeypatch.setattr(tables, "matrix_figure", lambda runs, path: drawn.extend(runs) or path)
    tables.grid_figure(tables.read_per_seed([str(tmp_path / "a.csv"), str(tmp_path / "b.csv")])[0], str(tmp_path / "m2.png"))
    assert sorted((r["activation"], r["seed"], r["worst case"]) for r in drawn if r["activation"] == "kaf") == \
        [("kaf", "0", 61.0), ("kaf", "1", 63.0), ("kaf", "2", 63.2)]
    assert {r["activation"] for r in drawn} == {"relu", "kaf", "silu"}  # the failed kwta run is left out
    assert tables.main(["--grid", str(tmp_path / "a.csv"), "--plot"]) == 2
    assert capsys.readouterr().err.startswith("usage: python tables.py --grid")


def test_save_figure_writes_a_palette_png_smaller_than_matplotlibs_with_the_plot_colours_kept(tmp_path):
    plt = tables.pyplot()
    if plt is None:
        pytest.skip("matplotlib not installed")
    from PIL import Image
    fig, ax = plt.subplots(figsize=(6, 4))
    for i in range(12):  # more lines than the default colour cycle, antialiased
        ax.plot(range(50), [((x * (i + 3)) % 17) + i for x in range(50)], "-o", markersize=3)
    fig.savefig(tmp_path / "rgba.png", dpi=110)
    assert tables.save_figure(fig, str(tmp_path / "palette.png")) == str(tmp_path / "palette.png")
    plt.close(fig)
    with Image.open(tmp_path / "rgba.png") as rgba, Image.open(tmp_path / "palette.png") as palette:
        assert rgba.mode == "RGBA" and palette.mode == "P" and palette.size == rgba.size
        kept = {c for _, c in palette.convert("RGB").getcolors(256)}
        assert (31, 119, 180) in kept and (255, 127, 14) in kept  # tab:blue and tab:orange, exact
    assert (tmp_path / "palette.png").stat().st_size < 0.6 * (tmp_path / "rgba.png").stat().st_size


def test_autoattack_table_compares_each_evaluation_with_autoattack_image_by_image(tmp_path, capsys):
    def evaluation(folder, name, robust, time_s, escalated=False, n=10):
        folder.mkdir(exist_ok=True)
        tables.write_json({"n_eval": n, "robust_accuracy": len(robust) / n, "robust_images": robust, "time_s": time_s,
                           "escalation": {"reasons": ["masked"]} if escalated else None},
                          str(folder / f"eval_{name}.json"))
    relu, kwta = tmp_path / "fast_relu_s0", tmp_path / "fast_kwta_s0"
    evaluation(relu, "autoattack", [0, 1, 2, 3, 4, 5], 100.0)
    evaluation(relu, "quick", [0, 1, 2, 3, 4, 9], 20.0)  # image 9 robust for quick only, 5 for AutoAttack only
    evaluation(relu, "standard", [0, 1, 2, 3, 4, 5], 90.0)
    evaluation(kwta, "autoattack", [0, 1, 2], 50.0)
    evaluation(kwta, "quick", [0], 40.0, escalated=True)
    assert tables.main(["--autoattack", str(tmp_path / "out"), str(relu), str(kwta)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == ("| model | AutoAttack (time s) | quick (time s) | quick only / AutoAttack only | standard (time s) | "
                        "standard only / AutoAttack only |")
    assert lines[2] == "| fast_relu_s0 | 60.00 (100) | 60.00 (20) | 1 / 1 | 60.00 (90) | 0 / 0 |"
    assert lines[3] == "| fast_kwta_s0 | 30.00 (50) | 10.00 escalated (40) | 0 / 2 | - | - |"
    rows, _ = tables.read_csv(str(tmp_path / "out" / "autoattack.csv"))
    assert [(r["model"], r["evaluation"], r["only_this"], r["only_autoattack"]) for r in rows][:2] == \
        [("fast_relu_s0", "autoattack", "0", "0"), ("fast_relu_s0", "quick", "1", "1")]
    assert (tmp_path / "out" / "autoattack.png").exists() == (tables.pyplot() is not None)
    # evaluations on other images are not compared
    evaluation(kwta, "standard", [0], 40.0, n=20)
    assert tables.main(["--autoattack", str(tmp_path / "out"), str(relu), str(kwta)]) == 2
    assert "eval_standard.json has 20 images, eval_autoattack.json 10" in capsys.readouterr().err
    assert tables.main(["--autoattack", str(tmp_path / "out")]) == 2
