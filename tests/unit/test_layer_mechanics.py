"""Per-layer mechanics of VQ4DiT (../shared/method.md steps 1-4, 7-8) on small hand-made layers
with known answers. Each test names the step it guards; each fails when that step is broken
(checked with tools/mutation_check.py)."""
import json
import math
import struct

import pytest
import torch
import torch.nn.functional as F

from conftest import make_tiny_dit
from vq4dit import METHODS, VQ_PRESETS, CalibConfig, RTNConfig, VQConfig, method_config, quantize
from vq4dit.io import load_quantized, save_quantized, unpack_bits
from vq4dit.kmeans import kmeans
from vq4dit.layers import RTNLinear, VQLinear
from vq4dit.size import quantized_layers
from vq4dit.trace import gradient_conflict

pytestmark = pytest.mark.core


def vq_layer(codebook: torch.Tensor, weight: torch.Tensor, n: int = 2) -> VQLinear:
    """A VQLinear with a given fp32 codebook (k, d) whose hard assignment is the nearest codeword."""
    k, d = codebook.shape
    out_f, in_f = weight.shape
    q = VQLinear(in_f, out_f, k, d, n_candidates=n, bias=False, codebook_dtype="float32")
    with torch.no_grad():
        q.codebook.copy_(codebook)
    q.assignment.copy_(torch.cdist(weight.reshape(-1, d), codebook).argmin(1))
    q.kmeans_assignment.copy_(q.assignment)
    return q


def soft_layer(logits: torch.Tensor, k: int = 8, d: int = 2, seed: int = 0) -> VQLinear:
    """A soft VQLinear with the given (S, n) logits, random codebook and distinct candidates."""
    g = torch.Generator().manual_seed(seed)
    s, n = logits.shape
    q = vq_layer(torch.randn(k, d, generator=g), torch.randn(s, d, generator=g), n=n)
    q.init_soft(torch.randn(s, d, generator=g))
    with torch.no_grad():
        q.logits.copy_(logits)
    return q


# ---------------------------------------------------------------------------------------------
# Step 1: k-means
# ---------------------------------------------------------------------------------------------

def _blobs(seed=0, k=8, per=64, d=4, noise=0.05):
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(k, d, generator=g) * 3
    x = (centers[:, None] + noise * torch.randn(k, per, d, generator=g)).reshape(-1, d)
    return x[torch.randperm(len(x), generator=g)], centers


def test_kmeans_is_a_lloyd_fixed_point_and_beats_random_codebook():
    """Step 1: converged Lloyd = every point at its nearest centroid, every centroid the mean of its
    points; its error is far below a codebook of random data points."""
    torch.manual_seed(0)
    x = torch.randn(2000, 2)
    c, a = kmeans(x, 32, iters=300, tol=0.0)
    assert c.shape == (32, 2) and a.shape == (2000,)
    dist = torch.cdist(x, c)  # each point at its nearest centroid (up to distance rounding)
    assert (dist.gather(1, a[:, None]).squeeze(1) <= dist.min(1).values + 1e-5).all()
    counts = torch.bincount(a, minlength=32)
    assert (counts > 0).all()
    means = torch.zeros_like(c).index_add_(0, a, x) / counts[:, None]
    assert torch.allclose(c, means, atol=1e-5)
    err = (x - c[a]).pow(2).sum(1).mean()
    rand_c = x[torch.randperm(2000, generator=torch.Generator().manual_seed(1))[:32]]
    err_rand = (x - rand_c[torch.cdist(x, rand_c).argmin(1)]).pow(2).sum(1).mean()
    assert err < 0.7 * err_rand


def test_kmeans_recovers_separated_clusters():
    """Step 1: 8 well separated blobs, k=8 -> error equals the blob noise (d * sigma^2)."""
    x, centers = _blobs()
    c, a = kmeans(x, 8, iters=100)
    err = (x - c[a]).pow(2).sum(1).mean().item()
    assert err == pytest.approx(4 * 0.05 ** 2, rel=0.3)
    assert torch.cdist(centers, c).min(1).values.max() < 0.05


