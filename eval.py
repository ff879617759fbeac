"""Evaluate a checkpoint: the one evaluation entry point (attacks, noise, nonsense, sanity checks).

The model is rebuilt from the checkpoint alone (models.load_checkpoint) and attacked in eval mode and
float32 (also when it was trained with AMP), batched (--batch-size), on --device.  eps (L-inf) defaults
to the training epsilon.  The attacks run in AutoAttack's order: each one only on the images that the
clean pass and every earlier attack left standing, so an image counts as robust only if no attack
breaks it (the per-example worst case, by construction) and the later, costly attacks run on the
survivors alone.  accuracy[name] is the accuracy left after that attack and every one before it
(AutoAttack's report; the last is the headline); the 'cascade' list gives, per attack, the images it
attacked and broke and its time.

Presets (--preset; --attacks replaces the attack list, or adds to it with +NAME):
  basic     (default when neither --preset nor --attacks is given) clean, FGSM, PGD --pgd-steps x
            --pgd-restarts; no extras
  quick     clean, FGSM, PGD-20, APGD-CE (100 iterations) and APGD-T (100 iterations towards the 3
            classes MALT ranks nearest), then Square (500 queries) on the images they left; noise,
            nonsense and accuracy-vs-eps (PGD-10)
  standard  clean, FGSM, PGD-20, PGD-50 x 10 restarts, APGD-CE + APGD-DLR (100 iterations), APGD-T
            (100 iterations x the 9 classes of highest logit: AutoAttack's budget), Square (5000
            queries) on what they left; noise, nonsense, accuracy-vs-eps (PGD-20)
When gradients look masked -- more than --zero-grad-max of the images with an all-zero input
gradient, the white-box attacks after the first iterative one breaking more than --gap-warn of the
images, or the first Square run breaking more than --square-only-max of them -- the images still
standing get APGD-T again with --escalate-restarts random starts (5) towards the --escalate-targets
(3) classes MALT ranks nearest and then, unless Square already ran with as many, Square with
--square-escalate queries (5000, the standard budget); the JSON's 'escalation' says why.  No table
cell is a white-box-only upper bound.  A model at chance level (clean accuracy at most 1.25 /
classes) is named in the headline and the JSON's 'at_chance'; tables.py flags its cell.
APGD-T is in both presets because untargeted attacks can be led to the runner-up class and stop there
while another class is within reach: without it, the standard worst case sat 2-3 points above
AutoAttack's on small lenets, and quick's more than twice too high on an rbf-insert lenet.
Attack names: fgsm, pgd (= --pgd-steps x --pgd-restarts), pgdK or pgdKxR (e.g. pgd50x10), apgd-ce,
apgd-dlr, apgd-t (targeted DLR towards each of the --apgd-targets most likely classes after the top
one), square, autoattack (standard AutoAttack from the optional pyautoattack package, a cross-check,
seeded with --seed).  PGD steps are --pgd-alpha (default eps/4).

Extras: accuracy on clip(x + N(0, sigma^2)) for --noise-sigmas; the nonsense rate (Zhao & Griffin
2016): the share of --nonsense-n pure Gaussian-noise images classified with max softmax confidence
above --nonsense-threshold; accuracy vs eps (PGD at --curve-eps, default eps x 0, 1/4, 1/2, 1, 2, 4).

Gradient-masking sanity checks (Athalye, Carlini & Wagner 2018; Carlini et al. 2019, "On evaluating
adversarial robustness"), each PASS / FAIL / SKIP, in the JSON and next to the headline:
  1 large_eps                 PGD at --large-eps (0.5) drives accuracy to <= 0.05
  2 more_iterations           more PGD steps / restarts (and APGD-CE with at least PGD's budget) never
                              raise accuracy (up to --check-tol)
  3 iterative_vs_single_step  PGD accuracy <= FGSM accuracy (+ tol)
                              (2 and 3 compare attacks run standalone on the first --check-n images)
  4 black_box_vs_white_box    Square (black-box) breaks at most --square-only-max (0.2%, AutoAttack's
                              flag) of the images that every white-box attack left standing
  5 input_gradients           mean |d CE / d x| > 1e-10 over the evaluated images and at most
                              --zero-grad-max (1%) of them with an all-zero gradient
The checks only ask that stronger attacks are not weaker.  A warning (not a check) is added when the
accuracy left after an attack is more than --gap-warn (0.10) above the worst case: the attacks up to
it -- typically fixed-step PGD on a bounded or symmetric unit -- overstate the model's robustness, so
numbers reported with them alone would be wrong (seen on an rbf-insert lenet: PGD-20 36%, worst
case 7%).  --robustbench NAME also writes RobustBench's model_info JSON.

Output: JSON (--out, default eval.json next to a checkpoint.pt, eval_<name>.json next to any other
checkpoint such as interrupted.pt), a Markdown table row, and a PNG plot (accuracy vs eps and vs
noise; only when matplotlib is installed).  An --out or --plot that cannot be written is refused
before the evaluation.

    python eval.py runs/train_fast_cifar10_preactresnet18_relu/checkpoint.pt --preset standard
    python eval.py CKPT --preset quick --n-eval 1000
    python eval.py CKPT --attacks apgd-ce apgd-dlr square --eps 8/255
    python eval.py CKPT --preset standard --attacks +autoattack
"""
import argparse
import os
import re
import statistics
import time

import torch

import attacks
import models
import utils

