"""White-box attacks on [0, 1] image classifiers, and robust-accuracy evaluation.

Every attack here runs with the model in eval mode and in float32 (autocast off), whatever mode and
precision the caller trains in, and returns adversarial images that never leave the eps-ball around
x nor [0, 1].  The model is put back in its previous mode afterwards.  Gradients are taken with
torch.autograd.grad, so parameter .grad fields are never touched.

Imports only torch.
"""
import contextlib

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


def per_example_loss(logits, y, loss="ce"):
    if loss == "ce":
        return F.cross_entropy(logits, y, reduction="none")
    if loss == "cw":
        return cw_margin_loss(logits, y)
    raise ValueError(f"unknown attack loss {loss!r}; choose ce or cw")


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
    """Projected Gradient Descent (Madry et al. 2018), L-inf or L2.

    Each of ``restarts`` runs starts at a random point of the ball (or at x if random_init=False)
    and takes ``steps`` steps of size ``alpha`` (sign of the gradient for L-inf, normalised gradient
    for L2), projecting onto the ball and [0,1] after each.  Per example, the result is the worst
    case over restarts: the first point found that is misclassified, else the one of highest loss.
    ``loss`` is 'ce' (cross-entropy) or 'cw' (Carlini-Wagner margin)."""
    with eval_float32(model):
        x = x.float().detach()
        best = x.clone()
        best_loss = torch.full((x.shape[0],), float("-inf"), device=x.device)
        fooled = torch.zeros(x.shape[0], dtype=torch.bool, device=x.device)
        for _ in range(restarts):
            x_adv = random_start(x, eps, norm) if random_init else x.clone()
            for _ in range(steps):
                grad, _, _ = _input_grad(model, x_adv, y, loss)
                if norm == "linf":
                    step = alpha * grad.sign()
                else:
                    step = alpha * grad / _l2_norm(grad)
                x_adv = project(x_adv + step, x, eps, norm).detach()
            with torch.no_grad():
                logits = model(x_adv)
                losses = per_example_loss(logits, y, loss)
                now_fooled = logits.argmax(1) != y
            take = ~fooled & (now_fooled | (losses > best_loss))
            best[take] = x_adv[take]
            best_loss = torch.where(take, losses, best_loss)
            fooled |= now_fooled
        return best


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
