"""Attacks on [0, 1] image classifiers, and robust-accuracy / noise evaluation.

White-box: FGSM, PGD (L-inf / L2), APGD-CE and APGD-DLR (targeted DLR optional).  Black-box
(score-based): the L-inf Square attack.  Evaluation helpers: robust_accuracy (batched, per-example
correctness), noise_accuracy and nonsense_rate (Zhao & Griffin 2016), input_gradient_stats.

Every attack here runs with the model in eval mode and in float32 (autocast off), whatever mode and
precision the caller trains in, and returns adversarial images that never leave the eps-ball around
x nor [0, 1].  The model is put back in its previous mode afterwards.  Gradients are taken with
torch.autograd.grad, so parameter .grad fields are never touched.

Imports only torch.
"""
import contextlib
import math

import torch
import torch.nn.functional as F


@contextlib.contextmanager
def eval_float32(model):
    """Eval mode and autocast disabled for the duration; restores the model's training flag."""
    was_training = model.training
    model.eval()
    try:
        with torch.autocast("cuda", enabled=False), torch.autocast("cpu", enabled=False):
            yield
    finally:
        model.train(was_training)


def cw_margin_loss(logits, y):
    """Carlini-Wagner margin, per example: max_{j != y} z_j - z_y (positive = misclassified)."""
    true = logits.gather(1, y[:, None]).squeeze(1)
    other = logits.clone()
    other.scatter_(1, y[:, None], float("-inf"))
    return other.max(1).values - true


def _sorted_logits(logits, need):
    if logits.shape[1] < need:
        raise ValueError(f"the DLR loss needs at least {need} classes, got {logits.shape[1]}")
    return logits.sort(1, descending=True).values


def dlr_loss(logits, y):
    """Difference of Logits Ratio (Croce & Hein 2020, "Reliable evaluation of adversarial robustness
    with an ensemble of diverse parameter-free attacks"), per example:

        DLR(z, y) = -(z_y - max_{i != y} z_i) / (z_pi1 - z_pi3 + 1e-12)

    with z_pi1 >= z_pi2 >= ... the sorted logits.  Invariant to shifting and scaling the logits (so a
    rescaled, saturated softmax cannot hide the gradient), positive iff the example is misclassified.
    The attack maximises it.  Needs >= 3 classes."""
    srt = _sorted_logits(logits, 3)
    true = logits.gather(1, y[:, None]).squeeze(1)
    other = logits.scatter(1, y[:, None], float("-inf")).max(1).values
    return -(true - other) / (srt[:, 0] - srt[:, 2] + 1e-12)


def dlr_targeted_loss(logits, y, target):
    """Targeted DLR (Croce & Hein 2020), per example, maximised by the attack:

        DLR_t(z, y) = -(z_y - z_t) / (z_pi1 - (z_pi3 + z_pi4) / 2 + 1e-12)

    Needs >= 4 classes."""
    srt = _sorted_logits(logits, 4)
    true = logits.gather(1, y[:, None]).squeeze(1)
    tgt = logits.gather(1, target[:, None]).squeeze(1)
    return -(true - tgt) / (srt[:, 0] - 0.5 * (srt[:, 2] + srt[:, 3]) + 1e-12)


def per_example_loss(logits, y, loss="ce"):
    """Per-example attack loss: 'ce' (cross-entropy), 'cw' (CW margin), 'dlr', or a callable
    ``loss(logits, y) -> (n,)``."""
    if callable(loss):
        return loss(logits, y)
    if loss == "ce":
        return F.cross_entropy(logits, y, reduction="none")
    if loss == "cw":
        return cw_margin_loss(logits, y)
    if loss == "dlr":
        return dlr_loss(logits, y)
    raise ValueError(f"unknown attack loss {loss!r}; choose ce, cw or dlr")


def _input_grad(model, x, y, loss):
    x = x.detach().requires_grad_(True)
    logits = model(x)
    losses = per_example_loss(logits.float(), y, loss)
    (grad,) = torch.autograd.grad(losses.sum(), x)
    return grad, logits.detach(), losses.detach()