PRESETS = {
    "basic": dict(attacks=["fgsm", "pgd"], apgd_iters=100, apgd_targets=9, target_order="logit",
                  square_queries=5000, curve_steps=20, extras=False),
    "quick": dict(attacks=["fgsm", "pgd20", "apgd-ce", "apgd-t", "square"], apgd_iters=100, apgd_targets=3,
                  target_order="malt", square_queries=500, curve_steps=10, extras=True),
    "standard": dict(attacks=["fgsm", "pgd20", "pgd50x10", "apgd-ce", "apgd-dlr", "apgd-t", "square"], apgd_iters=100,
                     apgd_targets=9, target_order="logit", square_queries=5000, curve_steps=20, extras=True),
}
ATTACK_NAME = re.compile(r"^(fgsm|pgd|pgd([1-9]\d*)(?:x([1-9]\d*))?|apgd-ce|apgd-dlr|apgd-t|square|autoattack)$")  # no 0 steps
DEFAULT_SIGMAS = [0.02, 0.05, 0.1, 0.2, 0.3]
CURVE_MULTIPLES = [0.0, 0.25, 0.5, 1.0, 2.0, 4.0]
CHECKS = ["large_eps", "more_iterations", "iterative_vs_single_step", "black_box_vs_white_box", "input_gradients"]
AUTOATTACK_MISSING = "autoattack: not installed (pip install pyautoattack); skipped"
AT_CHANCE = 1.25  # clean accuracy at most this x 1/classes: the model is at chance level


