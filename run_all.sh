#!/usr/bin/env bash
# Reproduce the table of results: every activation x training regime x seed is trained, then evaluated
# with eval.py, and the table (mean +- std over seeds, paired differences to relu) is written to
# $OUT/results.md (+ results.csv, results.json, and results_seeds.csv with one row per run).
#
#   bash run_all.sh              # the papers' setting: CIFAR-10, preactresnet18, eps 8/255, standard
#                                # evaluation on the full test set, seed 0 (a GPU job: hours per run on a CPU)
#   QUICK=1 JOBS=2 bash run_all.sh   # Fashion-MNIST, lenet, eps 0.1, short budgets, seeds 0 1 2, quick
#                                # evaluation (clean on the whole test set, attacks on 1000 images):
#                                # a CPU-sized matrix, two runs at a time (see RESULTS.md for its time)
#
# Environment variables (defaults in brackets: paper / QUICK):
#   ACTS        activations; NAME-insert = Zhao & Griffin's unit after every conv (--saf-insert NAME)
#               [relu softplus silu gelu elu prelu psilu psoftplus pssilu kaf kwta mrelu-insert rbf-insert]
#   REGIMES     any of: fast free pgd natural (train_fast.py --attack none)        [fast free pgd]
#   CELLS       instead of REGIMES x ACTS, an explicit list of REGIME:ACT cells, where ACT may carry
#               Zhao & Griffin's tricks as suffixes: +R random training ($TRICK_R), +M mean training
#               ($TRICK_M), +H the hybrid loss ($TRICK_H); e.g. "natural:mrelu-insert+H+R+M fast:relu"
#   STUDY=saf   Zhao & Griffin's grid (Fashion-MNIST lenet, seeds 0 1 2, OUT results-saf): relu /
#               mrelu-insert+H / rbf-insert+H x {none, +R, +M, +R+M} under natural training and the
#               three under FGSM-RS, evaluated with APGD-CE + APGD-DLR and the three curves, every model
#               scored by its max softmax (one confidence rule; mean training lowers that score) against
#               the threshold that 95% of its clean test images reach (one operating point), and
#               the penultimate-feature test of their Figure 1 (ANALYZE_FLAGS: analyze.py --features)
#               (eval.py --saf-curves -> $OUT/saf_curves.md, .json, .png; per run: saf_seeds.csv)
#               A cell's ACT may end in ,FLAG=VALUE (or ,FLAG for a switch) options for that cell
#               alone, e.g. "free:relu,lr-schedule=onecycle,epochs=2" or "fast:relu,nfgsm"
#   STUDY=schedules  the fast-schedule thesis's protocol (its Table 1), scaled to Fashion-MNIST lenet:
#               train_free.py with FAT's m = 8, batch 128, weight decay 2e-4, momentum 0.9; the 3-step
#               baseline (piecewise) at FAT's LR 0.1 over 2 passes; over 1 pass (the thesis's half
#               budget) at SCHED_LR (0.047, the LR range test's suggestion on this data, see
#               RESULTS.md) with floors lr_max/1000: 1cycle (also with 0.95-0.85 momentum cycling),
#               1cycle truncated, 1cycle & half, linear decay, linear-decay warm restarts, exponential,
#               warm restarts (sgdr) to lr_max/10 and to lr_max/100, constant; seeds 0 1 2, with the
#               --eval-every curves ($OUT/curves.md, .json, .png: accuracy over iterations, iterations
#               to 95% of the best final PGD accuracy).  The shapes the thesis lists but did not run
#               (triangular, triangular-decreasing, sgdr-decreasing, trapezoid) run with EXTRA=1
#   STUDY=fastat  fast AT as of 2026 (Fashion-MNIST lenet, seeds 0-4, OUT results-fastat): FGSM-RS,
#               N-FGSM, GradAlign, ELLE and ELLE-A, each stopping or recovering at catastrophic
#               overfitting (--co-action) and each with and without the FastAT benchmark's weight
#               averaging + label smoothing (--label-smoothing 0.4; --ema 0.97: the benchmark's 0.9995
#               averages over 1/(1 - tau) = 2000 of its 39,100 steps, 5%; 0.97 keeps that share of
#               these runs' 632), 8 epochs of 10,000 images at EPS 0.3 (probed, RESULTS.md: over 4
#               epochs FGSM-RS collapsed in the last one, too late for a recovery; over 8 one seed's
#               collapse came in epoch 5 and the other's went undetected; at 0.25 none collapsed);
#               evaluated by the quick preset on 500 images without its sweeps; $OUT/fastat.md: collapse
#               incidence, recoveries, worst case and cost per cell
#   STUDY=paf   Dai et al.'s parametric activations under their regime, scaled (Fashion-MNIST lenet,
#               seeds 0 1 2, OUT results-paf): train_pgd.py with TRADES (beta 6, the attack in eval
#               mode, 3 steps of 0.04), SGD + Nesterov, cosine LR 0.1 -> 1e-3, batch 256, 3 epochs:
#               relu prelu psilu psoftplus pssilu (learned); pssilu at --pssilu-reg 0 0.1 1 (10 is
#               the default cell); the curvature sweep, fixed PSiLU x sigmoid(a x) with a = 1 2 5 10
#               20 40 (max |f''| = a / 2: 0.5 to 20); the shift sweep, fixed PSSiLU a = 1, beta = 0
#               0.1 0.3 0.5 0.7; evaluated by the quick preset on 500 images without its sweeps
#   NATURAL_FLAGS, TRICK_R, TRICK_M, TRICK_H   [FAST_FLAGS; --random-training 0.5; --mean-training 8; --hybrid-weight 1]
#   SEEDS       training seeds (--seed); a cell is the mean +- std over them        [0 / 0 1 2]
#   BASELINE    the ACT each cell is paired with in its regime (worst-case difference over seeds)
#                                       [relu / relu,lr-schedule=piecewise for the schedules' own cells]
#   JOBS        runs at a time (on one GPU they share it)          [1]
#   THREADS     CPU threads of each run (OMP_NUM_THREADS): the numbers are bit-identical for equal
#               THREADS, whatever JOBS, but change (like another seed) with THREADS
#                                                                  [torch's default, or nproc/JOBS when JOBS > 1 / 1]
#   DATASET, DATA_DIR, MODEL, EPS                                  [cifar10 ./data preactresnet18 8/255 /
#                                                                   fashionmnist /usr/share/datasets/fashion-mnist lenet 0.1]
#   FAST_FLAGS, FREE_FLAGS, PGD_FLAGS  budgets of each regime      [each script's defaults / short ones]
#   DEVICE      cpu, cuda, cuda:1 ... for training and evaluation  [the scripts' default: cuda when present]
#   DEVICES     several devices, e.g. "cuda:0 cuda:1 cuda:2 cuda:3": each concurrent run gets one of
#               its own (JOBS slots, slot s on device s mod the count; JOBS defaults to the count)
#   CELL        run only run K of `bash run_all.sh --list` (0-based; e.g. CELL=$SLURM_ARRAY_TASK_ID in a
#               cluster array job): it writes its own run folder only, takes no lock on OUT and writes no
#               table; once every K has finished, the usual command skips them all and writes the table
#   TRAIN_FLAGS extra flags for every training run (e.g. "--n-train 20000"; the seed comes from SEEDS)
#   EVAL_FLAGS  eval.py flags                [--preset standard / --preset quick --n-eval 1000 --n-clean 0]
#   ANALYZE_FLAGS  analyze.py flags run on every checkpoint after its evaluation (its JSON goes to the
#               run's analysis/; done once per ANALYZE_FLAGS, analyze_config.txt)
#                                        [none / STUDY=saf: --features --n-eval 1000 --no-plot]
#   OUT         results folder                                     [results / results-quick]
#   FIGURES     a folder (e.g. figures/quick) that receives a copy of the tables' figures (PNG) and
#               their data (results.md, results.csv, results_seeds.csv, curves / saf_curves / fastat
#               .md and .json, saf_seeds.csv, shape_sweeps.png) once the table is written: small files, to commit
#               beside RESULTS.md
#
# Each run lives in $OUT/runs/<regime>_<act>_s<seed>/ with its logs and run_config.txt (script and
# training flags; DATA_DIR and DEVICE may change, as under --resume).  Every run's flags, EVAL_FLAGS,
# DEVICE and OUT are checked before the first run.  Re-running skips the runs whose eval.json was made
# with the same EVAL_FLAGS (eval_config.txt; other EVAL_FLAGS re-evaluate), resumes interrupted ones
# (--resume), and refuses to start when a run folder holds another training configuration (another
# EPS, *_FLAGS, ...).  A failed run is recorded as failed (the table flags it, its cell is the mean of
# the other seeds) and the others go on; Ctrl-C stops the whole matrix (the runs in progress are marked
# interrupted and resume on the next invocation).  The table is written for what finished; the exit
# code is 130 after Ctrl-C, 1 when a run failed, else 0.
set -u
cd "$(dirname "$0")"
LIST=0
case "${1:-}" in
    "") ;;
    --list) LIST=1 ;;
    *) echo "run_all.sh: unknown argument '$1' (the only one is --list; settings are environment variables)" >&2; exit 2 ;;