def test_kmeans_handles_empty_clusters():
    """Step 1: 5 distinct points repeated, k=8 -> clusters go empty; they are re-seeded at data points
    (not left at 0 / NaN), and every point is still represented exactly."""
    base = torch.tensor([[10.0, 10], [11, 10], [10, 12], [13, 13], [12, 11]])
    x = base.repeat(40, 1)
    c, a = kmeans(x, 8, iters=20)
    assert torch.isfinite(c).all()
    assert torch.cdist(c, base).min(1).values.max() < 1e-5  # every codeword sits on a data point
    assert torch.equal(c[a], x)


# ---------------------------------------------------------------------------------------------
# Steps 2-3: candidate sets, logit init, assignment ratios, soft weight
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("n", [2, 3])
def test_candidates_are_nearest_codewords_and_logits_follow_the_formula(n):
    """Step 2-3 init: candidates = n nearest codewords (nearest first); logit_i =
    log(dist_last / (dist_i + 1e-5)) for i < n-1, logit_last = 0; the nearest dominates."""
    g = torch.Generator().manual_seed(0)
    codebook = torch.randn(16, 2, generator=g)
    w = torch.randn(24, 4, generator=g)  # 48 sub-vectors of d=2
    q = vq_layer(codebook, w, n=n)
    q.init_soft(w)
    dist = torch.cdist(w.reshape(-1, 2), codebook)  # Euclidean, (48, 16)
    dn, idx = dist.sort(1)
    assert torch.equal(q.candidates, idx[:, :n])
    expect = torch.zeros(48, n)
    expect[:, :-1] = torch.log(dn[:, n - 1:n] / (dn[:, :n - 1] + 1e-5))
    assert torch.allclose(q.logits, expect, rtol=1e-4, atol=1e-5)
    r = q.assignment_ratios()
    assert (r.argmax(1) == 0).all() and (r[:, 0] > 1.0 / n).all()
    assert torch.equal(q.assignment, idx[:, 0]) and not q.hard


def test_logit_init_on_a_hand_computed_case():
    """Step 3: sub-vector 0.2 on a 1-D codebook {0, 1, 3, 7}: candidates (0, 1), distances (0.2, 0.8),
    logit_0 = log(0.8 / 0.20001) = 1.386, ratio 0.8 on the nearest."""
    codebook = torch.tensor([[0.0], [1.0], [3.0], [7.0]])
    w = torch.tensor([[0.2, 2.5, 6.0, 1.1]])
    q = vq_layer(codebook, w, n=2)
    q.init_soft(w)
    assert q.candidates.tolist() == [[0, 1], [2, 1], [3, 2], [1, 0]]
    assert q.logits[0, 0].item() == pytest.approx(math.log(0.8 / 0.20001), rel=1e-5)
    assert q.logits[1, 0].item() == pytest.approx(math.log(1.5 / 0.50001), rel=1e-5)
    assert q.logits[:, 1].abs().max().item() == 0.0
    assert q.assignment_ratios()[0, 0].item() == pytest.approx(0.8 / (0.8 + 0.20001), rel=1e-4)


def test_ratios_are_softmax_over_candidates_and_weight_is_their_mix():
    """Step 3: r = softmax(logits) per sub-vector; w_hat_j = sum_i r_ji C[cand_ji]; changing one
    sub-vector's logits changes exactly its ratios and its weight."""
    logits = torch.randn(32, 3, generator=torch.Generator().manual_seed(1))
    q = soft_layer(logits)
    r = q.assignment_ratios()
    assert torch.allclose(r, torch.softmax(logits, 1), atol=1e-7)
    w = q.weight_hat()
    manual = (r[:, :, None] * q.codebook[q.candidates]).sum(1).reshape(q.out_features, q.in_features)
    assert torch.allclose(w, manual, atol=1e-6)
    before_r, before_w = r.detach().clone(), w.detach().reshape(-1, q.d).clone()
    with torch.no_grad():
        q.logits[5] += torch.tensor([2.0, -1.0, 0.0])
    r2, w2 = q.assignment_ratios().detach(), q.weight_hat().detach().reshape(-1, q.d)
    changed_r = (r2 - before_r).abs().sum(1) > 1e-3
    changed_w = (w2 - before_w).abs().sum(1) > 1e-4
    assert changed_r.nonzero().flatten().tolist() == [5]
    assert changed_w.nonzero().flatten().tolist() == [5]


