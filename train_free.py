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
import math
import time

import torch
import torch.nn.functional as F

import activations
import tricks
import utils


def get_args(argv=None):
    p = utils.parser(__doc__.split("\n\n")[0])
    g = p.add_argument_group("Free training")
    g.add_argument("--replays", type=int, default=8,
                   help="m: replays of each minibatch; the data is passed over ceil(epochs / m) "
                        "times")
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
    number of correct predictions and a non-finite flag, as device tensors (no host sync)."""
    eps, n = args.epsilon, len(x)
    d = delta[:n].detach().requires_grad_(True)
    # ---- forward and loss under the run's one AMP context
    with run.amp:
        logits = run.forward(x + d)
        if args.hybrid_weight:  # Zhao & Griffin's hybrid loss
            loss = tricks.hybrid_loss(logits, y, args.hybrid_weight, args.hybrid_p)
        else:
            loss = F.cross_entropy(logits, y, label_smoothing=args.label_smoothing)
    total = loss
    if tr.mean_copies:  # Zhao & Griffin's mean training
        total = total + tr.mean_loss(run.model, run.forward, run.amp)
    if run.pssilu_reg:  # Dai et al.'s L1 penalty on PSSiLU's shift
        total = total + run.pssilu_reg * activations.pssilu_l1(run.model)
    run.scaler.scale(total).backward()  # one pass: the weights' gradients and d.grad
    # ---- the free perturbation step: delta <- clip(delta + eps sign(g)), x + delta in [0, 1]
    with torch.no_grad():
        # fp16 loss scaling scales d.grad but keeps its sign; an overflowing pass (whose step the
        # scaler skips) must not leave NaN in delta for the rest of the run
        g = torch.nan_to_num(d.grad, nan=0.0)
        moved = (d + eps * run.attack_step_scale * g.sign()).clamp(-eps, eps)  # scale: a recovery's
        delta[:n] = (x + moved).clamp(0, 1) - x
    # ---- unscale, clip, step, update, zero_grad
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


def train_minibatch(run, tr, x, y, delta, args):
    """All m replays of a minibatch at the LR the optimiser holds (the LR range test, bench.py)."""
    for _ in range(args.replays):
        out = replay_step(run, tr, x, y, delta, args)
    return out


def main(argv=None, arrays=None):
    """Train; ``arrays`` = (x_train, y_train, x_test, y_test) replaces --dataset's files (bench)."""
    args = get_args(argv)
    run = utils.setup(args, "train_free", arrays)  # device, data on it, model, SGD, AMP, out dir
    # random / mean training, extra data: off unless asked
    tr = tricks.TrainingTricks.for_run(args, run)
    # the perturbation persists across minibatches (and is saved with the run)
    delta = torch.zeros((tr.rows(args.batch_size), *run.batches.x.shape[1:]), device=run.device)
    if args.lr_find:
        step = lambda x, y: train_minibatch(run, tr, *tr.mix(x, y), delta, args)[0]
        return tricks.lr_range_test(run, args, step)
    n_passes = passes(args)
    total_steps = n_passes * len(run.batches) * args.replays  # one optimiser step per replay
    lrs, momenta = utils.lr_schedule(args, total_steps)
    # fresh, or restored whole by --resume
    state = utils.new_state(run, args, n_passes, delta=delta)
    summary = utils.start_summary(run, args, n_passes, "free", state, label="pass")
    try:
        while state["epoch"] < n_passes and state["guard"] is None:  # a guard stop stays stopped
            epoch = state["epoch"] + 1
            run.model.train()
            loss_sum = torch.zeros((), device=run.device)  # summed on the device: no host sync
            correct = torch.zeros((), device=run.device)
            # 1 + its index; 0: none
            first_bad = torch.zeros((), dtype=torch.long, device=run.device)
            n, seen, tic = len(run.batches), 0, time.time()
            bar = utils.progress(run, run.batches, f"pass {epoch}/{n_passes}")
            for i, (x, y) in enumerate(bar):
                if tr.mixes:  # extra images, random-training noise
                    x, y = tr.mix(x, y)
                for _ in range(args.replays):
                    it = state["iteration"]
                    lr = lrs[it]
                    # this step's LR (x --act-lr-mult) and momentum
                    for group in run.opt.param_groups:
                        group["lr"], group["momentum"] = lr * group.get("lr_mult", 1.0), momenta[it]
                    loss, n_correct, bad = replay_step(run, tr, x, y, state["delta"], args)
                    state["iteration"] = it = it + 1
                    if args.ema:  # weight averaging (the FastAT benchmark's), after every optimiser step
                        utils.update_ema(state["ema"], run.model, args.ema)
                    if args.eval_every and it % args.eval_every == 0:  # accuracy over iterations
                        state["curve"].append(utils.probe(run, args, it, lr))
                # the last replay's
                first_bad = torch.where((first_bad == 0) & bad, i + 1, first_bad)
                loss_sum += loss.float() * len(y)
                correct += n_correct
                seen += len(y)
                if i % 50 == 0 or i == n - 1:  # the loop's only host syncs
                    if first_bad.item():
                        raise utils.Diverged(epoch, int(first_bad.item()), n, "pass")
                    bar.set_postfix(loss=f"{loss_sum.item() / seen:.3f}",
                                    acc=f"{correct.item() / seen:.3f}",
                                    lr=f"{lr:.3g}")
            train_loss, train_acc = utils.epoch_result(run, loss_sum, correct, seen)
            seconds = time.time() - tic
            if utils.end_epoch(run, args, state, train_loss, train_acc, lr, seconds, "pass"):
                break  # the guard restored the best pass's weights
    except (utils.Diverged, KeyboardInterrupt) as stop:
        raise utils.record_stop(run, args, stop, summary, state, label="pass") from None
    return utils.finish(run, args, summary, state, label="pass")


if __name__ == "__main__":
    utils.main_guard(main)