esac
PYTHON=${PYTHON:-python}

if [ "${STUDY:-}" = saf ]; then
    # Zhao & Griffin's grid on Fashion-MNIST: plain (relu) and robust CNNs (an mReLU / RBF unit after every
    # conv and hidden fc, trained on the hybrid loss: +H) under natural training with none / R / M / R-M,
    # and the three units under FGSM-RS; clean, the worst case of APGD-CE + APGD-DLR, the three curves
    DATASET=${DATASET:-fashionmnist}; DATA_DIR=${DATA_DIR:-/usr/share/datasets/fashion-mnist}
    MODEL=${MODEL:-lenet}; EPS=${EPS:-0.1}; OUT=${OUT:-results-saf}; SEEDS=${SEEDS:-0 1 2}; THREADS=${THREADS:-1}
    FAST_FLAGS=${FAST_FLAGS:---epochs 2 --n-train 20000 --n-eval 500}
    EVAL_FLAGS=${EVAL_FLAGS:---attacks apgd-ce apgd-dlr --n-eval 1000 --n-clean 0 --saf-curves --confidence softmax --accept-clean 0.95}
    ANALYZE_FLAGS=${ANALYZE_FLAGS---features --n-eval 1000 --no-plot}  # set and empty: no analysis
    if [ -z "${CELLS:-}" ]; then
        for unit in relu mrelu-insert+H rbf-insert+H; do
            for t in "" +R +M +R+M; do CELLS="${CELLS:-} natural:$unit$t"; done
        done
        CELLS="$CELLS fast:relu fast:mrelu-insert+H fast:rbf-insert+H"
    fi
