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
import copy
import os
import time

import torch
import torch.nn.functional as F

import tricks
import utils


def get_args(argv=None):
    p = utils.parser(__doc__.split("\n\n")[0])
    g = p.add_argument_group("PGD training")
    g.add_argument("--attack-iters", type=int, default=10, help="k: PGD steps per minibatch")
    g.add_argument("--attack-step", type=utils.fraction, default=2 / 255, help="alpha: PGD step size, e.g. 2/255")
    g.add_argument("--loss", default="ce", choices=["ce", "trades"], help="ce: Madry et al.; trades: Zhang et al.")
    g.add_argument("--trades-beta", type=float, default=6.0, help="TRADES weight of the KL term")
    g.add_argument("--attack-mode", default=None, choices=["eval", "train"],
                   help="model mode while the attack runs (default: the references': train for ce as Wong et al., eval for trades; Dai et al. use eval)")
    utils.add_shared_flags(p, epochs=15, lr_max=0.2, lr_schedule="cyclic")
    tricks.add_flags(p)
    args = utils.parse_args(p, argv, checks=[tricks.flag_problems])
    if args.attack_iters < 1:
        p.error("--attack-iters must be >= 1")
    if args.attack_step <= 0:
        p.error("--attack-step must be > 0")
    if args.trades_beta < 0:
        p.error("--trades-beta must be >= 0")
    args.attack_mode = args.attack_mode or ("eval" if args.loss == "trades" else "train")
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


def trades_loss(run, x, y, eps, alpha, iters, beta, attack_mode="eval"):
    """TRADES: CE(f(x), y) + beta * KL(f(x) || f(x_adv)); returns (loss, logits of x_adv, attack steps)."""
    run.model.train(attack_mode == "train")  # the TRADES reference attacks in eval mode
    with torch.no_grad(), run.autocast():
        p_clean = F.softmax(run.attack_forward(x).float(), dim=1)
    kl = lambda logits: F.kl_div(F.log_softmax(logits.float(), dim=1), p_clean, reduction="sum")
    delta, steps = pgd_delta(run, x, kl, eps, alpha, iters, 0.001 * torch.randn_like(x))
    run.model.train()
    with run.autocast():
        logits, logits_adv = run.forward(x), run.forward(x + delta)
    robust = F.kl_div(F.log_softmax(logits_adv.float(), dim=1), F.softmax(logits.float(), dim=1), reduction="batchmean")
    return F.cross_entropy(logits.float(), y) + beta * robust, logits_adv, steps


def train_step(run, tr, x, y, args):
    """One minibatch: the PGD (or TRADES) perturbation, then one SGD step on its loss (plus the
    mean-training term when asked), at the LR the optimiser holds.  Returns the loss, the number of
    correct predictions on x + delta, a non-finite flag (device tensors) and the attack's steps."""
    eps, alpha, k = args.epsilon, args.attack_step, args.attack_iters
    if args.loss == "trades":
        loss, logits, steps = trades_loss(run, x, y, eps, alpha, k, args.trades_beta, args.attack_mode)
    else:
        ce = lambda logits: F.cross_entropy(logits, y)
        run.model.train(args.attack_mode == "train")
        delta, steps = pgd_delta(run, x, ce, eps, alpha, k, torch.empty_like(x).uniform_(-eps, eps))
        run.model.train()
        with run.autocast():
            logits = run.forward(x + delta)
            loss = tricks.hybrid_loss(logits, y, args.hybrid_weight, args.hybrid_p)  # CE unless --hybrid-weight
    total = loss + tr.mean_loss(run.model, run.forward, run.autocast) if tr.mean_copies else loss
    total = total + utils.activation_penalty(run, args)  # PSSiLU: Dai et al.'s L1 penalty on the shift
    run.scaler.scale(total).backward()  # fp16: scaled, so that small gradients do not underflow
    bad = ~torch.isfinite(loss.detach().float())
    bad = bad | utils.clip_gradients(run, args)  # --grad-clip, PSSiLU's --pssilu-beta-clip
    run.scaler.step(run.opt)  # skipped by the fp16 scaler when the gradients overflowed
    run.scaler.update()
    run.opt.zero_grad(set_to_none=True)
    return loss.detach(), (logits.argmax(1) == y).sum(), bad, steps


