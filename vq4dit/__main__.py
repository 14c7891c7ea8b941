"""Command line: `python -m vq4dit quantize ...` and `python -m vq4dit sample ...`.

    python -m vq4dit quantize --bits 2 --out out/w2               # default method, recipe by model size
    python -m vq4dit quantize --method vq4dit --recipe reference --out out/w2-paper
    python -m vq4dit sample --model out/w2 --labels 0 1 2 3 --out grid.png
    torchrun --nproc_per_node 2 -m vq4dit quantize --out out/w2   # data-parallel calibration
"""
from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from pathlib import Path


def _default_model() -> str:
    from .testbed import DIGITS_DIT_DIR
    return str(DIGITS_DIT_DIR)


# Flags that only some methods use: passing them to another method is an error, not silently ignored.
VQ_FLAGS = ("k", "d", "candidates", "kmeans_iters", "init")
CALIB_FLAGS = ("iterations", "sampling_steps", "labels_per_iteration", "lr_logits", "lr_codebook", "lambda_r",
               "max_seconds", "teacher_sampler", "until_hard", "max_steps")
MAX_SAMPLE_LABELS = 1024  # images per `sample` call (sampled in batches of SAMPLE_BATCH)
SAMPLE_BATCH = 64


class _Terminated(KeyboardInterrupt):
    """SIGTERM, handled exactly like Ctrl-C (SIGINT): calibration stops, the partial trace is kept."""


_SIGNALLED = {"term": False}


def _on_sigterm(signum, frame):
    _SIGNALLED["term"] = True
    raise _Terminated()


@contextlib.contextmanager
def _sigterm_as_interrupt():
    """While a command runs, SIGTERM raises like Ctrl-C; the previous handler is restored afterwards."""
    import signal
    try:
        previous = signal.signal(signal.SIGTERM, _on_sigterm)
    except ValueError:  # not the main thread (e.g. main() called from a worker): leave signals alone
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextlib.contextmanager
def _signals_deferred():
    """While a finished calibration is written, SIGINT/SIGTERM are recorded instead of raised, so the
    save completes; the caller then reports them (`got["sig"]`: "interrupted" / "terminated (SIGTERM)")."""
    import signal
    got = {"sig": None}

    def record(signum, frame):
        got["sig"] = "terminated (SIGTERM)" if signum == signal.SIGTERM else "interrupted"
    try:
        prev = {s: signal.signal(s, record) for s in (signal.SIGINT, signal.SIGTERM)}
    except ValueError:  # not the main thread: signals are not ours to handle
        yield got
        return
    try:
        yield got
    finally:
        for s, h in prev.items():
            signal.signal(s, h)


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _unused_flags(args) -> list[str]:
    from .config import METHODS
    spec = METHODS[args.method]
    used = [f for f in VQ_FLAGS + CALIB_FLAGS if getattr(args, f, None) is not None]
    if spec.kind == "rtn":
        return used
    if not spec.calibrated:
        return [f for f in used if f in CALIB_FLAGS]
    return []


def config_from_args(args, model=None):
    """The validated method config the flags describe (`vq4dit.config.build_config`). --recipe auto:
    `small` for models under SMALL_MODEL_WEIGHTS quantizable weights (the embedded digits DiT), else
    `reference`; without a model (checking flags before loading) auto validates with the small recipe."""
    from .config import build_config

    calib = dict(iterations=args.iterations, num_sampling_steps=args.sampling_steps,
                 labels_per_iteration=args.labels_per_iteration, lr_logits=args.lr_logits,
                 lr_codebook=args.lr_codebook, lambda_r=args.lambda_r, max_seconds=args.max_seconds,
                 teacher_sampler=args.teacher_sampler, seed=args.seed, device=args.device,
                 until_hard=args.until_hard, max_steps=args.max_steps)
    return build_config(args.method, bits=args.bits, k=args.k, d=args.d, init=args.init, recipe=args.recipe,
                        model=model, n_quantizable_weights=None if model is not None else 0, calib=calib,
                        n_candidates=args.candidates, kmeans_iters=args.kmeans_iters, seed=args.seed)