def get_args(argv=None):
    p = utils.Parser(description=__doc__.split("\n\n")[0], formatter_class=utils.HelpFormatter)
    p.add_argument("checkpoint", help="checkpoint.pt written by a training script")
    p.add_argument("--data-dir", default=None, help="dataset folder (default: the one used in training)")
    p.add_argument("--preset", default=None, choices=list(PRESETS),
                   help="attack set and budgets (default: basic; standard for the full report)")
    p.add_argument("--attacks", nargs="+", default=None,
                   help="attacks to run instead of the preset's (space or comma separated); +NAME adds to the preset")
    p.add_argument("--eps", type=utils.fraction, default=None, help="L-inf radius (default: the training epsilon)")
    p.add_argument("--pgd-steps", type=int, default=20, help="steps of the attack named 'pgd' (basic preset)")
    p.add_argument("--pgd-restarts", type=int, default=1, help="restarts of the attack named 'pgd'")
    p.add_argument("--pgd-alpha", type=utils.fraction, default=None, help="PGD step of every PGD attack (default eps/4)")
    p.add_argument("--apgd-iters", type=int, default=None, help="APGD iterations (default: 100, AutoAttack's)")
    p.add_argument("--apgd-restarts", type=int, default=1)
    p.add_argument("--apgd-targets", type=int, default=None,
                   help="target classes of APGD-T, the most likely after the top one (default 9, as AutoAttack)")
    p.add_argument("--square-queries", type=int, default=None, help="Square attack queries per image (default 5000)")
    p.add_argument("--square-p-init", type=float, default=0.8, help="Square attack initial square share p")
    p.add_argument("--apgd-target-order", default=None, choices=["logit", "malt"],
                   help="APGD-T's targets: the highest clean logits, or MALT's nearest boundaries "
                        "(default: quick malt, else logit)")
    p.add_argument("--square-escalate", type=int, default=5000,
                   help="queries of a second Square run on the images still standing when gradients look "
                        "masked (when above --square-queries)")
    p.add_argument("--escalate-restarts", type=int, default=5,
                   help="restarts of the APGD-T run that escalation adds before that Square run (0 = none)")
    p.add_argument("--escalate-targets", type=int, default=3,
                   help="target classes of that APGD-T run, the nearest by MALT's ranking (at most --apgd-targets)")
    p.add_argument("--check-n", type=int, default=200,
                   help="images on which the checks' attacks also run standalone (checks 2 and 3)")
    p.add_argument("--robustbench", default=None, metavar="NAME",
                   help="also write RobustBench's model_info JSON for model NAME next to --out")
    p.add_argument("--noise-sigmas", type=utils.fraction, nargs="*", default=None,
                   help=f"Gaussian noise sweep (default with extras {DEFAULT_SIGMAS}; none = skip)")
    p.add_argument("--nonsense-n", type=int, default=None, help="pure-noise images for the nonsense rate (default 1000 with extras; 0 = skip)")
    p.add_argument("--nonsense-threshold", type=float, default=0.9,
                   help="confidence above which a noise image counts as confidently classified "
                        "(below it --saf-curves read 'nonsense')")
    p.add_argument("--nonsense-std", type=float, default=0.25, help="noise images are clip(0.5 + std * N(0,1), 0, 1)")
    p.add_argument("--saf-curves", action="store_true",
                   help="Zhao & Griffin's curves over a strength beta: targeted-FGS adversarial, "
                        "nonsense (noise pushed to a class), noisy")
    p.add_argument("--saf-betas", type=utils.fraction, nargs="+", default=[0.0, 0.05, 0.1, 0.2, 0.3, 0.5],
                   help="strengths beta of the --saf-curves")
    p.add_argument("--accept-clean", type=float, default=None, metavar="SHARE",
                   help="--saf-curves' threshold per model: the score SHARE of its clean images "
                        "reach (e.g. 0.95; in place of --nonsense-threshold)")
    p.add_argument("--confidence", default="softmax", choices=["softmax", "output", "auto"],
                   help="--saf-curves' score, one rule for every model: max softmax, or the raw output "
                        "(auto: output for hybrid-loss models)")
    p.add_argument("--curve-eps", type=utils.fraction, nargs="*", default=None,
                   help="eps of the accuracy-vs-eps curve (default with extras: eps x 0, 1/4, 1/2, "
                        "1, 2, 4; none = skip)")
    p.add_argument("--curve-steps", type=int, default=None, help="PGD steps of the curve and the large-eps check (default 20; 10 in quick)")
    p.add_argument("--large-eps", type=utils.fraction, default=None,
                   help="eps of sanity check 1 (default 0.5 with extras; 0 = skip)")
    p.add_argument("--check-tol", type=float, default=0.01, help="accuracy tolerance of the sanity checks")
    p.add_argument("--square-only-max", type=float, default=0.002,
                   help="check 4 fails when Square alone breaks more than this share of the "
                        "images (AutoAttack's 0.2%%)")
    p.add_argument("--zero-grad-max", type=float, default=0.01,
                   help="check 5 fails when more than this share of the images has an all-zero input gradient")
    p.add_argument("--gap-warn", type=float, default=0.10,
                   help="warn when an attack's accuracy is this far above the worst case (it overstates robustness)")
    p.add_argument("--n-eval", type=int, default=None, help="first N test images (default: all)")
    p.add_argument("--n-clean", type=int, default=None,
                   help="also clean accuracy on the first N test images (0 = all; cheap: attacks "
                        "on --n-eval, clean on all)")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--device", default=utils.DEFAULT_DEVICE)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="JSON output (default: eval.json next to a checkpoint.pt, eval_<name>.json next to any other, e.g. eval_interrupted.json)")
    p.add_argument("--plot", default=None, help="PNG output (default: the JSON path with .png; needs matplotlib)")
    p.add_argument("--no-plot", action="store_true")
    args = p.parse_args(argv)
    problems = utils.number_problems(args)
    if problems:
        p.error("; ".join(problems))
    if args.eps is not None and not 0 < args.eps <= 1:
        p.error("--eps must be in (0, 1] (images are in [0, 1])")
    if args.pgd_alpha is not None and args.pgd_alpha <= 0:  # a step of 0 leaves every image robust
        p.error(f"--pgd-alpha must be > 0, got {args.pgd_alpha}")
    if not 0 < args.square_p_init <= 1 or not 0 <= args.nonsense_threshold <= 1:
        p.error("--square-p-init must be in (0, 1] and --nonsense-threshold in [0, 1]")
    if args.accept_clean is not None and not 0 < args.accept_clean <= 1:
        p.error(f"--accept-clean must be a share in (0, 1], got {args.accept_clean:g}")
    if min(args.nonsense_std, args.check_tol, args.gap_warn, args.square_only_max, args.zero_grad_max) < 0:
        p.error("--nonsense-std, --check-tol, --gap-warn, --square-only-max and --zero-grad-max must be >= 0")
    if min(args.pgd_steps, args.pgd_restarts, args.batch_size, args.apgd_restarts) < 1 or (args.n_eval is not None and args.n_eval < 1) \
            or (args.n_clean is not None and args.n_clean < 0):
        p.error("--pgd-steps, --pgd-restarts, --apgd-restarts, --batch-size and --n-eval must be >= 1, --n-clean >= 0")
    if utils.device_problem(args.device):
        p.error(utils.device_problem(args.device))
    # ---- the attack list: the preset's, replaced or extended by --attacks
    names = [n.strip().lower() for item in (args.attacks or []) for n in item.split(",") if n.strip()]
    added, plain = [n[1:] for n in names if n.startswith("+")], [n for n in names if not n.startswith("+")]
    for n in added + plain:
        if not ATTACK_NAME.match(n):
            p.error(f"unknown attack {n!r}; choose from fgsm, pgd, pgdK[xR], apgd-ce, apgd-dlr, apgd-t, square, autoattack")
    preset = PRESETS[args.preset or "basic"]
    args.attack_list = list(dict.fromkeys((plain or preset["attacks"]) + added))
    # ---- budgets and extras not given: the preset's
    extras = preset["extras"]
    args.apgd_iters = args.apgd_iters if args.apgd_iters is not None else preset["apgd_iters"]
    args.apgd_targets = args.apgd_targets if args.apgd_targets is not None else preset["apgd_targets"]
    args.apgd_target_order = args.apgd_target_order or preset["target_order"]
    args.square_queries = args.square_queries if args.square_queries is not None else preset["square_queries"]
    args.curve_steps = args.curve_steps if args.curve_steps is not None else preset["curve_steps"]
    args.noise_sigmas = args.noise_sigmas if args.noise_sigmas is not None else (DEFAULT_SIGMAS if extras else [])
    args.nonsense_n = args.nonsense_n if args.nonsense_n is not None else (1000 if extras else 0)
    args.large_eps = args.large_eps if args.large_eps is not None else (0.5 if extras else 0.0)
    args.curve_default = args.curve_eps is None and extras  # eps multiples, once eps is known
    args.curve_eps = args.curve_eps or []
    if args.square_escalate < 0 or args.escalate_restarts < 0 or args.check_n < 1 or args.escalate_targets < 1:
        p.error("--square-escalate and --escalate-restarts must be >= 0, --check-n and --escalate-targets >= 1")
    if min(args.apgd_iters, args.apgd_targets, args.square_queries, args.curve_steps) < 1:
        p.error("--apgd-iters, --apgd-targets, --square-queries and --curve-steps must be >= 1")
    if args.nonsense_n < 0 or args.large_eps < 0 or any(s < 0 for s in args.noise_sigmas) or any(e < 0 for e in args.curve_eps):
        p.error("--nonsense-n, --large-eps, --noise-sigmas and --curve-eps must be >= 0")
    return args


def _pgd_config(name, args):
    """(steps, restarts) of a PGD attack name, or None."""
    m = ATTACK_NAME.match(name)
    if name == "pgd":
        return args.pgd_steps, args.pgd_restarts
    if m and m.group(2):
        return int(m.group(2)), int(m.group(3) or 1)
    return None