elif [ "${STUDY:-}" = schedules ]; then
    # the fast-schedule thesis (Table 1): FAT's 3-step schedule at its LR and budget, every other shape at
    # the LR range test's LR and half the budget, floors lr_max/1000 (warm restarts: /10 and /100);
    # clean and PGD-10 accuracy on 500 test images every 50 optimiser steps (the curves), then the worst case
    DATASET=${DATASET:-fashionmnist}; DATA_DIR=${DATA_DIR:-/usr/share/datasets/fashion-mnist}
    MODEL=${MODEL:-lenet}; EPS=${EPS:-0.1}; OUT=${OUT:-results-schedules}; SEEDS=${SEEDS:-0 1 2}; THREADS=${THREADS:-1}
    SCHED_LR=${SCHED_LR:-0.047}
    FREE_FLAGS=${FREE_FLAGS:---epochs 8 --replays 8 --momentum 0.9 --weight-decay 2e-4 --n-train 20000 --n-eval 500 --eval-every 50}
    # the attacks and checks of the quick preset on 500 images, without its noise / nonsense / eps
    # sweeps (on 1000, the evaluation took twice a 1-pass run's training)
    EVAL_FLAGS=${EVAL_FLAGS:---preset quick --n-eval 500 --n-clean 0 --noise-sigmas --nonsense-n 0 --curve-eps}
    if [ -z "${CELLS:-}" ]; then
        floor=$($PYTHON -c "print($SCHED_LR / 1000)")
        CELLS="free:relu,lr-schedule=piecewise,lr-max=0.1,epochs=16"
        for sched in onecycle onecycle-truncated onecycle-half linear linear-restarts exponential constant; do
            CELLS="$CELLS free:relu,lr-schedule=$sched,lr-max=$SCHED_LR"
            case $sched in exponential|constant) ;; *) CELLS="$CELLS,lr-min=$floor" ;; esac
        done
        CELLS="$CELLS free:relu,lr-schedule=onecycle,lr-max=$SCHED_LR,lr-min=$floor,momentum-schedule=onecycle"
        for div in 10 100; do
            CELLS="$CELLS free:relu,lr-schedule=sgdr,lr-max=$SCHED_LR,lr-min=$($PYTHON -c "print($SCHED_LR / $div)")"
        done
        if [ "${EXTRA:-0}" = 1 ]; then  # shapes the thesis describes but did not run: an extension
            for sched in triangular triangular-decreasing sgdr-decreasing trapezoid; do
                CELLS="$CELLS free:relu,lr-schedule=$sched,lr-max=$SCHED_LR,lr-min=$floor"
            done
        fi
        BASELINE=${BASELINE:-relu,lr-schedule=piecewise,lr-max=0.1,epochs=16}
    fi
