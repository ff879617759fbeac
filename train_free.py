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

import torch
import torch.nn.functional as F

import utils


def get_args(argv=None):
    p = utils.base_parser(__doc__.split("\n\n")[0], epochs=80, lr_max=0.04, lr_schedule="cyclic")
    g = p.add_argument_group("Free training")
    g.add_argument("--replays", type=int, default=8, help="m: replays of each minibatch; the data is passed over ceil(epochs / m) times")
    args = utils.parse_args(p, argv)
    if args.replays < 1:
        p.error("--replays must be >= 1")
    return args


def passes(args):
    """Passes over the data that cost as many gradient computations as --epochs natural epochs."""
    return math.ceil(args.epochs / args.replays)


class FreeStep:
    """``train_step`` for Run.fit: m replays of a minibatch, one optimiser step each.

    ``self.delta`` (batch_size x C x H x W) persists across calls; a short last batch uses (and
    updates) its first rows, the next full batch the whole of it again."""

    def __init__(self, run, eps, replays):
        self.run, self.eps, self.replays = run, eps, replays
        self.delta = None  # allocated at the first batch, once the image shape is known

    def state_dict(self):  # saved in every checkpoint: --resume continues with the same perturbation
        return {"delta": self.delta}

    def load_state_dict(self, state):
        self.delta = state["delta"]

    def __call__(self, x, y):
        run, eps, n = self.run, self.eps, len(x)
        if self.delta is None:
            self.delta = torch.zeros((run.args.batch_size, *x.shape[1:]), device=x.device)
        for _ in range(self.replays):
            delta = self.delta[:n].detach().requires_grad_(True)  # shares memory with self.delta
            with run.autocast():
                logits = run.forward(x + delta)
                loss = F.cross_entropy(logits, y)
            run.backward(loss)  # one pass: the weights' gradients and delta.grad
            with torch.no_grad():
                # fp16 loss scaling scales delta.grad but keeps its sign; an overflowing pass (whose
                # step the scaler skips) must not leave NaN in delta for the rest of the run
                g = torch.nan_to_num(delta.grad, nan=0.0)
                d = (delta + eps * g.sign()).clamp(-eps, eps)
                self.delta[:n] = (x + d).clamp(0, 1) - x
            run.step()  # gradients are already there: no loss to back-propagate again
        return loss.detach(), (logits.argmax(1) == y).sum()


def main(argv=None):
    args = get_args(argv)
    run = utils.Run(args, "train_free", steps_per_batch=args.replays, epochs_budget=passes(args))
    train_step = FreeStep(run, args.epsilon, args.replays)
    if args.lr_find:
        return utils.lr_range_test(run, train_step)
    return run.fit(train_step, passes_label="pass")


if __name__ == "__main__":
    utils.main_guard(main)
