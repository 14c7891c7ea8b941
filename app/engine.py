"""The engine: the FP teacher (loaded once), the runs store, starting the calibration worker, images.

Everything here is a thin layer over the library: quantizing, calibrating, sampling and metrics all
come from `vq4dit`; a run's config comes from `RunRequest.config` (= `vq4dit.config.build_config`
with the model's recipe, the CLI's path).
"""
from __future__ import annotations

import threading
from dataclasses import asdict, replace
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from vq4dit.config import default_recipe
from vq4dit.runner import EvalSpec, generate
from vq4dit.io import load_dit
from vq4dit.naming import default_filter
from vq4dit.checks import resolve_device
from vq4dit.sampling import sample
from vq4dit.testbed import DIGITS_DIT_DIR

from .cache import LRU
from .config import AppConfig, RunRequest, setup_defaults
from .store import DEMO_DIR, DEMO_PREFIX, DEMO_SAMPLES, RunStore
from .worker import RunCancelled
from .active_run import ActiveRun, WorkerProcess, follow_worker

__all__ = ["ActiveRun", "Engine", "RunCancelled", "warm_umap_async"]


class Engine:
    """Holds the FP teacher (loaded once), the runs store, the worker and image caches."""

    def __init__(self, cfg: AppConfig):
        self.cfg = cfg
        self.device = resolve_device(cfg.device)
        self.bundle = load_dit(cfg.model, device=self.device)
        self.teacher = self.bundle.transformer
        tc = self.teacher.config
        if tc.num_embeds_ada_norm is None:
            raise ValueError(f"{cfg.model} is not a class-conditional DiT (num_embeds_ada_norm is None)")
        self.n_classes = int(tc.num_embeds_ada_norm)
        self.n_blocks = len(self.teacher.transformer_blocks)
        self.embedded = Path(cfg.model).resolve() == Path(DIGITS_DIT_DIR).resolve()
        self.is_digits = (tc.in_channels == 1 and tc.sample_size == 16 and self.n_classes == 10
                          and self.bundle.vae is None)
        demo = DEMO_DIR if cfg.demo_runs and self.embedded else None  # demo runs were made from this model
        self.store = RunStore(cfg.runs_dir, device=self.device, demo_root=demo, fp_base=self.teacher,
                              cache_weights=cfg.cache_weights)
        # the recipe (budget, learning rates, k-means) follows the model's size, as on the CLI
        self.n_quantizable_weights = sum(m.weight.numel() for name, m in self.teacher.named_modules()
                                         if default_filter(m, name))
        self.recipe = default_recipe(self.n_quantizable_weights)
        self.calib_defaults, self.kmeans_default = setup_defaults(cfg, self.n_quantizable_weights)
        self.model_lock = threading.Lock()   # every forward pass of a model goes through here
        self.active: Optional[ActiveRun] = None
        self.worker_setup: Optional[str] = None  # "module:function" the worker calls first (tests: faults)
        self._spare: Optional[WorkerProcess] = None  # the next run's worker, started ahead (start_spare)
        self._spare_lock, self._closed = threading.Lock(), False
        self._evaluator = None
        self._images = LRU(48)  # (model key, labels, seed, guidance, steps) -> images

    # -- metrics --------------------------------------------------------------------------
    @property
    def evaluator(self):
        if self._evaluator is None and self.is_digits:
            from vq4dit.testbed.classifier import DigitsEvaluator
            self._evaluator = DigitsEvaluator()
        return self._evaluator

    def eval_spec(self) -> EvalSpec:
        return EvalSpec(n_per_class=self.cfg.eval_per_class, num_classes=min(10, self.n_classes),
                        num_steps=self.cfg.eval_steps, guidance_scale=4.0, seed=0)

    def images(self, key: str, model, labels, seed: int, guidance: float, steps: int,
               scheduler=None, vae=None, on_step=None) -> torch.Tensor:
        """Samples for `labels`, cached by (model key, labels, seed, guidance, steps); `on_step(i, x)`
        after each sampler step when they are sampled."""
        ck = (key, tuple(int(x) for x in labels), int(seed), float(guidance), int(steps))
        if ck in self._images:
            return self._images.get(ck)
        x = self.shipped_images(*ck)
        if x is not None:
            return self._images.put(ck, x)
        with self.model_lock:
            x = sample(model, list(labels), num_steps=int(steps), guidance_scale=float(guidance), seed=int(seed),
                       scheduler=scheduler or self.bundle.scheduler, vae=vae if vae is not None else self.bundle.vae,
                       on_step=on_step)
        return self._images.put(ck, x)

    def has_images(self, key: str, labels, seed, guidance, steps) -> bool:
        """Are these images cached or shipped with a demo run (no sampling needed)?"""
        ck = (key, tuple(int(x) for x in labels), int(seed), float(guidance), int(steps))
        return ck in self._images or self.shipped_images(*ck) is not None

    def shipped_images(self, key: str, labels: tuple, seed: int, guidance: float, steps: int) -> Optional[torch.Tensor]:
        """Images a demo run ships (DEMO_SAMPLES: its own and FP's, sampled by `python -m app.demo build`
        at the Images tab's defaults) when the request matches them exactly; key 'fp' = the FP model."""
        if self.store.demo_root is None or not self.store.demo_root.is_dir():
            return None
        rids = [key] if self.store.is_demo(key) else sorted(p.name for p in self.store.demo_root.iterdir()
                                                            if p.name.startswith(DEMO_PREFIX)) if key == "fp" else []
        want = dict(labels=",".join(map(str, labels)), seed=str(seed), guidance=str(float(guidance)), steps=str(steps))
        from safetensors import safe_open
        for rid in rids:
            try:
                f = self.store.run_dir(rid) / DEMO_SAMPLES
                if not f.is_file():
                    continue
                with safe_open(str(f), "pt") as st:
                    if {k: st.metadata().get(k) for k in want} != want:
                        continue
                    return st.get_tensor("fp" if key == "fp" else "run").float()
            except (ValueError, OSError):
                continue
        return None

    def fp_images(self, labels, seed, guidance, steps, on_step=None) -> torch.Tensor:
        return self.images("fp", self.teacher, labels, seed, guidance, steps, on_step=on_step)

    def run_images(self, run_id, labels, seed, guidance, steps) -> torch.Tensor:
        b = self.store.model(run_id)
        return self.images(run_id, b.transformer, labels, seed, guidance, steps, vae=self.bundle.vae)

    def image_metrics(self, images, labels, reference) -> dict:
        """The library's metrics (DigitsEvaluator on the digits model, vq4dit.metrics otherwise)
        plus the predicted class of each image ("pred") for the image labels."""
        if self.evaluator is not None:
            out = self.evaluator.evaluate(images, labels, reference)
            out["pred"] = self.evaluator.predict(images).tolist()
            return out
        from vq4dit.metrics import image_mse, psnr
        if reference is None:
            return {}
        return dict(psnr=float(psnr(images, reference).mean()), image_mse=float(image_mse(images, reference).mean()))

    def evaluate_run_model(self, model, progress=None) -> tuple[dict, dict]:
        """(metrics of the quantized model, metrics of FP) on the fixed eval spec.
        `progress(done, total)`: after each sampler step (FP's too when they are not cached)."""
        spec = self.eval_spec()
        labels = spec.labels()
        fp_cached = self.has_images("fp", labels, spec.seed, spec.guidance_scale, spec.num_steps)
        # sampler steps: generate() runs batches of spec.batch, fp_images one batch
        total = -(-len(labels) // spec.batch) * spec.num_steps + (0 if fp_cached else spec.num_steps)
        done = [0]

        def step(i, x):
            done[0] += 1
            if progress is not None:
                progress(done[0], total)
        fp = self.fp_images(labels, spec.seed, spec.guidance_scale, spec.num_steps, on_step=step)
        with self.model_lock:
            q = generate(model, spec, self.bundle.scheduler, self.bundle.vae, on_step=step)
        m = self.image_metrics(q, labels, fp)
        f = self.image_metrics(fp, labels, None)
        m.pop("pred", None), f.pop("pred", None)
        return m, f

    # -- estimates ------------------------------------------------------------------------
    def estimate(self, cfg) -> dict:
        """Before a run: storage from the library's bit accounting (`vq_storage_bits` /
        `rtn_storage_bits`, the numbers the packed model will have) over the layers `quantize`
        targets, and time from earlier runs of the same method and k x d (median per stage)."""
        from vq4dit.config import VQConfig
        from vq4dit.peers import PeerConfig
        from vq4dit.size import rtn_storage_bits, vq_storage_bits
        if isinstance(cfg, PeerConfig):  # what the library stores is counted when it runs: earlier runs say
            same = [r.meta["bits_per_weight"] for r in self.store.list() if r.error is None
                    and r.meta.get("method") == cfg.method and r.meta.get("bits_per_weight")]
            return dict(peer=True, bits_per_weight=same[0] if same else None, steps=0, seconds=None)
        n = total = 0
        for name, lin in self.teacher.named_modules():
            if not default_filter(lin, name):
                continue
            bias = lin.bias is not None
            if isinstance(cfg, VQConfig):
                if lin.in_features % cfg.d:
                    return dict(error=f"d={cfg.d} does not divide {name}'s in_features={lin.in_features}")
                b = vq_storage_bits(lin.out_features, lin.in_features, cfg.k, cfg.d, cfg.codebook_dtype, bias)
            else:
                b = rtn_storage_bits(lin.out_features, lin.in_features, cfg.bits, cfg.per_channel, bias)
            n += b["n_weights"]
            total += b["index_bits"] + b["side_bits"] + b["bias_bits"]
        calib = getattr(cfg, "calib", None)
        steps = calib.total_steps if calib is not None else 0
        out = dict(n_weights=n, bits_per_weight=total / max(n, 1), bytes=total / 8, steps=steps, seconds=None)
        same = [r.meta for r in self.store.list() if r.error is None and r.meta.get("quantize_seconds") is not None
                and r.meta.get("method") == cfg.method and r.meta.get("k") == getattr(cfg, "k", None)
                and r.meta.get("d") == getattr(cfg, "d", None)]
        if same:
            q = float(np.median([m["quantize_seconds"] for m in same]))
            per = [(m["seconds"] - m["quantize_seconds"]) / m["steps_done"] for m in same
                   if m.get("steps_done") and m.get("seconds") is not None]
            out["seconds"] = q + (float(np.median(per)) * steps if per else 0.0)
            out["basis"] = f"median of {len(same)} earlier {cfg.method} run(s) at this k×d, excluding evaluation"
        return out

    # -- runs -----------------------------------------------------------------------------
    def run_config(self, s: RunRequest):
        """The library config of a request on this model and device (`build_config`, recipe "auto")."""
        return replace(s, calib=dict(s.calib or {}, device=str(self.device))).config(
            n_quantizable_weights=self.n_quantizable_weights)

    def busy(self) -> bool:
        return self.active is not None and not self.active.done.is_set()

    def start_run(self, s: RunRequest) -> ActiveRun:
        """Validate, then quantize + calibrate + evaluate + save in a worker process (app/worker.py);
        a thread of this process follows its records into the returned ActiveRun."""
        config = self.run_config(s)  # ValueError for invalid k/d/n/bits/iterations/learning rates
        if self.busy():
            raise RuntimeError("a run is already in progress: wait for it or press Cancel")
        calib = getattr(config, "calib", None)
        w = self._take_worker()
        a = ActiveRun(settings=s, config=config, total_steps=calib.total_steps if calib is not None else 0,
                      stop=w.stop, phase="starting worker")
        w.submit(asdict(s))
        a.pid, a.phase_t0["starting worker"] = w.proc.pid, a.t0
        self.active = a
        threading.Thread(target=follow_worker, args=(a, w, self.store, self.cfg.cancel_grace_s),
                         kwargs=dict(on_end=self.start_spare), daemon=True, name="vq4dit-run-follow").start()
        return a

    # -- worker processes -----------------------------------------------------------------
    def _worker_job(self) -> dict:
        return dict(app=dict(asdict(self.cfg), device=str(self.device)), setup=self.worker_setup,
                    threads=self.cfg.threads or torch.get_num_threads())

    def start_spare(self):
        """Start the next run's worker ahead (AppConfig.spare_worker): it imports while the user looks."""
        job = self._worker_job()
        with self._spare_lock:
            if self.cfg.spare_worker and not self._closed and (self._spare is None or not self._spare.fits(job)):
                if self._spare is not None:
                    self._spare.retire()
                self._spare = WorkerProcess.spawn(job)

    def _take_worker(self) -> WorkerProcess:
        """The spare when it was started for today's job (same config, setup hook, threads), else a new one."""
        job = self._worker_job()
        with self._spare_lock:
            w, self._spare = self._spare, None
        if w is not None and w.fits(job):
            return w
        if w is not None:
            w.retire()
        return WorkerProcess.spawn(job)

    def close(self):
        """Retire the spare worker (a running one is left to finish or be cancelled)."""
        with self._spare_lock:
            self._closed = True
            if self._spare is not None:
                self._spare.retire()
                self._spare = None


def warm_umap_async():
    """Compile umap's numba kernels in the background so the first UMAP view doesn't stall."""
    def warm():
        try:
            import umap
            x = np.random.default_rng(0).normal(size=(64, 4)).astype(np.float32)
            umap.UMAP(n_neighbors=8, n_epochs=20, random_state=0, n_jobs=1).fit_transform(x)
        except Exception:
            pass
    t = threading.Thread(target=warm, daemon=True, name="umap-warmup")
    t.start()
    return t