def _l2_norm(v):
    return v.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, *([1] * (v.dim() - 1)))


def project(x_adv, x, eps, norm="linf"):
    """Project x_adv onto the eps-ball around x (L-inf or L2) intersected with [0, 1]."""
    delta = x_adv - x
    if norm == "linf":
        delta = delta.clamp(-eps, eps)
    elif norm == "l2":
        delta = delta * (eps / _l2_norm(delta)).clamp(max=1.0)
    else:
        raise ValueError(f"unknown norm {norm!r}; choose linf or l2")
    return (x + delta).clamp(0, 1)


def random_start(x, eps, norm="linf"):
    """A uniform random point of the eps-ball (L-inf: per pixel; L2: uniform in the ball), in [0,1]."""
    if norm == "linf":
        delta = torch.empty_like(x).uniform_(-eps, eps)
    else:
        direction = torch.randn_like(x)
        direction = direction / _l2_norm(direction)
        radius = torch.rand(x.shape[0], device=x.device).pow(1.0 / x[0].numel())
        delta = direction * eps * radius.view(-1, *([1] * (x.dim() - 1)))
    return (x + delta).clamp(0, 1)


def fgsm(model, x, y, eps, loss="ce"):
    """Fast Gradient Sign Method (Goodfellow et al. 2015): x + eps * sign(grad_x loss), in [0,1]."""
    with eval_float32(model):
        x = x.float()
        grad, _, _ = _input_grad(model, x, y, loss)
        return project(x + eps * grad.sign(), x, eps, "linf").detach()


def pgd(model, x, y, eps, alpha, steps, restarts=1, norm="linf", loss="ce", random_init=True):
    """Projected Gradient Descent (Madry et al. 2018), L-inf or L2, with the early stop of Wong, Rice
    & Kolter 2020 ("Fast is better than free", attack_pgd in locuslab/fast_adversarial).

    Each of ``restarts`` runs starts at a random point x^(0) of the ball (or at x if
    random_init=False) and takes ``steps`` steps of size alpha, with P the projection onto the ball
    and [0, 1]:

        x^(k+1) = P(x^(k) + alpha sign(grad_x f(x^(k))))          (L-inf)
        x^(k+1) = P(x^(k) + alpha grad / ||grad||_2)              (L2)

    An example stops moving at the first iterate the model misclassifies (x^(0) included): a later
    step could make it correct again.  Per example, the result is the first run's first
    misclassified iterate; an example no run fools gets the last iterate of the run that ended with
    the highest loss.  Fooled examples are not attacked by later runs.  ``loss`` is 'ce'
    (cross-entropy), 'cw' (Carlini-Wagner margin), 'dlr' or a callable (see per_example_loss)."""
    with eval_float32(model):
        x = x.float().detach()
        best = x.clone()
        best_loss = torch.full((x.shape[0],), float("-inf"), device=x.device)
        fooled = torch.zeros(x.shape[0], dtype=torch.bool, device=x.device)
        for _ in range(restarts):
            live = (~fooled).nonzero().squeeze(1)
            if live.numel() == 0:
                break
            xs, ys = x[live], y[live]
            x_adv = random_start(xs, eps, norm) if random_init else xs.clone()
            stopped = torch.zeros(live.numel(), dtype=torch.bool, device=x.device)
            run_loss = torch.empty(live.numel(), device=x.device)
            for k in range(steps + 1):
                # only the examples not yet fooled are evaluated (eval mode: each row is independent)
                run = (~stopped).nonzero().squeeze(1)
                if run.numel() == 0:
                    break
                if k < steps:
                    grad, logits, losses = _input_grad(model, x_adv[run], ys[run], loss)
                else:  # the last iterate: its prediction and loss only
                    with torch.no_grad():
                        logits = model(x_adv[run]).float()
                        losses = per_example_loss(logits, ys[run], loss)
                run_loss[run] = losses
                now = logits.argmax(1) != ys[run]
                stopped[run[now]] = True
                if k == steps:
                    break
                move, grad = run[~now], grad[~now]
                if norm == "linf":
                    step = alpha * grad.sign()
                else:
                    step = alpha * grad / _l2_norm(grad)
                x_adv[move] = project(x_adv[move] + step, xs[move], eps, norm).detach()
            take = stopped | (run_loss > best_loss[live])
            best[live[take]] = x_adv[take]
            best_loss[live[take]] = run_loss[take]
            fooled[live[stopped]] = True
        return best


