"""Fast adversarial training: FGSM with a random start (Wong, Rice & Kolter 2020, "Fast is better
than free").

Per minibatch: delta ~ U(-eps, eps) with x + delta kept in [0, 1]; one signed-gradient step
delta <- delta + alpha * sign(grad_delta loss), alpha = 1.25 eps; project onto the eps-ball and
[0, 1]; train on x + delta.  Defaults are the paper's CIFAR-10 ones: 15 epochs, cyclic learning rate
0 -> 0.2 -> 0, eps 8/255, alpha 10/255, batch 128, SGD momentum 0.9, weight decay 5e-4.  After each
epoch PGD on a held batch of training images watches for catastrophic overfitting; if it collapses,
the run stops with the best weights.  Optional fixes: N-FGSM (de Jorge et al. 2022) and GradAlign
(Andriushchenko & Flammarion 2020).

    python train_fast.py --act kaf --epochs 15
    python train_fast.py --dataset fashionmnist --data-dir /usr/share/datasets/fashion-mnist \\
        --model lenet --act relu --epochs 3 --epsilon 0.1
"""
import torch
import torch.nn.functional as F

import utils


def get_args(argv=None):
    p = utils.base_parser(__doc__.split("\n\n")[0], epochs=15, lr_max=0.2, lr_schedule="cyclic")
    g = p.add_argument_group("FGSM training")
    g.add_argument("--alpha", type=utils.fraction, default=None, help="FGSM step (default 1.25 * eps; eps with --nfgsm)")
    g.add_argument("--init", default="random", choices=["random", "zero"], help="start of the FGSM step (zero = plain FGSM training)")
    g.add_argument("--nfgsm", action="store_true", help="N-FGSM: noise U(-2eps, 2eps), step eps, no projection to the eps-ball")
    g.add_argument("--grad-align", type=float, default=0.0, help="GradAlign weight lambda (0.2 at 8/255; 0 = off)")
    args = utils.parse_args(p, argv)
    if args.alpha is not None and args.alpha <= 0:
        p.error("--alpha must be > 0")
    if args.grad_align < 0:
        p.error("--grad-align must be >= 0")
    if args.nfgsm and args.init == "zero":
        p.error("--nfgsm starts from noise; it cannot be combined with --init zero")
    return args


def input_gradient(run, x, y, create_graph=False):
    """Gradient of the (scaled) training loss w.r.t. the input only: no weight gradients computed."""
    x = x if x.requires_grad else x.detach().requires_grad_(True)
    with run.autocast():
        loss = F.cross_entropy(run.attack_forward(x), y)
    (grad,) = torch.autograd.grad(run.scaler.scale(loss), x, create_graph=create_graph)
    return grad


def fgsm_delta(run, x, y, eps, alpha, init="random", nfgsm=False):
    """The FGSM(-RS) or N-FGSM perturbation of a training batch (model in train mode, as in the paper)."""
    if nfgsm:
        delta = torch.empty_like(x).uniform_(-2 * eps, 2 * eps)
    elif init == "random":
        delta = torch.empty_like(x).uniform_(-eps, eps)
    else:
        delta = torch.zeros_like(x)
    delta = (x + delta).clamp(0, 1) - x
    grad = input_gradient(run, x + delta, y)
    delta = delta.detach() + alpha * grad.sign()
    if not nfgsm:
        delta = delta.clamp(-eps, eps)
    return ((x + delta).clamp(0, 1) - x).detach()


def grad_align_penalty(run, x, y, eps):
    """GradAlign: 1 - cos(grad_x loss(x), grad_x loss(x + eta)), eta ~ U(-eps, eps), differentiable."""
    g1 = input_gradient(run, x.detach().requires_grad_(True), y, create_graph=True)
    eta = torch.empty_like(x).uniform_(-eps, eps)
    g2 = input_gradient(run, (x + eta).clamp(0, 1).detach().requires_grad_(True), y, create_graph=True)
    cos = F.cosine_similarity(g1.flatten(1).float(), g2.flatten(1).float(), dim=1)
    return (1 - cos).mean()


def make_train_step(run, args):
    """``train_step(x, y) -> (loss, n_correct)`` for Run.fit: FGSM(-RS / N-FGSM) perturbation, then one
    SGD step on the perturbed batch (plus the GradAlign penalty when asked)."""
    eps = args.epsilon
    alpha = args.alpha if args.alpha is not None else (eps if args.nfgsm else 1.25 * eps)

    def train_step(x, y):
        delta = fgsm_delta(run, x, y, eps, alpha, args.init, args.nfgsm)
        with run.autocast():
            logits = run.forward(x + delta)
            loss = F.cross_entropy(logits, y)
        total = loss
        if args.grad_align > 0:
            total = loss + args.grad_align * grad_align_penalty(run, x, y, eps)
        run.step(total)
        return loss.detach(), (logits.argmax(1) == y).sum()

    return train_step


def main(argv=None):
    args = get_args(argv)
    run = utils.Run(args, "train_fast")
    train_step = make_train_step(run, args)
    if args.lr_find:
        return utils.lr_range_test(run, train_step)
    return run.fit(train_step)


if __name__ == "__main__":
    utils.main_guard(main)
