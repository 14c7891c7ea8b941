"""Command line: `python -m vq4dit quantize ...` and `python -m vq4dit sample ...`.

    python -m vq4dit quantize --model assets/digits-dit --bits 2 --method vq4dit --out out/w2
    python -m vq4dit sample --model out/w2 --labels 0 1 2 3 --out grid.png
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path


def _default_model() -> str:
    from .testbed import DIGITS_DIT_DIR
    return str(DIGITS_DIT_DIR)


def config_from_args(args, model):
    """The validated method config the flags describe. --recipe auto: `small` for models under
    SMALL_MODEL_WEIGHTS quantizable weights (the embedded digits DiT), else `reference`."""
    from .config import METHODS, default_recipe, method_config
    from .layers import default_filter

    spec = METHODS[args.method]
    recipe = args.recipe
    if recipe == "auto":
        n = sum(m.weight.numel() for name, m in model.named_modules() if default_filter(m, name))
        recipe = default_recipe(n)
    calib = {k: v for k, v in dict(iterations=args.iterations, num_sampling_steps=args.sampling_steps,
                                   labels_per_iteration=args.labels_per_iteration,
                                   lr_logits=args.lr_logits, lr_codebook=args.lr_codebook,
                                   lambda_r=args.lambda_r, max_seconds=args.max_seconds,
                                   teacher_sampler=args.teacher_sampler, seed=args.seed,
                                   device=args.device).items() if v is not None}
    vq_kw = {k: v for k, v in dict(k=args.k, d=args.d, n_candidates=args.candidates,
                                   kmeans_iters=args.kmeans_iters, seed=args.seed).items() if v is not None}
    if spec.kind == "rtn":
        return method_config(args.method, bits=args.bits)
    return method_config(args.method, bits=args.bits, recipe=recipe, calib=calib if spec.calibrated else None,
                         **vq_kw)


def cmd_quantize(args) -> int:
    import torch
    from .io import load_dit, save_quantized
    from .metrics import block_mse
    from .quant_api import quantize, size_summary
    from .sampling import pick_device

    out = Path(args.out)
    if out.exists() and not args.overwrite:
        print(f"error: output directory {out} already exists (pass --overwrite to replace it)", file=sys.stderr)
        return 2
    torch.manual_seed(args.seed)
    device = pick_device(args.device)
    bundle = load_dit(args.model, device=device)
    model = bundle.transformer
    config = config_from_args(args, model)
    import copy
    teacher = copy.deepcopy(model).eval()
    t0 = time.time()
    trace = None
    try:
        trace = quantize(model, config, teacher=teacher)
    except KeyboardInterrupt:
        print("interrupted before calibration started: nothing written", file=sys.stderr)
        return 130
    seconds = time.time() - t0
    if trace is not None and trace.meta.get("stopped") == "interrupted":
        partial = out.with_name(out.name + ".partial-trace")
        trace.save(partial)
        print(f"interrupted after {trace.meta['steps_done']} steps: partial trace kept in {partial}; "
              f"no model written", file=sys.stderr)
        return 130
    model.eval()
    mse = block_mse(model, teacher)
    extra = dict(source=str(args.model), seconds=seconds, block_mse=mse["mean"])
    save_quantized(model, out, scheduler=bundle.scheduler, overwrite=args.overwrite, extra=extra)
    if trace is not None:
        trace.save(out / "trace")
    size = size_summary(model)
    print(json.dumps(dict(out=str(out), method=config.method, bits_per_weight=round(size["bits_per_weight"], 4),
                          index_bytes=size["index_bytes"], block_mse=mse["mean"], seconds=round(seconds, 1)),
                     indent=1))
    return 0


def cmd_sample(args) -> int:
    from .io import load_dit
    from .sampling import pick_device, sample
    from .viz import save_grid

    bundle = load_dit(args.model, device=pick_device(args.device))
    n_cls = bundle.transformer.config.num_embeds_ada_norm
    labels = args.labels if args.labels else list(range(min(n_cls, 10)))
    bad = [l for l in labels if not 0 <= l < n_cls]
    if bad:
        print(f"error: labels {bad} out of range [0, {n_cls - 1}]", file=sys.stderr)
        return 2
    images = sample(bundle.transformer, labels, num_steps=args.steps, guidance_scale=args.cfg, seed=args.seed,
                    scheduler=bundle.scheduler, vae=bundle.vae)
    save_grid(images, args.out, nrow=args.nrow or len(labels))
    print(f"wrote {len(labels)} samples to {args.out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from .config import DEFAULT_METHOD, METHODS, RECIPES
    methods_help = "methods:\n" + "\n".join(f"  {n:14s} {m.description}" for n, m in METHODS.items())
    p = argparse.ArgumentParser(prog="python -m vq4dit", description=__doc__, epilog=methods_help,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)

    q = sub.add_parser("quantize", help="quantize (and calibrate) a DiT, write a packed model + trace",
                       epilog=methods_help, formatter_class=argparse.RawDescriptionHelpFormatter)
    q.add_argument("--model", default=_default_model(),
                   help="diffusers DiT dir (transformer dir or pipeline dir) or Hub id (default: embedded digits DiT)")
    q.add_argument("--bits", type=int, default=2, help="bit-width preset: 2 (k256,d4), 3 (k64,d2), 4 (k256,d2)")
    q.add_argument("--method", default=DEFAULT_METHOD, choices=list(METHODS),
                   help=f"quantization method (default {DEFAULT_METHOD}: the best measured; see below)")
    q.add_argument("--recipe", default="auto", choices=["auto", *RECIPES],
                   help="calibration budget and learning rates, the same for every method: 'small' (8 x 25 "
                        "steps, DDIM teacher) or 'reference' (the reference code: 1000 x 50 steps, DDPM teacher); "
                        "auto = small for models under 50M quantizable weights (default)")
    q.add_argument("--teacher-sampler", choices=["ddim", "ddpm"], help="teacher trajectory sampler (default: the recipe's)")
    q.add_argument("--out", required=True, help="output directory for the packed model (must not exist)")
    q.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    q.add_argument("--k", type=int, help="codewords per layer (overrides the preset)")
    q.add_argument("--d", type=int, help="sub-vector length (overrides the preset)")
    q.add_argument("--candidates", type=int, help="candidate codewords per sub-vector (default 2)")
    q.add_argument("--kmeans-iters", type=int, help="k-means iterations (default: the recipe's, 50 small / 100 reference)")
    q.add_argument("--iterations", type=int, help="calibration trajectories (default: the recipe's, 8 / 1000)")
    q.add_argument("--sampling-steps", type=int, help="teacher sampler steps per trajectory (default: 25 / 50)")
    q.add_argument("--labels-per-iteration", type=int, help="random class labels per trajectory (default 4)")
    q.add_argument("--lr-logits", type=float, help="learning rate of assignment logits (default: 2e-2 / 5e-2)")
    q.add_argument("--lr-codebook", type=float, help="learning rate of codebooks (default: 3e-4 / 1e-4)")
    q.add_argument("--lambda-r", type=float, help="weight of the ratio regularizer L_r (default 1.0)")
    q.add_argument("--max-seconds", type=float, help="stop calibration after this many seconds")
    q.add_argument("--seed", type=int, default=0, help="seed for k-means, labels and noise")
    q.add_argument("--device", help="cuda, cuda:1 or cpu (default: CUDA when available)")
    q.set_defaults(func=cmd_quantize)

    s = sub.add_parser("sample", help="generate a grid of class-conditional samples")
    s.add_argument("--model", default=_default_model(), help="FP or packed model directory")
    s.add_argument("--labels", type=int, nargs="*", help="class labels (default: 0..9)")
    s.add_argument("--out", required=True, help="output PNG path")
    s.add_argument("--steps", type=int, default=50, help="DDIM sampling steps")
    s.add_argument("--cfg", type=float, default=4.0, help="classifier-free guidance scale")
    s.add_argument("--seed", type=int, default=0, help="noise seed")
    s.add_argument("--nrow", type=int, help="images per grid row")
    s.add_argument("--device", help="cuda or cpu (default: CUDA when available)")
    s.set_defaults(func=cmd_sample)
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError, FileExistsError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2



def main_entry() -> None:
    """The `vq4dit` console command (pyproject [project.scripts])."""
    sys.exit(main())


if __name__ == "__main__":
    sys.exit(main())
