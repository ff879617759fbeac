"""run_all.sh's tables over seeds, from the finished run folders <OUT>/runs/<regime>_<act>_s<seed>:

  matrix_table  one row per cell (regime, activation): mean +- std over the seeds of every accuracy
                eval.py reported, the paired difference to the baseline cell with a 95% t-interval,
                the catastrophic-overfitting flags;      -> results.md / .csv / .json,
                results_seeds.csv
  curve_table   accuracy over optimiser steps (--eval-every) and steps to reach a share of the
                final PGD accuracy;                       -> curves.md / .json / .png
  shape_sweep_figure  STUDY=paf's fixed shapes: worst case against curvature and shift;
                                                          -> shape_sweeps.png
  saf_table     Zhao & Griffin's three curves (adversarial, noisy, nonsense) averaged over seeds,
                and their feature test where the runs were analysed (analyze.py --features);
                                                          -> saf_curves.md / .json / .png,
                saf_seeds.csv (the same per run)

Standard library only (matplotlib optional, for the PNGs).  run_all.sh calls

    python tables.py OUT "CELLS" "SEEDS" [BASELINE] [EVAL_FLAGS]

with CELLS as 'regime:act ...' and SEEDS as '0 1 2'.  A family of comparisons inside a published
table is read back from its committed per-seed CSV (paired over seeds, Holm over the cells named):

    python tables.py --compare figures/paf/results_seeds.csv pgd:relu pgd:prelu pgd:psilu ...

(another column than the worst case with --column, e.g. --column clean, or --column "nonsense beta
0.1" in a saf_seeds.csv); eval.py's presets against AutoAttack on the same images, a row per model folder
(eval_autoattack.json beside eval_NAME.json; robust accuracy, time, images robust under one only):

    python tables.py --autoattack figures/autoattack figures/autoattack/fast_relu_s0 ...

and a matrix as one row per activation and a column pair per regime (--against: how far each cell
moved from an earlier table of the same cells, † on those not re-run; per-seed CSVs are pooled, one
Holm family per regime; --plot: their seeds as a figure):

    python tables.py --grid figures/quick-white-box/results.csv figures/quick-fast/results_seeds.csv \
        --against figures/quick-white-box/results.csv --plot figures/matrix.png
"""
import csv
import json
import math
import os
import re
import sys


def write_json(obj, path):
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2)
    os.replace(tmp, path)


def read_json(path):
    with open(path) as f:
        return json.load(f)


def read_csv(path):
    """(rows as dicts, column names) of a CSV file."""
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        return list(reader), reader.fieldnames or []


