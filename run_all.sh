#!/usr/bin/env bash
# Reproduce the table of results: every activation x training regime is trained, then evaluated with
# eval.py, and the rows are collected into $OUT/results.md (+ .csv, .json).
#
#   bash run_all.sh              # the papers' setting: CIFAR-10, preactresnet18, eps 8/255, standard
#                                # evaluation on the full test set (a GPU job: hours per run on a CPU)
#   QUICK=1 bash run_all.sh      # Fashion-MNIST, lenet, eps 0.1, short budgets, quick evaluation on
#                                # 500 test images: a CPU-sized matrix (see RESULTS.md for its time)
#
# Environment variables (defaults in brackets: paper / QUICK):
#   ACTS        activations; NAME-insert = Zhao & Griffin's unit after every conv (--saf-insert NAME)
#               [relu softplus silu gelu elu prelu psilu psoftplus pssilu kaf kwta mrelu-insert rbf-insert]
#   REGIMES     any of: fast free pgd                              [fast free pgd]
#   DATASET, DATA_DIR, MODEL, EPS                                  [cifar10 ./data preactresnet18 8/255 /
#                                                                   fashionmnist /usr/share/datasets/fashion-mnist lenet 0.1]
#   FAST_FLAGS, FREE_FLAGS, PGD_FLAGS  budgets of each regime      [each script's defaults / short ones]
#   DEVICE      cpu, cuda, cuda:1 ... for training and evaluation  [the scripts' default: cuda when present]
#   TRAIN_FLAGS extra flags for every training run (e.g. "--n-train 20000 --seed 1")
#   EVAL_FLAGS  eval.py flags                                      [--preset standard / --preset quick --attacks +apgd-dlr --n-eval 500]
#   OUT         results folder                                     [results / results-quick]
#
# Each run lives in $OUT/runs/<regime>_<act>/ with its log and run_config.txt (script and training
# flags; DATA_DIR and DEVICE may change, as under --resume).  Every run's flags, EVAL_FLAGS, DEVICE and OUT
# are checked before the first run.  Re-running skips the runs whose eval.json was made with the same
# EVAL_FLAGS (eval_config.txt; other EVAL_FLAGS re-evaluate), resumes interrupted ones (--resume), and
# refuses to start when a run folder holds another training configuration (another EPS, *_FLAGS, ...).
# A failed run is recorded as failed in the table and the others go on; Ctrl-C stops the whole matrix
# (the current run is marked interrupted and resumes on the next invocation).  The table is written for
# what finished; the exit code is 130 after Ctrl-C, 1 when a run failed, else 0.
set -u
cd "$(dirname "$0")"
PYTHON=${PYTHON:-python}

if [ "${QUICK:-0}" = 1 ]; then
    DATASET=${DATASET:-fashionmnist}; DATA_DIR=${DATA_DIR:-/usr/share/datasets/fashion-mnist}
    MODEL=${MODEL:-lenet}; EPS=${EPS:-0.1}; OUT=${OUT:-results-quick}
    # a third of the training set and short budgets; the scripts' own final check on 500 test images
    # (eval.py makes the table)
    short="--n-train 20000 --n-eval 500"
    FAST_FLAGS=${FAST_FLAGS:---epochs 2 $short}
    FREE_FLAGS=${FREE_FLAGS:---epochs 4 --replays 2 --lr-max 0.04 $short}
    PGD_FLAGS=${PGD_FLAGS:---epochs 1 --attack-iters 3 --attack-step 0.04 $short}
    EVAL_FLAGS=${EVAL_FLAGS:---preset quick --attacks +apgd-dlr --n-eval 500}
else
    DATASET=${DATASET:-cifar10}; DATA_DIR=${DATA_DIR:-./data}
    MODEL=${MODEL:-preactresnet18}; EPS=${EPS:-8/255}; OUT=${OUT:-results}
    FAST_FLAGS=${FAST_FLAGS:-}; FREE_FLAGS=${FREE_FLAGS:-}; PGD_FLAGS=${PGD_FLAGS:-}
    EVAL_FLAGS=${EVAL_FLAGS:---preset standard}
fi
ACTS=${ACTS:-relu softplus silu gelu elu prelu psilu psoftplus pssilu kaf kwta mrelu-insert rbf-insert}
REGIMES=${REGIMES:-fast free pgd}
TRAIN_FLAGS=${TRAIN_FLAGS:-}
DEVICE_FLAGS=${DEVICE:+--device $DEVICE}