def test_soft_weight_sends_gradients_to_logits_and_candidate_codewords():
    """Steps 3+6: the soft mix is differentiable in the ratios (logits) and in the codebook."""
    q = soft_layer(torch.randn(40, 2, generator=torch.Generator().manual_seed(2)))
    g = torch.randn(q.out_features, q.in_features, generator=torch.Generator().manual_seed(3))
    (q.weight_hat() * g).sum().backward()
    assert q.logits.grad is not None and (q.logits.grad.abs().sum(1) > 0).all()
    r = q.assignment_ratios().detach()
    expect = torch.zeros_like(q.codebook).index_add_(
        0, q.candidates.reshape(-1), (r[:, :, None] * g.reshape(-1, 1, q.d)).reshape(-1, q.d))
    assert torch.allclose(q.codebook.grad, expect, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# Step 4: L_r
# ---------------------------------------------------------------------------------------------

def test_ratio_regularizer_value_on_known_ratios():
    """Step 4: L_r = n * mean(r (1 - r)). r=(.5,.5),(.8,.2): 2 * mean(.25,.25,.16,.16) = 0.41;
    n=3 uniform: 3 * 2/9; frozen sub-vectors do not count; hard layers have L_r = 0."""
    q = soft_layer(torch.tensor([[0.0, 0.0], [math.log(4.0), 0.0]]))
    assert q.ratio_regularizer().item() == pytest.approx(0.41, rel=1e-5)
    q.frozen_mask[0] = True
    assert q.ratio_regularizer().item() == pytest.approx(0.32, rel=1e-5)
    q3 = soft_layer(torch.zeros(4, 3))
    assert q3.ratio_regularizer().item() == pytest.approx(2.0 / 3.0, rel=1e-5)
    q3.make_hard()
    assert q3.ratio_regularizer().item() == 0.0


def test_ratio_regularizer_gradient_pushes_toward_one_hot():
    """Step 4: a gradient-descent step on L_r raises every sub-vector's top ratio, keeping its argmax."""
    logits = torch.randn(200, 3, generator=torch.Generator().manual_seed(4))
    q = soft_layer(logits)
    top0 = q.assignment_ratios().detach().max(1)
    q.ratio_regularizer().backward()
    with torch.no_grad():
        q.logits -= 5.0 * q.logits.grad
    top1 = q.assignment_ratios().detach().max(1)
    assert torch.equal(top0.indices, top1.indices)
    assert (top1.values > top0.values).all()


# ---------------------------------------------------------------------------------------------
# Step 7: progressive freezing and the hard switch
# ---------------------------------------------------------------------------------------------

def _freeze_case():
    # top ratios 0.995 (cand 0), 0.989, 0.995 (cand 1), 0.574: softmax is NOT 1.0 for frozen rows
    logits = torch.tensor([[math.log(199.0), 0.0], [math.log(0.989 / 0.011), 0.0], [0.0, math.log(199.0)],
                           [0.3, 0.0]])
    return soft_layer(logits)


def test_freezing_picks_rows_above_threshold_and_makes_them_exactly_one_hot():
    """Step 7: top ratio > 0.99 freezes the sub-vector; a frozen sub-vector is exactly one-hot at its
    top candidate (its softmax is only 0.995), so its weight is exactly that codeword."""
    q = _freeze_case()
    assert q.freeze_confident(0.99, 0.99) is False and not q.hard
    assert q.frozen_mask.tolist() == [True, False, True, False]
    r = q.assignment_ratios()
    assert r[0].tolist() == [1.0, 0.0] and r[2].tolist() == [0.0, 1.0]
    assert r[1, 0].item() == pytest.approx(0.989, abs=1e-6)  # just below the threshold: stays soft
    w = q.weight_hat().detach().reshape(-1, q.d)
    assert torch.equal(w[0], q.codebook.detach()[q.candidates[0, 0]])
    assert torch.equal(w[2], q.codebook.detach()[q.candidates[2, 1]])
    assert q.top_ratio()[0].item() == 1.0


def test_frozen_rows_stay_put_while_others_train():
    """Step 7: frozen sub-vectors get no gradient, keep their weight and stay frozen; the others move."""
    q = _freeze_case()
    q.freeze_confident(0.99, 0.99)
    q.codebook.requires_grad_(False)
    w0 = q.weight_hat().detach().reshape(-1, q.d).clone()
    # pull every sub-vector toward its other candidate
    other = q.codebook.detach()[q.candidates.gather(1, (1 - q.logits.detach().argmax(1, keepdim=True)))].squeeze(1)
    opt = torch.optim.RMSprop([q.logits], lr=0.05, alpha=0.9)
    for _ in range(20):
        opt.zero_grad()
        loss = (q.weight_hat().reshape(-1, q.d) - other).pow(2).sum()
        loss.backward()
        assert q.logits.grad[[0, 2]].abs().max().item() == 0.0
        opt.step()
        q.freeze_confident(0.99, 0.99)
    w1 = q.weight_hat().detach().reshape(-1, q.d)
    assert torch.equal(w1[[0, 2]], w0[[0, 2]])
    assert ((w1[[1, 3]] - w0[[1, 3]]).abs().sum(1) > 1e-3).all()
    assert q.frozen_mask[[0, 2]].all()
    with torch.no_grad():  # freezing is monotone: a frozen row stays frozen whatever its logits
        q.logits[0] = 0.0
    q.freeze_confident(0.99, 0.99)
    assert q.frozen_mask[0]


def _confident_layer(n_confident: int, s: int = 100) -> VQLinear:
    logits = torch.zeros(s, 2)
    logits[:n_confident, 1] = 8.0  # top = candidate 1 (not the k-means codeword), ratio 0.99966
    return soft_layer(logits)


def test_hard_switch_only_when_more_than_threshold_share_is_frozen():
    """Step 7: 'more than 99%' frozen switches the layer to hard assignments; exactly 99% does not."""
    q = _confident_layer(99)
    assert q.freeze_confident(0.99, 0.99) is False
    assert not q.hard and q.frozen_mask.sum().item() == 99
    q = _confident_layer(51)
    assert q.freeze_confident(0.99, 0.5) is True and q.hard


def test_hard_switch_keeps_the_top_candidate():
    """Step 7: the hard index is each sub-vector's top candidate (here candidate 1 for 100 of them),
    logits are dropped and the weight is the codebook lookup."""
    q = _confident_layer(100, s=120)
    with torch.no_grad():
        q.logits[100:, 0] = 8.0
    top = q.candidates.gather(1, q.logits.detach().argmax(1, keepdim=True)).squeeze(1).clone()
    assert (top[:100] == q.candidates[:100, 1]).all()
    assert q.freeze_confident(0.99, 0.99) is True
    assert q.hard and q.logits is None and q.candidates is None
    assert torch.equal(q.assignment, top)
    assert torch.equal(q.weight_hat().detach().reshape(-1, q.d), q.codebook.detach()[top])


# ---------------------------------------------------------------------------------------------
# Straight-through forward (vq4dit-ste, CalibConfig.hard_forward)
# ---------------------------------------------------------------------------------------------

def test_straight_through_forward_is_hard_but_ratios_get_the_soft_gradient():
    """hard_forward: the forward weight is exactly the top candidate's codeword (what ships); the
    logits get the soft mix's gradient; the codebook gets the hard lookup's gradient."""
    logits = torch.randn(60, 2, generator=torch.Generator().manual_seed(5)) * 0.5
    g = torch.randn(60, 2, generator=torch.Generator().manual_seed(6))
    soft, ste = soft_layer(logits), soft_layer(logits)
    ste.hard_forward = True
    hard_w = ste.codebook.detach()[ste.current_assignment()]
    w_ste = ste.weight_hat()
    assert torch.allclose(w_ste.detach().reshape(-1, 2), hard_w, atol=1e-6)
    assert not torch.allclose(soft.weight_hat().detach().reshape(-1, 2), hard_w, atol=1e-3)
    (w_ste.reshape(-1, 2) * g).sum().backward()
    (soft.weight_hat().reshape(-1, 2) * g).sum().backward()
    assert ste.logits.grad.abs().sum() > 0
    assert torch.allclose(ste.logits.grad, soft.logits.grad, atol=1e-6)
    expect_cb = torch.zeros_like(ste.codebook).index_add_(0, ste.current_assignment(), g)
    assert torch.allclose(ste.codebook.grad, expect_cb, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# Gradient-direction conflict statistic
# ---------------------------------------------------------------------------------------------

def test_gradient_conflict_on_a_hand_made_case():
    """coherence = |sum g| / sum |g| per codeword, conflict share = share of g_j with negative cosine to
    their codeword's sum (codewords with >= 2 sub-vectors), worst = least coherent of those with >= 4.

    codeword 0: (1,0) x3, (-1,0)      -> coherence 2/4, 1 negative
    codeword 1: (0,1) x4              -> coherence 1,   0 negative
    codeword 2: one sub-vector        -> nan (excluded)
    codeword 3: (2,0), (-1,0)         -> coherence 1/3, 1 negative (too few to be 'worst')
    conflict share = 2 / 10."""
    grads = torch.tensor([[1.0, 0], [1, 0], [1, 0], [-1, 0], [0, 1], [0, 1], [0, 1], [0, 1], [5, 5],
                          [2, 0], [-1, 0]])
    assign = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1, 2, 3, 3])
    q = VQLinear(2, 11, k=4, d=2, bias=False)
    q.assignment.copy_(assign)
    w = torch.zeros(11, 2, requires_grad=True)
    w.grad = grads.clone()
    q.last_weight = w
    c = gradient_conflict(q)
    coh = c["coherence"]
    assert coh[0].item() == pytest.approx(0.5, abs=1e-6)
    assert coh[1].item() == pytest.approx(1.0, abs=1e-6)
    assert math.isnan(coh[2].item())
    assert coh[3].item() == pytest.approx(1 / 3, abs=1e-6)
    assert c["conflict_share"] == pytest.approx(0.2, abs=1e-6)
    assert c["worst"] == 0
    assert torch.equal(c["worst_grads"], grads[:4])


