"""VQ4DiT explorer: `python app.py` opens it on the embedded digits DiT.

    python app.py                                  # http://127.0.0.1:7860
    python app.py --model path/to/DiT-XL-2-256 --device cuda
    VQ4DIT_PORT=8000 python app.py --runs-dir /tmp/runs
    VQ4DIT_AUTH=me:secret python app.py --host 0.0.0.0   # reachable from the network: login required
    VQ4DIT_AUTH=me:secret python app.py --share          # public Gradio share link: login required

Bind address: --host, else $VQ4DIT_HOST, else $GRADIO_SERVER_NAME, else 127.0.0.1. Port: --port, else
$VQ4DIT_PORT, else $GRADIO_SERVER_PORT, else 7860. A non-loopback address needs credentials (--auth or
$VQ4DIT_AUTH, "user:password") unless --no-auth is given. A public share link is opened only with --share,
and only with credentials (Gradio's GRADIO_SHARE variable is ignored: the app decides). Gradio analytics
are off unless GRADIO_ANALYTICS_ENABLED=True is set.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # offline by default (set before gradio is imported)
DEFAULT_HOST, DEFAULT_PORT = "127.0.0.1", 7860


def parse_args(argv=None):
    from vq4dit.checks import bounded_int
    from vq4dit.testbed import DIGITS_DIT_DIR
    p = argparse.ArgumentParser(description="Explore VQ4DiT vector quantization of a Diffusion Transformer.")
    p.add_argument("--model", default=str(DIGITS_DIT_DIR), help="diffusers DiT dir (default: embedded digits DiT)")
    p.add_argument("--runs-dir", default=str(ROOT / "runs"), help="where runs are saved and listed")
    p.add_argument("--device", default=None, help="cpu / cuda (default: cuda when available)")
    p.add_argument("--host", default=None,
                   help="bind address (else $VQ4DIT_HOST, else $GRADIO_SERVER_NAME, else 127.0.0.1)")
    p.add_argument("--port", default=None, help="port (else $VQ4DIT_PORT, else $GRADIO_SERVER_PORT, else 7860)")
    p.add_argument("--auth", default=None,
                   help="login as user:password (else $VQ4DIT_AUTH); required when --host is not a loopback address")
    p.add_argument("--no-auth", action="store_true",
                   help="serve a non-loopback address without credentials (anyone on the network can use the app)")
    p.add_argument("--share", action="store_true",
                   help="open a public Gradio share link (needs --auth or $VQ4DIT_AUTH; GRADIO_SHARE is ignored)")
    p.add_argument("--threads", type=bounded_int(1, 1024), default=1,
                   help="torch CPU threads (1: tiny ops are much faster single-threaded on a busy box)")
    # bounds = the app's own input limits (app/config.py APP_LIMITS), checked here so no run fails after its work
    g = p.add_argument_group("defaults shown in the Set-up panel (tests use tiny values)")
    g.add_argument("--iterations", type=bounded_int(1, 10_000), default=None,
                   help="calibration trajectories (default: library recipe)")
    g.add_argument("--sampling-steps", type=bounded_int(1, 1000), default=None,
                   help="teacher steps per trajectory (default: recipe)")
    g.add_argument("--kmeans-iters", type=bounded_int(1, 1000), default=None,
                   help="k-means iterations (default: library setting)")
    g.add_argument("--eval-per-class", type=bounded_int(1, 1000), default=5, help="images per class for a run's metrics")
    g.add_argument("--eval-steps", type=bounded_int(1, 1000), default=25, help="sampler steps for a run's metrics")
    g.add_argument("--image-steps", type=bounded_int(1, 1000), default=25, help="default sampler steps in the Images view")
    p.add_argument("--cache-weights", action="store_true",
                   help="keep the decoded weights of loaded packed runs (faster sampling, more memory than FP)")
    p.add_argument("--no-umap-warmup", action="store_true", help="skip compiling UMAP in the background at start")
    p.add_argument("--no-spare-worker", action="store_true",
                   help="start each run's worker process on Run, not ahead (saves its 0.34 GiB while idle; Run then waits for its imports, 3-4 CPU s)")
    p.add_argument("--no-demo-runs", action="store_true",
                   help="do not list the demo runs shipped in assets/demo_runs/ (listed read-only by default)")
    return p.parse_args(argv)


class ServerBinding:
    def __init__(self, host: str, port: int, auth, exposed: bool, share: bool = False, notes=()):
        self.host, self.port, self.auth, self.exposed = host, port, auth, exposed
        self.share = share  # passed to launch() explicitly, so Gradio never decides it from GRADIO_SHARE
        self.notes = list(notes)

    def banner(self) -> str:
        url = f"http://{self.host}:{self.port}"
        notes = "".join(f"\nnote: {n}" for n in self.notes)
        if self.share:
            return (f"VQ4DiT explorer on {url} and on a PUBLIC Gradio share link (printed by Gradio below): "
                    f"reachable from the internet; login required (user {self.auth[0]!r})" + notes)
        return self._bind_banner(url) + notes

    def _bind_banner(self, url: str) -> str:
        if not self.exposed:
            return f"VQ4DiT explorer on {url} (loopback only)"
        if self.auth:
            return (f"VQ4DiT explorer on {url}: reachable from the network; login required "
                    f"(user {self.auth[0]!r})")
        return (f"WARNING: VQ4DiT explorer on {url} is reachable from the network WITHOUT credentials "
                f"(--no-auth): anyone who can reach it can start and cancel runs and download models")


def resolve_server(args, env=None) -> ServerBinding:
    """Bind address, port and credentials from flags, then the project's and Gradio's variables.
    ValueError (one clear line) for a bad port, bad credentials or an exposed address without them."""
    from vq4dit.checks import is_loopback
    env = os.environ if env is None else env
    host = args.host or env.get("VQ4DIT_HOST") or env.get("GRADIO_SERVER_NAME") or DEFAULT_HOST
    src, raw = next(((n, v) for n, v in (("--port", args.port), ("VQ4DIT_PORT", env.get("VQ4DIT_PORT")),
                                         ("GRADIO_SERVER_PORT", env.get("GRADIO_SERVER_PORT")))
                     if v not in (None, "")), ("default", DEFAULT_PORT))
    try:
        port = int(str(raw).strip())
    except ValueError:
        raise ValueError(f"{src}={raw!r} is not a port number (1-65535)") from None
    if not 1 <= port <= 65535:
        raise ValueError(f"{src}={raw!r} is not a port number (1-65535)")
    auth_src, auth_raw = (("--auth", args.auth) if args.auth else ("VQ4DIT_AUTH", env.get("VQ4DIT_AUTH") or None))
    auth = None
    if auth_raw:
        user, sep, pw = auth_raw.partition(":")
        if not sep or not user or not pw:
            raise ValueError(f"{auth_src} must be user:password with both parts non-empty")
        auth = (user, pw)
    exposed = not is_loopback(host)
    share = bool(getattr(args, "share", False))
    if share and auth is None:  # --no-auth never allows a public link
        raise ValueError("--share opens a public link reachable from the internet: it needs --auth user:password "
                         "(or VQ4DIT_AUTH); --no-auth does not apply to it")
    if exposed and auth is None and not args.no_auth:
        raise ValueError(f"binding to {host} makes the app reachable from the network: pass --auth user:password "
                         f"(or set VQ4DIT_AUTH), or --no-auth to serve it without credentials")
    notes = []
    if env.get("GRADIO_SHARE", "").strip() and not share:
        notes.append(f"GRADIO_SHARE={env['GRADIO_SHARE']!r} is ignored: no share link (pass --share and --auth for one)")
    return ServerBinding(host, port, auth, exposed, share, notes)


def check_port_free(host: str, port: int):
    import socket
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror:
        raise ValueError(f"cannot resolve bind address {host!r}") from None
    family, _, _, _, addr = infos[0]
    s = socket.socket(family, socket.SOCK_STREAM)
    try:
        if os.name == "posix":  # as the server itself binds: a port in TIME_WAIT after a crash is free
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(addr)
    except OSError as e:
        raise ValueError(f"cannot listen on {host}:{port}: {e.strerror or e} (port busy? pick another with --port)") from None
    finally:
        s.close()


def main(argv=None) -> int:
    args = parse_args(argv)
    from vq4dit.checks import resolve_device
    from vq4dit.fs import check_writable
    try:  # everything that can fail is checked before the model is loaded
        server = resolve_server(args)
        device = resolve_device(args.device)
        check_port_free(server.host, server.port)
        check_writable(args.runs_dir)  # a runs dir that is a file (or unwritable) fails now, not after loading
    except (ValueError, PermissionError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    import torch
    torch.set_num_threads(max(1, args.threads))
    from app import AppConfig, create_app
    cfg = AppConfig(model=args.model, runs_dir=args.runs_dir, device=str(device), iterations=args.iterations,
                    sampling_steps=args.sampling_steps, kmeans_iters=args.kmeans_iters,
                    eval_per_class=args.eval_per_class, eval_steps=args.eval_steps, image_steps=args.image_steps,
                    warm_umap=not args.no_umap_warmup, demo_runs=not args.no_demo_runs,
                    cache_weights=args.cache_weights, threads=args.threads,
                    spare_worker=not args.no_spare_worker)
    try:
        demo = create_app(cfg)
    except (FileNotFoundError, ValueError, PermissionError) as e:
        print(f"error: cannot open model: {e}", file=sys.stderr)
        return 2
    demo.queue(default_concurrency_limit=1)
    print(server.banner(), file=sys.stderr, flush=True)
    try:
        demo.launch(server_name=server.host, server_port=server.port, auth=server.auth, share=server.share)
    except OSError as e:
        print(f"error: cannot start the server on {server.host}:{server.port}: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