# -------------------------------------------------------------------------------------------- APGD
def apgd_checkpoints(n_iter):
    """APGD's checkpoints w_j = ceil(p_j N) (Croce & Hein 2020, Sec. 3.1): p_0 = 0, p_1 = 0.22,
    p_{j+1} = p_j + max(p_j - p_{j-1} - 0.03, 0.06), for p_j <= 1.  N = 100 gives
    [0, 22, 41, 57, 70, 80, 87, 93, 99]."""
    p = [0.0, 0.22]
    while p[-1] + max(p[-1] - p[-2] - 0.03, 0.06) <= 1:
        p.append(p[-1] + max(p[-1] - p[-2] - 0.03, 0.06))
    # round first: 0.22 * 100 is 22.000000000000004 in floating point
    return sorted({min(math.ceil(round(q * n_iter, 6)), n_iter) for q in p})


def _apgd_run(model, x, y, eps, n_iter, loss, rho=0.75, momentum=0.75, random_init=True):
    """One APGD run (Algorithm 1 of Croce & Hein 2020) on a batch, L-inf.  ``loss(logits, y, rows)``
    gives the per-example loss of the batch rows ``rows``.  An example leaves the run once it is
    misclassified (its trajectory does not depend on the others: the model is in eval mode).
    Returns (x_out, best loss, fooled): x_out is, per example, the first iterate found
    misclassified, else the iterate of highest loss."""
    n = x.shape[0]
    view = (-1,) + (1,) * (x.dim() - 1)
    checks = set(apgd_checkpoints(n_iter)[1:])
    x_cur = random_start(x, eps) if random_init else x.clone()
    x_prev = x_cur.clone()
    eta = torch.full((n,), 2.0 * eps, device=x.device)  # initial step size 2 eps
    best_x, best_grad = x_cur.clone(), torch.zeros_like(x)
    best_loss = torch.full((n,), float("-inf"), device=x.device)
    loss_prev = best_loss.clone()
    out = x_cur.clone()
    fooled = torch.zeros(n, dtype=torch.bool, device=x.device)
    successes = torch.zeros(n, device=x.device)
    halved_last = torch.zeros(n, dtype=torch.bool, device=x.device)
    best_at_check, last_check = best_loss.clone(), 0
    for k in range(n_iter + 1):
        live = (~fooled).nonzero().squeeze(1)
        if live.numel() == 0:
            break
        xl, yl = x_cur[live], y[live]
        fn = lambda z, yy: loss(z, yy, live)
        if k < n_iter:
            grad, logits, losses = _input_grad(model, xl, yl, fn)
        else:  # the last iterate: its loss only
            with torch.no_grad():
                logits = model(xl)
                losses = per_example_loss(logits.float(), yl, fn)
        now = logits.argmax(1) != yl
        out[live[now]] = xl[now]
        fooled[live[now]] = True
        if k > 0:  # successful step: f(x^(k)) > f(x^(k-1))
            successes[live] += (losses > loss_prev[live]).float()
        improved = losses > best_loss[live]
        best_x[live[improved]] = xl[improved]
        best_loss[live[improved]] = losses[improved]
        if k == n_iter:
            break
        best_grad[live[improved]] = grad[improved]
        loss_prev[live] = losses
        if k == 0:
            best_at_check = best_loss.clone()
        elif k in checks:
            # condition 1: fewer than rho (w_j - w_{j-1}) successful steps since the last checkpoint;
            # condition 2: step size not halved at the last checkpoint and best loss not improved since
            cond1 = successes < rho * (k - last_check)
            cond2 = ~halved_last & (best_loss <= best_at_check)
            halve = cond1 | cond2
            eta = torch.where(halve, eta / 2, eta)
            # restart from the best point, with its gradient and no momentum from the old path
            h = halve[live].view(view)
            xl = torch.where(h, best_x[live], xl)
            grad = torch.where(h, best_grad[live], grad)
            x_prev[live] = torch.where(h, best_x[live], x_prev[live])
            loss_prev = torch.where(halve, best_loss, loss_prev)
            halved_last, best_at_check = halve, best_loss.clone()
            successes.zero_()
            last_check = k
        xs = x[live]
        z = project(xl + eta[live].view(view) * grad.sign(), xs, eps)
        if k > 0:
            z = project(xl + momentum * (z - xl) + (1 - momentum) * (xl - x_prev[live]), xs, eps)
        x_prev[live] = xl
        x_cur[live] = z.detach()
    return torch.where(fooled.view(view), out, best_x), best_loss, fooled