# ---------------------------------------------------------------------------------------------
# Step 8: what a packed layer stores
# ---------------------------------------------------------------------------------------------

def _safetensors_spans(path) -> dict:
    """{name: (dtype, shape, bytes stored)} from the file's header."""
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        head = json.loads(f.read(n))
    head.pop("__metadata__", None)
    return {k: (v["dtype"], v["shape"], v["data_offsets"][1] - v["data_offsets"][0]) for k, v in head.items()}


@pytest.mark.parametrize("k", [16, 64, 256, 1024])
def test_packed_indices_take_log2_k_bits_on_disk(tmp_path, k):
    """Step 8: one index per sub-vector at log2(k) bits: the bytes stored in model.safetensors for a
    layer's indices are ceil(S * log2(k) / 8), and they unpack to the layer's assignment."""
    m = make_tiny_dit(layers=1)
    quantize(m, VQConfig(k=k, d=2, kmeans_iters=2), progress=False)
    save_quantized(m, tmp_path / "p")
    spans = _safetensors_spans(tmp_path / "p" / "model.safetensors")
    layers = quantized_layers(m)
    assert len(layers) == 7
    for name, q in layers.items():
        dtype, shape, nbytes = spans[f"vq/{name}/indices"]
        s = q.out_features * q.in_features // 2
        assert dtype == "U8" and nbytes == math.ceil(s * int(math.log2(k)) / 8), name
        assert spans[f"vq/{name}/codebook"] == ("F16", [k, 2], k * 2 * 2)
    back = load_quantized(tmp_path / "p").transformer
    for name, q in quantized_layers(back).items():
        assert torch.equal(q.indices(), layers[name].assignment)
        # compact runtime: the buffer is the packed bytes (<= 8 bits) or int16 ids, never int64
        assert q.assignment.element_size() * q.assignment.numel() == (
            spans[f"vq/{name}/indices"][2] if k <= 256 else 2 * q.num_subvectors), name
    from safetensors.torch import load_file
    t = load_file(str(tmp_path / "p" / "model.safetensors"))
    name, q = next(iter(layers.items()))
    assert torch.equal(unpack_bits(t[f"vq/{name}/indices"], int(math.log2(k)), q.num_subvectors), q.assignment)


