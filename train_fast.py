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
import time

import torch
import torch.nn.functional as F

import activations
import tricks
import utils


def get_args(argv=None):
    p = utils.parser(__doc__.split("\n\n")[0])
    g = p.add_argument_group("FGSM training")
    g.add_argument("--attack", default="fgsm", choices=["fgsm", "none"],
                   help="none: natural (clean) training, as Zhao & Griffin's plain and robust CNNs "
                        "(the overfitting guard is then off)")
    g.add_argument("--alpha", type=utils.fraction, default=None,
                   help="FGSM step (default 1.25 * eps; eps with --nfgsm)")
    g.add_argument("--init", default="random", choices=["random", "zero"],
                   help="start of the FGSM step (zero = plain FGSM training)")
    g.add_argument("--nfgsm", action="store_true",
                   help="N-FGSM: noise U(-2eps, 2eps), step eps, no projection to the eps-ball")
    g.add_argument("--grad-align", type=float, default=0.0,
                   help="GradAlign weight lambda (0.2 at 8/255; 0 = off)")
    g.add_argument("--elle", type=float, default=0.0, metavar="LAMBDA",
                   help="ELLE: weight of the local-linearity penalty (1 as the FastAT benchmark; 0 = off)")
    g.add_argument("--elle-adaptive", action="store_true",
                   help="ELLE-A: the weight is 0 until the linearity error jumps, then --elle, decaying")
    utils.add_shared_flags(p, epochs=15, lr_max=0.2, lr_schedule="cyclic")
    tricks.add_flags(p)
    args = utils.parse_args(p, argv, checks=[tricks.flag_problems])
    if args.alpha is not None and args.alpha <= 0:
        p.error("--alpha must be > 0")
    if args.grad_align < 0 or args.elle < 0:
        p.error("--grad-align and --elle must be >= 0")
    if args.elle_adaptive and args.elle <= 0:
        p.error("--elle-adaptive needs --elle > 0 (the weight it switches on)")
    if args.attack == "none" and (args.nfgsm or args.alpha is not None or args.init != "random"):
        p.error("--attack none trains on clean images; --nfgsm, --alpha and --init belong to the "
                "FGSM attack")
    if args.attack == "none":
        # PGD accuracy of a naturally trained model is near 0 and means nothing to the guard
        args.co_guard = 0.0
    if args.nfgsm and args.init == "zero":
        p.error("--nfgsm starts from noise; it cannot be combined with --init zero")
    return args


def input_gradient(run, x, y, create_graph=False):
    """Gradient of the (scaled) training loss w.r.t. the input only (no weight gradients)."""
    x = x if x.requires_grad else x.detach().requires_grad_(True)
    with run.amp:
        loss = F.cross_entropy(run.attack_forward(x), y, label_smoothing=run.label_smoothing)
    (grad,) = torch.autograd.grad(run.scaler.scale(loss), x, create_graph=create_graph)
    return grad


def grad_align_penalty(run, x, y, eps):
    """GradAlign: 1 - cos(grad_x loss(x), grad_x loss(x + eta)), eta ~ U(-eps, eps), differentiable
    (Andriushchenko & Flammarion 2020)."""
    g1 = input_gradient(run, x.detach().requires_grad_(True), y, create_graph=True)
    eta = torch.empty_like(x).uniform_(-eps, eps)
    x_eta = (x + eta).clamp(0, 1).detach().requires_grad_(True)
    g2 = input_gradient(run, x_eta, y, create_graph=True)
    cos = F.cosine_similarity(g1.flatten(1).float(), g2.flatten(1).float(), dim=1)
    return (1 - cos).mean()


def elle_penalty(run, x, y, eps, loss=None):
    """ELLE's local-linearity error (Abad Rocamora et al., ICLR 2024, "Efficient local linearity
    regularization to overcome catastrophic overfitting"): for x_a, x_b uniform in the eps-ball around
    x (kept in [0, 1]) and x_c = (1 - a) x_a + a x_b, a ~ U(0, 1) per image,

        E[ (L(x_c) - (1 - a) L(x_a) - a L(x_b))^2 ],

    zero where the per-example loss L is linear in the input; one forward pass over 3x the batch.
    ``loss(points, labels) -> per example`` replaces the model's cross-entropy (tests).  Read from
    the FastAT benchmark's ELLE (fzjcdt/FastAT_Benchmark), which leaves the points unclipped; here
    they stay images."""
    n, twice = len(x), torch.cat([x, x])
    x_ab = (twice + eps * (2 * torch.rand_like(twice) - 1)).clamp(0, 1)
    a = torch.rand((n,) + (1,) * (x.dim() - 1), device=x.device)
    points = torch.cat([x_ab, (1 - a) * x_ab[:n] + a * x_ab[n:]])
    if loss is None:
        with run.amp:
            losses = F.cross_entropy(run.forward(points).float(), y.repeat(3), reduction="none")
    else:
        losses = loss(points, y.repeat(3))
    a = a.flatten()
    return ((losses[2 * n:] - (1 - a) * losses[:n] - a * losses[n:2 * n]) ** 2).mean()