elif [ "${STUDY:-}" = fastat ]; then
    # FGSM-RS and its 2026 fixes, x stop / recover at catastrophic overfitting, x plain / EMA + label
    # smoothing; the guard's records give the collapse incidence, eval.py the worst case
    DATASET=${DATASET:-fashionmnist}; DATA_DIR=${DATA_DIR:-/usr/share/datasets/fashion-mnist}
    MODEL=${MODEL:-lenet}; EPS=${EPS:-0.3}; OUT=${OUT:-results-fastat}; SEEDS=${SEEDS:-0 1 2 3 4}; THREADS=${THREADS:-1}
    FAST_FLAGS=${FAST_FLAGS:---epochs 8 --n-train 10000 --n-eval 500}
    # the attacks and checks of the quick preset on 500 images, without its noise / nonsense / eps sweeps
    EVAL_FLAGS=${EVAL_FLAGS:---preset quick --n-eval 500 --n-clean 0 --noise-sigmas --nonsense-n 0 --curve-eps}
    if [ -z "${CELLS:-}" ]; then
        for method in "" ,nfgsm ,grad-align=0.2 ,elle=1 ,elle=1,elle-adaptive; do
            for action in stop recover; do
                for avg in "" ,ema=0.97,label-smoothing=0.4; do CELLS="${CELLS:-} fast:relu$method,co-action=$action$avg"; done
            done
        done
        BASELINE=${BASELINE:-relu,co-action=stop}
    fi
elif [ "${STUDY:-}" = paf ]; then
    # Dai et al. (2021): TRADES, eval-mode attack, Nesterov, cosine to 1e-3, batch 256; the learned units,
    # the --pssilu-reg sweep, and fixed shapes over curvature (PSiLU's a) and negative output (PSSiLU's beta)
    DATASET=${DATASET:-fashionmnist}; DATA_DIR=${DATA_DIR:-/usr/share/datasets/fashion-mnist}
    MODEL=${MODEL:-lenet}; EPS=${EPS:-0.1}; OUT=${OUT:-results-paf}; SEEDS=${SEEDS:-0 1 2}; THREADS=${THREADS:-1}
    PGD_FLAGS=${PGD_FLAGS:---loss trades --trades-beta 6 --attack-mode eval --attack-iters 3 --attack-step 0.04 --nesterov --lr-schedule cosine --lr-max 0.1 --lr-min 1e-3 --batch-size 256 --epochs 3 --n-train 20000 --n-eval 500}
    # on 500 test images, as STUDY=schedules: on 1000 the evaluation took as long as a run's training
    EVAL_FLAGS=${EVAL_FLAGS:---preset quick --n-eval 500 --n-clean 0 --noise-sigmas --nonsense-n 0 --curve-eps}
    if [ -z "${CELLS:-}" ]; then
        for act in relu prelu psilu psoftplus pssilu; do CELLS="${CELLS:-} pgd:$act"; done
        for reg in 0 0.1 1; do CELLS="$CELLS pgd:pssilu,pssilu-reg=$reg"; done
        for a in 1 2 5 10 20 40; do CELLS="$CELLS pgd:psilu,freeze-act,act-init=a=$a"; done
        for b in 0 0.1 0.3 0.5 0.7; do CELLS="$CELLS pgd:pssilu,freeze-act,act-init=a=1:b=$b"; done
    fi
elif [ "${STUDY:-}" != "" ]; then
    echo "run_all.sh: unknown STUDY '$STUDY' (choose from: saf schedules fastat paf)" >&2; exit 2
elif [ "${QUICK:-0}" = 1 ]; then
    DATASET=${DATASET:-fashionmnist}; DATA_DIR=${DATA_DIR:-/usr/share/datasets/fashion-mnist}
    MODEL=${MODEL:-lenet}; EPS=${EPS:-0.1}; OUT=${OUT:-results-quick}; SEEDS=${SEEDS:-0 1 2}; THREADS=${THREADS:-1}
    # a third of the training set and short budgets; the scripts' own final check on 500 test images
    # (eval.py makes the table)
    short="--n-train 20000 --n-eval 500"
    FAST_FLAGS=${FAST_FLAGS:---epochs 2 $short}
    FREE_FLAGS=${FREE_FLAGS:---epochs 4 --replays 2 --lr-max 0.04 $short}
    PGD_FLAGS=${PGD_FLAGS:---epochs 1 --attack-iters 3 --attack-step 0.04 $short}
    EVAL_FLAGS=${EVAL_FLAGS:---preset quick --n-eval 1000 --n-clean 0}