# ---- checked before the first run: regimes, every run's flags (activation, budgets, EPS, DEVICE),
# EVAL_FLAGS, OUT, and that no run folder holds another training configuration
regime_flags() {
    case $1 in fast) echo "$FAST_FLAGS" ;; free) echo "$FREE_FLAGS" ;; pgd) echo "$PGD_FLAGS" ;; esac
}
act_flags() {
    case $1 in *-insert) echo "--saf-insert ${1%-insert}" ;; *) echo "--act $1" ;; esac
}
train_config() {  # what makes a run: script and training flags (not DATA_DIR / DEVICE, which --resume lets change)
    echo "train_$1.py --dataset $DATASET --model $MODEL --epsilon $EPS $(act_flags "$2") $(regime_flags "$1") $TRAIN_FLAGS"
}
for regime in $REGIMES; do
    case $regime in fast|free|pgd) ;; *) echo "run_all.sh: unknown regime '$regime' in REGIMES (choose from: fast free pgd)" >&2; exit 2 ;; esac
done
if [ -z "$(echo $ACTS)" ] || [ -z "$(echo $REGIMES)" ]; then echo "run_all.sh: ACTS and REGIMES must not be empty" >&2; exit 2; fi
if ! mkdir -p "$OUT/runs" 2>/dev/null || ! { : > "$OUT/runs/.write-test"; } 2>/dev/null; then
    echo "run_all.sh: OUT=$OUT cannot be created or written" >&2; exit 2
fi
rm -f "$OUT/runs/.write-test"
# shellcheck disable=SC2086
if ! $PYTHON - "$REGIMES" "$ACTS" "$EVAL_FLAGS $DEVICE_FLAGS" <<'EOF'
import os, sys
import eval as evaluation, train_fast, train_free, train_pgd
regimes, acts, eval_flags = sys.argv[1].split(), sys.argv[2].split(), sys.argv[3].split()
scripts = dict(fast=train_fast, free=train_free, pgd=train_pgd)
env = lambda k: os.environ.get(k, "")
for regime in regimes:
    for act in acts:
        act_flags = ["--saf-insert", act[:-len("-insert")]] if act.endswith("-insert") else ["--act", act]
        argv = ["--dataset", env("DATASET"), "--data-dir", env("DATA_DIR"), "--model", env("MODEL"), "--epsilon", env("EPS"),
                *act_flags, *env(regime.upper() + "_FLAGS").split(), *env("TRAIN_FLAGS").split(),
                *(["--device", env("DEVICE")] if env("DEVICE") else []), "--resume"]
        sys.argv[0] = f"run_all.sh: {regime} {act}: train_{regime}.py"  # the one-line error's prefix
        scripts[regime].get_args(argv)
sys.argv[0] = "run_all.sh: EVAL_FLAGS: eval.py"
evaluation.get_args(["checkpoint.pt", *eval_flags])
EOF
then exit 2; fi
others=""
for regime in $REGIMES; do
    for act in $ACTS; do
        f="$OUT/runs/${regime}_${act}/run_config.txt"
        if [ -f "$f" ] && [ "$(cat "$f")" != "$(train_config "$regime" "$act")" ]; then others="$others ${regime}_${act}"; fi
    done
done
if [ -n "$others" ]; then
    echo "run_all.sh: $OUT/runs holds runs of another training configuration:$others (see their run_config.txt);" \
         "use another OUT, or delete those folders" >&2
    exit 2
fi

interrupted=0; failed=0
trap 'interrupted=1' INT  # the run in progress gets Ctrl-C too, saves what it has, and the matrix stops
total=$(( $(echo $ACTS | wc -w) * $(echo $REGIMES | wc -w) )); i=0; start=$SECONDS
for regime in $REGIMES; do
    flags=$(regime_flags "$regime")
    for act in $ACTS; do
        if [ $interrupted = 1 ]; then break 2; fi  # Ctrl-C between two runs
        i=$((i + 1))
        dir="$OUT/runs/${regime}_${act}"
        printf '[%d/%d %5ds] %-6s %-14s ' "$i" "$total" $((SECONDS - start)) "$regime" "$act"
        if [ -f "$dir/eval.json" ] && [ "$(cat "$dir/eval_config.txt" 2>/dev/null)" = "$EVAL_FLAGS" ]; then
            echo "done before, skipped"; continue
        fi
        mkdir -p "$dir"
        rm -f "$dir/FAILED" "$dir/INTERRUPTED"
        [ -f "$dir/run_config.txt" ] || train_config "$regime" "$act" > "$dir/run_config.txt"
        # shellcheck disable=SC2086  # the flag strings are meant to split into words
        if ! [ -f "$dir/summary.json" ] || ! grep -q '"evaluated": true' "$dir/summary.json"; then
            $PYTHON "train_$regime.py" --dataset "$DATASET" --data-dir "$DATA_DIR" --model "$MODEL" --epsilon "$EPS" \
                $(act_flags "$act") $flags $TRAIN_FLAGS $DEVICE_FLAGS --out-dir "$dir" --resume >> "$dir/train.log" 2>&1
            rc=$?
            if [ $interrupted = 1 ] || [ $rc = 130 ]; then
                interrupted=1; echo "train" > "$dir/INTERRUPTED"; echo "interrupted in training (resumes on the next run)"; break 2
            fi
            if [ $rc != 0 ]; then
                failed=$((failed + 1)); echo "train" > "$dir/FAILED"; echo "FAILED in training (see $dir/train.log)"; continue
            fi
        fi
        rm -f "$dir/eval_config.txt"
        # shellcheck disable=SC2086
        $PYTHON eval.py "$dir/checkpoint.pt" $EVAL_FLAGS $DEVICE_FLAGS --out "$dir/eval.json" > "$dir/eval.log" 2>&1
        rc=$?
        if [ $interrupted = 1 ] || [ $rc = 130 ]; then
            interrupted=1; echo "eval" > "$dir/INTERRUPTED"; echo "interrupted in evaluation (resumes on the next run)"; break 2
        fi
        if [ $rc != 0 ]; then
            failed=$((failed + 1)); echo "eval" > "$dir/FAILED"; echo "FAILED in evaluation (see $dir/eval.log)"; continue
        fi
        echo "$EVAL_FLAGS" > "$dir/eval_config.txt"
        tail -n 1 "$dir/eval.log"
    done
