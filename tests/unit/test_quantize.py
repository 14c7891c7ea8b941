"""Core method: presets, layers, k-means, calibration ordering, freezing, traces."""
import copy
import math

import pytest
import torch

from conftest import make_tiny_dit
from vq4dit import METHODS, VQConfig, RTNConfig, method_config, quantize, size_summary
from vq4dit.trace import Trace
from vq4dit.metrics import block_mse
from vq4dit.kmeans import kmeans
from vq4dit.layers import VQLinear
from vq4dit.naming import layer_type
from vq4dit.size import quantized_layers, vq_storage_bits

pytestmark = pytest.mark.core

FAST = dict(iterations=3, num_sampling_steps=10, labels_per_iteration=2)


@pytest.mark.parametrize("bits,k,d", [(2, 256, 4), (3, 64, 2), (4, 256, 2)])
def test_presets_give_index_bits_per_weight(bits, k, d, tiny_dit):
    cfg = VQConfig(bits=bits, kmeans_iters=5)
    assert (cfg.k, cfg.d) == (k, d) and math.log2(cfg.k) / cfg.d == bits
    quantize(tiny_dit, cfg, progress=False)
    s = size_summary(tiny_dit)
    assert s["index_bits_per_weight"] == pytest.approx(bits)
    # codebooks add k*d*16 bits per layer and fp32 biases 32 bits per output on top of the indices
    layers = quantized_layers(tiny_dit).values()
    extra = sum(k * d * 16 + 32 * m.out_features for m in layers)
    assert s["bits_per_weight"] == pytest.approx(bits + extra / s["quantized_weights"])


def test_only_block_linears_are_quantized(tiny_dit):
    quantize(tiny_dit, VQConfig(bits=3, kmeans_iters=3), progress=False)
    names = list(quantized_layers(tiny_dit))
    assert len(names) == 2 * 7  # q, k, v, out, fc1, fc2, adaLN per block
    assert not any(".emb." in n or "proj_out" in n or "pos_embed" in n for n in names)
    assert {layer_type(n) for n in names} == {"qkv", "out", "fc1", "fc2", "adaLN"}
    assert "VQLinear" in repr(tiny_dit) and "bits/weight" in repr(tiny_dit)


def test_soft_weights_equal_hard_when_ratios_one_hot():
    torch.manual_seed(0)
    lin = torch.nn.Linear(32, 48)
    q = VQLinear.from_linear(lin, VQConfig(bits=3, kmeans_iters=10))
    hard = q.weight_hat().detach().clone()
    q.init_soft(lin.weight)
    with torch.no_grad():
        q.logits.zero_()
        q.logits[:, 0] = 50.0  # ratio ~1 on the nearest candidate == k-means assignment
    assert torch.allclose(q.weight_hat(), hard, atol=1e-6)
    q.frozen_mask[:] = True  # frozen sub-vectors are exactly one-hot
    assert torch.equal(q.weight_hat().detach(), hard)


def test_kmeans_beats_random_codebook():
    torch.manual_seed(0)
    x = torch.randn(4096, 4)
    c, a = kmeans(x, 64, iters=50)
    err_km = (x - c[a]).pow(2).sum(1).mean()
    rand_c = x[torch.randperm(4096)[:64]]
    dist = torch.cdist(x, rand_c).argmin(1)
    err_rand = (x - rand_c[dist]).pow(2).sum(1).mean()
    assert err_km < 0.8 * err_rand
    assert a.shape == (4096,) and c.shape == (64, 4)


def _block_mse_after(method, bits, teacher, **calib):
    m = copy.deepcopy(teacher)
    spec = METHODS[method]
    if spec.kind == "rtn":
        cfg = method_config(method, bits=bits)
    elif spec.calibrated:
        cfg = method_config(method, bits=bits, calib={**FAST, **calib}, kmeans_iters=20)
    else:
        cfg = method_config(method, bits=bits, kmeans_iters=20)
    trace = quantize(m, cfg, teacher=teacher, progress=False)
    return block_mse(m, teacher)["mean"], trace, m


@pytest.mark.parametrize("bits", [2, 3])
def test_calibration_beats_kmeans_beats_rtn(bits):
    teacher = make_tiny_dit()
    mse = {meth: _block_mse_after(meth, bits, teacher, lr_codebook=1e-3)[0]
           for meth in ("rtn-tensor", "kmeans", "codebook-only", "vq4dit")}
    assert mse["codebook-only"] < mse["kmeans"], mse
    assert mse["vq4dit"] < mse["kmeans"], mse
    assert mse["kmeans"] < mse["rtn-tensor"], mse