# ---------------------------------------------------------------------------------------------
# RTN baselines
# ---------------------------------------------------------------------------------------------

def test_rtn_rounds_to_nearest_level_and_per_channel_beats_per_tensor():
    """rtn: each weight within half a step of its row's grid, at most 2^bits levels per row;
    rtn-tensor: one grid for the whole tensor -> larger error when row ranges differ."""
    torch.manual_seed(0)
    lin = torch.nn.Linear(64, 16)
    with torch.no_grad():
        lin.weight.mul_(torch.logspace(-2, 1, 16)[:, None])
    pc = RTNLinear.from_linear(lin, RTNConfig(bits=3, per_channel=True))
    pt = RTNLinear.from_linear(lin, RTNConfig(bits=3, per_channel=False))
    assert pc.scale.shape == (16, 1) and pt.scale.shape == (1, 1)
    err_pc = (pc.weight - lin.weight).abs()
    err_pt = (pt.weight - lin.weight).abs()
    assert ((err_pc / pc.scale).max() <= 0.5 + 1e-3)
    assert int(pc.qweight.max()) <= 7
    assert all(len(torch.unique(row)) <= 8 for row in pc.qweight)
    assert err_pc.pow(2).mean() < 0.5 * err_pt.pow(2).mean()
    assert method_config("rtn", bits=3).per_channel and not method_config("rtn-tensor", bits=3).per_channel


