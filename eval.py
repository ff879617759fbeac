"""Evaluate a checkpoint: clean, FGSM and PGD accuracy on its dataset's test set.

The model is rebuilt from the checkpoint alone (models.load_checkpoint) and attacked in eval mode and
float32.  eps defaults to the value the model was trained with.

    python eval.py runs/train_fast_cifar10_preactresnet18_relu/checkpoint.pt
    python eval.py CKPT --n-eval 1000 --pgd-steps 50 --pgd-restarts 10 --out eval.json
"""
import argparse
import json
import os
import time

import torch

import attacks
import models
import utils


def get_args(argv=None):
    p = utils.Parser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("checkpoint", help="checkpoint.pt written by a training script")
    p.add_argument("--data-dir", default=None, help="dataset folder (default: the one used in training)")
    p.add_argument("--eps", type=utils.fraction, default=None, help="L-inf radius (default: the training epsilon)")
    p.add_argument("--pgd-steps", type=int, default=20)
    p.add_argument("--pgd-restarts", type=int, default=1)
    p.add_argument("--pgd-alpha", type=utils.fraction, default=None, help="PGD step (default eps/4)")
    p.add_argument("--n-eval", type=int, default=None, help="first N test images (default: all)")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="JSON output (default: eval.json next to the checkpoint)")
    args = p.parse_args(argv)
    if args.eps is not None and args.eps <= 0:
        p.error("--eps must be > 0")
    if min(args.pgd_steps, args.pgd_restarts, args.batch_size) < 1 or (args.n_eval is not None and args.n_eval < 1):
        p.error("--pgd-steps, --pgd-restarts, --batch-size and --n-eval must be >= 1")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        p.error("--device cuda asked for but CUDA is not available; use --device cpu")
    return args


def main(argv=None):
    args = get_args(argv)
    utils.seed_everything(args.seed)
    model = models.load_checkpoint(args.checkpoint).to(args.device)
    train_args = model.checkpoint.get("args", {})
    dataset = model.checkpoint.get("dataset", {}).get("name") or train_args.get("dataset")
    if dataset not in utils.DATASETS:
        raise utils.UserError(f"checkpoint {args.checkpoint} names no known dataset ({dataset!r})")
    x, y = utils.load_split(dataset, args.data_dir or train_args.get("data_dir", "./data"), train=False)
    if args.n_eval:
        x, y = x[:args.n_eval], y[:args.n_eval]
    x = x.float().div_(255)
    eps = args.eps if args.eps is not None else train_args.get("epsilon", 8 / 255)
    alpha = args.pgd_alpha if args.pgd_alpha is not None else eps / 4
    bar = lambda desc: (lambda it: utils.tqdm(it, desc=desc, leave=False, dynamic_ncols=True))
    evals = {
        "clean": None,
        "fgsm": lambda m, xb, yb: attacks.fgsm(m, xb, yb, eps),
        f"pgd{args.pgd_steps}x{args.pgd_restarts}": lambda m, xb, yb: attacks.pgd(m, xb, yb, eps, alpha, args.pgd_steps,
                                                                                   args.pgd_restarts),
    }
    result = {"checkpoint": args.checkpoint, "dataset": dataset, "n_eval": len(y), "eps": eps,
              "pgd": dict(steps=args.pgd_steps, restarts=args.pgd_restarts, alpha=alpha), "accuracy": {}}
    start = time.time()
    for name, attack in evals.items():
        acc, _ = attacks.robust_accuracy(model, x, y, attack, args.batch_size, progress=bar(name))
        result["accuracy"][name] = acc
        print(f"{name:>12s}  {acc:.4f}", flush=True)
    result["time_s"] = round(time.time() - start, 2)
    out = args.out or os.path.join(os.path.dirname(os.path.abspath(args.checkpoint)), "eval.json")
    utils.write_json(result, out)
    print(f"{len(y)} images, eps {eps:.4g}, {result['time_s']}s -> {out}")
    return result


if __name__ == "__main__":
    utils.main_guard(main)