def test_freezing_and_hard_switch_happen():
    teacher = make_tiny_dit()
    _, trace, m = _block_mse_after("vq4dit", 2, teacher, lr_logits=0.5)
    ev = trace.events
    assert len(ev) > 0 and set(ev.event) == {"hard"}
    fr = trace.layers.groupby("step").frozen_frac.mean()
    assert fr.iloc[0] == 0.0 and fr.iloc[-1] == 1.0 and fr.is_monotonic_increasing
    assert all(q.hard for q in quantized_layers(m).values())  # finalize makes everything hard


def test_trace_records_and_round_trips(tmp_path):
    teacher = make_tiny_dit()
    _, trace, m = _block_mse_after("vq4dit", 3, teacher)
    steps = trace.steps
    assert len(steps) == FAST["iterations"] * FAST["num_sampling_steps"]
    assert {"loss", "block_loss", "l_r", "block_0", "block_1", "frozen_frac"} <= set(steps.columns)
    lay = trace.layers
    assert {"coherence_mean", "conflict_share", "changed_frac", "ratio_hist_0", "coherence_hist_9"} <= set(lay.columns)
    calibrated = lay.dropna(subset=["coherence_mean"])
    assert len(calibrated) and calibrated.coherence_mean.between(0, 1).all()
    assert calibrated.conflict_share.between(0, 1).all()
    snaps = trace.snapshot_steps()
    assert snaps[0] == 0 and snaps[-1] == len(steps) and len(snaps) >= 3
    trace.save(tmp_path / "tr")
    back = Trace.load(tmp_path / "tr")
    assert back.steps.loss.tolist() == pytest.approx(steps.loss.tolist())
    assert set(back.snapshots) == set(trace.snapshots)
    assert back.meta["method"] == "vq4dit"


def test_codebook_only_records_conflict_and_keeps_kmeans_assignments():
    teacher = make_tiny_dit()
    _, trace, m = _block_mse_after("codebook-only", 2, teacher)
    assert (trace.layers.changed_frac == 0).all()
    assert trace.layers.coherence_mean.notna().any()


def test_vq4dit_ref_keeps_codebook_frozen_while_soft():
    teacher = make_tiny_dit()
    # huge freeze thresholds: layers stay soft for the whole run, so codebooks never train
    _, trace, m = _block_mse_after("vq4dit-ref", 2, teacher, freeze_threshold=1.0, hard_threshold=1.0)
    last = trace.layers[trace.layers.step == trace.layers.step.max()]
    assert (last.codebook_drift < 1e-3).all()  # only fp16 rounding
    _, trace2, _ = _block_mse_after("vq4dit", 2, teacher, freeze_threshold=1.0, hard_threshold=1.0,
                                    lr_codebook=1e-3)
    last2 = trace2.layers[trace2.layers.step == trace2.layers.step.max()]
    assert (last2.codebook_drift > 1e-3).any()


def test_rtn_per_channel_beats_per_tensor(tiny_dit):
    teacher = copy.deepcopy(tiny_dit)
    a = copy.deepcopy(teacher); quantize(a, RTNConfig(bits=3, per_channel=True), progress=False)
    b = copy.deepcopy(teacher); quantize(b, RTNConfig(bits=3, per_channel=False), progress=False)
    assert block_mse(a, teacher)["mean"] < block_mse(b, teacher)["mean"]


def test_dit_xl2_index_size_arithmetic():
    h, L = 1152, 28
    block = [(h, h)] * 4 + [(4 * h, h), (h, 4 * h), (6 * h, h)]  # qkv, out, fc1, fc2, adaLN
    shapes = block * L
    assert sum(o * i for o, i in shapes) == 668_860_416
    nbytes = sum(vq_storage_bits(o, i, k=256, d=4)["index_bits"] for o, i in shapes) // 8
    assert nbytes == 668_860_416 * 2 // 8
    assert round(nbytes / 2 ** 20, 2) == 159.47


def test_cancel_keeps_partial_trace_and_valid_model():
    teacher = make_tiny_dit()
    m = copy.deepcopy(teacher)
    calls = []

    def on_step(info):
        calls.append(info["step"])
        if info["step"] == 7:
            raise KeyboardInterrupt  # like Ctrl-C mid-run
        return True

    trace = quantize(m, method_config("vq4dit", bits=2, calib=FAST, kmeans_iters=5), teacher=teacher,
                     on_step=on_step, progress=False)
    assert trace.meta["stopped"] == "interrupted" and trace.meta["steps_done"] == 7
    assert len(trace.steps) == 7
    assert all(q.hard for q in quantized_layers(m).values())
    m2 = copy.deepcopy(teacher)
    trace2 = quantize(m2, method_config("vq4dit", bits=2, calib=FAST, kmeans_iters=5), teacher=teacher,
                      on_step=lambda info: info["step"] < 4, progress=False)
    assert trace2.meta["stopped"] == "cancelled" and len(trace2.steps) == 4