done
trap - INT

# ---- the table: one row per run of this matrix, in the order above
$PYTHON - "$OUT" "$REGIMES" "$ACTS" <<'EOF'
import csv, json, os, sys
out, regimes, acts = sys.argv[1], sys.argv[2].split(), sys.argv[3].split()
cols = ["regime", "activation", "eps", "clean", "PGD-20", "PGD-50x10", "APGD-CE", "APGD-DLR", "worst case",
        "sanity checks", "train time (s)", "activation params", "status"]
pick = {"clean": "clean", "PGD-20": "pgd20x1", "PGD-50x10": "pgd50x10", "APGD-CE": "apgd-ce", "APGD-DLR": "apgd-dlr"}
rows = []
for regime in regimes:
    for act in acts:
        d = os.path.join(out, "runs", f"{regime}_{act}")
        load = lambda name: json.load(open(os.path.join(d, name))) if os.path.exists(os.path.join(d, name)) else {}
        s, e = load("summary.json"), load("eval.json")
        mark = lambda name: open(os.path.join(d, name)).read().strip() if os.path.exists(os.path.join(d, name)) else None
        failed, interrupted = mark("FAILED"), mark("INTERRUPTED")
        eps = e.get("eps", s.get("flags", {}).get("epsilon"))
        row = dict(regime=regime, activation=act, eps=f"{eps:.4g}" if eps is not None else "-")
        acc = e.get("accuracy", {})
        for col, key in pick.items():
            row[col] = f"{100 * acc[key]:.2f}" if key in acc else "-"
        row["worst case"] = f"{100 * e['robust_accuracy']:.2f}" if "robust_accuracy" in e else "-"
        if "sanity_checks" in e:
            row["sanity checks"] = ("FAIL: " + ", ".join(e["sanity_failed"])) if e["sanity_failed"] else "pass"
            if e.get("warnings"):  # attacks far above the worst case (see eval.py --gap-warn)
                row["sanity checks"] += "; overstated by: " + ", ".join(w.split()[0] for w in e["warnings"])
        else:
            row["sanity checks"] = "-"
        row["train time (s)"] = f"{s['train_time_s']:.1f}" if s.get("epochs_completed") else "-"
        row["activation params"] = str(s.get("activation_params", "-"))
        row["status"] = (f"failed ({failed})" if failed else f"interrupted in {interrupted} (resumable)" if interrupted
                         else "ok" if e else "not run") + (
            f"; {s['stopped_early']}" if s.get("stopped_early") else "")
        rows.append(row)
with open(os.path.join(out, "results.csv"), "w", newline="") as f:
    w = csv.DictWriter(f, fieldnames=cols)
    w.writeheader()
    w.writerows(rows)
json.dump(rows, open(os.path.join(out, "results.json"), "w"), indent=2)
with open(os.path.join(out, "results.md"), "w") as f:
    f.write("| " + " | ".join(cols) + " |\n|" + "---|" * len(cols) + "\n")
    for r in rows:
        f.write("| " + " | ".join(r[c] for c in cols) + " |\n")
print(open(os.path.join(out, "results.md")).read(), end="")
print(f"{len(rows)} rows -> {out}/results.md, results.csv, results.json")
EOF
if [ $interrupted = 1 ]; then echo "run_all.sh: interrupted; run it again to continue" >&2; exit 130; fi
if [ $failed -gt 0 ]; then echo "run_all.sh: $failed run(s) failed" >&2; exit 1; fi
