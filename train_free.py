"""Free adversarial training (Shafahi et al. 2019, "Adversarial training for free!").

Each minibatch is replayed m times (--replays; "Free-m").  Every replay is ONE forward/backward pass
of loss(x + delta, y) that gives both the weight gradient (one SGD step) and g = grad_delta loss,
which moves the perturbation for free:

    delta <- clip(delta + eps * sign(g), -eps, eps),   with x + delta kept in [0, 1].

delta starts at 0 and is never reset: it carries over from replay to replay and from one minibatch
to the next.  --epochs is the budget in epochs of natural training: the data is passed over
ceil(epochs / m) times (the paper's N_ep / m), so Free costs about as many gradient computations as
natural training.  Defaults: the PreActResNet-18 / CIFAR-10 Free run of Wong et al. 2020 (their
train_free.py): m = 8, 10 passes (--epochs 80), cyclic LR 0 -> 0.04 -> 0, eps 8/255, batch 128,
SGD momentum 0.9, weight decay 5e-4.  Shafahi et al.'s own schedule (the fast-training thesis's
"FAT" baseline, "3 steps") is --lr-schedule piecewise --lr-max 0.1.

    python train_free.py --act kaf
    python train_free.py --dataset fashionmnist --data-dir /usr/share/datasets/fashion-mnist \\
        --model lenet --epsilon 0.1 --epochs 8 --replays 4
"""
import copy
import math
import os
import time

import torch
import torch.nn.functional as F

import tricks
import utils


def get_args(argv=None):
    p = utils.parser(__doc__.split("\n\n")[0])
    g = p.add_argument_group("Free training")
    g.add_argument("--replays", type=int, default=8, help="m: replays of each minibatch; the data is passed over ceil(epochs / m) times")
    utils.add_shared_flags(p, epochs=80, lr_max=0.04, lr_schedule="cyclic")
    tricks.add_flags(p)
    args = utils.parse_args(p, argv, checks=[tricks.flag_problems])
    if args.replays < 1:
        p.error("--replays must be >= 1")
    return args


def passes(args):
    """Passes over the data that cost as many gradient computations as --epochs natural epochs."""
    return math.ceil(args.epochs / args.replays)


def replay_step(run, tr, x, y, delta, args):
    """One replay of a minibatch at the LR the optimiser holds: one forward/backward pass gives the
    weights' gradients (one SGD step) and delta's, which moves ``delta`` in place.

    ``delta`` is the persistent batch_size x C x H x W perturbation; a short last batch uses (and
    updates) its first rows, the next full batch the whole of it again.  Returns the loss, the
    number of correct predictions and a non-finite flag, as device tensors."""
    eps, n = args.epsilon, len(x)
    d = delta[:n].detach().requires_grad_(True)
    with run.autocast():
        logits = run.forward(x + d)
        loss = tricks.hybrid_loss(logits, y, args.hybrid_weight, args.hybrid_p)  # CE unless --hybrid-weight
    total = loss + tr.mean_loss(run.model, run.forward, run.autocast) if tr.mean_copies else loss
    total = total + utils.activation_penalty(run, args)  # PSSiLU: Dai et al.'s L1 penalty on the shift
    run.scaler.scale(total).backward()  # one pass: the weights' gradients and d.grad
    with torch.no_grad():
        # fp16 loss scaling scales d.grad but keeps its sign; an overflowing pass (whose step the
        # scaler skips) must not leave NaN in delta for the rest of the run
        g = torch.nan_to_num(d.grad, nan=0.0)
        moved = (d + eps * g.sign()).clamp(-eps, eps)
        delta[:n] = (x + moved).clamp(0, 1) - x
    bad = ~torch.isfinite(loss.detach().float())
    bad = bad | utils.clip_gradients(run, args)  # --grad-clip, PSSiLU's --pssilu-beta-clip
    run.scaler.step(run.opt)
    run.scaler.update()
    run.opt.zero_grad(set_to_none=True)
    return loss.detach(), (logits.argmax(1) == y).sum(), bad


def train_minibatch(run, tr, x, y, delta, args):
    """All m replays of a minibatch at the LR the optimiser holds (the LR range test, bench.py)."""
    for _ in range(args.replays):
        out = replay_step(run, tr, x, y, delta, args)
    return out