else
    DATASET=${DATASET:-cifar10}; DATA_DIR=${DATA_DIR:-./data}
    MODEL=${MODEL:-preactresnet18}; EPS=${EPS:-8/255}; OUT=${OUT:-results}; SEEDS=${SEEDS:-0}
    EVAL_FLAGS=${EVAL_FLAGS:---preset standard}
fi
FAST_FLAGS=${FAST_FLAGS:-}; FREE_FLAGS=${FREE_FLAGS:-}; PGD_FLAGS=${PGD_FLAGS:-}; NATURAL_FLAGS=${NATURAL_FLAGS:-$FAST_FLAGS}
TRICK_R=${TRICK_R:---random-training 0.5}; TRICK_M=${TRICK_M:---mean-training 8}; TRICK_H=${TRICK_H:---hybrid-weight 1}
ACTS=${ACTS:-relu softplus silu gelu elu prelu psilu psoftplus pssilu kaf kwta mrelu-insert rbf-insert}
REGIMES=${REGIMES:-fast free pgd}
if [ -z "${CELLS:-}" ]; then
    for regime in $REGIMES; do for act in $ACTS; do CELLS="${CELLS:-} $regime:$act"; done; done
fi
CELLS=$(echo ${CELLS:-})
TRAIN_FLAGS=${TRAIN_FLAGS:-}
ANALYZE_FLAGS=$(echo ${ANALYZE_FLAGS:-})
DEVICES=$(echo ${DEVICES:-})
if [ -n "$DEVICES" ] && [ -n "${DEVICE:-}" ]; then echo "run_all.sh: give DEVICE or DEVICES, not both" >&2; exit 2; fi
DEVICE_FLAGS=${DEVICE:+--device $DEVICE}
if [ -n "$DEVICES" ]; then
    read -r -a device_list <<< "$DEVICES"
    DEVICE_FLAGS="--device ${device_list[0]}"  # the up-front checks; each run gets its slot's device
    JOBS=${JOBS:-${#device_list[@]}}
fi
JOBS=${JOBS:-1}

# ---- checked before the first run: cells, seeds, jobs, every run's flags (activation, budgets, EPS,
# DEVICE), EVAL_FLAGS, OUT, and that no run folder holds another training configuration
script_of() { case $1 in natural) echo fast ;; *) echo "$1" ;; esac; }
regime_flags() {
    case $1 in fast) echo "$FAST_FLAGS" ;; free) echo "$FREE_FLAGS" ;; pgd) echo "$PGD_FLAGS" ;; natural) echo "--attack none $NATURAL_FLAGS" ;; esac
}
act_flags() {  # NAME or NAME-insert, then any of +R +M +H (Zhao & Griffin's tricks)
    local spec=${1%%,*} base t flags
    base=${spec%%+*}
    case $base in *-insert) flags="--saf-insert ${base%-insert}" ;; *) flags="--act $base" ;; esac
    for t in $(echo "${spec#"$base"}" | tr '+' ' '); do
        case $t in R) flags="$flags $TRICK_R" ;; M) flags="$flags $TRICK_M" ;; H) flags="$flags $TRICK_H" ;; *) return 1 ;; esac
    done
    echo "$flags"
}
cell_flags() {  # an ACT's trailing ,FLAG=VALUE options: the cell's own flags, given last so that they win
    local spec=${1%%,*} t flags=""
    if [ "$spec" != "$1" ]; then
        for t in $(echo "${1#"$spec",}" | tr ',' ' '); do
            case $t in ?*=?*) flags="$flags --${t%%=*} ${t#*=}" ;; [a-z]*) flags="$flags --$t" ;; *) return 1 ;; esac
        done
    fi
    echo "$flags"
}
cell_train_flags() {  # a cell's training flags past the data and model: its own ,FLAG=VALUE options last, so they win
    echo "$(act_flags "$2") $(regime_flags "$1") $TRAIN_FLAGS$(cell_flags "$2")"
}
train_config() {  # what makes a run: script and training flags (not DATA_DIR / DEVICE, which --resume lets change)
    echo "train_$(script_of "$1").py --dataset $DATASET --model $MODEL --epsilon $EPS $(cell_train_flags "$1" "$2") --seed $3"
}
run_dir() { echo "$OUT/runs/$1_$2_s$3"; }
same_config() {  # two run configurations, equal as text or with their numbers compared by value (EPS 1/10 = 0.1)
    [ "$1" = "$2" ] && return 0
    $PYTHON -c '
import sys
from fractions import Fraction
def value(word):
    try:
        return float(Fraction(word))
    except (ValueError, ZeroDivisionError):
        return word
a, b = (s.split() for s in sys.argv[1:3])
sys.exit(0 if len(a) == len(b) and all(value(x) == value(y) for x, y in zip(a, b)) else 1)
' "$1" "$2"
}
if [ -z "$CELLS" ] || [ -z "$(echo $SEEDS)" ]; then
    echo "run_all.sh: ACTS, REGIMES (or CELLS) and SEEDS must not be empty" >&2; exit 2