# ---------------------------------------------------------------------------------------------
# The paper's numbers and the method registry
# ---------------------------------------------------------------------------------------------

def test_defaults_are_the_papers_recipe():
    """Presets (bits -> k, d), n = 2 candidates, ~100 k-means iterations, and the reference
    calibration recipe: 1000 x 50 steps, 4 labels, CFG 4.0, RMSprop(0.9), lr 5e-2 / 1e-4 / 1e-4,
    thresholds 0.99."""
    assert VQ_PRESETS == {2: (256, 4), 3: (64, 2), 4: (256, 2)}
    v = VQConfig()
    assert (v.n_candidates, v.kmeans_iters) == (2, 100)
    c = CalibConfig()
    assert (c.iterations, c.num_sampling_steps, c.labels_per_iteration, c.guidance_scale) == (1000, 50, 4, 4.0)
    assert (c.rmsprop_alpha, c.lr_logits, c.lr_codebook, c.lr_bias) == (0.9, 5e-2, 1e-4, 1e-4)
    assert (c.freeze_threshold, c.hard_threshold, c.freeze_after, c.force_hard_at) == (0.99, 0.99, 0, None)
    assert c.train_assignments and c.train_codebook_soft and not c.hard_forward
    assert not c.lr_gate and not c.until_hard and c.step_cap == c.total_steps  # paper: L_r every step