def main(argv=None, data=None):
    """Train; ``data`` = (x_train, y_train, x_test, y_test) replaces --dataset's files (bench.py)."""
    args = get_args(argv)
    run = utils.setup(args, "train_free", data)  # device, data on it, model, SGD, AMP scaler, out dir
    tr = tricks.TrainingTricks.for_run(args, run)  # random / mean training, extra data: no-ops unless asked
    delta = torch.zeros((tr.rows(args.batch_size), *run.batches.x.shape[1:]), device=run.device)  # persists across minibatches
    if args.lr_find:
        return tricks.lr_range_test(run, args, lambda x, y: train_minibatch(run, tr, *tr.mix(x, y), delta, args)[0])
    n_passes = passes(args)
    total_steps = n_passes * len(run.batches) * args.replays  # one optimiser step per replay
    start, it, history, best, train_time, guard, curve = 0, 0, [], None, 0.0, None, []
    if args.resume and (ckpt := utils.load_for_resume(run, args, n_passes)):
        start, it, history, best, train_time, guard, curve, delta = (
            ckpt[k] for k in ("epoch", "iteration", "history", "best", "train_time_s", "guard", "curve", "delta"))

    def save(path, epoch):  # everything eval.py and --resume need, Free's delta included
        utils.save_checkpoint(run, args, path, epoch=epoch, iteration=it, history=history, best=best,
                              train_time_s=train_time, guard=guard, curve=curve, delta=delta)

    summary = utils.start_summary(run, args, n_passes, label="pass")
    summary["regime"] = "free"
    summary["catastrophic_overfitting"] = guard
    epoch = start
    try:
        while epoch < n_passes and guard is None:  # a run the guard stopped stays stopped
            epoch += 1
            run.model.train()
            meter = utils.EpochMeter(run, epoch, n_passes, label="pass")
            tic = time.time()
            for x, y in meter.bar:
                x, y = tr.mix(x, y)
                for _ in range(args.replays):
                    lr = utils.scheduled_lr(run.opt, it, total_steps, args)
                    loss, correct, bad = replay_step(run, tr, x, y, delta, args)
                    it += 1
                    if args.eval_every and it % args.eval_every == 0:  # accuracy over iterations (--eval-every)
                        curve.append(utils.probe(run, args, it, lr))
                meter.add(loss, correct, len(y), bad, lr)
            train_loss, train_acc = meter.result()
            train_time += time.time() - tic
            utils.sync_buffers(run)
            held = utils.held_out_pgd(run, args.epsilon)
            history.append(dict(epoch=epoch, train_loss=train_loss, train_acc=train_acc, held_pgd_acc=held, lr=lr,
                                time_s=round(train_time, 2)))
            utils.log(run, f"pass {epoch:3d}  loss {train_loss:.4f}  acc {train_acc:.4f}  held-out PGD-10 acc {held:.4f}  "
                           f"lr {lr:.4g}  time {train_time:.1f}s")
            if utils.collapsed(held, best, args.co_guard):  # catastrophic overfitting: back to the best pass, stop
                guard = dict(epoch=epoch, held_pgd_acc=held, best_held_pgd_acc=best["held_pgd_acc"], restored_epoch=best["epoch"])
                utils.log(run, f"catastrophic overfitting detected in pass {epoch}: held-out PGD accuracy fell from "
                               f"{best['held_pgd_acc']:.3f} to {held:.3f}; restoring the weights of pass {best['epoch']} and stopping")
                run.model.load_state_dict(best["model_state"])
                break
            if best is None or held >= best["held_pgd_acc"]:
                best = dict(epoch=epoch, held_pgd_acc=held, model_state=copy.deepcopy(run.model.state_dict()))
            save(os.path.join(run.out_dir, "checkpoint.pt"), epoch)
    except (utils.Diverged, KeyboardInterrupt) as stop:
        done = len(history)  # completed passes
        summary.update(utils.results(run, args, done, train_time, history, dict(optimizer_steps=it), evaluated=False, curve=curve))
        raise utils.record_stop(run, stop, summary, done, lambda path: save(path, done), label="pass") from None
    save(os.path.join(run.out_dir, "checkpoint.pt"), epoch)
    summary.update(catastrophic_overfitting=guard, stopped_early=guard and f"catastrophic overfitting in pass {guard['epoch']}")
    summary.update(utils.results(run, args, epoch, train_time, history, dict(optimizer_steps=it), evaluated=False, curve=curve))
    return utils.finish(run, args, summary)


if __name__ == "__main__":
    utils.main_guard(main)