fi
for cell in $CELLS; do
    regime=${cell%%:*}; act=${cell#*:}
    case $regime in fast|free|pgd|natural) ;; *) echo "run_all.sh: unknown regime '$regime' (choose from: fast free pgd natural)" >&2; exit 2 ;; esac
    if [ "$act" = "$cell" ] || [ -z "$act" ] || ! act_flags "$act" > /dev/null || ! cell_flags "$act" > /dev/null; then
        echo "run_all.sh: bad cell '$cell' (REGIME:ACT, ACT = NAME or NAME-insert, then any of +R +M +H, then any ,FLAG=VALUE)" >&2; exit 2
    fi
done
if [ -n "${BASELINE:-}" ]; then
    case " $CELLS " in *":$BASELINE "*) ;; *) echo "run_all.sh: BASELINE '$BASELINE' is the ACT of no cell" >&2; exit 2 ;; esac
fi
for seed in $SEEDS; do
    case $seed in *[!0-9]*) echo "run_all.sh: SEEDS must be non-negative integers, got '$seed'" >&2; exit 2 ;; esac
done
for n in "$JOBS" "${THREADS:-1}"; do
    case $n in ''|*[!0-9]*|0) echo "run_all.sh: JOBS and THREADS must be positive integers" >&2; exit 2 ;; esac
done
if [ $LIST = 1 ]; then  # the runs, numbered as CELL takes them: index regime act seed folder
    k=0
    for seed in $SEEDS; do for cell in $CELLS; do
        echo "$k ${cell%%:*} ${cell#*:} $seed $(run_dir "${cell%%:*}" "${cell#*:}" "$seed")"; k=$((k + 1))
    done; done
    exit 0
fi
n_runs=$(( $(echo $SEEDS | wc -w) * $(echo $CELLS | wc -w) ))
if [ -n "${CELL:-}" ]; then
    case $CELL in *[!0-9]*) echo "run_all.sh: CELL must be a run index of --list (0 to $((n_runs - 1))), got '$CELL'" >&2; exit 2 ;; esac
    if [ "$CELL" -ge "$n_runs" ]; then echo "run_all.sh: CELL=$CELL, but there are $n_runs runs (0 to $((n_runs - 1)))" >&2; exit 2; fi
fi
if [ -z "${THREADS:-}" ] && [ "$JOBS" -gt 1 ]; then THREADS=$(( $(nproc) / JOBS )); [ "$THREADS" -ge 1 ] || THREADS=1; fi
if [ -n "${THREADS:-}" ]; then export OMP_NUM_THREADS=$THREADS MKL_NUM_THREADS=$THREADS; fi
case " $TRAIN_FLAGS " in *" --seed "*|*" --seed="*) echo "run_all.sh: give the seeds with SEEDS, not --seed in TRAIN_FLAGS" >&2; exit 2 ;; esac
if ! mkdir -p "$OUT/runs" 2>/dev/null || ! { : > "$OUT/runs/.write-test"; } 2>/dev/null; then
    echo "run_all.sh: OUT=$OUT cannot be created or written" >&2; exit 2
fi
rm -f "$OUT/runs/.write-test"
# one matrix per OUT at a time: a second invocation stops here, before touching any run folder (array
# tasks, CELL=K, share OUT: each has its own run folder, locked by its training script)
lock="$OUT/.run_all.lock"
if [ -n "${CELL:-}" ]; then
    :
elif ! mkdir "$lock" 2>/dev/null; then
    holder=$(cat "$lock/pid" 2>/dev/null)
    if [ -n "$holder" ] && kill -0 "$holder" 2>/dev/null; then
        echo "run_all.sh: OUT=$OUT is in use by another run_all.sh (process $holder); wait for it or use another OUT" >&2
        exit 2
    fi
    rm -rf "$lock"  # left by a run_all.sh that was killed
    if ! mkdir "$lock" 2>/dev/null; then echo "run_all.sh: could not take $lock; try again" >&2; exit 2; fi