def _autoattack(eps, device, seed):
    """Standard AutoAttack as an attack(model, xb, yb) -> x_adv, from the original package (import
    name autoattack) or PyPI's pyautoattack; ImportError when neither is installed.  Seeded with
    ``seed`` (AutoAttack's default seeds from the clock)."""
    try:
        from autoattack import AutoAttack  # github.com/fra31/auto-attack
        make = lambda m: AutoAttack(m, norm="Linf", eps=eps, version="standard", device=str(device), verbose=False,
                                    seed=seed)
        run = lambda adversary, xb, yb: adversary.run_standard_evaluation(xb, yb, bs=len(xb))
    except ImportError:
        from pyautoattack import AutoAttack  # pip install pyautoattack
        make = lambda m: AutoAttack(m, norm="Linf", eps=eps, version="standard", device=str(device), seed=seed)
        run = lambda adversary, xb, yb: adversary.run_standard_evaluation(xb, yb, batch_size=len(xb))[0]

    def attack(model, xb, yb):
        # AutoAttack reseeds torch's global generator before each of its attacks; fork_rng hands the
        # previous state back afterwards, so the attacks after it draw the same numbers as without it
        cuda = [xb.device] if xb.device.type == "cuda" else []
        with attacks.eval_float32(model), torch.random.fork_rng(devices=cuda):
            return run(make(model), xb, yb).to(xb.device).float()
    return attack


def square_attack(eps, queries, p_init, seen):
    """Square as an attack(model, xb, yb) -> x_adv that notes the queries each image took in ``seen``."""
    def square(m, xb, yb):
        adv, q = attacks.square(m, xb, yb, eps, queries, p_init, return_queries=True)
        seen.append((q.cpu().tolist(), queries))
        return adv
    return square


def apgd_t_attack(args, eps, restarts, targets=None, order=None):
    """APGD-T (--apgd-iters; ``targets`` classes in ``order``, default --apgd-targets and
    --apgd-target-order) with ``restarts`` random starts, as an attack(model, xb, yb) -> x_adv."""
    targets, order = targets or args.apgd_targets, order or args.apgd_target_order
    return lambda m, xb, yb: attacks.apgd(m, xb, yb, eps, args.apgd_iters, "dlr", restarts, targeted=True,
                                          n_target_classes=targets, target_order=order)


def build_attacks(args, eps, device, square_queries_seen):
    """[(accuracy key, description, attack(model, xb, yb) -> x_adv)] for args.attack_list."""
    alpha = args.pgd_alpha if args.pgd_alpha is not None else eps / 4
    out = []
    for name in args.attack_list:
        pgd_cfg = _pgd_config(name, args)
        if name == "fgsm":
            out.append(("fgsm", "FGSM", lambda m, xb, yb: attacks.fgsm(m, xb, yb, eps)))
        elif pgd_cfg:
            steps, restarts = pgd_cfg
            out.append((f"pgd{steps}x{restarts}", f"PGD-{steps} x {restarts} (step {alpha:.4g})",
                        lambda m, xb, yb, s=steps, r=restarts: attacks.pgd(m, xb, yb, eps, alpha, s, r)))
        elif name in ("apgd-ce", "apgd-dlr"):
            loss = name.split("-")[1]
            out.append((name, f"APGD-{loss.upper()} ({args.apgd_iters} it. x {args.apgd_restarts})",
                        lambda m, xb, yb, l=loss: attacks.apgd(m, xb, yb, eps, args.apgd_iters, l, args.apgd_restarts)))
        elif name == "apgd-t":
            out.append((name, f"APGD-T ({args.apgd_iters} it. x {args.apgd_restarts}, {args.apgd_targets} targets)",
                        apgd_t_attack(args, eps, args.apgd_restarts)))
        elif name == "square":
            out.append(("square", f"Square ({args.square_queries} queries)",
                        square_attack(eps, args.square_queries, args.square_p_init, square_queries_seen)))
        elif name == "autoattack":
            try:
                out.append(("autoattack", f"AutoAttack (standard, seed {args.seed})", _autoattack(eps, device, args.seed)))
            except ImportError:
                print(AUTOATTACK_MISSING, flush=True)
    return out


def sanity_checks(acc, pgd_configs, apgd_budget, large, grad_stats, tol, large_max=0.05, square_only=None,
                  square_only_max=0.002, zero_grad_max=0.01):
    """The gradient-masking checks: {name: {status: PASS|FAIL|SKIP, detail}} (see the module docstring).
    ``square_only``: the share of the evaluated images that Square breaks and every white-box attack
    misses (None: not measured); ``grad_stats``: attacks.input_gradient_stats."""
    checks = {}

    def put(name, ok, detail):
        checks[name] = {"status": "SKIP" if ok is None else "PASS" if ok else "FAIL", "detail": detail}

    # 1: accuracy reaches ~0 at a large eps
    if large is None:
        put("large_eps", None, "not run")
    else:
        put("large_eps", large["accuracy"] <= large_max,
            f"PGD-{large['steps']} at eps {large['eps']:.4g}: accuracy {large['accuracy']:.4f} (must be <= {large_max:g})")
    # 2: more iterations never raise accuracy
    pairs = [(a, b) for a, ca in pgd_configs.items() for b, cb in pgd_configs.items()
             if a != b and ca[0] >= cb[0] and ca[1] >= cb[1]]
    if "apgd-ce" in acc and apgd_budget is not None:
        pairs += [("apgd-ce", b) for b, cb in pgd_configs.items() if cb[0] * cb[1] <= apgd_budget]
    if pairs:
        bad = [f"{a} {acc[a]:.4f} > {b} {acc[b]:.4f}" for a, b in pairs if acc[a] > acc[b] + tol]
        put("more_iterations", not bad, "; ".join(bad) if bad else
            ", ".join(f"{a} {acc[a]:.4f} <= {b} {acc[b]:.4f}" for a, b in pairs))
    else:
        put("more_iterations", None, "needs two PGD runs of different budgets, or APGD-CE and PGD")
    # 3: iterative beats single-step
    if "fgsm" in acc and pgd_configs:
        bad = [f"{k} {acc[k]:.4f} > fgsm {acc['fgsm']:.4f}" for k in pgd_configs if acc[k] > acc["fgsm"] + tol]
        put("iterative_vs_single_step", not bad, "; ".join(bad) if bad else
            ", ".join(f"{k} {acc[k]:.4f}" for k in pgd_configs) + f" <= fgsm {acc['fgsm']:.4f}")
    else:
        put("iterative_vs_single_step", None, "needs FGSM and PGD")
    # 4: the black box finds (almost) nothing the white-box attacks missed.  Per example, as
    # AutoAttack's flag (Square lowering the accuracy left by its white-box attacks by > 0.2%):
    # comparing accuracies alone passes when Square breaks a different, smaller set of images
    if square_only is not None:  # Square ran after every white-box attack, on what they left
        put("black_box_vs_white_box", square_only <= square_only_max,
            f"{100 * square_only:.2f}% of the images broken by Square alone, after every white-box attack "
            f"(must be <= {100 * square_only_max:g}%)")
    else:
        put("black_box_vs_white_box", None, "needs Square and a white-box attack")
    # 5: non-zero input gradients.  An all-zero gradient leaves a gradient attack nothing to follow
    # from that image (AutoAttack warns at the first one), so more than a small share fails
    if grad_stats is None:
        put("input_gradients", None, "not run")
    else:
        put("input_gradients", grad_stats["mean_abs_grad"] > 1e-10 and grad_stats["zero_grad_share"] <= zero_grad_max,
            f"mean |grad| {grad_stats['mean_abs_grad']:.3g}, share of all-zero gradients "
            f"{grad_stats['zero_grad_share']:.4f} (must be <= {zero_grad_max:g}) over {grad_stats['n']} images")
    return checks