def cmd_quantize(args) -> int:
    import torch
    from . import distributed
    from .io import check_output
    from .checks import resolve_device
    from .fs import output_lock

    out = Path(args.out)
    unused = _unused_flags(args)
    if unused:
        raise ValueError(f"--method {args.method} does not use {', '.join(_flag(f) for f in unused)}: "
                         f"remove {'them' if len(unused) > 1 else 'it'}")
    # everything that can be checked is checked before any model is loaded or computed
    check_output(out, args.overwrite, protect=[args.model] if Path(args.model).exists() else [])
    device = resolve_device(args.device)
    torch.manual_seed(args.seed)
    config_from_args(args)  # bad settings fail here, before the model is loaded
    device = distributed.init_from_env(device)  # under torchrun: join the group (cuda:LOCAL_RANK on GPUs)
    args.device = str(device)
    try:
        # rank 0 writes OUT: it claims it now, so a second run on the same --out fails here, not at the save
        with output_lock(out) if distributed.is_main() else contextlib.nullcontext():
            return _quantize(args, out, device)
    except KeyboardInterrupt as e:  # _quantize handles interrupts once the quantized model exists
        what = "terminated (SIGTERM)" if isinstance(e, _Terminated) else "interrupted"
        print(f"{what} before the model was quantized: nothing written", file=sys.stderr)
        return 143 if isinstance(e, _Terminated) else 130
    finally:
        distributed.shutdown()


def _quantize(args, out: Path, device) -> int:
    import copy
    from . import distributed
    from .config import METHODS
    from .io import dir_bytes, load_dit, save_quantized
    from .metrics import block_mse
    from .quant_api import quantize
    from .size import size_summary

    bundle = load_dit(args.model, device=device)
    model = bundle.transformer
    config = config_from_args(args, model)
    # only calibration needs the full-precision teacher while quantizing; k-means and RTN do not
    teacher = copy.deepcopy(model).eval() if METHODS[args.method].calibrated else None
    t0 = time.time()
    trace = quantize(model, config, teacher=teacher, progress=distributed.is_main())
    seconds = time.time() - t0
    if not distributed.is_main():  # data parallel: every rank holds the same model; rank 0 writes it
        return 0
    if trace is not None and trace.meta.get("stopped") == "interrupted":
        partial = out.with_name(out.name + ".partial-trace")
        trace.save(partial)
        what = "terminated (SIGTERM)" if _SIGNALLED["term"] else "interrupted"
        print(f"{what} after {trace.meta['steps_done']} steps: partial trace kept in {partial}; "
              f"no model written", file=sys.stderr)
        return 143 if _SIGNALLED["term"] else 130
    model.eval()
    # From here the quantized model exists: an interrupt skips what is left of the evaluation, and the
    # save runs with SIGINT/SIGTERM deferred, so a finished calibration is never thrown away.
    mse, stopped = None, None
    try:
        if not args.no_eval:  # block MSE vs FP on held-out trajectories (~100 TFLOP for DiT-XL/2)
            if teacher is None:
                teacher = load_dit(args.model, device=device).transformer
            mse = block_mse(model, teacher)["mean"]
    except KeyboardInterrupt as e:
        stopped = ("terminated (SIGTERM)" if isinstance(e, _Terminated) else "interrupted") + \
            " during the block-MSE evaluation"
    del teacher
    extra = dict(source=str(args.model), seconds=seconds, block_mse=mse)
    write_trace = (lambda tmp: trace.save(tmp / "trace")) if trace is not None else None
    with _signals_deferred() as got:
        save_quantized(model, out, scheduler=bundle.scheduler, overwrite=args.overwrite, extra=extra,
                       protect=[args.model] if Path(args.model).exists() else [], write_extra=write_trace,
                       vae=bundle.vae)  # a latent-space pipeline keeps its VAE (vae/, not in dir_bytes)
    if got["sig"] and not stopped:
        stopped = got["sig"] + " while saving"
    if stopped:
        kept = "the quantized model and its calibration trace" if trace is not None else "the quantized model"
        print(f"{stopped}: {kept} were written to {out}" + (" (block MSE not computed)" if mse is None and
              not args.no_eval else ""), file=sys.stderr)
        return 143 if stopped.startswith("terminated") else 130
    size = size_summary(model)
    print(json.dumps(dict(out=str(out), method=config.method, bits_per_weight=round(size["bits_per_weight"], 4),
                          index_bytes=size["index_bytes"], dir_bytes=dir_bytes(out, vae=False),
                          vae_bytes=dir_bytes(out) - dir_bytes(out, vae=False), block_mse=mse,
                          seconds=round(seconds, 1)), indent=1))
    return 0