def malt_target_order(model, x, y):
    """Classes ranked by MALT's linear estimate of the distance to each decision boundary (Melamed et
    al. 2024, "Mind the gap: a closer look at adversarial attacks' targets"): for class k != y,

        (z_y - z_k) / ||grad_x (z_y - z_k)||_1,

    the L-inf distance to the boundary between y and k of the logits' first-order expansion; smallest
    first.  One backward pass per class.  Returns a (n, K) index tensor whose column 0 is y."""
    x = x.detach().requires_grad_(True)
    logits = model(x).float()
    grads = [torch.autograd.grad(logits[:, k].sum(), x, retain_graph=k < logits.shape[1] - 1)[0].flatten(1)
             for k in range(logits.shape[1])]
    grads = torch.stack(grads, 1)  # n x K x d
    rows = torch.arange(len(y), device=y.device)
    margin = (logits[rows, y][:, None] - logits).detach()
    dist = margin / (grads[rows, y][:, None] - grads).abs().sum(2).clamp(min=1e-12)
    dist[rows, y] = float("-inf")  # y first, as the logit order's top class
    return dist.argsort(1)


def apgd(model, x, y, eps, n_iter=100, loss="ce", restarts=1, targeted=False, n_target_classes=9,
         rho=0.75, random_init=True, target_order="logit"):
    """Auto-PGD, L-inf (Croce & Hein 2020, "Reliable evaluation of adversarial robustness with an
    ensemble of diverse parameter-free attacks", Algorithm 1): the white-box part of AutoAttack.

    Starting at a random point x^(0) of the eps-ball, with step eta^(0) = 2 eps and P the projection
    onto the eps-ball and [0, 1]:

        x^(1)     = P(x^(0) + eta^(0) sign(grad f(x^(0))))
        z^(k+1)   = P(x^(k) + eta^(k) sign(grad f(x^(k))))
        x^(k+1)   = P(x^(k) + 0.75 (z^(k+1) - x^(k)) + 0.25 (x^(k) - x^(k-1)))     (momentum 0.75)

    At the checkpoints w_j (see apgd_checkpoints) the step size of an example is halved, and the
    example restarted from its best point so far, when
      1. fewer than rho = 0.75 of the steps since the last checkpoint raised the loss, or
      2. its step size was not halved at the last checkpoint and its best loss has not improved.
    Each example keeps its own step size and best point; the result is, per example, the first
    misclassified iterate, else the highest-loss one (over ``restarts`` runs).

    ``loss``: 'ce' (APGD-CE) or 'dlr' (APGD-DLR, see dlr_loss).  ``targeted=True`` runs APGD-T: the
    targeted DLR loss (dlr_targeted_loss) towards each of the ``n_target_classes`` classes of highest
    clean logit after the top one (``target_order='malt'``: the nearest by malt_target_order),
    ``restarts`` runs each.  Only examples the model classifies
    correctly are attacked (the others are already errors), and an example leaves the attack once
    fooled.  One forward/backward pass per iteration and live example."""
    if n_iter < 1 or restarts < 1:
        raise ValueError("apgd needs n_iter >= 1 and restarts >= 1")
    if not targeted and loss not in ("ce", "dlr"):
        raise ValueError(f"unknown APGD loss {loss!r}; choose ce or dlr")
    with eval_float32(model):
        x = x.float().detach()
        adv = x.clone()
        with torch.no_grad():
            logits = model(x).float()
        active = logits.argmax(1) == y
        best_loss = torch.full((x.shape[0],), float("-inf"), device=x.device)
        if targeted:
            if target_order == "malt":
                with torch.enable_grad():
                    order = malt_target_order(model, x, y)
            elif target_order == "logit":
                order = logits.sort(1, descending=True).indices
            else:
                raise ValueError(f"unknown target order {target_order!r}; choose logit or malt")
            # the k-th most likely class after the top one (= y for the attacked examples)
            targets = [order[:, k] for k in range(1, min(n_target_classes, logits.shape[1] - 1) + 1)]
            runs = [(lambda t: (lambda z, yy, rows: dlr_targeted_loss(z, yy, t[rows])))(t)
                    for t in targets for _ in range(restarts)]
        else:
            runs = [lambda z, yy, rows: per_example_loss(z, yy, loss)] * restarts
        for run_loss in runs:
            idx = active.nonzero().squeeze(1)
            if idx.numel() == 0:
                break
            fn = (lambda f, i: (lambda z, yy, rows: f(z, yy, i[rows])))(run_loss, idx)
            x_out, run_best, fooled = _apgd_run(model, x[idx], y[idx], eps, n_iter, fn, rho, random_init=random_init)
            # keep: a fooling point; else (same loss over runs) the higher-loss point, or the first run's
            keep = fooled | (torch.isinf(best_loss[idx]) if targeted else run_best > best_loss[idx])
            adv[idx[keep]] = x_out[keep]
            best_loss[idx[keep]] = run_best[keep]
            active[idx[fooled]] = False
        return adv.detach()


