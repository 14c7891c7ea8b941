"""Command line of the test bed: train the digits DiT and classifier, evaluate a DiT.

  python -m vq4dit.testbed train-classifier
  python -m vq4dit.testbed train-dit --out assets/digits-dit --steps N --ckpt-dir checkpoints/digits-dit
  python -m vq4dit.testbed train-dit --out assets/digits-dit --ckpt-dir checkpoints/digits-dit --export-from-checkpoint
  python -m vq4dit.testbed eval-dit --model assets/digits-dit --grid out/grid.png
  python -m vq4dit.testbed write-xl out/dit-xl-shaped [--blocks 2]   # random DiT-XL/2-shaped pipeline
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from . import CLASSIFIER_DIR, DIGITS_DIT_DIR, NUM_CLASSES
from .classifier import ClassifierTrainConfig, DigitsEvaluator, load_classifier, train_classifier
from .model import DiTTrainConfig, export_checkpoint, latest_checkpoint, load_digits_dit, train_dit


def eval_dit(model_dir: Path, classifier_dir: Path, per_class: int, cfgs: list[float], num_steps: int,
             seed: int, grid: Path | None) -> dict:
    """Sample `per_class` digits per class at each guidance scale (the library's `generate`, so the
    same noise as the benchmark), score them with the classifier, optionally save one grid."""
    from ..runner import EvalSpec, generate
    from ..viz import save_grid

    model, scheduler = load_digits_dit(model_dir)
    evaluator = DigitsEvaluator(load_classifier(classifier_dir))
    out, panels = {}, []
    for g in cfgs:
        spec = EvalSpec(n_per_class=per_class, guidance_scale=g, num_steps=num_steps, seed=seed)
        images = generate(model, spec, scheduler=scheduler)       # (10 * per_class, 1, 16, 16)
        labels = torch.tensor(spec.labels())
        correct = (evaluator.predict(images) == labels).float()
        out[g] = dict(accuracy=float(correct.mean()), per_class=correct.view(NUM_CLASSES, per_class).mean(1).tolist())
        panels.append(images.view(NUM_CLASSES, per_class, *images.shape[1:])[:, :min(per_class, 10)])
    if grid is not None:  # one row per class; guidance scales side by side
        k = panels[0].shape[1]
        save_grid(torch.cat(panels, 1).reshape(-1, *panels[0].shape[2:]), grid, nrow=k * len(panels))
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(prog="python -m vq4dit.testbed", description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1: shared machine)")
    sub = ap.add_subparsers(dest="cmd", required=True)

    p = sub.add_parser("train-dit", help="train (or resume / export) the digits DiT")
    p.add_argument("--out", type=Path, default=DIGITS_DIT_DIR)
    p.add_argument("--ckpt-dir", type=Path, default=Path("checkpoints/digits-dit"))
    p.add_argument("--steps", type=int, default=DiTTrainConfig.steps)
    p.add_argument("--batch-size", type=int, default=DiTTrainConfig.batch_size)
    p.add_argument("--seed", type=int, default=DiTTrainConfig.seed)
    p.add_argument("--export-from-checkpoint", action="store_true",
                   help="only export the newest checkpoint's EMA weights to --out, no training")

    p = sub.add_parser("train-classifier", help="train the digit classifier and save it")
    p.add_argument("--out", type=Path, default=CLASSIFIER_DIR)
    p.add_argument("--seed", type=int, default=0)

    p = sub.add_parser("eval-dit", help="sample, classify, print accuracy per CFG, save a grid")
    p.add_argument("--model", type=Path, default=DIGITS_DIT_DIR)
    p.add_argument("--classifier", type=Path, default=CLASSIFIER_DIR)
    p.add_argument("--per-class", type=int, default=20)
    p.add_argument("--cfg", type=float, nargs="+", default=[1.0, 4.0])
    p.add_argument("--num-steps", type=int, default=50)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--grid", type=Path, default=None, help="PNG path for the sample grid")

    p = sub.add_parser("write-xl", help="write a random pipeline laid out like facebook/DiT-XL-2-256")
    p.add_argument("out", type=Path)
    p.add_argument("--blocks", type=int, default=28, help="transformer blocks (28 = DiT-XL/2; 2 = XL-wide, for tests)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--overwrite", action="store_true", help="replace a pipeline written earlier by write-xl")

    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    if args.cmd == "train-dit":
        if args.export_from_checkpoint:
            ck = latest_checkpoint(args.ckpt_dir)
            if ck is None:
                raise SystemExit(f"no checkpoint in {args.ckpt_dir}")
            export_checkpoint(ck, args.out)
            print(f"exported EMA weights of {ck} to {args.out}")
            return
        args.ckpt_dir.mkdir(parents=True, exist_ok=True)
        ck = latest_checkpoint(args.ckpt_dir)
        if ck is not None:  # keep the run's config; only the step target may change
            cfg = DiTTrainConfig.from_dict(json.loads(ck.read_text())["config"])
            cfg.steps = args.steps
        else:
            cfg = DiTTrainConfig(steps=args.steps, batch_size=args.batch_size, seed=args.seed)
        t0 = time.time()
        train_dit(cfg, ckpt_dir=args.ckpt_dir, out_dir=args.out, log_path=args.ckpt_dir / "train.log")
        print(f"done in {time.time() - t0:.0f} s")
    elif args.cmd == "train-classifier":
        t0 = time.time()
        _, acc = train_classifier(ClassifierTrainConfig(seed=args.seed), out_dir=args.out)
        print(f"test accuracy {acc:.4f} ({time.time() - t0:.0f} s); saved to {args.out}")
    elif args.cmd == "write-xl":
        from .xl import write_xl_pipeline
        if not 1 <= args.blocks <= 28:
            raise SystemExit("--blocks must be in [1, 28]")
        t0 = time.time()
        write_xl_pipeline(args.out, num_layers=args.blocks, seed=args.seed, overwrite=args.overwrite)
        print(f"wrote {args.out} ({args.blocks} blocks) in {time.time() - t0:.0f} s")
    elif args.cmd == "eval-dit":
        t0 = time.time()
        res = eval_dit(args.model, args.classifier, args.per_class, args.cfg, args.num_steps, args.seed, args.grid)
        for g, r in res.items():
            pc = " ".join(f"{a:.2f}" for a in r["per_class"])
            print(f"CFG {g:g}: accuracy {r['accuracy']:.4f}  per class [{pc}]")
        print(f"({time.time() - t0:.0f} s for {len(res) * NUM_CLASSES * args.per_class} samples)")
        if args.grid is not None:
            print(f"grid saved to {args.grid}")


if __name__ == "__main__":
    main()