def evaluate(model, x, y, args, eps, progress=True):
    """Run the configured evaluation of ``model`` (on its device) on (x, y) ([0,1] floats, on the CPU)
    at L-inf radius ``eps``.  ``args`` is get_args()'s namespace.  Returns the result dict (without the
    checkpoint's fields) and prints a line per attack, the checks and the headline."""
    device = next(model.parameters()).device
    bar = (lambda desc: (lambda it: utils.tqdm(it, desc=desc, leave=False, dynamic_ncols=True))) if progress else (lambda desc: None)
    square_queries = []
    specs = build_attacks(args, eps, device, square_queries)
    result = {"n_eval": len(y), "eps": eps, "attacks": [k for k, _, _ in specs], "accuracy": {}, "time_per_attack_s": {},
              "config": {"pgd_alpha": args.pgd_alpha if args.pgd_alpha is not None else eps / 4,
                         "apgd_iters": args.apgd_iters, "apgd_restarts": args.apgd_restarts,
                         "square_queries": args.square_queries, "square_p_init": args.square_p_init,
                         "apgd_targets": args.apgd_targets, "apgd_target_order": args.apgd_target_order,
                         "curve_steps": args.curve_steps, "check_tol": args.check_tol,
                         "square_only_max": args.square_only_max, "zero_grad_max": args.zero_grad_max,
                         "batch_size": args.batch_size,
                         "seed": args.seed, "device": str(device)}}
    if "autoattack" in args.attack_list and "autoattack" not in result["attacks"]:
        result["skipped"] = {"autoattack": "not installed (pip install pyautoattack)"}
    start = time.time()
    # ---- AutoAttack's order: each attack runs only on the images every earlier one left standing, so
    # an image counts robust only if no attack breaks it (the per-example worst case, by construction),
    # and accuracy[name] is what is left after that attack and those before it (AutoAttack's report)
    t0 = time.time()
    result["accuracy"]["clean"], robust = attacks.robust_accuracy(model, x, y, None, args.batch_size,
                                                                  progress=bar("clean"))
    result["time_per_attack_s"]["clean"] = round(time.time() - t0, 2)
    print(f"{'clean':>12s}  {result['accuracy']['clean']:.4f}   clean", flush=True)
    # a model at chance level (never learned, or exploded with finite weights, as RESULTS.md's KAF
    # resnet20 from random coefficients) makes every robust accuracy below meaningless: said loudly
    with torch.no_grad():
        classes = model(x[:1].to(device)).shape[-1]
    result["chance"] = 1 / classes
    result["at_chance"] = result["accuracy"]["clean"] <= AT_CHANCE / classes
    grad_stats = attacks.input_gradient_stats(model, x, y, batch_size=args.batch_size)
    result["input_gradients"] = grad_stats
    cascade = []

    def run(name, desc, attack):
        t0, idx = time.time(), robust.nonzero().squeeze(1)
        if len(idx):
            _, still = attacks.robust_accuracy(model, x[idx], y[idx], attack, args.batch_size, progress=bar(name))
            robust[idx[~still]] = False
        seconds = round(time.time() - t0, 2)
        result["accuracy"][name] = robust.float().mean().item()
        result["time_per_attack_s"][name] = result["time_per_attack_s"].get(name, 0) + seconds
        cascade.append(dict(attack=name, description=desc, attacked=len(idx), broken=len(idx) - int(robust[idx].sum()),
                            accuracy_after=result["accuracy"][name], time_s=seconds))
        print(f"{name:>12s}  {result['accuracy'][name]:.4f}   {desc}: {len(idx)} images attacked, "
              f"{cascade[-1]['broken']} broken  ({seconds}s)", flush=True)

    black_box = [spec for spec in specs if spec[0] == "square"]  # after every white-box attack
    for name, desc, attack in [spec for spec in specs if spec[0] != "square"]:
        run(name, desc, attack)
    white = result["accuracy"][cascade[-1]["attack"]] if cascade else result["accuracy"]["clean"]
    if black_box:
        run(*black_box[0])
        # a sign of gradient masking sends Square back with the full budget to the images still standing
        first = next((c for c in cascade if c["attack"] != "fgsm"), None)
        reasons = []
        if grad_stats["zero_grad_share"] > args.zero_grad_max or grad_stats["mean_abs_grad"] <= 1e-10:
            reasons.append(f"{100 * grad_stats['zero_grad_share']:.1f}% of the images have an all-zero input gradient")
        if first and first["accuracy_after"] - white > args.gap_warn:
            reasons.append(f"the white-box attacks after {first['attack']} broke "
                           f"{100 * (first['accuracy_after'] - white):.1f} points more")
        if cascade[-1]["broken"] > args.square_only_max * len(y):
            reasons.append(f"Square broke {cascade[-1]['broken']} images every white-box attack missed")
        result["escalation"] = None
        # random starts decide a masked model's APGD result (seeds moved an rbf-insert lenet's by 4 of
        # 300 images): restarts on the few survivors, then Square's full budget if it has not run yet.
        # MALT's 3 nearest targets: over 3 seeds as strong there as the 9 highest logits, at a third
        restarts = args.escalate_restarts if "apgd-t" in args.attack_list else 0
        targets = min(args.escalate_targets, args.apgd_targets)
        more_square = args.square_escalate > args.square_queries
        if reasons and robust.any() and (restarts or more_square):
            result["escalation"] = dict(reasons=reasons, queries=args.square_escalate if more_square else None,
                                        apgd_t_restarts=restarts, apgd_t_targets=targets if restarts else None)
            print(f"  escalating: {'; '.join(reasons)}", flush=True)
            if restarts:
                run("apgd-t-escalated", f"APGD-T ({args.apgd_iters} it. x {restarts} restarts, "
                    f"{targets} MALT targets, escalated)", apgd_t_attack(args, eps, restarts, targets, "malt"))
            if more_square:
                run("square-escalated", f"Square ({args.square_escalate} queries, escalated)",
                    square_attack(eps, args.square_escalate, args.square_p_init, square_queries))
    result["cascade"] = cascade
    result["robust_accuracy"] = robust.float().mean().item()
    result["robust_images"] = robust.nonzero().squeeze(1).tolist()  # per image: for cross-checks
    if square_queries:
        # the queries an image took to break (those that broke before the budget), which is what a
        # budget is chosen from
        q = [int(v) for qs, budget in square_queries for v in qs if 0 < v < budget]
        result["square_queries_used"] = {"broken": len(q), "mean": statistics.fmean(q) if q else 0.0,
                                         "median": statistics.median(q) if q else 0.0,
                                         "max": max(q, default=0), "budget": args.square_queries}
    square_only = None
    if "square" in args.attack_list and any(not c["attack"].startswith("square") for c in cascade):
        # images that only the black-box attack breaks (every white-box attack ran before it): a sign
        # of gradient masking
        result["square_only_breaks"] = sum(c["broken"] for c in cascade if c["attack"].startswith("square"))
        square_only = result["square_only_breaks"] / len(y)
    # ---- the attacks the checks compare, standalone on the first --check-n images
    n_check = min(args.check_n, len(y))
    standalone = {}
    for name, desc, attack in specs:
        if name == "fgsm" or name.startswith("pgd") or name == "apgd-ce":
            standalone[name], _ = attacks.robust_accuracy(model, x[:n_check], y[:n_check], attack, args.batch_size,
                                                          progress=bar(f"{name} standalone"))
    result["standalone"] = {"n": n_check, "accuracy": standalone}
    # ---- accuracy vs eps, and the large-eps check
    curve_eps = list(args.curve_eps) or ([m * eps for m in CURVE_MULTIPLES] if args.curve_default else [])
    large = None
    if args.large_eps > 0:
        curve_eps.append(args.large_eps)
    curve = {}
    for e in sorted(set(curve_eps)):
        t0 = time.time()
        key = f"pgd{args.curve_steps}x1"
        if e == 0:
            acc = result["accuracy"]["clean"]
        elif abs(e - eps) < 1e-12 and key in result["accuracy"] and args.pgd_alpha is None:
            acc = result["accuracy"][key]
        else:
            acc, _ = attacks.robust_accuracy(
                model, x, y, lambda m, xb, yb, e=e: attacks.pgd(m, xb, yb, e, e / 4, args.curve_steps),
                args.batch_size, progress=bar(f"eps {e:.4g}"))
        curve[f"{e:.6g}"] = acc
        print(f"  PGD-{args.curve_steps} at eps {e:<8.4g} {acc:.4f}  ({time.time() - t0:.1f}s)", flush=True)
        if args.large_eps > 0 and abs(e - args.large_eps) < 1e-12:
            large = {"eps": e, "steps": args.curve_steps, "accuracy": acc}
    if curve:
        result["accuracy_vs_eps"] = {"steps": args.curve_steps, "accuracy": curve}
    if large:
        result["large_eps"] = large
    # ---- noise and nonsense
    if args.noise_sigmas:
        noise = attacks.noise_accuracy(model, x, y, args.noise_sigmas, args.seed, args.batch_size, progress=bar("noise"))
        result["noise_accuracy"] = {f"{s:.6g}": a for s, a in noise.items()}
        print("  noise      " + "  ".join(f"sigma {s:g}: {a:.4f}" for s, a in noise.items()), flush=True)
    if args.nonsense_n > 0:
        result["nonsense"] = attacks.nonsense_rate(model, args.nonsense_n, tuple(x.shape[1:]), args.nonsense_threshold,
                                                   args.seed, std=args.nonsense_std, batch_size=args.batch_size)
        print(f"  nonsense   {result['nonsense']['rate']:.4f} of {args.nonsense_n} noise images with confidence > "
              f"{args.nonsense_threshold:g} (mean confidence {result['nonsense']['mean_confidence']:.3f})", flush=True)
    if args.saf_curves:
        t0 = time.time()
        saf = attacks.saf_curves(model, x, y, args.saf_betas, args.nonsense_threshold, args.seed, noise_std=args.nonsense_std,
                                 batch_size=args.batch_size, progress=bar("saf curves"), confidence=args.confidence,
                                 accept_clean=args.accept_clean)
        result["saf_curves"] = saf
        for kind, key in (("adversarial", "accuracy"), ("nonsense", "nonsense"), ("noisy", "accuracy")):
            print(f"  {kind:<11s} {'rejected as nonsense' if kind == 'nonsense' else 'accuracy'} over beta: " +
                  "  ".join(f"{b}: {r[key]:.3f}" for b, r in saf[kind].items()), flush=True)
        at = f" (the score {args.accept_clean:g} of the clean images reach)" if args.accept_clean else ""
        print(f"  (saf curves, {args.confidence} confidence, threshold {saf['threshold']:.4g}{at}: {time.time() - t0:.1f}s)", flush=True)
    # ---- sanity checks
    pgd_configs = {}
    for name in args.attack_list:
        cfg = _pgd_config(name, args)
        if cfg:
            pgd_configs[f"pgd{cfg[0]}x{cfg[1]}"] = cfg
    checks = sanity_checks({"clean": result["accuracy"]["clean"], **standalone}, pgd_configs,
                           args.apgd_iters * args.apgd_restarts, large, grad_stats,
                           args.check_tol, square_only=square_only, square_only_max=args.square_only_max,
                           zero_grad_max=args.zero_grad_max)
    result["sanity_checks"] = checks
    result["sanity_failed"] = [k for k, v in checks.items() if v["status"] == "FAIL"]
    result["gap_warn"] = args.gap_warn
    result["warnings"] = attack_gap_warnings(result["accuracy"], result["robust_accuracy"], args.gap_warn)
    for w in result["warnings"]:
        print(f"  WARN  {w}")
    if result["at_chance"]:
        print(f"  WARN  clean accuracy {result['accuracy']['clean']:.4f} is at chance level (1/{classes}): "
              "the model has not learned, and its robust accuracy says nothing")
    result["time_s"] = round(time.time() - start, 2)
    print("gradient-masking sanity checks:")
    for k, v in checks.items():
        print(f"  {v['status']:4s}  {k}: {v['detail']}")
    result["headline"] = headline(result)
    return result