# ------------------------------------------------------------------------------------------ Square
def square_p(p_init, i, n_queries):
    """The fraction p of pixels a Square-attack square covers at iteration i (Andriushchenko et al.
    2020): halved at iterations 10, 50, 200, 500, 1000, 2000, 4000, 6000, 8000 of a 10,000-query
    schedule, rescaled to n_queries."""
    it = int(i / n_queries * 10000)
    return p_init / 2 ** sum(it > t for t in (10, 50, 200, 500, 1000, 2000, 4000, 6000, 8000))


def _margins(model, x, y):
    logits = model(x).float()
    return -cw_margin_loss(logits, y)  # z_y - max_{k != y} z_k: negative iff misclassified


@torch.no_grad()
def square(model, x, y, eps, n_queries=5000, p_init=0.8, return_queries=False):
    """Square attack, L-inf (Andriushchenko, Croce, Flammarion & Hein 2020, "Square Attack: a
    query-efficient black-box adversarial attack via random search").  Score-based black box: uses
    the model's logits only, never its gradients, so gradient masking does not stop it.

    Minimises the margin loss L(x) = z_y(x) - max_{k != y} z_k(x) (negative = misclassified) by random
    search on the vertices of the eps-ball:
      * init: vertical stripes, x + eps * s with one random sign s per (channel, column);
      * step i: a square of side h_i = round(sqrt(p_i * H * W)) (clamped to [1, H-1]) at a random place
        gets a new perturbation +-eps (one random sign per channel); the candidate is kept iff it
        lowers the margin.  p_i follows square_p (p_init halved at fixed fractions of the budget).
    Only examples still classified correctly are updated and queried; an example stops once fooled.
    ``n_queries`` counts the model evaluations per example, the stripe init included (the clean
    prediction that selects the attacked examples is not counted).  p_init = 0.8 is AutoAttack's
    setting for 5000 queries (the paper uses 0.05 with 10,000 queries on ImageNet).

    Returns x_adv, or (x_adv, queries per example) with return_queries=True."""
    with eval_float32(model):
        x = x.float().detach()
        n, c, h, w = x.shape
        queries = torch.zeros(n, dtype=torch.long, device=x.device)
        adv = x.clone()
        margin = _margins(model, x, y)
        idx = (margin > 0).nonzero().squeeze(1)
        if idx.numel() and n_queries >= 1:
            signs = torch.randint(0, 2, (idx.numel(), c, 1, w), device=x.device).float() * 2 - 1
            adv[idx] = (x[idx] + eps * signs).clamp(0, 1)
            margin[idx] = _margins(model, adv[idx], y[idx])
            queries[idx] += 1
        rows, cols = torch.arange(h, device=x.device), torch.arange(w, device=x.device)
        for i in range(1, n_queries):
            idx = (margin > 0).nonzero().squeeze(1)
            if idx.numel() == 0:
                break
            xs, cur = x[idx], adv[idx]
            delta = cur - xs
            s = int(round(math.sqrt(square_p(p_init, i, n_queries) * h * w)))
            s = min(max(s, 1), min(h, w) - 1)
            k = idx.numel()
            top = torch.randint(0, h - s + 1, (k,), device=x.device)
            left = torch.randint(0, w - s + 1, (k,), device=x.device)
            values = eps * (torch.randint(0, 2, (k, c, 1, 1), device=x.device).float() * 2 - 1)
            for attempt in range(10):  # redraw squares that would leave an image unchanged (as the paper's code)
                in_rows = (rows >= top[:, None]) & (rows < top[:, None] + s)
                in_cols = (cols >= left[:, None]) & (cols < left[:, None] + s)
                mask = (in_rows[:, :, None] & in_cols[:, None, :])[:, None]  # (k, 1, h, w)
                cand = (xs + torch.where(mask, values, delta)).clamp(0, 1)
                same = (cand - cur).abs().flatten(1).amax(1) < 1e-7
                if attempt == 9 or not same.any():
                    break
                m = int(same.sum())
                top[same] = torch.randint(0, h - s + 1, (m,), device=x.device)
                left[same] = torch.randint(0, w - s + 1, (m,), device=x.device)
                values[same] = eps * (torch.randint(0, 2, (m, c, 1, 1), device=x.device).float() * 2 - 1)
            new_margin = _margins(model, cand, y[idx])
            queries[idx] += 1
            better = new_margin < margin[idx]
            adv[idx[better]] = cand[better]
            margin[idx[better]] = new_margin[better]
        adv = project(adv, x, eps)  # a no-op up to rounding: every candidate is x + (+-eps or old delta), clamped
        return (adv, queries) if return_queries else adv


