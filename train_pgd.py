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
al. and TRADES train 76-200 epochs with a piecewise LR from 0.1: --lr-schedule piecewise
--lr-max 0.1.)

    python train_pgd.py --act psilu --attack-iters 7
    python train_pgd.py --act pssilu --loss trades --trades-beta 6
"""
import time

import torch
import torch.nn.functional as F

import activations
import tricks
import utils


def get_args(argv=None):
    p = utils.parser(__doc__.split("\n\n")[0])
    g = p.add_argument_group("PGD training")
    g.add_argument("--attack-iters", type=int, default=10, help="k: PGD steps per minibatch")
    g.add_argument("--attack-step", type=utils.fraction, default=2 / 255,
                   help="alpha: PGD step size, e.g. 2/255")
    g.add_argument("--loss", default="ce", choices=["ce", "trades"],
                   help="ce: Madry et al.; trades: Zhang et al.")
    g.add_argument("--trades-beta", type=float, default=6.0, help="TRADES weight of the KL term")
    g.add_argument("--attack-mode", default=None, choices=["eval", "train"],
                   help="model mode while the attack runs (default: the references': train for ce "
                        "as Wong et al., eval for trades; Dai et al. use eval)")
    utils.add_shared_flags(p, epochs=15, lr_max=0.2, lr_schedule="cyclic")
    tricks.add_flags(p)
    args = utils.parse_args(p, argv, checks=[tricks.flag_problems])
    if args.attack_iters < 1:
        p.error("--attack-iters must be >= 1")
    if args.attack_step <= 0:
        p.error("--attack-step must be > 0")
    if args.trades_beta < 0:
        p.error("--trades-beta must be >= 0")
    if args.hybrid_weight > 0 and args.loss == "trades":
        p.error("--hybrid-weight replaces the cross-entropy of --loss ce; it cannot be combined "
                "with --loss trades")
    args.attack_mode = args.attack_mode or ("eval" if args.loss == "trades" else "train")
    if args.loss == "trades" and args.pssilu_beta_clip is None and args.act == "pssilu":
        # Dai et al.'s TRADES trainer clips PSSiLU's shift gradient to 0.1
        args.pssilu_beta_clip = 0.1
    return args


def pgd_delta(run, x, objective, eps, alpha, iters, start):
    """``iters`` projected signed-gradient ascent steps on ``objective(logits)`` from x + start, in
    the model's current mode.  Only input gradients are computed (scaled under fp16, which keeps
    their sign).  Returns (delta, number of steps taken)."""
    delta = ((x + start.clamp(-eps, eps)).clamp(0, 1) - x).detach()
    steps = 0
    for _ in range(iters):
        delta.requires_grad_(True)
        with torch.enable_grad(), run.amp:  # also when called under no_grad
            loss = objective(run.attack_forward(x + delta))
        (grad,) = torch.autograd.grad(run.scaler.scale(loss), delta)
        grad = torch.nan_to_num(grad, nan=0.0)  # an fp16 overflow must not turn delta into NaN
        delta = (delta.detach() + alpha * grad.sign()).clamp(-eps, eps)
        delta = (x + delta).clamp(0, 1) - x
        steps += 1
    return delta.detach(), steps


def trades_loss(run, x, y, eps, alpha, iters, beta, attack_mode="eval"):
    """TRADES: CE(f(x), y) + beta * KL(f(x) || f(x_adv)); returns (loss, logits of x_adv, attack
    steps)."""
    run.model.train(attack_mode == "train")  # the TRADES reference attacks in eval mode
    with torch.no_grad(), run.amp:
        p_clean = F.softmax(run.attack_forward(x).float(), dim=1)
    kl = lambda logits: F.kl_div(F.log_softmax(logits.float(), dim=1), p_clean, reduction="sum")
    delta, steps = pgd_delta(run, x, kl, eps, alpha, iters, 0.001 * torch.randn_like(x))
    run.model.train()
    with run.amp:
        logits, logits_adv = run.forward(x), run.forward(x + delta)
    robust = F.kl_div(F.log_softmax(logits_adv.float(), dim=1), F.softmax(logits.float(), dim=1),
                      reduction="batchmean")
    ce = F.cross_entropy(logits.float(), y, label_smoothing=run.label_smoothing)
    return ce + beta * robust, logits_adv, steps


def train_step(run, tr, x, y, args):
    """One minibatch at the LR the optimiser holds: the PGD (or TRADES) perturbation, then one SGD
    step on its loss.  Returns the loss, the number of correct predictions on x + delta, a
    non-finite flag (device tensors, no host sync) and the attack's steps."""
    eps, alpha, k = args.epsilon, args.attack_step * run.attack_step_scale, args.attack_iters
    if args.loss == "trades":  # its own perturbation (of the KL term), forward and loss
        loss, logits, steps = trades_loss(run, x, y, eps, alpha, k, args.trades_beta,
                                          args.attack_mode)
    else:
        # ---- the perturbation: k PGD steps from a random start, in --attack-mode
        ce = lambda logits: F.cross_entropy(logits, y, label_smoothing=args.label_smoothing)
        run.model.train(args.attack_mode == "train")
        delta, steps = pgd_delta(run, x, ce, eps, alpha, k, torch.empty_like(x).uniform_(-eps, eps))
        run.model.train()
        # ---- forward and loss under the run's one AMP context
        with run.amp:
            logits = run.forward(x + delta)
            if args.hybrid_weight:  # Zhao & Griffin's hybrid loss
                loss = tricks.hybrid_loss(logits, y, args.hybrid_weight, args.hybrid_p)
            else:
                loss = F.cross_entropy(logits, y, label_smoothing=args.label_smoothing)
    total = loss
    if tr.mean_copies:  # Zhao & Griffin's mean training
        total = total + tr.mean_loss(run.model, run.forward, run.amp)
    if run.pssilu_reg:  # Dai et al.'s L1 penalty on PSSiLU's shift
        total = total + run.pssilu_reg * activations.pssilu_l1(run.model)
    # ---- backward, unscale, clip, step, update, zero_grad
    run.scaler.scale(total).backward()  # fp16: scaled, so that small gradients do not underflow
    bad = ~torch.isfinite(loss.detach().float())
    if args.grad_clip > 0 or run.shift_params:
        run.scaler.unscale_(run.opt)  # clip the true gradients
    if args.grad_clip > 0:
        norm = torch.nn.utils.clip_grad_norm_(run.model.parameters(), args.grad_clip)
        if not run.scaler.is_enabled():  # under fp16 an inf norm is the scaler's business
            bad = bad | ~torch.isfinite(norm)
    if run.shift_params:  # Dai et al. clip the gradient norm of PSSiLU's shift on its own
        torch.nn.utils.clip_grad_norm_(run.shift_params, run.shift_clip)
    run.scaler.step(run.opt)  # skipped by the fp16 scaler when the gradients overflowed
    run.scaler.update()
    run.opt.zero_grad(set_to_none=True)
    return loss.detach(), (logits.argmax(1) == y).sum(), bad, steps