def attack_gap_warnings(acc, worst, gap):
    """One line for every attack whose accuracy exceeds the per-example worst case by more than ``gap``."""
    return [f"{name} {a:.4f} is {100 * (a - worst):.1f} points above the worst case {worst:.4f}: it overstates robustness"
            for name, a in acc.items() if name not in ("clean", "fgsm") and a - worst > gap]


def headline(result):
    """'robust acc 0.43 (...)  [2 sanity checks FAILED: a, b]' or '... [3 sanity checks passed, 2 skipped]'."""
    failed = result["sanity_failed"]
    status = [v["status"] for v in result["sanity_checks"].values()]
    passed, skipped = status.count("PASS"), status.count("SKIP")
    over = ", ".join(k for k in result["accuracy"] if k != "clean") or "no attack"
    text = f"robust acc {result['robust_accuracy']:.4f} (worst case over {over}; clean {result['accuracy']['clean']:.4f})"
    warned = [w.split()[0] for w in result.get("warnings", [])]
    if result.get("at_chance"):
        text += "  [WARNING: clean accuracy at chance level: the model has not learned]"
    if warned:
        text += f"  [WARNING: {', '.join(warned)} overstate{'s' if len(warned) == 1 else ''} robustness by > {100 * result['gap_warn']:.0f} points]"
    if failed:
        return text + f"  [{len(failed)} sanity check{'s' if len(failed) > 1 else ''} FAILED: {', '.join(failed)}]"
    return text + f"  [{passed} sanity check{'' if passed == 1 else 's'} passed" + (f", {skipped} skipped]" if skipped else "]")