@torch.no_grad()
def predict(model, x, batch_size=512):
    """Class predictions in eval mode and float32, batched."""
    with eval_float32(model):
        return torch.cat([model(x[i:i + batch_size].float()).argmax(1) for i in range(0, len(x), batch_size)])


def robust_accuracy(model, x, y, attack=None, batch_size=256, device=None, progress=None):
    """Accuracy of ``model`` on (x, y) after ``attack(model, xb, yb) -> x_adv`` (None = clean).

    x, y may live on the CPU; batches are moved to ``device`` (default: the model's).  ``progress``
    is an optional callable wrapping the batch iterator (e.g. a tqdm partial).  Returns (accuracy,
    per-example correctness as a bool tensor on the CPU)."""
    device = device or next(model.parameters()).device
    starts = range(0, len(x), batch_size)
    correct = []
    for i in (progress(starts) if progress else starts):
        xb = x[i:i + batch_size].to(device, non_blocking=True).float()
        yb = y[i:i + batch_size].to(device, non_blocking=True)
        if attack is not None:
            xb = attack(model, xb, yb)
        correct.append(predict(model, xb, batch_size) == yb)
    correct = torch.cat(correct).cpu()
    return correct.float().mean().item(), correct


# ------------------------------------------------------------------------------- noise and gradients
@torch.no_grad()
def noise_accuracy(model, x, y, sigmas, seed=0, batch_size=256, device=None, progress=None):
    """Accuracy under additive Gaussian noise (Zhao & Griffin 2016): for each sigma, the accuracy on
    clip(x + sigma z, 0, 1) with z ~ N(0, I).  One z per image, shared by all sigmas (common random
    numbers: the curve over sigma is not jagged by resampling); z is drawn on the CPU from
    torch.Generator().manual_seed(seed), batch after batch (torch.randn(xb.shape, generator=g)), so
    the result does not depend on the device.  Returns {sigma: accuracy}."""
    device = device or next(model.parameters()).device
    g = torch.Generator().manual_seed(seed)
    correct = {s: 0 for s in sigmas}
    starts = range(0, len(x), batch_size)
    with eval_float32(model):
        for i in (progress(starts) if progress else starts):
            xb = x[i:i + batch_size].float()
            z = torch.randn(xb.shape, generator=g)
            xb, z, yb = xb.to(device), z.to(device), y[i:i + batch_size].to(device)
            for s in sigmas:
                correct[s] += (model((xb + s * z).clamp(0, 1)).argmax(1) == yb).sum().item()
    return {s: correct[s] / len(x) for s in sigmas}


