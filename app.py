"""VQ4DiT explorer: `python app.py` opens it on the embedded digits DiT.

    python app.py                                  # http://127.0.0.1:7860
    python app.py --model path/to/DiT-XL-2-256 --device cuda
    VQ4DIT_PORT=8000 python app.py --runs-dir /tmp/runs
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent


def parse_args(argv=None):
    from vq4dit.testbed import DIGITS_DIT_DIR
    p = argparse.ArgumentParser(description="Explore VQ4DiT vector quantization of a Diffusion Transformer.")
    p.add_argument("--model", default=str(DIGITS_DIT_DIR), help="diffusers DiT dir (default: embedded digits DiT)")
    p.add_argument("--runs-dir", default=str(ROOT / "runs"), help="where runs are saved and listed")
    p.add_argument("--device", default=None, help="cpu / cuda (default: cuda when available)")
    p.add_argument("--host", default=os.environ.get("VQ4DIT_HOST", "127.0.0.1"), help="bind address ($VQ4DIT_HOST)")
    p.add_argument("--port", type=int, default=int(os.environ.get("VQ4DIT_PORT", "7860")), help="port ($VQ4DIT_PORT)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads (1: tiny ops are much faster single-threaded on a busy box)")
    g = p.add_argument_group("defaults shown in the Set-up panel (tests use tiny values)")
    g.add_argument("--iterations", type=int, default=None, help="calibration trajectories (default: library recipe)")
    g.add_argument("--sampling-steps", type=int, default=None, help="teacher steps per trajectory (default: recipe)")
    g.add_argument("--kmeans-iters", type=int, default=None, help="k-means iterations (default: library setting)")
    g.add_argument("--eval-per-class", type=int, default=5, help="images per class for a run's metrics")
    g.add_argument("--eval-steps", type=int, default=25, help="sampler steps for a run's metrics")
    g.add_argument("--image-steps", type=int, default=25, help="default sampler steps in the Images view")
    p.add_argument("--no-umap-warmup", action="store_true", help="skip compiling UMAP in the background at start")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch
    torch.set_num_threads(max(1, args.threads))
    from app import AppConfig, create_app
    cfg = AppConfig(model=args.model, runs_dir=args.runs_dir, device=args.device, iterations=args.iterations,
                    sampling_steps=args.sampling_steps, kmeans_iters=args.kmeans_iters,
                    eval_per_class=args.eval_per_class, eval_steps=args.eval_steps, image_steps=args.image_steps,
                    warm_umap=not args.no_umap_warmup)
    try:
        demo = create_app(cfg)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: cannot open model: {e}", file=sys.stderr)
        return 2
    demo.queue(default_concurrency_limit=1)
    demo.launch(server_name=args.host, server_port=args.port)
    return 0


if __name__ == "__main__":
    sys.exit(main())