def write_robustbench(result, args, train_args, model, out):
    """RobustBench's model_info JSON for this evaluation (the fields ``benchmark(..., to_disk=True)``
    writes: model_info/<dataset>/Linf/<name>.json beside --out), accuracies in percent as RobustBench
    stores them; autoattack_acc holds this evaluation's worst case (the footnote says which attacks)
    and the breakdown goes under 'evaluation'.  Returns the path."""
    cfg = model.config
    attacks_run = ", ".join(c["attack"] for c in result["cascade"])
    info = {"link": None, "name": args.robustbench, "authors": None,
            "additional_data": bool(train_args.get("extra_data")), "number_forward_passes": 1,
            "dataset": result["dataset"], "venue": None,
            "architecture": f"{cfg['arch']} ({models.act_label(cfg['act'], cfg.get('saf_insert'))})",
            "eps": result["eps"], "clean_acc": f"{100 * result['accuracy']['clean']:.2f}", "reported": None,
            "corruptions_acc": None, "autoattack_acc": f"{100 * result['robust_accuracy']:.2f}",
            "footnote": f"Per-example worst case of this project's eval.py ({result['preset']} preset: "
                        f"{attacks_run}) on {result['n_eval']} test images, not AutoAttack itself"
                        + ("" if "autoattack" not in result["accuracy"] else " (AutoAttack included)"),
            "evaluation": {k: result[k] for k in ("accuracy", "cascade", "standalone", "sanity_checks", "n_eval")
                           if k in result}}
    path = os.path.join(os.path.dirname(os.path.abspath(out)), "model_info", result["dataset"], "Linf",
                        f"{args.robustbench}.json")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    utils.write_json(info, path)
    return path


def markdown(result, label):
    """(header, separator, row) of a one-line Markdown table row."""
    keys = list(result["accuracy"])
    failed = result["sanity_failed"]
    cols = ["model", "eps", "n"] + keys + ["robust (worst case)", "sanity checks", "time (s)"]
    vals = [label, f"{result['eps']:.4g}", str(result["n_eval"])] + [f"{result['accuracy'][k]:.4f}" for k in keys] + [
        f"**{result['robust_accuracy']:.4f}**", ("FAILED: " + ", ".join(failed)) if failed else "pass", f"{result['time_s']:.0f}"]
    row = lambda v: "| " + " | ".join(v) + " |"
    return row(cols), row(["---"] * len(cols)), row(vals)