def cmd_sample(args) -> int:
    from .io import load_dit
    from .checks import resolve_device
    from .fs import check_writable
    from .sampling import sample
    from .viz import check_image_out, save_grid

    if args.labels is not None and len(args.labels) > MAX_SAMPLE_LABELS:
        raise ValueError(f"at most {MAX_SAMPLE_LABELS} labels per call, got {len(args.labels)}")
    out = Path(args.out)
    # before any work: a known image format, never inside an input model, never an existing file unasked
    model_dirs = [args.model, args.vae] if not str(args.model).startswith("hf:") else [args.vae]
    check_image_out(out, args.overwrite, protect=model_dirs)
    check_writable(out.parent)
    device = resolve_device(args.device)
    bundle = load_dit(args.model, device=device, cache=args.cache_weights)
    if args.vae is not None:
        from .io import load_vae
        bundle.vae = load_vae(args.vae, device)
    if bundle.vae is None and bundle.transformer.config.in_channels not in (1, 3):
        raise ValueError(f"{args.model} is a latent-space model ({bundle.transformer.config.in_channels} channels) "
                         f"without a VAE: pass --vae PIPELINE_DIR (a packed model quantized from a transformer dir, not "
                         f"a pipeline, has no vae/)")
    n_cls = bundle.transformer.config.num_embeds_ada_norm
    labels = args.labels if args.labels else list(range(min(n_cls, 10)))
    bad = [l for l in labels if not 0 <= l < n_cls]
    if bad:
        print(f"error: labels {bad[:10]} out of range [0, {n_cls - 1}]", file=sys.stderr)
        return 2
    images = sample(bundle.transformer, labels, num_steps=args.steps, guidance_scale=args.cfg, seed=args.seed,
                    scheduler=bundle.scheduler, vae=bundle.vae, batch_size=SAMPLE_BATCH)
    save_grid(images, args.out, nrow=args.nrow or min(len(labels), 32), overwrite=args.overwrite)
    print(f"wrote {len(labels)} samples to {args.out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from .config import DEFAULT_METHOD, INITS, METHODS, RECIPES
    from .checks import bounded_float, bounded_int
    methods_help = "methods:\n" + "\n".join(f"  {n:14s} {m.description}" for n, m in METHODS.items())
    p = argparse.ArgumentParser(prog="python -m vq4dit", description=__doc__, epilog=methods_help,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)

    q = sub.add_parser("quantize", help="quantize (and calibrate) a DiT, write a packed model + trace",
                       epilog=methods_help, formatter_class=argparse.RawDescriptionHelpFormatter)
    q.add_argument("--model", default=_default_model(),
                   help="diffusers DiT dir (transformer dir or pipeline dir), or hf:owner/name to load from the Hub "
                        "(default: embedded digits DiT; a missing local path is an error)")
    q.add_argument("--bits", type=bounded_int(2, 8), default=2, help="bit-width preset: 2 (k256,d4), 3 (k64,d2), 4 (k256,d2)")
    q.add_argument("--method", default=DEFAULT_METHOD, choices=list(METHODS),
                   help=f"quantization method (default {DEFAULT_METHOD}: the best measured; see below)")
    q.add_argument("--recipe", default="auto", choices=["auto", *RECIPES],
                   help="calibration budget and learning rates, the same for every method: 'small' (8 x 25 "
                        "steps, DDIM teacher) or 'reference' (the reference code: 1000 x 50 steps, DDPM teacher); "
                        "auto = small for models under 50M quantizable weights (default)")
    q.add_argument("--teacher-sampler", choices=["ddim", "ddpm"], help="teacher trajectory sampler (default: the recipe's)")
    q.add_argument("--out", required=True, help="output directory for the packed model (must not exist)")
    q.add_argument("--overwrite", action="store_true",
                   help="replace --out if it holds a previous vq4dit output (never the input model or the working dir)")
    q.add_argument("--k", type=bounded_int(2, 65536), help="codewords per layer (overrides the preset)")
    q.add_argument("--d", type=bounded_int(1, 64), help="sub-vector length (overrides the preset)")
    q.add_argument("--candidates", type=bounded_int(1, 16), help="candidate codewords per sub-vector (default 2)")
    q.add_argument("--init", choices=list(INITS),
                   help="codebook init (default: the method's own; act-aware only for vq4dit-ste-aa). Changing "
                        "it saves the run under the name of those switches (vq4dit-ste + act-aware = vq4dit-ste-aa)")
    q.add_argument("--kmeans-iters", type=bounded_int(1, 10000),
                   help="k-means iterations (default: the recipe's, 50 small / 100 reference)")
    q.add_argument("--iterations", type=bounded_int(1, 1_000_000),
                   help="calibration trajectories (default: the recipe's, 8 small / 1000 reference)")
    q.add_argument("--sampling-steps", type=bounded_int(1, 1000),
                   help="teacher sampler steps per trajectory (default: 25 small / 50 reference)")
    q.add_argument("--labels-per-iteration", type=bounded_int(1, 1024), help="random class labels per trajectory (default 4)")
    q.add_argument("--lr-logits", type=bounded_float(0, 10),
                   help="learning rate of assignment logits (default: 2e-2 small / 5e-2 reference)")
    q.add_argument("--lr-codebook", type=bounded_float(0, 10),
                   help="learning rate of codebooks (default: 3e-4 small / 1e-4 reference)")
    q.add_argument("--lambda-r", type=bounded_float(0, 1000), help="weight of the ratio regularizer L_r (default 1.0)")
    q.add_argument("--max-seconds", type=bounded_float(0.001, 1e7), help="stop calibration after this many seconds")
    q.add_argument("--until-hard", action="store_true", default=None,
                   help="after --iterations, keep calibrating until every layer has switched to hard by itself "
                        "(+50 steps), at most --max-steps; otherwise layers still soft are forced to argmax")
    q.add_argument("--max-steps", type=bounded_int(1, 100_000_000), help="step cap of --until-hard (default 4x the planned steps)")
    q.add_argument("--seed", type=bounded_int(0, 2 ** 32 - 1), default=0, help="seed for k-means, labels and noise")
    q.add_argument("--device", help="cuda, cuda:1 or cpu (default: CUDA when available)")
    q.add_argument("--no-eval", action="store_true",
                   help="skip the block-MSE evaluation against the FP model (about 100 TFLOP for DiT-XL/2)")
    q.set_defaults(func=cmd_quantize)

    s = sub.add_parser("sample", help="generate a grid of class-conditional samples")
    s.add_argument("--model", default=_default_model(), help="FP or packed model directory")
    s.add_argument("--labels", type=bounded_int(0, 1_000_000), nargs="*",
                   help=f"class labels (default: 0..9; at most {MAX_SAMPLE_LABELS}, sampled {SAMPLE_BATCH} at a time)")
    s.add_argument("--out", required=True, help="output image (.png, .jpg, .webp, .bmp: written in that format; "
                                                "never inside the model directories)")
    s.add_argument("--overwrite", action="store_true", help="replace an existing --out image file")
    s.add_argument("--steps", type=bounded_int(1, 1000), default=50, help="DDIM sampling steps")
    s.add_argument("--cfg", type=bounded_float(0, 100), default=4.0, help="classifier-free guidance scale")
    s.add_argument("--seed", type=bounded_int(0, 2 ** 32 - 1), default=0, help="noise seed")
    s.add_argument("--nrow", type=bounded_int(1, 1024), help="images per grid row")
    s.add_argument("--device", help="cuda or cpu (default: CUDA when available)")
    s.add_argument("--vae", help="pipeline dir (its vae/) or VAE dir to decode latents (default: the model's own "
                                 "vae/: a pipeline, or a packed dir quantized from one)")
    s.add_argument("--cache-weights", action="store_true",
                   help="packed model: keep every decoded weight after the first step (faster; more memory "
                        "than the FP model). Default: decode each layer per forward (about the packed size)")
    s.set_defaults(func=cmd_sample)
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    _SIGNALLED["term"] = False
    try:
        with _sigterm_as_interrupt():
            return args.func(args)
    except (ValueError, FileNotFoundError, FileExistsError, PermissionError, FloatingPointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:
        print("terminated (SIGTERM)" if isinstance(e, _Terminated) else "interrupted", file=sys.stderr)
        return 143 if isinstance(e, _Terminated) else 130


def main_entry() -> None:
    """The `vq4dit` console command (pyproject [project.scripts])."""
    sys.exit(main())


if __name__ == "__main__":
    sys.exit(main())