@torch.no_grad()
def nonsense_rate(model, n, shape, threshold=0.9, seed=0, mean=0.5, std=0.25, batch_size=256, device=None):
    """The "nonsense" rate (Zhao & Griffin 2016): the share of pure-noise images the model labels with
    confidence (max softmax probability) above ``threshold``.  The images are clip(mean + std z, 0, 1),
    z ~ N(0, I) of ``shape`` (C, H, W), drawn on the CPU from torch.Generator().manual_seed(seed) batch
    after batch.  A model that is sure about noise is over-confident off the data.  Returns
    {rate, mean_confidence, threshold, n, predicted_class_counts}."""
    device = device or next(model.parameters()).device
    g = torch.Generator().manual_seed(seed)
    conf, pred = [], []
    with eval_float32(model):
        for i in range(0, n, batch_size):
            z = torch.randn((min(batch_size, n - i), *shape), generator=g)
            p = F.softmax(model((mean + std * z).clamp(0, 1).to(device)).float(), 1).max(1)
            conf.append(p.values.cpu())
            pred.append(p.indices.cpu())
    conf, pred = torch.cat(conf), torch.cat(pred)
    return {"rate": (conf > threshold).float().mean().item(), "mean_confidence": conf.mean().item(),
            "threshold": threshold, "n": n, "predicted_class_counts": torch.bincount(pred).tolist()}


def input_gradient_stats(model, x, y, loss="ce", batch_size=256, device=None):
    """Mean |d loss / d x| over (x, y) and the share of examples whose input gradient is exactly 0
    (eval mode, float32, batched; x, y may live on the CPU, batches go to ``device``, default the
    model's).  Gradients that vanish (e.g. a quantising, shattering input layer) make gradient
    attacks report robustness that is not there, on every image where they vanish.
    Returns {mean_abs_grad, zero_grad_share, n}."""
    device = device or next(model.parameters()).device
    total, zero = 0.0, 0
    with eval_float32(model):
        for i in range(0, len(x), batch_size):
            xb, yb = x[i:i + batch_size].to(device).float(), y[i:i + batch_size].to(device)
            grad, _, _ = _input_grad(model, xb, yb, loss)
            flat = grad.flatten(1).abs()
            total += flat.mean(1).sum().item()
            zero += int((flat.amax(1) == 0).sum())
    return {"mean_abs_grad": total / len(x), "zero_grad_share": zero / len(x), "n": len(x)}


def targeted_fgs(model, x, target, beta):
    """One fast-gradient-sign step of strength ``beta`` towards class ``target`` (Zhao & Griffin 2016,
    after Goodfellow et al.): x' = clip(x - beta * sign(grad_x CE(f(x), target)), 0, 1), i.e. down the
    loss of the chosen category.  Eval mode, float32."""
    if beta == 0:
        return x.detach()
    with eval_float32(model):
        x = x.detach().float().requires_grad_(True)
        (grad,) = torch.autograd.grad(F.cross_entropy(model(x).float(), target), x)
    return (x - beta * grad.sign()).clamp(0, 1).detach()