def plot(result, path):
    """The curves the evaluation made (accuracy vs eps, vs noise sigma, Zhao & Griffin's three), a
    panel each, as a PNG if matplotlib is installed; returns the path or None."""
    saf = result.get("saf_curves")
    panels = [(key, xlabel, title) for key, xlabel, title in [
        ("accuracy_vs_eps", "eps (L-inf)", "PGD accuracy vs eps"), ("noise_accuracy", "noise sigma", "accuracy under Gaussian noise"),
        ("adversarial", "beta", "adversarial samples"), ("nonsense", "beta", "nonsense samples"), ("noisy", "beta", "noisy samples")]
        if (key in result if key in ("accuracy_vs_eps", "noise_accuracy") else saf and key in saf)]
    plt = utils.pyplot() if panels else None
    if plt is None:
        return None
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4), squeeze=False)
    for ax, (key, xlabel, title) in zip(axes[0], panels):
        if key in ("accuracy_vs_eps", "noise_accuracy"):
            data = result[key].get("accuracy", result[key]) if key == "accuracy_vs_eps" else result[key]
            xs = sorted(float(k) for k in data)
            ax.plot(xs, [data[f"{v:.6g}"] for v in xs], marker="o")
            ax.set(ylabel="accuracy")
            if key == "accuracy_vs_eps":
                ax.axvline(result["eps"], color="k", linestyle="--", linewidth=0.8)
        else:
            betas = [float(b) for b in saf[key]]
            for metric in saf[key][f"{betas[0]:.6g}"]:
                ax.plot(betas, [saf[key][f"{b:.6g}"][metric] for b in betas], marker="o", label=metric)
            title += f" ({saf.get('confidence', 'softmax')} score, threshold {saf['threshold']:g})"
            ax.set(ylabel="share of samples")
            ax.legend()
        ax.set(xlabel=xlabel, title=title, ylim=(0, 1))
        ax.grid(alpha=0.3)
    fig.suptitle(result.get("label", ""))
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return path


def default_out(checkpoint):
    """Where the JSON goes without --out: eval.json next to a run's checkpoint.pt (the run's result,
    which run_all.sh reads), eval_<name>.json next to any other file, so that evaluating a run's
    interrupted.pt writes eval_interrupted.json and never passes for the finished run's eval.json."""
    folder, name = os.path.split(os.path.abspath(checkpoint))
    stem = os.path.splitext(name)[0]
    return os.path.join(folder, "eval.json" if stem == "checkpoint" else f"eval_{stem}.json")


def main(argv=None):
    args = get_args(argv)
    utils.seed_everything(args.seed)
    out = args.out or default_out(args.checkpoint)
    utils.check_writable(out)  # before the evaluation, not after it
    if not args.no_plot:
        utils.check_writable(args.plot or os.path.splitext(out)[0] + ".png", "--plot")
    model, train_args, eps = utils.load_for_eval(args.checkpoint, args.device, args.eps)
    # one read of the test split: the attacks take its first --n-eval images, clean accuracy --n-clean
    n_read = args.n_eval
    if args.n_clean is not None:
        n_read = None if args.n_clean == 0 or args.n_eval is None else max(args.n_eval, args.n_clean)
    dataset, x_read, y_read = utils.checkpoint_test_set(model, args.checkpoint, args.data_dir, n_read)
    x, y = x_read[:args.n_eval], y_read[:args.n_eval]
    utils.check_outputs_finite(model, x, args.checkpoint)
    if args.confidence == "auto":
        args.confidence = "output" if (train_args.get("hybrid_weight") or 0) > 0 else "softmax"
    cfg = getattr(model, "config", {})
    label = f"{cfg.get('arch', '?')} {models.act_label(cfg.get('act', '?'), cfg.get('saf_insert'))} " \
            f"({train_args.get('dataset', dataset)}, {model.checkpoint.get('script', '?')})"
    print(f"eval: {label}, {len(y)} images, eps {eps:.4g}, attacks {', '.join(args.attack_list)} on {args.device}", flush=True)
    result = {"checkpoint": args.checkpoint, "dataset": dataset, "label": label, "preset": args.preset or "basic",
              "pgd": dict(steps=args.pgd_steps, restarts=args.pgd_restarts,
                          alpha=args.pgd_alpha if args.pgd_alpha is not None else eps / 4)}
    result.update(evaluate(model, x, y, args, eps))
    if args.n_clean is not None:
        xc, yc = x_read[:args.n_clean or None], y_read[:args.n_clean or None]
        acc, _ = attacks.robust_accuracy(model, xc, yc, None, args.batch_size)
        result["clean_full"] = {"n": len(yc), "accuracy": acc}
        print(f"clean accuracy on {len(yc)} test images: {acc:.4f}", flush=True)
    header, sep, row = markdown(result, label)
    result.update(markdown_header=header, markdown_row=row)
    if not args.no_plot:
        result["plot"] = plot(result, args.plot or os.path.splitext(out)[0] + ".png")
    utils.write_json(result, out)
    if args.robustbench:
        result["robustbench"] = write_robustbench(result, args, train_args, model, out)
    print(header, sep, row, sep="\n")
    print(f"{len(y)} images, eps {eps:.4g}, {result['time_s']}s -> {out}" + (f", {result['plot']}" if result.get("plot") else ""))
    print(("!! " if result["sanity_failed"] or result["warnings"] or result["at_chance"] else "") + result["headline"],
          flush=True)
    return result


if __name__ == "__main__":
    utils.main_guard(main)