@pytest.mark.parametrize("method,switches", [
    ("vq4dit", dict(train_assignments=True, train_codebook_soft=True, hard_forward=False, lr_gate=False)),
    ("vq4dit-ref", dict(train_assignments=True, train_codebook_soft=False, hard_forward=False, lr_gate=True)),
    ("vq4dit-ste", dict(train_assignments=True, train_codebook_soft=True, hard_forward=True)),
    ("codebook-only", dict(train_assignments=False)),
])
def test_method_names_set_their_switches(method, switches):
    cfg = method_config(method, bits=2)
    assert cfg.method == method and cfg.calib is not None
    for key, val in switches.items():
        assert getattr(cfg.calib, key) == val, (method, key)
    assert method_config("kmeans", bits=2).calib is None
    assert set(METHODS) >= {"vq4dit", "vq4dit-ref", "vq4dit-ste", "codebook-only", "kmeans", "rtn", "rtn-tensor"}


def test_kmeans_method_weight_is_the_nearest_codeword():
    """kmeans method / step 1 in place: each sub-vector of the quantized weight is the codeword
    nearest to the original sub-vector (no calibration: quantize returns no trace)."""
    m = make_tiny_dit(layers=1)
    orig = {n: mod.weight.detach().clone() for n, mod in m.named_modules() if isinstance(mod, torch.nn.Linear)}
    assert quantize(m, method_config("kmeans", bits=3, kmeans_iters=10), progress=False) is None
    for name, q in quantized_layers(m).items():
        x = orig[name].reshape(-1, q.d)
        cb = q.codebook.detach()
        nearest = torch.cdist(x, cb).min(1).values
        got = (x - q.weight.reshape(-1, q.d)).norm(dim=1)
        # k-means assigns against the fp32 centroids, then the codebook is rounded to fp16 for
        # storage: a sub-vector may sit one fp16 rounding (|c| * 2^-11 per coordinate) off its nearest
        slack = 2 * cb.abs().max().item() * 2 ** -11 * math.sqrt(q.d)
        assert (got <= nearest + slack).all(), name
        assert (got - nearest > 1e-6).float().mean() < 0.05, name
        assert F.mse_loss(q.weight, orig[name]) < 0.5 * orig[name].var()


def test_recipes_set_budget_only_and_changed_switches_rename_the_method():
    """A recipe changes budget and learning rates, never the algorithm; overriding an algorithm switch
    reports a derived name, so a changed algorithm is never saved as the registry method."""
    from vq4dit.config import RECIPES
    small = method_config("vq4dit", bits=2, recipe="small").calib
    for key, val in RECIPES["small"].items():
        assert getattr(small, key) == val
    assert small.train_codebook_soft and not small.hard_forward and small.recipe == "small"
    cfg = method_config("vq4dit", bits=2, calib=dict(commit_until=0.8, iterations=3))
    assert cfg.method == "vq4dit+commit_until=0.8" and cfg.calib.iterations == 3
    assert method_config("vq4dit-ste", bits=2, calib=dict(iterations=3)).method == "vq4dit-ste"


@pytest.mark.parametrize("dtype,exact_fp16", [("float16", True), ("float32", False)])
def test_codebook_dtype_is_the_precision_kept_and_stored(dtype, exact_fp16, tmp_path):
    """codebook_dtype: float16 codebooks are rounded to fp16 in memory (so the packed reload is exact),
    float32 ones are kept as k-means made them; the file stores that dtype."""
    m = make_tiny_dit(layers=1)
    quantize(m, VQConfig(bits=3, kmeans_iters=3, codebook_dtype=dtype), progress=False)
    cbs = [q.codebook.detach() for q in quantized_layers(m).values()]
    assert all(torch.equal(c, c.half().float()) for c in cbs) == exact_fp16
    save_quantized(m, tmp_path / "p")
    spans = _safetensors_spans(tmp_path / "p" / "model.safetensors")
    name = next(iter(quantized_layers(m)))
    assert spans[f"vq/{name}/codebook"][0] == ("F16" if exact_fp16 else "F32")