def main(argv=None, data=None):
    """Train; ``data`` = (x_train, y_train, x_test, y_test) replaces --dataset's files (bench.py)."""
    args = get_args(argv)
    run = utils.setup(args, "train_pgd", data)  # device, data on it, model, SGD, AMP scaler, out dir
    tr = tricks.TrainingTricks.for_run(args, run)  # random / mean training, extra data: no-ops unless asked
    if args.lr_find:
        return tricks.lr_range_test(run, args, lambda x, y: train_step(run, tr, *tr.mix(x, y), args)[0])
    total_steps = args.epochs * len(run.batches)
    start, it, history, best, train_time, guard, curve, attack_steps = 0, 0, [], None, 0.0, None, [], 0
    if args.resume and (ckpt := utils.load_for_resume(run, args, args.epochs)):
        start, it, history, best, train_time, guard, curve, attack_steps = (
            ckpt[k] for k in ("epoch", "iteration", "history", "best", "train_time_s", "guard", "curve", "attack_steps"))

    def save(path, epoch):  # everything eval.py and --resume need
        utils.save_checkpoint(run, args, path, epoch=epoch, iteration=it, history=history, best=best,
                              train_time_s=train_time, guard=guard, curve=curve, attack_steps=attack_steps)

    summary = utils.start_summary(run, args, args.epochs)
    summary["regime"] = args.loss if args.loss == "trades" else "pgd"
    summary["catastrophic_overfitting"] = guard
    epoch = start
    try:
        while epoch < args.epochs and guard is None:  # a run the guard stopped stays stopped
            epoch += 1
            run.model.train()
            meter = utils.EpochMeter(run, epoch, args.epochs)
            tic = time.time()
            for x, y in meter.bar:
                x, y = tr.mix(x, y)
                lr = utils.scheduled_lr(run.opt, it, total_steps, args)
                loss, correct, bad, steps = train_step(run, tr, x, y, args)
                it += 1
                if args.eval_every and it % args.eval_every == 0:  # accuracy over iterations (--eval-every)
                    curve.append(utils.probe(run, args, it, lr))
                attack_steps += steps
                meter.add(loss, correct, len(y), bad, lr)
            train_loss, train_acc = meter.result()
            train_time += time.time() - tic
            utils.sync_buffers(run)
            held = utils.held_out_pgd(run, args.epsilon)
            history.append(dict(epoch=epoch, train_loss=train_loss, train_acc=train_acc, held_pgd_acc=held, lr=lr,
                                time_s=round(train_time, 2)))
            utils.log(run, f"epoch {epoch:3d}  loss {train_loss:.4f}  acc {train_acc:.4f}  held-out PGD-10 acc {held:.4f}  "
                           f"lr {lr:.4g}  time {train_time:.1f}s")
            if utils.collapsed(held, best, args.co_guard):  # catastrophic overfitting: back to the best epoch, stop
                guard = dict(epoch=epoch, held_pgd_acc=held, best_held_pgd_acc=best["held_pgd_acc"], restored_epoch=best["epoch"])
                utils.log(run, f"catastrophic overfitting detected in epoch {epoch}: held-out PGD accuracy fell from "
                               f"{best['held_pgd_acc']:.3f} to {held:.3f}; restoring the weights of epoch {best['epoch']} and stopping")
                run.model.load_state_dict(best["model_state"])
                break
            if best is None or held >= best["held_pgd_acc"]:
                best = dict(epoch=epoch, held_pgd_acc=held, model_state=copy.deepcopy(run.model.state_dict()))
            save(os.path.join(run.out_dir, "checkpoint.pt"), epoch)
    except (utils.Diverged, KeyboardInterrupt) as stop:
        done = len(history)  # completed epochs
        counts = dict(optimizer_steps=it, attack_steps=attack_steps)
        summary.update(utils.results(run, args, done, train_time, history, counts, evaluated=False, curve=curve))
        raise utils.record_stop(run, stop, summary, done, lambda path: save(path, done)) from None
    save(os.path.join(run.out_dir, "checkpoint.pt"), epoch)
    summary.update(catastrophic_overfitting=guard, stopped_early=guard and f"catastrophic overfitting in epoch {guard['epoch']}")
    counts = dict(optimizer_steps=it, attack_steps=attack_steps)
    summary.update(utils.results(run, args, epoch, train_time, history, counts, evaluated=False, curve=curve))
    return utils.finish(run, args, summary)


if __name__ == "__main__":
    utils.main_guard(main)