def pyplot():
    """matplotlib.pyplot with the file-only Agg backend, or None when matplotlib is not
    installed."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        return plt
    except ImportError:  # plots are optional
        return None


def save_figure(fig, path, dpi=110, **savefig_kwargs):
    """Write a matplotlib figure to ``path`` as a PNG of at most 256 colours (Pillow's median cut, no
    dithering; Pillow comes with matplotlib): these line, dot and bar plots have few colours, and the
    file is about a third of matplotlib's RGBA one, small enough to commit beside RESULTS.md.
    Returns the path."""
    import io
    from PIL import Image
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi, **savefig_kwargs)
    with Image.open(buffer) as image:
        palette = image.convert("RGB").quantize(256, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE)
    palette.save(path, optimize=True)
    return path


# two-sided 95% quantiles of Student's t, degrees of freedom 1..30 (1.96 beyond)
T975 = [12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
        2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042]
# A model that overfitted catastrophically resists the one-step attack it was trained on but not
# multi-step ones (Wong et al. 2020): FGSM no longer lowers its accuracy (FGSM >= clean, Kurakin et
# al.'s "label leaking") while the worst case sits far below, more than CO_GAP.  Either sign alone
# also occurs without it, on barely trained models of the tests' synthetic data: FGSM = clean where a
# saturated rbf unit gives FGSM no gradient (clean 18.8, worst 0), a gap of 31 points on a relu lenet
# (clean 100, FGSM 68.8, worst 37.5).
CO_GAP = 0.30
RELATIVE_DROP = 0.5  # fastat_table's count of collapses the guard missed: probe below half its best

# eval.py runs its attacks in AutoAttack's order: each column is the accuracy left after that attack
# and every one before it (an evaluation made before that order: the attack's own accuracy)
MATRIX_ACCURACIES = {"clean": "clean", "PGD-20": "pgd20x1", "PGD-50x10": "pgd50x10", "APGD-CE": "apgd-ce",
                     "APGD-DLR": "apgd-dlr", "APGD-T": "apgd-t", "Square": "square"}


def mean_std(values):
    """(mean, sample standard deviation with n - 1; 0 for a single value) of a non-empty list."""
    n = len(values)
    mean = sum(values) / n
    return mean, (math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else 0.0)


def t_two_sided_p(t, df):
    """Two-sided p-value of Student's t with integer ``df`` >= 1, exact (Abramowitz & Stegun 26.7.3 /
    26.7.4: with theta = atan(|t| / sqrt(df)), P(|T| < |t|) is a finite sum in cos(theta))."""
    theta = math.atan(abs(t) / math.sqrt(df))
    c2, term, total = math.cos(theta) ** 2, 1.0, 1.0
    if df % 2 == 0:  # sin(theta) (1 + 1/2 c^2 + (1 3)/(2 4) c^4 + ... up to c^(df - 2))
        for k in range(1, df // 2):
            term *= c2 * (2 * k - 1) / (2 * k)
            total += term
        inside = math.sin(theta) * total
    else:  # (2 / pi) (theta + sin(theta) cos(theta) (1 + 2/3 c^2 + (2 4)/(3 5) c^4 + ... up to c^(df - 3)))
        for k in range(1, (df - 1) // 2):
            term *= c2 * (2 * k) / (2 * k + 1)
            total += term
        inside = 2 / math.pi * (theta + (math.sin(theta) * math.cos(theta) * total if df > 1 else 0.0))
    return max(0.0, 1.0 - inside)


def holm(pvalues, alpha=0.05):
    """Holm's step-down correction: for {key: p}, the keys whose difference survives at family-wise
    level ``alpha`` (sorted ascending, the i-th smallest of m is kept while p <= alpha / (m - i))."""
    kept = set()
    ordered = sorted(pvalues.items(), key=lambda kv: kv[1])
    for i, (key, p) in enumerate(ordered):
        if p > alpha / (len(ordered) - i):
            break
        kept.add(key)
    return kept


def paired_difference(a, b):
    """The paired difference a - b over seeds (lists of equal length, one value per seed): its mean,
    the 95% Student-t interval of that mean (None under two pairs) and the sign agreement, so a
    table can say whether a difference is more than seed-to-seed noise."""
    d = [x - y for x, y in zip(a, b)]
    mean, std = mean_std(d)
    k = len(d)
    half = None if k < 2 else (T975[k - 2] if k <= 31 else 1.96) * std / math.sqrt(k)
    same_sign = all(v > 0 for v in d) or all(v < 0 for v in d)
    p = None if k < 2 else (0.0 if mean != 0 else 1.0) if std == 0 else t_two_sided_p(mean / (std / math.sqrt(k)), k - 1)
    return {"n": len(d), "differences": d, "mean": mean, "std": std, "half_width": half,
            "low": None if half is None else mean - half, "high": None if half is None else mean + half,
            "significant": half is not None and (mean - half > 0 or mean + half < 0), "same_sign": same_sign,
            "p": p}


def judged(stats):
    """Whether a paired_difference can be tested: at least 3 pairs (2 give no usable interval) and some
    spread (a difference equal in every seed makes t infinite, a degenerate test: on a few hundred
    images such a difference is often 1-3 images; 1e-9 absorbs float noise)."""
    return stats["p"] is not None and stats["n"] >= 3 and stats["std"] > 1e-9


def matrix_run(folder, eval_flags=None):
    """One run of the matrix, read from its folder (summary.json, eval.json, FAILED / INTERRUPTED
    markers): accuracies in %, the worst case, checks, time, and what went wrong, if anything.  With
    ``eval_flags`` (run_all.sh's EVAL_FLAGS) an evaluation made with other flags (eval_config.txt)
    does not count: run_all.sh redoes it when it runs again."""
    def load(name):
        path = os.path.join(folder, name)
        return read_json(path) if os.path.exists(path) else {}

    def mark(name):
        path = os.path.join(folder, name)
        if not os.path.exists(path):
            return None
        with open(path) as f:
            return f.read().strip()

    s, e = load("summary.json"), load("eval.json")
    acc = dict(e.get("accuracy", {}))
    if "clean_full" in e:  # clean accuracy on the whole test set, the attacks on --n-eval images
        acc["clean"] = e["clean_full"]["accuracy"]
    run = {k: 100 * acc[key] for k, key in MATRIX_ACCURACIES.items() if key in acc}
    if "robust_accuracy" in e:
        run["worst case"] = 100 * e["robust_accuracy"]
    failed, interrupted = mark("FAILED"), mark("INTERRUPTED")
    stale = bool(e) and eval_flags is not None and (mark("eval_config.txt") or "") != eval_flags.strip()
    fgsm, clean, worst = acc.get("fgsm"), e.get("accuracy", {}).get("clean"), e.get("robust_accuracy")  # same images
    collapsed = None not in (fgsm, clean, worst) and fgsm >= clean and fgsm - worst > CO_GAP
    trouble = [f"failed ({failed})" if failed else None, f"interrupted in {interrupted} (resumable)" if interrupted else None,
               "evaluated with other EVAL_FLAGS (redone by the next run_all.sh)" if stale else None,
               "catastrophic overfitting" if s.get("catastrophic_overfitting") else None,
               f"catastrophically overfitted model (clean {100 * clean:.1f}, FGSM "
               f"{100 * fgsm:.1f}, worst case {100 * worst:.1f})"
               if collapsed else None,
               "diverged" if s.get("diverged") else None,
               f"clean accuracy at chance ({100 * clean:.1f})" if e.get("at_chance") else None,
               s.get("stopped_early") if s.get("stopped_early") and not s.get("diverged")
               and not (s.get("catastrophic_overfitting") and "overfitting" in s["stopped_early"]) else None]
    run.update(eps=e.get("eps", s.get("flags", {}).get("epsilon")), n_eval=e.get("n_eval"),
               n_clean=e.get("clean_full", {}).get("n", e.get("n_eval")),
               sanity=(("FAIL: " + ", ".join(e["sanity_failed"])) if e["sanity_failed"] else "pass") if "sanity_checks" in e else None,
               overstated=[w.split()[0] for w in e.get("warnings", [])],
               train_time=s["train_time_s"] if s.get("epochs_completed") else None,
               steps=s.get("counts", {}).get("optimizer_steps"), history=s.get("history", []),
               co_detected=bool(s.get("catastrophic_overfitting") or s.get("co_recoveries")),
               recoveries=len(s.get("co_recoveries") or []), collapsed_final=collapsed,
               activation_params=s.get("activation_params"), activation_values=s.get("activation_values"),
               trouble=[t for t in trouble if t], ok=bool(e) and not failed and not interrupted and not stale)
    return run


def _pm(values, digits=2):
    if not values:
        return "-"
    m, s = mean_std(values)
    return f"{m:.{digits}f}" if len(values) == 1 else f"{m:.{digits}f} ± {s:.{digits}f}"


def matrix_table(out, cells, seeds, baseline="relu", eval_flags=None):
    """The table of a run_all.sh matrix in ``out``: one row per cell (regime, activation) with every
    accuracy as mean ± std over the seeds that finished, the paired difference of the worst case to
    ``baseline`` in the same regime (mean, 95% t-interval, significant when the paired t-test survives
    Holm's correction over the table's comparisons with >= 3 seeds,
    sign agreement), and a flag for any seed that failed, diverged or overfitted catastrophically
    (the training guard fired, or the final model's FGSM accuracy is at least its clean accuracy and
    more than CO_GAP above its worst case).
    Writes results.md / .csv / .json (the cells) and results_seeds.csv (one row per run); returns
    the markdown text."""
    cells = [tuple(c) for c in cells]
    runs = {(g, a, s): matrix_run(os.path.join(out, "runs", f"{g}_{a}_s{s}"), eval_flags)
            for g, a in cells + [(g, baseline) for g, _ in cells] for s in seeds}
    present = [c for c in [*MATRIX_ACCURACIES, "worst case"] if any(c in r for r in runs.values())] or ["clean", "worst case"]
    cols = ["regime", "activation", "eps", "seeds ok", *present, f"worst - {baseline} (95% CI)", "significant",
            "sanity checks", "train time (s)", "activation params", "flags"]
    rows, per_seed = [], []
    for g, a in cells:
        rs = {s: runs[(g, a, s)] for s in seeds}
        ok = {s: r for s, r in rs.items() if r["ok"]}
        eps = next((r["eps"] for r in rs.values() if r["eps"] is not None), None)
        cell = {"regime": g, "activation": a, "eps": f"{eps:.4g}" if eps is not None else "-",
                "seeds ok": f"{len(ok)}/{len(seeds)}"}
        for c in present:
            cell[c] = _pm([r[c] for r in ok.values() if c in r])
        diff, sig = "-", "-"
        base = {s: runs[(g, baseline, s)] for s in seeds} if (g, baseline) in cells and a != baseline else {}
        pairs = [(r["worst case"], base[s]["worst case"]) for s, r in ok.items()
                 if s in base and base[s]["ok"] and "worst case" in r and "worst case" in base[s]]
        stats = paired_difference(*zip(*pairs)) if pairs else None
        if stats:
            diff = f"{stats['mean']:+.2f}" + (f" [{stats['low']:+.2f}, {stats['high']:+.2f}]" if stats["half_width"] is not None else "")
            if stats["half_width"] is None:  # the others get Holm's verdict, below
                sig = "n=1"
        cell[f"worst - {baseline} (95% CI)"], cell["significant"] = diff, sig
        sanity = [f"s{s}: {r['sanity']}" for s, r in ok.items() if r["sanity"] and r["sanity"] != "pass"]
        sanity += [f"s{s}: overstated by {', '.join(r['overstated'])}" for s, r in ok.items() if r["overstated"]]
        cell["sanity checks"] = "; ".join(sanity) or ("pass" if any(r["sanity"] for r in ok.values()) else "-")
        cell["train time (s)"] = _pm([r["train_time"] for r in ok.values() if r["train_time"] is not None], 1)
        cell["activation params"] = str(next((r["activation_params"] for r in rs.values() if r["activation_params"] is not None), "-"))
        flags = [f"s{s}: {', '.join(r['trouble'])}" for s, r in rs.items() if r["trouble"]]
        flags += [f"s{s}: not run" for s, r in rs.items() if not r["ok"] and not r["trouble"]]
        cell["flags"] = "; ".join(flags) or "-"
        cell["paired_difference"] = stats
        rows.append(cell)
        for s, r in rs.items():
            per_seed.append({"regime": g, "activation": a, "seed": s, **{k: v for k, v in r.items() if k != "ok"},
                             "status": "ok" if r["ok"] else ", ".join(r["trouble"]) or "not run",
                             "flags": ", ".join(r["trouble"]) if r["ok"] else ""})
    # the table's comparisons that can be tested (judged), together under Holm's correction so that
    # many comparisons do not make chance look significant
    tested = {i: c["paired_difference"]["p"] for i, c in enumerate(rows)
              if c["paired_difference"] and judged(c["paired_difference"])}
    kept = holm(tested)
    for i, c in enumerate(rows):
        stats = c["paired_difference"]
        if not stats or stats["half_width"] is None:
            continue
        if i not in tested:
            c["significant"] = (f"not judged (n={stats['n']})" if stats["n"] < 3 else
                                "not judged (equal in every seed)")
        else:
            c["significant"] = ("yes" if i in kept else "no" if not stats["significant"] else "no after Holm") + \
                f" (p {stats['p']:.3g})"
        if stats["same_sign"]:
            c["significant"] += f"; same sign in {stats['n']}/{stats['n']}"
    with open(os.path.join(out, "results.csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    # the learned activation parameters (PReLU's a, PSSiLU's a and shift, ...) as JSON, so that a table
    # of learned shapes can be read from the committed CSV alone
    seed_cols = ["regime", "activation", "seed", *present, "eps", "n_eval", "n_clean", "sanity", "train_time",
                 "activation_params", "activation_values", "status", "flags"]
    shown = lambda k, v: (f"{v:.2f}" if isinstance(v, float) and k in present else
                          json.dumps(v, separators=(",", ":")) if k == "activation_values" and v is not None else v)
    with open(os.path.join(out, "results_seeds.csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=seed_cols, extrasaction="ignore")
        w.writeheader()
        w.writerows({k: shown(k, v) for k, v in r.items()} for r in per_seed)
    write_json({"seeds": list(seeds), "baseline": baseline, "cells": rows, "runs": per_seed},
                     os.path.join(out, "results.json"))
    text = "| " + " | ".join(cols) + " |\n|" + "---|" * len(cols) + "\n"
    text += "".join("| " + " | ".join(c[k] for k in cols) + " |\n" for c in rows)
    n = {r["n_eval"] for r in per_seed if r["n_eval"]}
    text += (f"\nmean ± std over seeds {' '.join(map(str, seeds))} (sample std); accuracies in %; "
             "worst case = per-example "
             f"worst over the attacks run, on {'/'.join(map(str, sorted(n))) or '?'} test images; "
             f"'worst - {baseline}' is the paired "
             f"difference over the seeds both finished, with its 95% t-interval (seed-to-seed variance on a "
             f"fixed test subset only); significant = the paired t-test rejects 0 after Holm's correction "
             f"over the table's {len(tested)} comparisons with at least 3 seeds (p: uncorrected); "
             "2 seeds are not judged.\n")
    with open(os.path.join(out, "results.md"), "w") as f:
        f.write(text)
    matrix_figure(per_seed, os.path.join(out, "results.png"))
    shape_sweep_figure(per_seed, os.path.join(out, "shape_sweeps.png"))
    return text


FIXED_SHAPE = re.compile(r"^(psilu|pssilu),.*freeze-act.*act-init=a=([0-9.]+)(?::b=([0-9.]+))?")


def shape_sweep_figure(per_seed, path):
    """shape_sweeps.png (with matplotlib), for STUDY=paf's fixed-shape cells ('psilu,freeze-act,
    act-init=a=A', 'pssilu,freeze-act,act-init=a=1:b=B'): the worst case against the curvature
    max f'' = A / 2 of x sigmoid(A x) (log axis) and against PSSiLU's shift B, each seed a dot and the
    means joined; the same regime's ReLU mean as a dashed line.  Returns the path, or None when
    there is no such cell (or no matplotlib)."""
    plt = pyplot()
    runs = [r for r in per_seed if r.get("worst case") is not None and r.get("status") == "ok"]
    sweeps, regimes = {"curvature": {}, "shift": {}}, set()
    for r in runs:
        m = FIXED_SHAPE.match(r["activation"])
        regimes |= {r["regime"]} if m else set()
        if m and m.group(1) == "psilu":
            sweeps["curvature"].setdefault(float(m.group(2)) / 2, []).append(r["worst case"])
        elif m and m.group(1) == "pssilu" and m.group(3) is not None:
            sweeps["shift"].setdefault(float(m.group(3)), []).append(r["worst case"])
    if plt is None or not any(sweeps.values()):
        return None
    relu = [r["worst case"] for r in runs if r["activation"] == "relu" and r["regime"] in regimes]
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8), sharey=True)
    titles = {"curvature": ("fixed x sigmoid(a x)", "max f'' = a / 2", "log"),
              "shift": ("fixed PSSiLU, a = 1", "shift beta (output on negative inputs)", "linear")}
    for ax, (kind, points) in zip(axes, sweeps.items()):
        title, xlabel, scale = titles[kind]
        xs = sorted(points)
        for x in xs:
            ax.plot([x] * len(points[x]), points[x], "k.", markersize=5)
        ax.plot(xs, [mean_std(points[x])[0] for x in xs], "-o", color="tab:blue", markersize=3, label="mean over seeds")
        if relu:
            ax.axhline(mean_std(relu)[0], color="0.4", linestyle="--", linewidth=1, label="relu (mean)")
        ax.set(title=title, xlabel=xlabel, xscale=scale, ylabel="worst-case accuracy (%)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    save_figure(fig, path, dpi=100, bbox_inches="tight")
    plt.close(fig)
    return path


def matrix_figure(per_seed, path):
    """results.png (with matplotlib): the worst case of every cell, a panel per regime, a row per
    activation: each seed's value as a dot, their mean as a bar, so the seed spread is seen next to
    the differences.  ``per_seed``: matrix_table's rows (regime, activation, seed, 'worst case', ...);
    runs without a worst case are left out.  Returns the path, or None."""
    plt = pyplot()
    runs = [r for r in per_seed if r.get("worst case") is not None and r.get("status") == "ok"]
    if plt is None or not runs:
        return None
    regimes = list(dict.fromkeys(r["regime"] for r in runs))
    acts = list(dict.fromkeys(r["activation"] for r in runs))
    fig, axes = plt.subplots(1, len(regimes), figsize=(4.5 * len(regimes), 0.35 * len(acts) + 1.5), sharey=True,
                             squeeze=False)
    for ax, g in zip(axes[0], regimes):
        for i, a in enumerate(acts):
            values = [r["worst case"] for r in runs if r["regime"] == g and r["activation"] == a]
            if values:
                ax.barh(i, mean_std(values)[0], color="0.8")
                ax.plot(values, [i] * len(values), "k.", markersize=5)
        ax.set(title=REGIME_NAMES.get(g, g), xlabel="worst-case accuracy (%)")
        ax.grid(axis="x", alpha=0.3)
    axes[0][0].set_yticks(range(len(acts)), acts, fontsize=8)
    axes[0][0].invert_yaxis()
    save_figure(fig, path, dpi=100, bbox_inches="tight")
    plt.close(fig)
    return path


SAF_METRICS = {"adversarial": ("accuracy", "accuracy on targeted-FGS adversarial samples"),
               "nonsense": ("nonsense", "share of nonsense samples rejected as nonsense"),
               "noisy": ("accuracy", "accuracy on noisy samples")}


def curve_table(out, cells, seeds, share=0.95):
    """Accuracy over iterations (the --eval-every probes in summary.json's "curve") of every cell
    that has them, for the schedule study: per cell the final and best probe accuracies (mean over
    seeds) and the iterations each seed took to reach ``share`` of the best final probe PGD accuracy
    of all cells (the fast-schedule thesis's "iterations to a given accuracy").  Writes curves.md,
    curves.json and, with matplotlib, curves.png (clean and PGD accuracy over iterations, a line per
    cell, mean over seeds).  Returns the markdown, or None when no run has a curve."""
    found = {}
    for g, a in cells:
        per_seed = {}
        for s in seeds:
            path = os.path.join(out, "runs", f"{g}_{a}_s{s}", "summary.json")
            if os.path.exists(path) and (c := read_json(path).get("curve")):
                per_seed[s] = c
        if per_seed:
            found[(g, a)] = per_seed
    if not found:
        return None
    final = {k: mean_std([c[-1]["pgd_acc"] for c in v.values()])[0] for k, v in found.items()}
    target = share * max(final.values())
    rows, text = [], (f"| regime | activation | seeds | steps | final clean (probe) | final PGD-10 "
                      "(probe) | best PGD-10 (probe) | "
                      f"steps to {100 * share:.0f}% of the best final PGD-10 ({100 * target:.1f}%) "
                      "|\n|" + "---|" * 8 + "\n")
    for (g, a), per_seed in found.items():
        reach = {s: next((p["iteration"] for p in c if p["pgd_acc"] >= target), None) for s, c in per_seed.items()}
        reached = [v for v in reach.values() if v is not None]
        reach_text = _pm(reached, 0) if reached else "never"
        if reached and len(reached) < len(reach):
            reach_text += " (" + ", ".join(f"s{s} never" for s, v in reach.items() if v is None) + ")"
        pm = lambda key, pick: _pm([100 * pick(c, key) for c in per_seed.values()])
        row = {"regime": g, "activation": a, "seeds": len(per_seed), "steps": max(c[-1]["iteration"] for c in per_seed.values()),
               "final_clean": pm("clean_acc", lambda c, k: c[-1][k]), "final_pgd": pm("pgd_acc", lambda c, k: c[-1][k]),
               "best_pgd": pm("pgd_acc", lambda c, k: max(p[k] for p in c)), "steps_to_target": reach_text,
               "steps_to_target_per_seed": reach,
               "curve": [{"iteration": p["iteration"], "lr": p["lr"],
                          "clean_acc": mean_std([c[i]["clean_acc"] for c in per_seed.values() if i < len(c)])[0],
                          "pgd_acc": mean_std([c[i]["pgd_acc"] for c in per_seed.values() if i < len(c)])[0]}
                         for i, p in enumerate(max(per_seed.values(), key=len))]}
        rows.append(row)
        text += (f"| {g} | {a} | {row['seeds']} | {row['steps']} | {row['final_clean']} | "
                 f"{row['final_pgd']} | "
                 f"{row['best_pgd']} | {reach_text} |\n")
    text += "\nprobe: clean and PGD-10 accuracy on the first held-out test images every --eval-every steps; mean ± std over seeds, %\n"
    write_json({"share": share, "target_pgd_acc": target, "cells": rows}, os.path.join(out, "curves.json"))
    with open(os.path.join(out, "curves.md"), "w") as f:
        f.write(text)
    plt = pyplot()
    if plt is not None:
        fig, axes = plt.subplots(1, 2, figsize=(14, 5))
        for ax, key, title in ((axes[0], "clean_acc", "clean accuracy (probe)"), (axes[1], "pgd_acc", "PGD-10 accuracy (probe)")):
            # past ten lines the colours repeat: change the line style
            for i, row in enumerate(rows):
                ax.plot([p["iteration"] for p in row["curve"]], [100 * p[key] for p in row["curve"]], label=row["activation"],
                        linestyle=("-", "--", ":")[i // 10 % 3])
            ax.set(xlabel="optimiser steps", ylabel="%", title=title)
            ax.grid(alpha=0.3)
        axes[1].axhline(100 * target, color="k", linestyle="--", linewidth=0.8)
        axes[1].legend(fontsize=7)
        save_figure(fig, os.path.join(out, "curves.png"), bbox_inches="tight")
        plt.close(fig)
    return text


def saf_features(out, cells, seeds):
    """The runs' analysis/features.json (analyze.py --features), read once: {(regime, act, seed):
    its content} for the runs that have one."""
    found = {}
    for g, a in cells:
        for s in seeds:
            path = os.path.join(out, "runs", f"{g}_{a}_s{s}", "analysis", "features.json")
            if os.path.exists(path):
                found[(g, a, s)] = read_json(path)
    return found


def saf_feature_rows(features, cells, seeds):
    """Zhao & Griffin's Figure 1 test per cell from the runs' features (saf_features), in %: the
    AUROC of the feature distance for noisy and for nonsense images against clean ones, and the
    nonsense images' share beyond the clean 99th percentile, one value per seed that has it.  []
    when no run has been analysed."""
    rows = []
    for g, a in cells:
        found = [features[(g, a, s)] for s in seeds if (g, a, s) in features]
        if found:
            rows.append({"regime": g, "activation": a, "seeds": len(found),
                         "auroc noisy": [100 * f["noisy"]["auroc_vs_clean"] for f in found],
                         "auroc nonsense": [100 * f["nonsense"]["auroc_vs_clean"] for f in found],
                         "nonsense beyond q99": [100 * f["nonsense"]["share_beyond_clean_q99"] for f in found]})
    return rows


def write_saf_seeds(out, runs, betas, features):
    """saf_seeds.csv: one row per run that has the curves (``runs``: {(regime, act, seed): the
    eval.json's saf_curves}, as saf_table read them), in %: each curve at each beta ('nonsense beta
    0.1') and, where the run was analysed (``features``: saf_features), the feature test's three
    numbers, so that a family of paired comparisons over seeds can be read back from the committed
    file (--compare ... --column)."""
    cols = ["regime", "activation", "seed", "status", "score", "threshold"]
    cols += [f"{kind} beta {b}" for kind in SAF_METRICS for b in betas]
    cols += ["auroc noisy", "auroc nonsense", "nonsense beyond q99"]
    rows = []
    for (g, a, s), curves in runs.items():
        row = {"regime": g, "activation": a, "seed": s, "status": "ok", "score": curves.get("confidence", "softmax"),
               "threshold": f"{curves['threshold']:.4g}"}
        for kind, (key, _) in SAF_METRICS.items():
            row.update({f"{kind} beta {b}": f"{100 * curves[kind][b][key]:.2f}" for b in betas if b in curves[kind]})
        if (g, a, s) in features:
            f = features[(g, a, s)]
            row.update({"auroc noisy": f"{100 * f['noisy']['auroc_vs_clean']:.2f}",
                        "auroc nonsense": f"{100 * f['nonsense']['auroc_vs_clean']:.2f}",
                        "nonsense beyond q99": f"{100 * f['nonsense']['share_beyond_clean_q99']:.2f}"})
        rows.append(row)
    with open(os.path.join(out, "saf_seeds.csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols)
        w.writeheader()
        w.writerows(rows)


def saf_table(out, cells, seeds):
    """Zhao & Griffin's three curves (eval.py --saf-curves) of every cell, mean ± std over the seeds
    that have them: saf_curves.md (a table per kind, a column per beta), saf_curves.json and, with
    matplotlib, saf_curves.png (a panel per kind, a line per cell); saf_seeds.csv (write_saf_seeds).
    Returns the markdown, or None when no run has the curves."""
    curves, per_run = {}, {}  # per cell: the seeds' curves; per (regime, act, seed): its curves
    for g, a in cells:
        found = []
        for s in seeds:
            path = os.path.join(out, "runs", f"{g}_{a}_s{s}", "eval.json")
            if os.path.exists(path) and "saf_curves" in (e := read_json(path)):
                found.append(e["saf_curves"])
                per_run[(g, a, s)] = e["saf_curves"]
        if found:
            curves[(g, a)] = found
    if not curves:
        return None
    first = next(iter(curves.values()))[0]
    betas = list(first["adversarial"])
    summary, text = {"threshold": first["threshold"], "accept_clean": first.get("accept_clean"), "betas": betas,
                     "cells": []}, ""
    for kind, (key, title) in SAF_METRICS.items():
        rule = (f"the threshold that {100 * first['accept_clean']:g}% of its clean images reach, per model"
                if first.get("accept_clean") else f"{first['threshold']:g}")
        text += (f"\n**{title}** (a prediction is nonsense when its best confidence score is below "
                 f"{rule}; mean ± std over seeds, %)\n\n"
                 f"| regime | activation | score | seeds | " + " | ".join(f"beta {b}" for b in betas) + " |\n|" + "---|" * (4 + len(betas)) + "\n")
        for (g, a), found in curves.items():
            values = {b: [100 * c[kind][b][key] for c in found if b in c[kind]] for b in betas}
            text += (f"| {g} | {a} | {found[0].get('confidence', 'softmax')} | {len(found)} | "
                     + " | ".join(_pm(values[b], 1) for b in betas) + " |\n")
            summary["cells"].append({"regime": g, "activation": a, "kind": kind, "metric": key, "seeds": len(found),
                                     "mean": {b: mean_std(v)[0] for b, v in values.items() if v},
                                     "std": {b: mean_std(v)[1] for b, v in values.items() if v}})
    per_run_features = saf_features(out, cells, seeds)
    features = saf_feature_rows(per_run_features, cells, seeds)
    write_saf_seeds(out, per_run, betas, per_run_features)
    if features:
        text += ("\n**Penultimate features** (`analyze.py CKPT --features`: Mahalanobis distance to the clean "
                 "features' Gaussian; AUROC of that distance separating noisy / nonsense images from clean "
                 "ones, 0.5 = none; share beyond the clean 99th percentile; mean ± std over seeds, %)\n\n"
                 "| regime | activation | seeds | AUROC noisy | AUROC nonsense | nonsense beyond clean q99 |\n"
                 "|---|---|---|---|---|---|\n")
        for row in features:
            text += (f"| {row['regime']} | {row['activation']} | {row['seeds']} | " +
                     " | ".join(_pm(row[k], 1) for k in ("auroc noisy", "auroc nonsense", "nonsense beyond q99")) + " |\n")
        summary["features"] = features
    with open(os.path.join(out, "saf_curves.md"), "w") as f:
        f.write(text.lstrip())
    write_json(summary, os.path.join(out, "saf_curves.json"))
    plt = pyplot()
    if plt is not None:
        fig, axes = plt.subplots(1, 3, figsize=(18, 4.5))
        for ax, (kind, (key, title)) in zip(axes, SAF_METRICS.items()):
            for i, c in enumerate(c for c in summary["cells"] if c["kind"] == kind):
                ax.plot([float(b) for b in c["mean"]], list(c["mean"].values()), marker="o", label=f"{c['regime']} {c['activation']}",
                        linestyle=("-", "--", ":")[i // 10 % 3])
            ax.set(xlabel="beta", ylabel="%", title=title, ylim=(0, 100))
            ax.grid(alpha=0.3)
        axes[-1].legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1))  # beside the curves, not on them
        save_figure(fig, os.path.join(out, "saf_curves.png"), bbox_inches="tight")
        plt.close(fig)
    return text.lstrip()


def fastat_table(out, cells, seeds, baseline):
    """STUDY=fastat's table, when a cell sets --co-action: per cell, the seeds in which training
    detected catastrophic overfitting (the guard stopped or recovered), the recoveries, the seeds
    whose final model is still collapsed (FGSM >= clean and far above the worst case), the worst case
    (mean ± std) and the training time relative to ``baseline``'s (mean over seeds of the per-seed
    ratio), in all and per optimiser step (a stopped run is short; its method is not cheaper); then
    the paired effects of recovering and of averaging (``fastat_effects``).  Writes fastat.md / .json;
    returns the markdown or None."""
    cells = [tuple(c) for c in cells]
    if not any("co-action=" in a for _, a in cells):
        return None
    runs = {(g, a, s): matrix_run(os.path.join(out, "runs", f"{g}_{a}_s{s}")) for g, a in cells for s in seeds}
    rows = []
    for g, a in cells:
        ok = {s: runs[(g, a, s)] for s in seeds if runs[(g, a, s)]["ok"]}
        base = {s: runs.get((g, baseline, s)) for s in seeds}
        ratios = lambda measure: [measure(r) / measure(base[s]) for s, r in ok.items()
                                  if base[s] and base[s]["ok"] and measure(r) and measure(base[s])]
        missed = [s for s, r in ok.items() if not r["co_detected"] and relative_drop_epoch(r["history"], RELATIVE_DROP)]
        rows.append({"cell": a, "seeds": len(ok), "collapse detected": sum(r["co_detected"] for r in ok.values()),
                     f"guard silent, probe below {RELATIVE_DROP:g} x its best": len(missed),
                     "recoveries": sum(r["recoveries"] for r in ok.values()),
                     "collapsed at the end": sum(bool(r["collapsed_final"]) for r in ok.values()),
                     "worst case": _pm([r["worst case"] for r in ok.values() if "worst case" in r]),
                     "clean": _pm([r["clean"] for r in ok.values() if "clean" in r]),
                     "time / " + baseline: _pm(ratios(total_time)),
                     "time per step / " + baseline: _pm(ratios(step_time))})
    cols = list(rows[0])
    text = "| " + " | ".join(cols) + " |\n|" + "---|" * len(cols) + "\n"
    text += "".join("| " + " | ".join(str(r[k]) for k in cols) + " |\n" for r in rows)
    text += ("\ncollapse detected: seeds whose training guard fired (stopped or recovered); guard silent: seeds "
             f"whose guard did not fire though the guard's PGD probe fell below {RELATIVE_DROP:g} x its best "
             "epoch's (what --co-guard-relative would catch); collapsed at the end: seeds whose final model has "
             f"FGSM accuracy >= clean and > {100 * CO_GAP:.0f} points above its worst case; accuracies in % "
             "(mean ± std over seeds).\n")
    effects = fastat_effects(runs, cells, seeds)
    if effects:
        text += ("\n| effect | cell | seeds | worst case, difference [95% CI] | p | Holm |\n|---|---|---|---|---|---|\n"
                 + "".join(f"| {e['effect']} | {e['cell']} | {e['n']} | {e['difference']} | {e['p']} | {e['holm']} |\n"
                           for e in effects)
                 + f"\nrecover - stop: the same cell with --co-action stop (cells whose guard fired in no seed, which "
                 f"trained as their stop cell, are left out); averaging: the same cell without --ema and "
                 f"--label-smoothing; paired over the seeds both finished; Holm over the {len(effects)} comparisons.\n")
    write_json({"seeds": list(seeds), "baseline": baseline, "cells": rows, "effects": effects},
               os.path.join(out, "fastat.json"))
    with open(os.path.join(out, "fastat.md"), "w") as f:
        f.write(text)
    return text


def total_time(run):
    return run["train_time"]


def step_time(run):
    return run["train_time"] / run["steps"] if run["train_time"] and run["steps"] else None


def relative_drop_epoch(history, fraction):
    """The first epoch whose guard probe (a run's summary.json history) fell below ``fraction``
    x the best of the epochs before it, or None: the rule of utils.overfitting_rule's
    --co-guard-relative, applied afterwards (here, so that tables.py needs no torch)."""
    best = None
    for row in history:
        held = row.get("held_pgd_acc")
        if held is None:
            continue
        if best is not None and held < fraction * best:
            return row["epoch"]
        best = held if best is None else max(best, held)
    return None


def fastat_effects(runs, cells, seeds):
    """The two paired effects STUDY=fastat asks about, per cell that has a partner: recovering against
    stopping (``co-action=recover`` against the same cell with ``co-action=stop``, where the guard fired
    in at least one seed) and weight averaging + label smoothing against neither (the cell without its
    ``ema=`` / ``label-smoothing=`` parts): the worst case's paired difference over seeds, its p and
    whether it survives Holm over all of them that can be tested (judged)."""
    names = {a for _, a in cells}
    plain = lambda a: ",".join(p for p in a.split(",") if not p.startswith(("ema=", "label-smoothing=")))
    # a recover cell whose guard fired in no seed trained as its stop cell did: nothing to compare
    pairs = [("recover - stop", g, a, a.replace("co-action=recover", "co-action=stop"))
             for g, a in cells if "co-action=recover" in a
             and any(runs[(g, a, s)]["ok"] and runs[(g, a, s)]["co_detected"] for s in seeds)]
    pairs += [("averaging + smoothing - plain", g, a, plain(a)) for g, a in cells if plain(a) != a]
    effects = []
    for effect, g, a, b in pairs:
        if b not in names:
            continue
        both = [s for s in seeds if runs[(g, a, s)]["ok"] and runs[(g, b, s)]["ok"]
                and "worst case" in runs[(g, a, s)] and "worst case" in runs[(g, b, s)]]
        if len(both) < 2:
            continue
        d = paired_difference([runs[(g, a, s)]["worst case"] for s in both],
                              [runs[(g, b, s)]["worst case"] for s in both])
        effects.append({"effect": effect, "cell": a, "n": d["n"], "mean": d["mean"], "p_value": d["p"], "judged": judged(d),
                        "difference": f"{d['mean']:+.2f} [{d['low']:+.2f}, {d['high']:+.2f}]",
                        "p": f"{d['p']:.2g}"})
    kept = holm({i: e["p_value"] for i, e in enumerate(effects) if e["judged"]})
    for i, e in enumerate(effects):
        e["holm"] = "yes" if i in kept else "no" if e["judged"] else "not judged"
    return effects


def paired_family(values, base, cells):
    """A family of paired comparisons: ``values`` {cell: {seed: value}}; each of ``cells`` against
    ``base`` over the seeds both have (paired_difference), with "holm": yes / no / not judged, Holm's
    correction over the family's judged comparisons.  One dict per cell, in order."""
    rows = []
    for cell in cells:
        both = sorted(set(values[cell]) & set(values[base]), key=int)
        rows.append(paired_difference([values[cell][s] for s in both], [values[base][s] for s in both]))
    kept = holm({i: r["p"] for i, r in enumerate(rows) if judged(r)})
    for i, r in enumerate(rows):
        r["holm"] = "yes" if i in kept else "no" if judged(r) else "not judged"
    return rows


def compare_table(per_seed_csv, base, cells, column="worst case"):
    """A family of paired comparisons read from a results_seeds.csv: each of ``cells`` ('regime:act')
    against ``base`` in ``column`` over the seeds both finished (status ok), with its 95% t-interval,
    the uncorrected p and whether it survives Holm's correction over these cells (5% family-wise;
    a cell with fewer than 3 paired seeds, or the same difference in every seed, is not judged).
    Returns the markdown table."""
    value, (table, columns) = {}, read_csv(per_seed_csv)  # {cell: {seed: value}}
    if column not in columns:
        raise ValueError(f"no column '{column}' in {per_seed_csv} (it has: {', '.join(columns)})")
    for r in table:
        if r.get("status") == "ok" and r.get(column) not in (None, ""):
            value.setdefault(f"{r['regime']}:{r['activation']}", {})[r["seed"]] = float(r[column])
    missing = [c for c in [base, *cells] if c not in value]
    if missing:
        raise ValueError(f"no finished run of {', '.join(missing)} in {per_seed_csv}")
    in_order = lambda cell: [value[cell][s] for s in sorted(value[cell], key=int)]
    rows = [{"cell": cell, "values": in_order(cell), **d} for cell, d in zip(cells, paired_family(value, base, cells))]
    family = sum(judged(r) for r in rows)
    text = f"| cell | {column} | - {base} [95% CI] | p | Holm (over {family}) | same sign |\n|---|---|---|---|---|---|\n"
    text += f"| {base} | {_pm(in_order(base))} | - | - | - | - |\n"
    for r in rows:
        ci = f" [{r['low']:+.2f}, {r['high']:+.2f}]" if r["half_width"] is not None else ""
        p = "-" if r["p"] is None else f"{r['p']:.2g}"
        same = f"{r['n']}/{r['n']}" if r["same_sign"] else "no"
        if r["n"] >= 3 and not judged(r):
            p = "- (equal in every seed)"
        text += f"| {r['cell']} | {_pm(r['values'])} | {r['mean']:+.2f}{ci} (n={r['n']}) | {p} | {r['holm']} | {same} |\n"
    return text


def pooled_runs(per_seed):
    """{(regime, act, seed): row} of the per-seed rows that finished with a worst case, a run given
    twice counting once (the later row)."""
    runs = {}
    for r in per_seed:
        if r.get("status") == "ok" and r.get("worst case") not in (None, "", "-"):
            runs[(r["regime"], r["activation"], r["seed"])] = r
    return runs


def pooled_cells(per_seed, baseline="relu"):
    """Cells computed from per-seed rows (results_seeds.csv rows with ``source`` and ``order``; a run
    given twice counts once, the later row): worst case and clean as mean ± std over the finished
    seeds, the paired difference to ``baseline`` of the same regime over the seeds both finished,
    Holm's correction over each regime's judged comparisons.  Rows shaped like results.csv's."""
    by_cell = {}  # {(regime, act): {seed: row}}
    for (g, a, s), r in pooled_runs(per_seed).items():
        by_cell.setdefault((g, a), {})[s] = r
    diff_col, rows = f"worst - {baseline} (95% CI)", {}
    for (g, a), seeds in by_cell.items():
        last = max(seeds.values(), key=lambda r: r["order"])
        rows[(g, a)] = {"regime": g, "activation": a, "worst case": _pm([float(r["worst case"]) for r in seeds.values()]),
                        "clean": _pm([float(r["clean"]) for r in seeds.values()]), diff_col: "-", "significant": "-",
                        "source": last["source"], "order": last["order"]}
    worst = {cell: {s: float(r["worst case"]) for s, r in seeds.items()} for cell, seeds in by_cell.items()}
    for g in dict.fromkeys(g for g, _ in by_cell):
        base = (g, baseline)
        # the regime's family: every other cell with two seeds shared with the baseline
        family = [c for c in by_cell if c[0] == g and c != base and base in by_cell
                  and len(set(worst[c]) & set(worst[base])) >= 2]
        for c, d in zip(family, paired_family(worst, base, family)):
            rows[c][diff_col] = f"{d['mean']:+.2f} [{d['low']:+.2f}, {d['high']:+.2f}]"
            rows[c]["significant"] = "not judged" if d["holm"] == "not judged" else f"{d['holm']} (p {d['p']:.2g})"
    return list(rows.values())


def autoattack_table(out, folders):
    """eval.py's presets against AutoAttack on the same images, one row per model folder.  Each folder
    holds eval_autoattack.json (``eval.py CKPT --attacks autoattack``) and, as eval_NAME.json, the
    evaluations to compare (e.g. eval_quick.json, eval_standard.json), all on the same --n-eval images
    and seed.  Per evaluation: robust accuracy in % (marked "escalated" when the masking escalation
    ran), its time_s, and the images robust under it only / under AutoAttack only (from the per-image
    robust_images).  Writes out/autoattack.md and .csv (+ autoattack.png with matplotlib: accuracy
    and time per model).  Returns the markdown table."""
    rows = []
    for folder in folders:
        reference = read_json(os.path.join(folder, "eval_autoattack.json"))
        compared = sorted(f[5:-5] for f in os.listdir(folder)
                          if f.startswith("eval_") and f.endswith(".json") and f != "eval_autoattack.json")
        for name in ["autoattack"] + compared:
            result = reference if name == "autoattack" else read_json(os.path.join(folder, f"eval_{name}.json"))
            if result["n_eval"] != reference["n_eval"]:
                raise ValueError(f"{folder}: eval_{name}.json has {result['n_eval']} images, "
                                 f"eval_autoattack.json {reference['n_eval']}")
            ours, theirs = set(result["robust_images"]), set(reference["robust_images"])
            rows.append({"model": os.path.basename(os.path.normpath(folder)), "evaluation": name,
                         "n": result["n_eval"], "robust": round(100 * result["robust_accuracy"], 2),
                         "time_s": result["time_s"], "escalated": bool(result.get("escalation")),
                         "only_this": len(ours - theirs), "only_autoattack": len(theirs - ours)})
    names = list(dict.fromkeys(r["evaluation"] for r in rows if r["evaluation"] != "autoattack"))
    models = list(dict.fromkeys(r["model"] for r in rows))
    get = {(r["model"], r["evaluation"]): r for r in rows}
    cols = ["model", "AutoAttack (time s)"]
    for name in names:
        cols += [f"{name} (time s)", f"{name} only / AutoAttack only"]
    text = "| " + " | ".join(cols) + " |\n|" + "---|" * len(cols) + "\n"
    for m in models:
        aa = get[(m, "autoattack")]
        cells = [m, f"{aa['robust']:.2f} ({aa['time_s']:.0f})"]
        for name in names:
            r = get.get((m, name))
            cells += ["-", "-"] if r is None else [
                f"{r['robust']:.2f}{' escalated' if r['escalated'] else ''} ({r['time_s']:.0f})",
                f"{r['only_this']} / {r['only_autoattack']}"]
        text += "| " + " | ".join(cells) + " |\n"
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "autoattack.md"), "w") as f:
        f.write(text)
    with open(os.path.join(out, "autoattack.csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    plt = pyplot()
    if plt is not None:
        fig, axes = plt.subplots(1, 2, figsize=(11, 0.6 * len(models) * (len(names) + 1) / 2 + 1.5), sharey=True)
        height = 0.8 / (len(names) + 1)
        for k, name in enumerate(["autoattack"] + names):
            ys = [i + (k - len(names) / 2) * height for i in range(len(models))]
            for ax, key in zip(axes, ("robust", "time_s")):
                ax.barh(ys, [get[(m, name)][key] if (m, name) in get else 0 for m in models], height,
                        label="AutoAttack" if name == "autoattack" else name)
        axes[0].set(xlabel=f"robust accuracy (%), {rows[0]['n']} images", title="robust accuracy")
        axes[1].set(xlabel="seconds", title="evaluation time")
        axes[0].set_yticks(range(len(models)), models, fontsize=8)
        axes[0].invert_yaxis()
        for ax in axes:
            ax.grid(axis="x", alpha=0.3)
        axes[1].legend(fontsize=8)
        save_figure(fig, os.path.join(out, "autoattack.png"), dpi=100, bbox_inches="tight")
        plt.close(fig)
    return text


REGIME_NAMES = {"fast": "FGSM-RS", "free": "Free", "pgd": "PGD", "natural": "natural"}


def read_per_seed(paths):
    """The rows of the per-seed files (a ``seed`` column) among ``paths``, each with its ``source``
    and ``order`` (the file's place), and the other files' rows the same way: (per_seed, other)."""
    per_seed, other = [], []
    for i, path in enumerate(paths):
        table, columns = read_csv(path)
        rows = [dict(r, source=path, order=i) for r in table]
        (per_seed if "seed" in columns else other).extend(rows)
    return per_seed, other


def grid_figure(per_seed, path):
    """The matrix figure (matrix_figure: a dot per seed, the mean as a bar, a panel per regime) of the
    per-seed rows (read_per_seed's first part), pooled as --grid pools them.  Returns the path, or
    None (no per-seed row, or no matplotlib)."""
    runs = pooled_runs(per_seed)
    return matrix_figure([dict(r, **{"worst case": float(r["worst case"])}) for r in runs.values()], path)


def grid_table(per_seed, rows, against=None):
    """The matrix as one row per activation and a column pair per regime, from the rows of one or
    more files as read_per_seed splits them (results.csv files of matrix_table; a cell in several:
    the last file's): the worst case (mean ± std, clean accuracy in brackets) and its paired
    difference to the baseline, in bold when it survives Holm's correction of its own table.  A
    per-seed file (results_seeds.csv, a ``seed`` column) is pooled with the other per-seed files (a
    run in several: the last one's) and its cells computed from the pooled seeds, one Holm family
    per regime (pooled_cells): a regime re-run in parts is judged as one table.  ``against``: an
    earlier results.csv of the same cells; each cell read from another file then also gives how far
    its mean worst case moved from that one's, and each cell still read from it is marked † (so a
    matrix re-run in parts can be shown whole, the parts not yet re-run as they were).  Returns the
    markdown."""
    if per_seed:  # one row per cell from the pooled seeds, placed where its last file stands
        rows = sorted(rows + pooled_cells(per_seed), key=lambda r: r["order"])
    before = {(r["regime"], r["activation"]): r for r in read_csv(against)[0]} if against else {}
    mean = lambda text: float(text.split(" ± ")[0])
    regimes = list(dict.fromkeys(r["regime"] for r in rows))
    acts = list(dict.fromkeys(r["activation"] for r in rows))
    cell = {(r["regime"], r["activation"]): r for r in rows}
    diff_col = next(k for k in rows[0] if k.startswith("worst - "))
    text = "| activation | " + " | ".join(f"{REGIME_NAMES.get(g, g)}: worst case (clean) | {diff_col.replace(' (95% CI)', '')} [95% CI]"
                                          for g in regimes) + " |\n|---|" + "---|---|" * len(regimes) + "\n"
    for a in acts:
        parts = []
        for g in regimes:
            r = cell.get((g, a))
            if r is None or r["worst case"] in ("", "-"):
                parts += ["-", "-"]
                continue
            moved, not_rerun = "", against and os.path.abspath(r["source"]) == os.path.abspath(against)
            if (g, a) in before and before[(g, a)]["worst case"] not in ("", "-") and not not_rerun:
                shift = round(mean(r["worst case"]) - mean(before[(g, a)]["worst case"]), 1) + 0.0  # no "-0.0"
                moved = f"; {shift:+.1f}"
            d = r[diff_col]
            parts += [f"{r['worst case']} ({mean(r['clean']):.1f}{moved}){' †' if not_rerun else ''}",
                      f"**{d}**" if r["significant"].startswith("yes") else d]
        text += f"| {a} | " + " | ".join(parts) + " |\n"
    return text


def main(argv=None):
    """Write every table run_all.sh shows and print them (the matrix, then the curves that
    exist); or, with --compare, print one family of paired comparisons from a per-seed CSV; --grid,
    a matrix from per-seed CSVs; --autoattack, eval.py's presets against AutoAttack."""
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "--grid":
        files = argv[1:]
        option = {"--against": None, "--plot": None}
        for flag in option:
            if flag in files[:-1]:
                i = files.index(flag)
                option[flag], files = files[i + 1], files[:i] + files[i + 2:]
        against, plot = option["--against"], option["--plot"]
        if not files or files[-1] in option:
            print("usage: python tables.py --grid results.csv|results_seeds.csv [...] [--against earlier/results.csv] "
                  "[--plot matrix.png]", file=sys.stderr)
            return 2
        try:
            per_seed, other = read_per_seed(files)  # read once, for the table and the figure
            print(grid_table(per_seed, other, against), end="")
            if plot:
                print(f"-> {grid_figure(per_seed, plot) or 'no figure (no per-seed file, or no matplotlib)'}")
        except (OSError, ValueError, KeyError, StopIteration) as err:
            print(f"tables.py: cannot read {' '.join(files)}: {err!r}", file=sys.stderr)
            return 2
        return 0
    if argv and argv[0] == "--autoattack":
        if len(argv) < 3:
            print("usage: python tables.py --autoattack OUT FOLDER [FOLDER ...]  (each with eval_autoattack.json "
                  "and eval_NAME.json)", file=sys.stderr)
            return 2
        try:
            print(autoattack_table(argv[1], argv[2:]), end="")
        except (OSError, ValueError, KeyError) as err:
            print(f"tables.py: {err}", file=sys.stderr)
            return 2
        print(f"-> {argv[1]}/autoattack.md, autoattack.csv (+ autoattack.png with matplotlib)")
        return 0
    if argv and argv[0] == "--compare":
        column = "worst case"
        if "--column" in argv:
            i = argv.index("--column")
            column, argv = (argv[i + 1] if i + 1 < len(argv) else ""), argv[:i] + argv[i + 2:]
        if len(argv) < 4 or not column:
            print("usage: python tables.py --compare results_seeds.csv BASE CELL [CELL ...] [--column NAME]", file=sys.stderr)
            return 2
        try:
            print(compare_table(argv[1], argv[2], argv[3:], column), end="")
        except (OSError, ValueError, KeyError) as err:
            print(f"tables.py: {err}", file=sys.stderr)
            return 2
        return 0
    if not 3 <= len(argv) <= 5:
        print("usage: python tables.py OUT 'regime:act ...' 'seed ...' [BASELINE] [EVAL_FLAGS]", file=sys.stderr)
        return 2
    out, cells = argv[0], [c.split(":", 1) for c in argv[1].split()]
    seeds = [int(s) for s in argv[2].split()]
    baseline = argv[3] if len(argv) > 3 else "relu"
    eval_flags = argv[4] if len(argv) > 4 else None
    print(matrix_table(out, cells, seeds, baseline=baseline, eval_flags=eval_flags), end="")
    print(f"{len(cells)} rows x {len(seeds)} seeds -> {out}/results.md, results.csv, results.json, "
          f"results_seeds.csv")
    curves = curve_table(out, cells, seeds)
    if curves:
        print(curves, end="")
        print(f"-> {out}/curves.md, curves.json (+ curves.png with matplotlib)")
    fastat = fastat_table(out, cells, seeds, baseline)
    if fastat:
        print(fastat, end="")
        print(f"-> {out}/fastat.md, fastat.json")
    saf = saf_table(out, cells, seeds)
    if saf:
        print(saf, end="")
        print(f"-> {out}/saf_curves.md, saf_curves.json (+ saf_curves.png with matplotlib)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
