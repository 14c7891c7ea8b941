"""Text the page shows: method descriptions, the named bit-width choices, run status and estimates."""
from __future__ import annotations

import time
from typing import Optional

from vq4dit.config import METHODS, SETTINGS, setting_kd

from .engine import Engine
from .forms import SetupForm



def setting_choices() -> list[tuple[str, str]]:
    """Dropdown choices: (label with bits and k×d, setting name), every named setting."""
    return [(f"{n} ({SETTINGS[n]['bits']}-bit, {setting_kd(n)[0]}×{setting_kd(n)[1]})", n) for n in SETTINGS]


def method_description(method: Optional[str]) -> str:
    from vq4dit.peers import PEERS, describe
    if method in PEERS:
        return f"**{method}** — {describe(PEERS[method])}"
    spec = METHODS.get(method or "")
    return f"**{method}** — {spec.description}" if spec else ""


def methods_table() -> str:
    """Markdown list of the Set-up panel's methods (vq4dit's, then the installed peers), one line each."""
    from .config import app_methods
    return "\n".join(f"- {method_description(n)}" for n in app_methods())


def status_text(a) -> str:
    """One line per stage: what runs, how far, and an ETA measured on the stage itself (k-means per
    layer, calibration per optimizer step, evaluation per sampler step: each clock starts with its
    stage, so the worker's start and the k-means time do not inflate a later stage's ETA)."""
    s = a.settings
    now = time.time()
    el = now - a.t0
    in_phase = now - (getattr(a, "phase_t0", None) or {}).get(a.phase, a.t0)
    head = phase_bar(a) + "\n\n" + f"**{s.method} W{s.bits}** — "
    tail = f" ({el:.0f} s elapsed)" + (" — **cancelling…**" if a.stop.is_set() else "")
    done = len(a.rows)
    if a.phase == "starting worker":
        return head + f"starting the calibration worker process (loading the model, {in_phase:.0f} s)…" + tail
    if a.phase == "k-means init" and a.layers_total:
        i, n = a.layers_done, a.layers_total
        eta = f", ~{in_phase / i * (n - i):.0f} s left" if i else ""
        return head + f"k-means: layer {i}/{n}{eta}" + tail
    if a.phase == "calibrating" and a.total_steps and done >= a.total_steps:
        return head + f"calibration done ({done} steps), measuring block MSE vs FP…" + tail
    if a.phase == "calibrating" and a.total_steps and done:
        r = a.rows[-1]
        eta = r["seconds"] / done * (a.total_steps - done)
        return (head + f"calibrating: step {done}/{a.total_steps}, block MSE {r['block_loss']:.4g}, "
                       f"L_r {r['l_r']:.3g}, frozen {100 * r['frozen_frac']:.1f}%, ~{eta:.0f} s of calibration left"
                + tail)
    if a.phase == "evaluating images" and getattr(a, "eval_total", 0):
        i, n = a.eval_done, a.eval_total
        eta = f", ~{in_phase / i * (n - i):.0f} s left" if i else ""
        return head + f"evaluating images: sampler step {i}/{n}{eta}" + tail
    if a.phase in ("measuring block MSE vs FP", "saving"):
        return head + f"{a.phase}… ({in_phase:.0f} s)" + tail
    return head + f"{a.phase}…" + tail


PHASES = (("k-means", ("k-means init",)), ("calibration", ("calibrating", "measuring block MSE vs FP")),
          ("evaluation", ("evaluating images",)), ("saving", ("saving", "saved")))


def phase_frac(a) -> Optional[float]:
    """Progress of the current phase in [0, 1] (None: not measurable)."""
    if a.phase == "k-means init" and a.layers_total:
        return a.layers_done / a.layers_total
    if a.phase == "calibrating" and a.total_steps:
        return min(len(a.rows) / a.total_steps, 1.0)
    if a.phase == "evaluating images" and getattr(a, "eval_total", 0):
        return min(a.eval_done / a.eval_total, 1.0)
    return None


def phase_bar(a) -> str:
    """The run's phases in order, the current one with a bar of its own progress (text: it streams with
    the status line, and reads in any client)."""
    cur = next((i for i, (_, ph) in enumerate(PHASES) if a.phase in ph), None)
    frac = phase_frac(a)
    out = []
    for i, (name, _) in enumerate(PHASES):
        if cur is None or i > cur:
            out.append(f"○ {name}")
        elif i < cur:
            out.append(f"● {name}")
        else:
            bar = "" if frac is None else " " + "█" * round(10 * frac) + "░" * (10 - round(10 * frac)) + f" {100 * frac:.0f}%"
            out.append(f"**▶ {name}{bar}**")
    return " → ".join(out)


def estimate_text(engine: Engine, form: SetupForm) -> str:
    """Before a run: bits/weight and size from the library's bit accounting, time from earlier runs."""
    try:
        cfg = engine.run_config(form.settings(engine.calib_defaults))
    except (ValueError, TypeError, KeyError) as e:
        return f"**Estimate:** invalid settings ({e})"
    est = engine.estimate(cfg)
    if est.get("error"):
        return f"**Estimate:** {est['error']}"
    if est.get("peer"):
        b = est["bits_per_weight"]
        return (f"**Estimate:** `{cfg.method}` is a peer library's scheme, calibration-free: its bits/weight "
                "(codes + scales + zeros + biases, as the library stores them) is counted when it runs"
                + (f"; an earlier run stored {b:.3f}." if b else "."))
    t = est.get("seconds")
    when = (f"~{t:.0f} s ({est['basis']})" if t is not None else "unknown until a first run at these settings")
    return (f"**Estimate before running:** {est['bits_per_weight']:.3f} bits/weight "
            f"({est['n_weights'] / 1e6:.2f} M quantized weights → {est['bytes'] / 2**20:.2f} MiB packed, "
            f"vs {est['n_weights'] * 4 / 2**20:.1f} MiB fp32); {est['steps']} calibration steps; time {when}.")