fi
if [ -z "${CELL:-}" ]; then echo $$ > "$lock/pid"; trap 'rm -rf "$lock"' EXIT; fi
checks=""  # one line per cell: the one-line error's prefix, the script, its training flags
for cell in $CELLS; do
    regime=${cell%%:*}; act=${cell#*:}
    checks="$checks$regime $act	train_$(script_of "$regime")	--dataset $DATASET --data-dir $DATA_DIR --model $MODEL --epsilon $EPS $(cell_train_flags "$regime" "$act") $DEVICE_FLAGS --resume
"
done
# shellcheck disable=SC2086
if ! printf '%s' "$checks" | ANALYZE_FLAGS=$ANALYZE_FLAGS $PYTHON -c '
import importlib, os, sys
import eval as evaluation
import utils
for line in sys.stdin.read().splitlines():
    label, script, flags = line.split("\t")
    sys.argv[0] = f"run_all.sh: {label}: {script}.py"  # the one-line error prefix
    importlib.import_module(script).get_args(flags.split())
sys.argv[0] = "run_all.sh: EVAL_FLAGS: eval.py"
evaluation.get_args(["checkpoint.pt", *sys.argv[1:]])
if os.environ["ANALYZE_FLAGS"]:
    import analyze
    sys.argv[0] = "run_all.sh: ANALYZE_FLAGS: analyze.py"
    analyze.get_args(["checkpoint.pt", *os.environ["ANALYZE_FLAGS"].split()])
for device in os.environ.get("DEVICES", "").split():
    if utils.device_problem(device):
        sys.exit(f"run_all.sh: DEVICES: {utils.device_problem(device)}")
' $EVAL_FLAGS $DEVICE_FLAGS
then exit 2; fi
others=""; k=0
for seed in $SEEDS; do
    for cell in $CELLS; do
        regime=${cell%%:*}; act=${cell#*:}
        k=$((k + 1))
        if [ -n "${CELL:-}" ] && [ $((k - 1)) != "$CELL" ]; then continue; fi  # an array task: its own run
        f="$(run_dir "$regime" "$act" "$seed")/run_config.txt"
        if [ -f "$f" ] && ! same_config "$(cat "$f")" "$(train_config "$regime" "$act" "$seed")"; then
            others="$others ${regime}_${act}_s$seed"
        fi
    done
done
if [ -n "$others" ]; then
    echo "run_all.sh: $OUT/runs holds runs of another training configuration:$others (see their run_config.txt);" \
         "use another OUT, or delete those folders" >&2
    exit 2
fi

# ---- one run: train (or resume) and evaluate.  Its outcome is one line and, unless it succeeded, a
# FAILED or INTERRUPTED file in its folder (it runs in the background: it cannot set our variables).
evaluated() { [ -f "$1/eval.json" ] && [ "$(cat "$1/eval_config.txt" 2>/dev/null)" = "$EVAL_FLAGS" ]; }
analysed() { [ -z "$ANALYZE_FLAGS" ] || [ "$(cat "$1/analyze_config.txt" 2>/dev/null)" = "$ANALYZE_FLAGS" ]; }
stopped() {  # DIR STEP WORDS LOG RC LINE: true (and recorded, and reported) when a step did not succeed
    if [ "$5" = 130 ] || [ "$5" = 143 ]; then echo "$2" > "$1/INTERRUPTED"; echo "$6 interrupted in $3 (resumes on the next run)"; return 0; fi
    if [ "$5" != 0 ]; then echo "$2" > "$1/FAILED"; echo "$6 FAILED in $3 (see $4)"; return 0; fi
    return 1
}
run_one() {
    local regime=$1 act=$2 seed=$3 line=$4 device_flags=$5 dir
    dir=$(run_dir "$regime" "$act" "$seed")
    mkdir -p "$dir"
    rm -f "$dir/FAILED" "$dir/INTERRUPTED"
    echo "${device_flags#--device }" > "$dir/device.txt"
    if ! [ -f "$dir/run_config.txt" ]; then  # atomic: a concurrent array task never reads half of it
        train_config "$regime" "$act" "$seed" > "$dir/run_config.txt.$$" && mv "$dir/run_config.txt.$$" "$dir/run_config.txt"
    fi
    if ! [ -f "$dir/summary.json" ] || ! grep -q '"evaluated": true' "$dir/summary.json"; then
        # shellcheck disable=SC2086  # the flag strings are meant to split into words
        $PYTHON "train_$(script_of "$regime").py" --dataset "$DATASET" --data-dir "$DATA_DIR" --model "$MODEL" --epsilon "$EPS" \
            $(cell_train_flags "$regime" "$act") --seed "$seed" $device_flags --out-dir "$dir" \
            --resume >> "$dir/train.log" 2>&1
        stopped "$dir" train training "$dir/train.log" $? "$line" && return
    fi
    if ! evaluated "$dir"; then
        rm -f "$dir/eval_config.txt"
        # shellcheck disable=SC2086
        $PYTHON eval.py "$dir/checkpoint.pt" $EVAL_FLAGS $device_flags --out "$dir/eval.json" > "$dir/eval.log" 2>&1
        stopped "$dir" eval evaluation "$dir/eval.log" $? "$line" && return
        echo "$EVAL_FLAGS" > "$dir/eval_config.txt"
    fi
    if ! analysed "$dir"; then
        rm -f "$dir/analyze_config.txt"
        # shellcheck disable=SC2086
        $PYTHON analyze.py "$dir/checkpoint.pt" $ANALYZE_FLAGS $device_flags > "$dir/analyze.log" 2>&1
        stopped "$dir" analyze analyze.py "$dir/analyze.log" $? "$line" && return
        echo "$ANALYZE_FLAGS" > "$dir/analyze_config.txt"
    fi
    echo "$line $(tail -n 1 "$dir/eval.log")"
}

# ---- the matrix, seed by seed (a cut leaves whole seeds), JOBS runs at a time.  Ctrl-C reaches every
# run (they share our process group): each saves what it has and stops, and we wait for them.
interrupted=0
trap 'interrupted=1' INT
total=$n_runs; i=0; start=$SECONDS
slot_pid=()  # the run each of the JOBS slots holds; with DEVICES, slot s runs on device s mod their count
for seed in $SEEDS; do
    for cell in $CELLS; do
        regime=${cell%%:*}; act=${cell#*:}
        i=$((i + 1))
        if [ -n "${CELL:-}" ] && [ $((i - 1)) != "$CELL" ]; then continue; fi
        dir=$(run_dir "$regime" "$act" "$seed")
        if evaluated "$dir" && analysed "$dir"; then
            printf '[%d/%d] %-7s %-16s s%-3s done before, skipped\n' "$i" "$total" "$regime" "$act" "$seed"; continue
        fi
        while [ $interrupted = 0 ] && [ "$(jobs -rp | wc -l)" -ge "$JOBS" ]; do wait -n; done
        if [ $interrupted = 1 ]; then break 2; fi
        slot=0
        while [ -n "${slot_pid[$slot]:-}" ] && kill -0 "${slot_pid[$slot]}" 2>/dev/null; do slot=$((slot + 1)); done
        flags=$DEVICE_FLAGS
        if [ -n "$DEVICES" ]; then flags="--device ${device_list[$((slot % ${#device_list[@]}))]}"; fi
        run_one "$regime" "$act" "$seed" "$(printf '[%d/%d %5ds] %-7s %-16s s%-3s' "$i" "$total" $((SECONDS - start)) "$regime" "$act" "$seed")" "$flags" &
        slot_pid[$slot]=$!
    done
done
while [ -n "$(jobs -rp)" ]; do wait; done  # a trapped Ctrl-C ends a wait early: wait again
trap - INT
failed=0; k=0
for seed in $SEEDS; do for cell in $CELLS; do
    k=$((k + 1))
    if [ -n "${CELL:-}" ] && [ $((k - 1)) != "$CELL" ]; then continue; fi  # an array task: its run only
    dir=$(run_dir "${cell%%:*}" "${cell#*:}" "$seed")
    if [ -f "$dir/FAILED" ]; then failed=$((failed + 1)); fi
    if [ -f "$dir/INTERRUPTED" ]; then interrupted=1; fi
done; done

if [ -n "${CELL:-}" ]; then  # an array task: its own run only, the table comes from the usual command
    if [ $interrupted = 1 ]; then exit 130; fi
    if [ $failed -gt 0 ]; then exit 1; fi
    exit 0
fi
# ---- the tables: one row per cell, mean +- std over the seeds, and the curves where the runs made
# them (tables.py)
$PYTHON tables.py "$OUT" "$CELLS" "$SEEDS" "${BASELINE:-relu}" "$EVAL_FLAGS"
if [ -n "${FIGURES:-}" ]; then
    mkdir -p "$FIGURES" && for f in results.png results.md results.csv results_seeds.csv curves.png curves.md curves.json \
        saf_curves.png saf_curves.md saf_curves.json saf_seeds.csv fastat.md fastat.json shape_sweeps.png; do
        if [ -f "$OUT/$f" ]; then cp "$OUT/$f" "$FIGURES/"; fi
    done && echo "figures and tables -> $FIGURES"
fi
if [ $interrupted = 1 ]; then echo "run_all.sh: interrupted; run it again to continue" >&2; exit 130; fi
if [ $failed -gt 0 ]; then echo "run_all.sh: $failed run(s) failed" >&2; exit 1; fi
