"""vq4dit.mechanism: one definition of "changed", the recorded gradient measures, and verdicts that say
"no effect" where there is none (hand-built traces with a known answer)."""
import numpy as np
import pytest
import torch

from conftest import make_tiny_dit

from vq4dit.mechanism import (changed_shares, gradient_stats, hard_switch_verdict, interval, moves_verdict,
                              paired_verdict, premise_verdict)
from vq4dit.trace import Trace

pytestmark = pytest.mark.core


def hand_trace(obs_minus_null, moved=None, hard=None, n_layers=12, steps_done=100):
    """A trace with one gradient record per layer: observed conflict share = 0.45 + obs_minus_null[i],
    null share 0.45; optional move statistics (cos_new - cos_old per layer) and hard events."""
    layers = {f"transformer_blocks.{i}.attn1.to_q": dict(block=i, k=16, d=4, shape=[64, 64]) for i in range(n_layers)}
    tr = Trace(dict(layers=layers, steps_done=steps_done, changed_vs="start"))
    for i, name in enumerate(layers):
        row = dict(step=10, layer=name, block=i, type="attn", changed_frac=0.1,
                   loo_conflict_share=0.45 + obs_minus_null[i], null_conflict_share=0.45)
        if moved is not None:
            row.update(moved_n=20, moved_cos_old=0.1, moved_cos_new=0.1 + moved[i], moved_gain_share=0.9)
        tr.add("layers", row)
    for name, step in (hard or {}).items():
        tr.add("events", dict(step=step, layer=name, event="hard"))
    return tr


def test_premise_verdict_sees_an_effect_and_says_no_effect_on_a_null():
    rng = np.random.default_rng(0)
    effect = hand_trace(0.05 + 0.01 * rng.standard_normal(12))
    v = premise_verdict(effect)
    assert v.effect is True and v.n == 12 and v.lo > 0 and v.mean == pytest.approx(0.05, abs=0.01)
    assert "conflict MORE than chance" in v.text and "No effect" not in v.text
    less = premise_verdict(hand_trace(-0.05 + 0.01 * rng.standard_normal(12)))
    assert less.effect is True and less.hi < 0 and "LESS than chance" in less.text
    null = hand_trace(0.01 * np.array([1, -1] * 6) + 0.001 * rng.standard_normal(12))
    v = premise_verdict(null)
    assert v.effect is False and v.lo < 0 < v.hi and "No effect at this setting" in v.text


def test_moves_verdict_and_hard_switch():
    up = hand_trace(np.zeros(12), moved=0.3 + 0.02 * np.arange(12))
    v = moves_verdict(up)
    assert v.effect is True and v.mean > 0.3 and "90% of the moves lowered the loss" in v.text
    flat = hand_trace(np.zeros(12), moved=0.05 * np.array([1, -1] * 6))
    assert moves_verdict(flat).effect is False and "No effect" in moves_verdict(flat).text
    assert moves_verdict(hand_trace(np.zeros(12))).effect is None  # no move statistics recorded
    names = list(up.meta["layers"])
    v = hard_switch_verdict(up)
    assert v.effect is False and "no layer switched by itself" in v.text and "step 100" in v.text
    v = hard_switch_verdict(hand_trace(np.zeros(12), hard={names[0]: 40, names[3]: 70}))
    assert v.effect is True and "2 of 12" in v.text and "10 were forced" in v.text


def test_paired_verdict_in_loss_units():
    base = np.linspace(1e-3, 4e-3, 6)
    v = paired_verdict(base * 0.5 * (1 + 0.01 * np.arange(6)), base, "vq4dit-ste", "codebook-only")
    assert v.effect is True and v.mean < 0 and "lowers the block error by about 4" in v.text  # ~48%
    v = paired_verdict(base * (1 + 0.01 * np.array([1, -1, 1, -1, 1, -1])), base, "vq4dit-ste", "codebook-only")
    assert v.effect is False and "No effect" in v.text
    m, lo, hi, n = interval([1.0, 2.0, 3.0])
    assert (m, n) == (2.0, 3) and lo == pytest.approx(2 - 4.30 / np.sqrt(3)) and hi == pytest.approx(2 + 4.30 / np.sqrt(3))


def test_gradient_stats_known_answer():
    """Codewords whose members' gradients all point one way: no leave-one-out conflict, while a random
    regrouping of the same gradients conflicts about half the time; moves measured against `prev`."""
    g0 = torch.Generator().manual_seed(0)
    k, per, d = 8, 50, 4
    dirs = torch.randn(k, d, generator=g0)
    assign = torch.arange(k).repeat_interleave(per)
    g = dirs[assign] * (1 + torch.rand(len(assign), 1, generator=g0))
    codebook = torch.randn(k, d, generator=g0)
    prev = assign.clone()
    prev[:10] = 1      # the first 10 (codeword 0) came from codeword 1
    out = gradient_stats(g, assign, prev, codebook, torch.Generator().manual_seed(1))
    assert out["loo_conflict_share"] == 0.0 and out["loo_cos_mean"] == pytest.approx(1.0, abs=1e-5)
    assert 0.25 < out["null_conflict_share"] < 0.75
    assert out["moved_n"] == 10 and out["moved_cos_new"] == pytest.approx(1.0, abs=1e-5)
    want = torch.nn.functional.cosine_similarity(dirs[0:1], dirs[1:2]).item()
    assert out["moved_cos_old"] == pytest.approx(want, abs=1e-4)


def test_changed_counts_from_the_start_assignment_whatever_the_init():
    """Activation-aware init: the recorded share is 0 at step 0 and, at the end, equals the share of
    sub-vectors whose final codeword differs from the start assignment the trace keeps."""
    from vq4dit import method_config, quantize
    from vq4dit.size import quantized_layers
    torch.manual_seed(0)
    teacher, model = make_tiny_dit(), make_tiny_dit()
    tr = quantize(model, method_config("vq4dit-ste-aa", bits=2, kmeans_iters=5, calib=dict(
        iterations=2, num_sampling_steps=5, trace_samples=64, lr_logits=0.5)), teacher=teacher, progress=False)
    assert tr.meta["changed_vs"] == "start"
    start = changed_shares(tr, 0)
    assert len(start) == len(tr.layer_names) and (start["changed_frac"] == 0).all() and start["exact"].all()
    end = changed_shares(tr).set_index("layer")["changed_frac"]
    q = quantized_layers(model)
    for name in tr.layer_names:
        got = float((q[name].assignment.numpy() != tr.start_assignment(name)).mean())
        assert end[name] == pytest.approx(got, abs=1e-6)
    assert end.max() > 0  # lr_logits 0.5 moves some sub-vectors
    # a trace without the recorded definition falls back to the sampled snapshots (step 0 -> 0 too)
    tr.meta.pop("changed_vs")
    est = changed_shares(tr, 0)
    assert not est["exact"].any() and (est["changed_frac"] == 0).all()