def saf_curves(model, x, y, betas, threshold=0.9, seed=0, noise_mean=0.5, noise_std=0.25, batch_size=256,
               device=None, progress=None, confidence="softmax", accept_clean=None):
    """Zhao & Griffin's three curves over a strength beta, on (x, y) ([0,1] images, may live on the
    CPU), each with the "nonsense" decision: a prediction whose best confidence score is below
    ``threshold`` is read as "this is nonsense" rather than a category.  The score is the softmax
    probability, or with ``confidence="output"`` the raw output itself (the scale a model trained on
    the hybrid loss learns: 1 for its category, 0 for the others).  With ``accept_clean`` (a share
    in (0, 1]) the threshold is not ``threshold`` but the score that this share of the clean images
    (x) reach: every model then works at the same clean acceptance, whatever the scale of its score
    (a hybrid-loss model's softmax stays far below 0.9 even when it is right).

    - adversarial: x' = targeted_fgs(x, t, beta) towards a random incorrect category t; accuracy =
      share still predicted correctly (above the threshold), fooled = share predicted as t;
    - nonsense: pure noise clip(noise_mean + noise_std z, 0, 1) pushed towards a random category t by
      targeted_fgs with strength beta; rejected = share decided "nonsense" (the higher the better),
      fooled = share predicted as t above the threshold;
    - noisy: clip(x + beta z, 0, 1), z ~ N(0, I); accuracy as for adversarial samples.

    Targets and noise come from torch.Generator().manual_seed(seed) on the CPU, one draw per image
    shared by all betas (the curves are not jagged by resampling).  Returns {kind: {beta: {...}}}."""
    device = device or next(model.parameters()).device
    score = lambda logits: (F.softmax(logits, 1) if confidence == "softmax" else logits).max(1)
    if accept_clean is not None:
        if not 0 < accept_clean <= 1:
            raise ValueError(f"accept_clean must be a share in (0, 1], got {accept_clean}")
        with torch.no_grad(), eval_float32(model):
            clean = torch.cat([score(model(x[i:i + batch_size].float().to(device)).float()).values.cpu()
                               for i in range(0, len(x), batch_size)])
        # the largest threshold that keeps at least accept_clean of the clean scores (>= threshold)
        threshold = clean.sort(descending=True).values[math.ceil(accept_clean * len(clean)) - 1].item()
    g = torch.Generator().manual_seed(seed)
    out = {k: {b: {"correct": 0, "fooled": 0, "nonsense": 0} for b in betas} for k in ("adversarial", "nonsense", "noisy")}
    starts = range(0, len(x), batch_size)
    k = None
    for i in (progress(starts) if progress else starts):
        xb, yb = x[i:i + batch_size].float(), y[i:i + batch_size]
        if k is None:
            with torch.no_grad(), eval_float32(model):
                k = model(xb[:1].to(device)).shape[1]
        wrong = (yb + torch.randint(1, k, yb.shape, generator=g)) % k  # a random incorrect category
        target = torch.randint(0, k, yb.shape, generator=g)
        noise = (noise_mean + noise_std * torch.randn(xb.shape, generator=g)).clamp(0, 1)
        z = torch.randn(xb.shape, generator=g)
        xb, yb, wrong, target, noise, z = (t.to(device) for t in (xb, yb, wrong, target, noise, z))
        for b in betas:
            for kind, xin, t in (("adversarial", targeted_fgs(model, xb, wrong, b), wrong),
                                 ("nonsense", targeted_fgs(model, noise, target, b), target),
                                 ("noisy", (xb + b * z).clamp(0, 1), None)):
                with torch.no_grad(), eval_float32(model):
                    p = score(model(xin).float())
                sure = p.values >= threshold
                r = out[kind][b]
                r["nonsense"] += (~sure).sum().item()
                if kind != "nonsense":
                    r["correct"] += (sure & (p.indices == yb)).sum().item()
                if t is not None:
                    r["fooled"] += (sure & (p.indices == t)).sum().item()
    n = len(x)
    result = {}
    for kind, curve in out.items():
        result[kind] = {}
        for b, r in curve.items():
            row = {"nonsense": r["nonsense"] / n}
            if kind != "nonsense":
                row["accuracy"] = r["correct"] / n
            if kind != "noisy":
                row["fooled"] = r["fooled"] / n
            result[kind][f"{b:.6g}"] = row
    return {"threshold": threshold, "confidence": confidence, "accept_clean": accept_clean, "n": n,
            "betas": list(betas), **result}
