"""The mechanism the paper claims, measured from a calibration trace, with a verdict per measure.

The paper: sub-vectors sharing a codeword pull its gradient in conflicting directions, so calibrating
the codebook alone fails; letting sub-vectors move to another codeword fixes it. What can show that:

    changed_shares(trace, step)      share of sub-vectors whose codeword differs from the one the run
                                     STARTED from (step 0): 0 at step 0 by construction, whatever the init
    gradient_stats(g, a, prev, C)    (recorded during calibration) leave-one-out cosines of each
                                     sub-vector's gradient with its codeword's summed gradient, against a
                                     random regrouping of the same gradients into codewords of the same
                                     sizes; for the sub-vectors that moved since the last record, cos with
                                     the old vs the new codeword's sum and the first-order gain
    premise_verdict / moves_verdict / paired_verdict / hard_switch_verdict
                                     a mean with a 95% t-interval over layers (or blocks) and a plain-words
                                     verdict: an effect only where the interval excludes 0

Including a sub-vector in its own codeword's sum biases its cosine positive, and the share of negative
cosines drifts toward 50% as any codebook converges (a codeword's summed gradient goes to 0 at a
stationary point); so the premise is read against the null, never as a raw share.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch

# ----------------------------------------------------------------------------------------
# "changed": one definition for every view
# ----------------------------------------------------------------------------------------


def changed_shares(trace, step: Optional[int] = None):
    """One row per layer: `changed_frac` = share of sub-vectors whose codeword differs from the one the
    run started from, at the last record at or before `step` (None: the end), and `exact` (True: every
    sub-vector, recorded during calibration; False: estimated on the trace's fixed sample, from the
    snapshots, for traces recorded before the start assignment was kept)."""
    import pandas as pd
    stats = trace.layer_stats()
    if trace.meta.get("changed_vs") == "start" and len(stats):
        if step is not None:
            stats = stats[stats["step"] <= step]
        last = stats.groupby("layer", sort=False).tail(1)
        return pd.DataFrame(dict(layer=last["layer"].to_numpy(), block=last["block"].to_numpy(),
                                 type=last["type"].to_numpy(), changed_frac=last["changed_frac"].to_numpy(float),
                                 exact=True))
    rows = []
    for layer in trace.layer_names:
        if not trace.has_samples(layer):
            continue
        mask = changed_mask(trace, layer, step)
        info = trace.layer_info(layer)
        rows.append(dict(layer=layer, block=info.block, type=_type_of(trace, layer), changed_frac=float(mask.mean()),
                         exact=False))
    return pd.DataFrame(rows, columns=["layer", "block", "type", "changed_frac", "exact"])


def changed_mask(trace, layer: str, step: Optional[int] = None) -> np.ndarray:
    """(n_samples,) bool: sampled sub-vectors whose codeword at the last snapshot at or before `step`
    differs from their codeword at the first snapshot (step 0)."""
    steps = trace.snapshot_steps(layer)
    at = [s for s in steps if step is None or s <= step] or steps[:1]
    return trace.snapshot(layer, at[-1]).assign != trace.snapshot(layer, steps[0]).assign


def _type_of(trace, layer: str) -> str:
    from .naming import layer_type
    return layer_type(layer)


# ----------------------------------------------------------------------------------------
# Recorded during calibration (bounded: scalars per layer and record, cosines of the fixed sample)
# ----------------------------------------------------------------------------------------


@torch.no_grad()
def gradient_stats(g: torch.Tensor, assign: torch.Tensor, prev: Optional[torch.Tensor], codebook: torch.Tensor,
                   generator: Optional[torch.Generator] = None, sample: Optional[torch.Tensor] = None) -> dict:
    """Measures of one layer's sub-vector gradients g (S, d) under assignment `assign` (S,).

    loo_*: cos(g_j, G_c - g_j), G_c = sum of the gradients assigned to j's codeword c (leave-one-out);
    null_*: the same with `assign` randomly permuted (codewords of the same sizes, same gradients);
    moved_*: sub-vectors whose codeword differs from `prev` (the previous record): cos with the old
    codeword's sum and with the new one's (leave-one-out), and the share whose move lowered the loss to
    first order, g_j . (C_old - C_new) > 0 (gradients of this step, after the move)."""
    k = codebook.shape[0]
    g = g.float()

    def loo_cos(a):
        gsum = torch.zeros(k, g.shape[1], device=g.device).index_add_(0, a, g)     # (k, d)
        count = torch.zeros(k, device=g.device).index_add_(0, a, torch.ones_like(a, dtype=torch.float))
        rest = gsum[a] - g                                                          # (S, d)
        cos = torch.nn.functional.cosine_similarity(g, rest, dim=1, eps=1e-30)
        return cos, count[a] >= 2, gsum

    cos, ok, gsum = loo_cos(assign)
    perm = torch.randperm(len(assign), generator=generator).to(assign.device)
    ncos, nok, _ = loo_cos(assign[perm])
    out = dict(loo_conflict_share=_mean((cos[ok] < 0).float()), loo_cos_mean=_mean(cos[ok]),
               null_conflict_share=_mean((ncos[nok] < 0).float()), null_cos_mean=_mean(ncos[nok]))
    if prev is not None:
        moved = torch.nonzero(prev != assign).squeeze(1)
        out["moved_n"] = int(len(moved))
        if len(moved):
            gm, old, new = g[moved], prev[moved], assign[moved]
            c_old = torch.nn.functional.cosine_similarity(gm, gsum[old], dim=1, eps=1e-30)
            c_new = torch.nn.functional.cosine_similarity(gm, gsum[new] - gm, dim=1, eps=1e-30)
            gain = (gm * (codebook[old].float() - codebook[new].float())).sum(1)
            out.update(moved_cos_old=_mean(c_old), moved_cos_new=_mean(c_new), moved_gain_share=_mean((gain > 0).float()))
    if sample is not None:
        out["sample_loo_cos"] = cos[sample].cpu()
    return out


def _mean(t: torch.Tensor) -> float:
    return t.mean().item() if t.numel() else float("nan")


# ----------------------------------------------------------------------------------------
# Verdicts
# ----------------------------------------------------------------------------------------

T95 = {1: 12.71, 2: 4.30, 3: 3.18, 4: 2.78, 5: 2.57, 6: 2.45, 7: 2.36, 8: 2.31, 9: 2.26, 10: 2.23, 15: 2.13,
       20: 2.09, 30: 2.04, 40: 2.02, 60: 2.0}


def interval(values) -> tuple[float, float, float, int]:
    """(mean, lo, hi, n): mean with a 95% t-interval of the finite values (n < 2: no interval)."""
    v = np.asarray([x for x in values if x is not None and math.isfinite(x)], float)
    n = len(v)
    if n == 0:
        return float("nan"), float("nan"), float("nan"), 0
    m = float(v.mean())
    if n < 2:
        return m, float("nan"), float("nan"), n
    df = n - 1
    t = next((T95[key] for key in sorted(T95) if key >= df), 1.96)
    h = t * float(v.std(ddof=1)) / math.sqrt(n)
    return m, m - h, m + h, n


@dataclass
class Verdict:
    measure: str                  # what was measured, in words
    effect: Optional[bool]        # True: the interval excludes 0; False: it does not; None: no data
    text: str                     # the plain-words verdict shown on screen
    mean: float = float("nan")
    lo: float = float("nan")
    hi: float = float("nan")
    n: int = 0
    unit: str = ""


def _verdict(measure: str, values, unit: str, over: str, yes: str, no: str, scale: float = 1.0) -> Verdict:
    m, lo, hi, n = interval(values)
    if n < 2:
        return Verdict(measure, None, f"{measure}: not enough data (needs at least 2 {over}).", m, lo, hi, n, unit)
    effect = bool(lo > 0 or hi < 0)
    u = f" {unit}" if unit else ""
    num = f"{scale * m:+.3g}{u} [95% interval {scale * lo:+.3g}, {scale * hi:+.3g}] over {n} {over}"
    return Verdict(measure, effect, f"{measure}: {num}. " + (yes if effect else no), m, lo, hi, n, unit)


def _first_per_layer(trace, column: str, first: bool = True) -> dict:
    df = trace.layer_stats()
    if not len(df) or column not in df:
        return {}
    df = df[df[column].notna()]
    pick = df.groupby("layer", sort=False).head(1) if first else df
    return {layer: float(g[column].mean()) for layer, g in pick.groupby("layer", sort=False)}


def premise_verdict(trace) -> Verdict:
    """At the common start (the first record with gradients): does a codeword's gradient conflict more
    than a random regrouping of the same gradients? Per layer: share of negative leave-one-out cosines
    minus the null's share, in percentage points."""
    obs, null = _first_per_layer(trace, "loo_conflict_share"), _first_per_layer(trace, "null_conflict_share")
    if not obs:
        return Verdict("Conflict inside codewords vs a random regrouping", None, "Premise: this trace has no "
                       "leave-one-out gradient statistics (recorded by calibration runs from this version on).")
    diffs = [obs[k] - null[k] for k in obs if k in null]
    v = _verdict("Conflict inside codewords vs a random regrouping, at the start", diffs, "pp", "layers", "",
                 "No effect at this setting: the conflict share is what a random grouping of the same "
                 "gradients gives.", scale=100.0)
    if v.effect:
        v.text += ("Sub-vectors sharing a codeword conflict MORE than chance: the paper's premise holds here."
                   if v.mean > 0 else "Sub-vectors sharing a codeword conflict LESS than chance (they agree more "
                   "than a random grouping): no sign of the conflict the paper's argument needs.")
    return v