def main(argv=None, arrays=None):
    """Train; ``arrays`` = (x_train, y_train, x_test, y_test) replaces --dataset's files (bench)."""
    args = get_args(argv)
    run = utils.setup(args, "train_pgd", arrays)  # device, data on it, model, SGD, AMP, out dir
    # random / mean training, extra data: off unless asked
    tr = tricks.TrainingTricks.for_run(args, run)
    if args.lr_find:
        step = lambda x, y: train_step(run, tr, *tr.mix(x, y), args)[0]
        return tricks.lr_range_test(run, args, step)
    total_steps = args.epochs * len(run.batches)
    lrs, momenta = utils.lr_schedule(args, total_steps)
    # fresh, or restored by --resume
    state = utils.new_state(run, args, args.epochs, attack_steps=0)
    regime = "trades" if args.loss == "trades" else "pgd"
    summary = utils.start_summary(run, args, args.epochs, regime, state)
    try:
        while state["epoch"] < args.epochs and state["guard"] is None:  # a guard stop stays stopped
            epoch = state["epoch"] + 1
            run.model.train()
            loss_sum = torch.zeros((), device=run.device)  # summed on the device: no host sync
            correct = torch.zeros((), device=run.device)
            # 1 + its index; 0: none
            first_bad = torch.zeros((), dtype=torch.long, device=run.device)
            n, seen, tic = len(run.batches), 0, time.time()
            bar = utils.progress(run, run.batches, f"epoch {epoch}/{args.epochs}")
            for i, (x, y) in enumerate(bar):
                if tr.mixes:  # extra images, random-training noise
                    x, y = tr.mix(x, y)
                it = state["iteration"]
                lr = lrs[it]
                for group in run.opt.param_groups:  # this step's LR (x --act-lr-mult) and momentum
                    group["lr"], group["momentum"] = lr * group.get("lr_mult", 1.0), momenta[it]
                loss, n_correct, bad, steps = train_step(run, tr, x, y, args)
                state["iteration"] = it = it + 1
                if args.ema:  # weight averaging (the FastAT benchmark's), after every optimiser step
                    utils.update_ema(state["ema"], run.model, args.ema)
                state["attack_steps"] += steps
                if args.eval_every and it % args.eval_every == 0:  # accuracy over iterations
                    state["curve"].append(utils.probe(run, args, it, lr))
                first_bad = torch.where((first_bad == 0) & bad, i + 1, first_bad)
                loss_sum += loss.float() * len(y)
                correct += n_correct
                seen += len(y)
                if i % 50 == 0 or i == n - 1:  # the loop's only host syncs
                    if first_bad.item():
                        raise utils.Diverged(epoch, int(first_bad.item()), n)
                    bar.set_postfix(loss=f"{loss_sum.item() / seen:.3f}",
                                    acc=f"{correct.item() / seen:.3f}",
                                    lr=f"{lr:.3g}")
            train_loss, train_acc = utils.epoch_result(run, loss_sum, correct, seen)
            if utils.end_epoch(run, args, state, train_loss, train_acc, lr, time.time() - tic):
                break  # the guard restored the best epoch's weights
    except (utils.Diverged, KeyboardInterrupt) as stop:
        raise utils.record_stop(run, args, stop, summary, state) from None
    return utils.finish(run, args, summary, state)


if __name__ == "__main__":
    utils.main_guard(main)
