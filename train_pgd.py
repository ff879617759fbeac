"""PGD adversarial training (Madry et al. 2018, "Towards deep learning models resistant to
adversarial attacks"), optionally with the TRADES loss (Zhang et al. 2019).

min_theta E max_{|delta|_inf <= eps} CE(f(x + delta), y), the inner max by k = --attack-iters steps
of projected signed-gradient ascent of size alpha = --attack-step from a random start:

    delta_0 ~ U(-eps, eps);  delta <- Proj(delta + alpha * sign(grad_delta CE)),

Proj onto the eps-ball and x + delta in [0, 1]; then one SGD step on CE(f(x + delta), y).  As in the
reference code (Wong et al.'s train_pgd.py) the attack runs on the model in train mode, under
autocast, computing input gradients only.

--loss trades: CE(f(x), y) + beta * KL(f(x) || f(x_adv)) averaged over the batch, beta =
--trades-beta (6), where x_adv maximises the KL term by the same k steps started at
x + 0.001 N(0, 1), with the model in eval mode during that attack, as in the TRADES reference code.

Defaults: k = 10, alpha = 2/255 (Rice et al. 2020's PGD-10; Madry et al. and the fast-AT comparison
used PGD-7: --attack-iters 7; the TRADES code steps 0.007), eps 8/255, and the schedule of Wong et
al.'s PGD baseline (their train_pgd.py), so the three regimes compare at their reference budgets:
15 epochs, cyclic LR 0 -> 0.2 -> 0, batch 128, SGD momentum 0.9, wd 5e-4.  (Madry et al., Rice et
al. and TRADES train 76-200 epochs with a piecewise LR from 0.1: --lr-schedule piecewise --lr-max 0.1.)

    python train_pgd.py --act psilu --attack-iters 7
    python train_pgd.py --act pssilu --loss trades --trades-beta 6
"""
import torch
import torch.nn.functional as F

import utils


def get_args(argv=None):
    p = utils.base_parser(__doc__.split("\n\n")[0], epochs=15, lr_max=0.2, lr_schedule="cyclic")
    g = p.add_argument_group("PGD training")
    g.add_argument("--attack-iters", type=int, default=10, help="k: PGD steps per minibatch")
    g.add_argument("--attack-step", type=utils.fraction, default=2 / 255, help="alpha: PGD step size, e.g. 2/255")
    g.add_argument("--loss", default="ce", choices=["ce", "trades"], help="ce: Madry et al.; trades: Zhang et al.")
    g.add_argument("--trades-beta", type=float, default=6.0, help="TRADES weight of the KL term")
    args = utils.parse_args(p, argv)
    if args.attack_iters < 1:
        p.error("--attack-iters must be >= 1")
    if args.attack_step <= 0:
        p.error("--attack-step must be > 0")
    if args.trades_beta < 0:
        p.error("--trades-beta must be >= 0")
    return args


def pgd_delta(run, x, objective, eps, alpha, iters, start):
    """``iters`` projected signed-gradient ascent steps on ``objective(logits)`` from x + start, in
    the model's current mode.  Only input gradients are computed (scaled under fp16, which keeps
    their sign).  Returns (delta, number of steps taken)."""
    delta = ((x + start.clamp(-eps, eps)).clamp(0, 1) - x).detach()
    steps = 0
    for _ in range(iters):
        delta.requires_grad_(True)
        with torch.enable_grad(), run.autocast():  # also when called under no_grad
            loss = objective(run.attack_forward(x + delta))
        (grad,) = torch.autograd.grad(run.scaler.scale(loss), delta)
        grad = torch.nan_to_num(grad, nan=0.0)  # an fp16 overflow must not turn delta into NaN
        delta = (delta.detach() + alpha * grad.sign()).clamp(-eps, eps)
        delta = (x + delta).clamp(0, 1) - x
        steps += 1
    return delta.detach(), steps


def trades_loss(run, x, y, eps, alpha, iters, beta):
    """TRADES: CE(f(x), y) + beta * KL(f(x) || f(x_adv)); returns (loss, logits of x_adv, attack steps)."""
    run.model.eval()  # the TRADES reference attacks in eval mode
    with torch.no_grad(), run.autocast():
        p_clean = F.softmax(run.attack_forward(x).float(), dim=1)
    kl = lambda logits: F.kl_div(F.log_softmax(logits.float(), dim=1), p_clean, reduction="sum")
    delta, steps = pgd_delta(run, x, kl, eps, alpha, iters, 0.001 * torch.randn_like(x))
    run.model.train()
    with run.autocast():
        logits, logits_adv = run.forward(x), run.forward(x + delta)
    robust = F.kl_div(F.log_softmax(logits_adv.float(), dim=1), F.softmax(logits.float(), dim=1), reduction="batchmean")
    return F.cross_entropy(logits.float(), y) + beta * robust, logits_adv, steps


def make_train_step(run, args):
    """``train_step`` for Run.fit; counts the attack's steps in run.counts['attack_steps']."""
    eps, alpha, k = args.epsilon, args.attack_step, args.attack_iters
    run.counts["attack_steps"] = 0

    def train_step(x, y):
        if args.loss == "trades":
            loss, logits, steps = trades_loss(run, x, y, eps, alpha, k, args.trades_beta)
        else:
            ce = lambda logits: F.cross_entropy(logits, y)
            delta, steps = pgd_delta(run, x, ce, eps, alpha, k, torch.empty_like(x).uniform_(-eps, eps))
            with run.autocast():
                logits = run.forward(x + delta)
                loss = F.cross_entropy(logits, y)
        run.counts["attack_steps"] += steps
        run.step(loss)
        return loss.detach(), (logits.argmax(1) == y).sum()

    return train_step


def main(argv=None):
    args = get_args(argv)
    run = utils.Run(args, "train_pgd")
    train_step = make_train_step(run, args)
    if args.lr_find:
        return utils.lr_range_test(run, train_step)
    return run.fit(train_step)


if __name__ == "__main__":
    utils.main_guard(main)