def moves_verdict(trace) -> Verdict:
    """For the sub-vectors that moved: do their gradients agree better with the new codeword's summed
    gradient than with the old one's? Per layer: mean over records of cos_new - cos_old."""
    df = trace.layer_stats()
    need = ("moved_cos_new", "moved_cos_old", "moved_n")
    if not len(df) or any(c not in df for c in need):
        return Verdict("Moves toward agreeing codewords", None, "Moves: this trace has no move statistics "
                       "(recorded by calibration runs from this version on).")
    df = df[df["moved_n"].fillna(0) > 0]
    per = [float(np.average(g["moved_cos_new"] - g["moved_cos_old"], weights=g["moved_n"]))
           for _, g in df.groupby("layer", sort=False)]
    v = _verdict("Moved sub-vectors: cos with the new codeword's gradient minus with the old one's", per, "",
                 "layers", "Sub-vectors move toward codewords whose gradients agree with theirs.",
                 "No effect at this setting: moved sub-vectors agree with their new codeword no better than "
                 "with their old one.")
    if "moved_gain_share" in df and len(df):
        share = float(np.average(df["moved_gain_share"], weights=df["moved_n"]))
        v.text += f" {100 * share:.0f}% of the moves lowered the loss to first order (they follow each sub-vector's own gradient)."
    return v


