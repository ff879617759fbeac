"""Fast adversarial training: FGSM with a random start (Wong, Rice & Kolter 2020, "Fast is better
than free").

Per minibatch: delta ~ U(-eps, eps) with x + delta kept in [0, 1]; one signed-gradient step
delta <- delta + alpha * sign(grad_delta loss), alpha = 1.25 eps; project onto the eps-ball and
[0, 1]; train on x + delta.  Defaults are the paper's CIFAR-10 ones: 15 epochs, cyclic learning rate
0 -> 0.2 -> 0, eps 8/255, alpha 10/255, batch 128, SGD momentum 0.9, weight decay 5e-4.  After each
epoch PGD on a held batch of training images watches for catastrophic overfitting; if it collapses,
the run stops with the best weights.  Optional fixes: N-FGSM (de Jorge et al. 2022) and GradAlign
(Andriushchenko & Flammarion 2020).  `--attack none` trains naturally (clean images, no attack), the
regime of Zhao & Griffin's plain and robust CNNs; summary.json's "regime" says which one ran.

    python train_fast.py --act kaf --epochs 15
    python train_fast.py --dataset fashionmnist --data-dir /usr/share/datasets/fashion-mnist \\
        --model lenet --act relu --epochs 3 --epsilon 0.1
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
    g = p.add_argument_group("FGSM training")
    g.add_argument("--attack", default="fgsm", choices=["fgsm", "none"],
                   help="none: natural (clean) training, as Zhao & Griffin's plain and robust CNNs (the overfitting guard is then off)")
    g.add_argument("--alpha", type=utils.fraction, default=None, help="FGSM step (default 1.25 * eps; eps with --nfgsm)")
    g.add_argument("--init", default="random", choices=["random", "zero"], help="start of the FGSM step (zero = plain FGSM training)")
    g.add_argument("--nfgsm", action="store_true", help="N-FGSM: noise U(-2eps, 2eps), step eps, no projection to the eps-ball")
    g.add_argument("--grad-align", type=float, default=0.0, help="GradAlign weight lambda (0.2 at 8/255; 0 = off)")
    utils.add_shared_flags(p, epochs=15, lr_max=0.2, lr_schedule="cyclic")
    tricks.add_flags(p)
    args = utils.parse_args(p, argv, checks=[tricks.flag_problems])
    if args.alpha is not None and args.alpha <= 0:
        p.error("--alpha must be > 0")
    if args.grad_align < 0:
        p.error("--grad-align must be >= 0")
    if args.attack == "none" and (args.nfgsm or args.alpha is not None or args.init != "random"):
        p.error("--attack none trains on clean images; --nfgsm, --alpha and --init belong to the FGSM attack")
    if args.attack == "none":
        args.co_guard = 0.0  # PGD accuracy of a naturally trained model is near 0 and means nothing to the guard
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


def train_step(run, tr, x, y, args):
    """One minibatch: the FGSM(-RS / N-FGSM) perturbation, then one SGD step on the perturbed batch
    (plus the GradAlign and mean-training terms when asked), at the LR the optimiser holds.
    Returns the loss, the number of correct predictions and a non-finite flag, as device tensors."""
    eps = args.epsilon
    alpha = args.alpha if args.alpha is not None else (eps if args.nfgsm else 1.25 * eps)
    delta = fgsm_delta(run, x, y, eps, alpha, args.init, args.nfgsm) if args.attack == "fgsm" else 0  # none: natural training
    with run.autocast():
        logits = run.forward(x + delta)
        loss = tricks.hybrid_loss(logits, y, args.hybrid_weight, args.hybrid_p)  # CE unless --hybrid-weight
    total = loss
    if args.grad_align > 0:
        total = total + args.grad_align * grad_align_penalty(run, x, y, eps)
    if tr.mean_copies:
        total = total + tr.mean_loss(run.model, run.forward, run.autocast)
    total = total + utils.activation_penalty(run, args)  # PSSiLU: Dai et al.'s L1 penalty on the shift
    run.scaler.scale(total).backward()  # fp16: scaled, so that small gradients do not underflow
    bad = ~torch.isfinite(loss.detach().float())
    bad = bad | utils.clip_gradients(run, args)  # --grad-clip, PSSiLU's --pssilu-beta-clip
    run.scaler.step(run.opt)  # skipped by the fp16 scaler when the gradients overflowed
    run.scaler.update()
    run.opt.zero_grad(set_to_none=True)
    return loss.detach(), (logits.argmax(1) == y).sum(), bad


def main(argv=None, data=None):
    """Train; ``data`` = (x_train, y_train, x_test, y_test) replaces --dataset's files (bench.py)."""
    args = get_args(argv)
    run = utils.setup(args, "train_fast", data)  # device, data on it, model, SGD, AMP scaler, out dir
    tr = tricks.TrainingTricks.for_run(args, run)  # random / mean training, extra data: no-ops unless asked
    if args.lr_find:
        return tricks.lr_range_test(run, args, lambda x, y: train_step(run, tr, x, y, args)[0])
    total_steps = args.epochs * len(run.batches)
    start, it, history, best, train_time, guard, curve = 0, 0, [], None, 0.0, None, []
    if args.resume and (ckpt := utils.load_for_resume(run, args, args.epochs)):
        start, it, history, best, train_time, guard, curve = (
            ckpt[k] for k in ("epoch", "iteration", "history", "best", "train_time_s", "guard", "curve"))

    def save(path, epoch):  # everything eval.py and --resume need
        utils.save_checkpoint(run, args, path, epoch=epoch, iteration=it, history=history, best=best,
                              train_time_s=train_time, guard=guard, curve=curve)

    summary = utils.start_summary(run, args, args.epochs)
    summary["regime"] = "natural" if args.attack == "none" else "n-fgsm" if args.nfgsm else "fgsm-rs" if args.init == "random" else "fgsm"
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
                loss, correct, bad = train_step(run, tr, x, y, args)
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
        summary.update(utils.results(run, args, done, train_time, history, dict(optimizer_steps=it), evaluated=False, curve=curve))
        raise utils.record_stop(run, stop, summary, done, lambda path: save(path, done)) from None
    save(os.path.join(run.out_dir, "checkpoint.pt"), epoch)
    summary.update(catastrophic_overfitting=guard, stopped_early=guard and f"catastrophic overfitting in epoch {guard['epoch']}")
    summary.update(utils.results(run, args, epoch, train_time, history, dict(optimizer_steps=it), evaluated=False, curve=curve))
    return utils.finish(run, args, summary)


if __name__ == "__main__":
    utils.main_guard(main)