def elle_a_update(st, error, weight, sensitivity=2.0, decay=0.99):
    """ELLE-A's weight for the next step, on the device (no host sync): --elle when this step's error
    exceeds the running mean of the errors so far by ``sensitivity`` standard deviations (after the
    first two), else the weight decays by ``decay`` (the benchmark's 'onoff' schedule: 2, 0.99).
    ``st``: {n, mean, m2, weight} device tensors (Welford's running variance)."""
    std = (st["m2"] / st["n"].clamp(min=1)).sqrt()
    jump = (st["n"] > 2) & (error > st["mean"] + sensitivity * std)
    st["weight"] = torch.where(jump, torch.full_like(st["weight"], weight), st["weight"] * decay)
    st["n"] += 1
    d = error - st["mean"]
    st["mean"] += d / st["n"]
    st["m2"] += d * (error - st["mean"])


def train_step(run, tr, x, y, args):
    """One minibatch at the LR the optimiser holds: the FGSM(-RS / N-FGSM) perturbation (model in
    train mode, as in the paper), then one SGD step on the perturbed batch.  Returns the loss, the
    number of correct predictions and a non-finite flag, as device tensors (no host sync)."""
    eps = args.epsilon
    # ---- the perturbation: a random start, one signed-gradient step, projection
    if args.attack == "none":  # natural training
        delta = 0
    else:
        alpha = args.alpha if args.alpha is not None else (eps if args.nfgsm else 1.25 * eps)
        alpha = alpha * run.attack_step_scale  # < 1 after a recovery (--co-action recover)
        if args.nfgsm:  # N-FGSM: larger noise, no projection back to the eps-ball
            delta = torch.empty_like(x).uniform_(-2 * eps, 2 * eps)
        elif args.init == "random":
            delta = torch.empty_like(x).uniform_(-eps, eps)
        else:
            delta = torch.zeros_like(x)
        delta = (x + delta).clamp(0, 1) - x
        delta = delta.detach() + alpha * input_gradient(run, x + delta, y).sign()
        if not args.nfgsm:
            delta = delta.clamp(-eps, eps)
        delta = ((x + delta).clamp(0, 1) - x).detach()
    # ---- forward and loss under the run's one AMP context
    with run.amp:
        logits = run.forward(x + delta)
        if args.hybrid_weight:  # Zhao & Griffin's hybrid loss
            loss = tricks.hybrid_loss(logits, y, args.hybrid_weight, args.hybrid_p)
        else:
            loss = F.cross_entropy(logits, y, label_smoothing=args.label_smoothing)
    total = loss
    if args.grad_align > 0:  # GradAlign's gradient-alignment term
        total = total + args.grad_align * grad_align_penalty(run, x, y, eps)
    if args.elle > 0:  # ELLE's local-linearity error; ELLE-A weighs it by run.elle["weight"]
        error = elle_penalty(run, x, y, eps)
        total = total + (run.elle["weight"] if args.elle_adaptive else args.elle) * error
        if args.elle_adaptive:
            elle_a_update(run.elle, error.detach(), args.elle)
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
    return loss.detach(), (logits.argmax(1) == y).sum(), bad


def main(argv=None, arrays=None):
    """Train; ``arrays`` = (x_train, y_train, x_test, y_test) replaces --dataset's files (bench)."""
    args = get_args(argv)
    run = utils.setup(args, "train_fast", arrays)  # device, data on it, model, SGD, AMP, out dir
    # random / mean training, extra data: off unless asked
    tr = tricks.TrainingTricks.for_run(args, run)
    if args.elle_adaptive:  # ELLE-A's running statistics and weight (which starts at 0)
        run.elle = {k: torch.zeros((), device=run.device) for k in ("n", "mean", "m2", "weight")}
    if args.lr_find:
        step = lambda x, y: train_step(run, tr, *tr.mix(x, y), args)[0]
        return tricks.lr_range_test(run, args, step)
    total_steps = args.epochs * len(run.batches)
    lrs, momenta = utils.lr_schedule(args, total_steps)
    # fresh, or restored whole by --resume (ELLE-A's statistics included)
    state = utils.new_state(run, args, args.epochs, **({"elle": run.elle} if args.elle_adaptive else {}))
    if args.elle_adaptive:
        run.elle = state["elle"]
    regime = ("natural" if args.attack == "none" else "n-fgsm" if args.nfgsm
              else "fgsm-rs" if args.init == "random" else "fgsm")
    regime += "+elle-a" if args.elle_adaptive else "+elle" if args.elle > 0 else ""
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
                loss, n_correct, bad = train_step(run, tr, x, y, args)
                state["iteration"] = it = it + 1
                if args.ema:  # weight averaging (the FastAT benchmark's), after every optimiser step
                    utils.update_ema(state["ema"], run.model, args.ema)
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