def paired_verdict(per_block_assign, per_block_fixed, label_assign: str, label_fixed: str) -> Verdict:
    """What reassignment buys in loss units: per block, log(block MSE of the assignment-training run /
    block MSE of the codebook-only run at the same k, d, init, seed); < 0 = reassignment helps."""
    a, b = np.asarray(per_block_assign, float), np.asarray(per_block_fixed, float)
    vals = np.log(a / b) if len(a) == len(b) and len(a) else []
    v = _verdict(f"Block MSE, {label_assign} vs {label_fixed} (log ratio per block)", list(vals), "", "blocks",
                 "", "No effect at this setting: the two runs' block errors do not differ beyond block-to-block noise.")
    if v.effect:
        r = math.exp(v.mean)
        size = f"{r:.1f}×" if r >= 2 else f"about {100 * abs(1 - r):.0f}%"
        v.text += (f"{label_assign} {'lowers' if v.mean < 0 else 'raises'} the block error "
                   f"{'to' if r >= 2 else 'by'} {size} (same k, d, init and seed).")
    return v


def hard_switch_verdict(trace) -> Verdict:
    """Did progressive freezing switch layers to hard assignments by itself, or was every layer forced at
    the end (the short-budget case: codebooks trained for soft mixtures)?"""
    hard = trace.hard_steps()
    n = len(trace.layer_names)
    own = len(hard)
    if n == 0:
        return Verdict("Hard switch", None, "Hard switch: no layers in this trace.")
    if own == 0:
        text = (f"Hard switch: no layer switched by itself; all {n} were made hard at the end of the run "
                f"(step {trace.steps_done}). Progressive freezing did not happen at this budget.")
    else:
        steps = sorted(hard.values())
        text = (f"Hard switch: {own} of {n} layers switched by themselves (steps {steps[0]}-{steps[-1]}); "
                f"{n - own} were forced at the end.")
    return Verdict("Hard switch", own > 0, text, float(own), n=n)


def switch_table(trace):
    """One row per layer: the step it switched to hard assignments, and whether it was forced at the end."""
    import pandas as pd
    hard = trace.hard_steps()
    return pd.DataFrame([dict(layer=layer, hard_step=hard.get(layer, trace.steps_done), forced=layer not in hard)
                         for layer in trace.layer_names])


def soft_hard_gap(trace, hard_block_mse: Optional[float]) -> Optional[dict]:
    """For a soft-forward method: the mean block loss of the last logged steps (soft model, calibration
    trajectories) vs the hard model's block MSE (held-out); None for straight-through methods."""
    if trace.config.get("calib", {}).get("hard_forward", False) or hard_block_mse is None or not len(trace.steps):
        return None
    tail = trace.steps["block_loss"].to_numpy(float)[-10:]
    soft = float(np.mean(tail))
    return dict(soft=soft, hard=float(hard_block_mse), ratio=float(hard_block_mse) / max(soft, 1e-30))
