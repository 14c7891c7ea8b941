"""Method variants: honest method names and recipes, the DDPM teacher, and the switches we
added to close the soft-to-hard gap (annealing, incremental commitment, re-pick pass,
activation-aware k-means). Small synthetic cases with known answers."""
from __future__ import annotations

import copy

import pytest
import torch

from conftest import make_tiny_dit
from vq4dit import VQLinear, method_config, quantize
from vq4dit.trajectories import teacher_trajectory
from vq4dit.config import METHODS, RECIPES, CalibConfig, VQConfig
from vq4dit.kmeans import kmeans
from vq4dit.layers import ratio_softmax
from vq4dit.sampling import make_scheduler, random_labels_and_noise

pytestmark = pytest.mark.core


# ---- names and recipes --------------------------------------------------------------------

def test_method_names_own_their_algorithm_switches():
    paper = method_config("vq4dit", bits=2, recipe="small").calib
    assert not paper.hard_forward and paper.train_codebook_soft and paper.train_assignments
    assert method_config("vq4dit-ste", bits=2).calib.hard_forward
    assert not method_config("vq4dit-ref", bits=2).calib.train_codebook_soft
    assert not method_config("codebook-only", bits=2).calib.train_assignments
    # changing a switch renames the run; changing the budget does not
    assert method_config("vq4dit", calib={"temperature_end": 0.05}).method == "vq4dit+temperature_end=0.05"
    assert method_config("vq4dit", calib={"hard_forward": True}).method == "vq4dit-ste"  # exactly its switches
    assert method_config("vq4dit", calib={"finish_repick": True}).method == "vq4dit+finish_repick=True"
    assert method_config("vq4dit", calib={"iterations": 3, "lr_logits": 1e-3}).method == "vq4dit"
    # the init is a switch too; a run with exactly another entry's switches takes that entry's name
    assert method_config("codebook-only", activation_aware=True).method == "codebook-only+activation_aware"
    assert method_config("vq4dit-ste", activation_aware=True).method == "vq4dit-ste-aa"
    assert method_config("vq4dit-ste-aa").activation_aware and method_config("vq4dit-ste-aa").calib.hard_forward
    assert method_config("vq4dit-ste-aa", activation_aware=False).method == "vq4dit-ste"
    assert method_config("vq4dit", activation_aware=True, calib={"finish_repick": True}).method == \
        "vq4dit+finish_repick=True,activation_aware"
    assert all(m.description for m in METHODS.values())


def test_recipe_applies_the_same_budget_to_every_method():
    small = RECIPES["small"]
    for name in ("vq4dit", "vq4dit-ref", "vq4dit-ste", "codebook-only"):
        c = method_config(name, bits=2, recipe="small")
        assert (c.calib.iterations, c.calib.num_sampling_steps, c.calib.lr_logits, c.calib.lr_codebook) == (
            small["iterations"], small["num_sampling_steps"], small["lr_logits"], small["lr_codebook"])
        assert c.calib.teacher_sampler == "ddim" and c.calib.recipe == "small"
    ref = method_config("vq4dit", bits=2, recipe="reference").calib
    assert (ref.iterations, ref.num_sampling_steps, ref.lr_logits, ref.teacher_sampler) == (1000, 50, 5e-2, "ddpm")


def test_rtn_and_kmeans_refuse_settings_they_would_ignore():
    with pytest.raises(ValueError, match="takes only bits"):
        method_config("rtn", bits=2, k=16)
    with pytest.raises(ValueError, match="no calibration"):
        method_config("kmeans", bits=2, calib={"iterations": 3})
    with pytest.raises(ValueError, match="unknown calibration settings"):
        method_config("vq4dit", bits=2, calib={"iteratons": 3})


# ---- ratios, temperature, commitment --------------------------------------------------------

@pytest.mark.parametrize("n", [2, 3])
def test_ratio_softmax_equals_softmax(n):
    logits = torch.randn(500, n) * 4
    for t in (1.0, 0.1):
        torch.testing.assert_close(ratio_softmax(logits, t), torch.softmax(logits / t, 1), atol=2e-6, rtol=0)


def _soft_layer(s_rows=16, k=8, d=2, n=2, seed=0):
    torch.manual_seed(seed)
    lin = torch.nn.Linear(8, s_rows)
    q = VQLinear.from_linear(lin, VQConfig(k=k, d=d, n_candidates=n, kmeans_iters=5))
    q.init_soft(lin.weight)
    return q, lin


def test_lower_temperature_sharpens_ratios_and_the_regularizer():
    q, _ = _soft_layer()
    r1, l1 = q.assignment_ratios().max(1).values, q.ratio_regularizer()
    q.temperature = 0.1
    r2, l2 = q.assignment_ratios().max(1).values, q.ratio_regularizer()
    assert (r2 >= r1 - 1e-6).all() and r2.mean() > r1.mean() and l2 < l1


def test_annealing_reaches_the_end_temperature(tiny_dit):
    cfg = method_config("vq4dit", bits=2, k=16, kmeans_iters=3,
                        calib=dict(iterations=1, num_sampling_steps=4, temperature_end=0.05, trace_every=100))
    seen = []
    quantize(tiny_dit, cfg, progress=False,
             on_step=lambda info: seen.append(next(m for m in tiny_dit.modules() if isinstance(m, VQLinear)).temperature))
    assert seen == pytest.approx([0.05 ** (i / 4) for i in range(1, 5)])


def test_commit_freezes_exactly_the_most_confident_share():
    q, _ = _soft_layer(s_rows=64)
    with torch.no_grad():
        q.logits.copy_(torch.stack([torch.linspace(-3, 3, q.num_subvectors), torch.zeros(q.num_subvectors)], 1))
    top = q.assignment_ratios().max(1).values
    assert not q.commit_most_confident(0.25, hard_threshold=0.99)
    assert int(q.frozen_mask.sum()) == round(0.25 * q.num_subvectors)
    assert top[q.frozen_mask].min() >= top[~q.frozen_mask].max()       # the most confident ones
    assert q.commit_most_confident(1.0, hard_threshold=0.99) and q.hard   # all committed -> hard


# ---- finishing pass and activation-aware k-means -----------------------------------------------

def _output_error(q, w, h):
    e = q.weight - w
    return float(torch.einsum("oi,ij,oj->", e, h, e))


def test_repick_lowers_the_output_error_and_recovers_nearest_codewords():
    torch.manual_seed(0)
    lin = torch.nn.Linear(16, 32)
    q = VQLinear.from_linear(lin, VQConfig(k=16, d=4, kmeans_iters=10))
    w, nearest = lin.weight.detach(), q.assignment.clone()
    q.assignment.copy_(torch.randint(16, nearest.shape))            # scrambled assignment
    eye = torch.eye(16)
    before = _output_error(q, w, eye)
    q.repick(w, eye, n_candidates=16, sweeps=1)
    # H = I: the error separates per sub-vector, so one sweep finds each nearest codeword
    assert torch.equal(q.assignment, nearest)
    assert _output_error(q, w, eye) < before
    # correlated H: greedy coordinate descent never increases the error
    x = torch.randn(200, 16) @ torch.randn(16, 16)
    h = x.T @ x / 200
    q.assignment.copy_(torch.randint(16, nearest.shape))
    errs = [_output_error(q, w, h)]
    for _ in range(3):
        q.repick(w, h, n_candidates=4, sweeps=1)
        errs.append(_output_error(q, w, h))
    assert all(b <= a + 1e-5 for a, b in zip(errs, errs[1:])) and errs[-1] < errs[0]
    # a codeword that is best under H is kept even when it is not among the Euclidean-nearest
    for _ in range(4):
        q.repick(w, h, n_candidates=16, sweeps=1)
    best, e_best = q.assignment.clone(), _output_error(q, w, h)
    assert not torch.equal(best, nearest)          # H-optimal differs from Euclidean-nearest here
    q.repick(w, h, n_candidates=1, sweeps=1)
    assert _output_error(q, w, h) <= e_best + 1e-6 and torch.equal(q.assignment, best)


def test_weighted_kmeans_fits_the_heavily_weighted_coordinate_better():
    torch.manual_seed(0)
    x = torch.randn(4000, 2)
    w = torch.tensor([[100.0, 1.0]]).expand(4000, 2)
    c0, a0 = kmeans(x, 8, iters=30)
    c1, a1 = kmeans(x, 8, iters=30, weights=w)
    err = lambda c, a, j: float(((x[:, j] - c[a][:, j]) ** 2).mean())  # noqa: E731
    assert err(c1, a1, 0) < 0.5 * err(c0, a0, 0)        # coordinate 0 matters 100x: fitted tighter
    assert err(c1, a1, 1) > err(c0, a0, 1)              # at the expense of coordinate 1
    # centroids are weighted means of their members (tight blobs: assignments are stable)
    centers = torch.randn(8, 2) * 10
    xb = centers.repeat_interleave(50, 0) + 0.3 * torch.randn(400, 2)
    wb = torch.rand(400, 2) * 10 + 0.1
    c, a = kmeans(xb, 8, iters=50, weights=wb)
    for j in range(8):
        m = a == j
        torch.testing.assert_close(c[j], (wb[m] * xb[m]).sum(0) / wb[m].sum(0), atol=1e-4, rtol=1e-4)


def test_activation_aware_quantize_uses_input_power(tiny_dit):
    teacher = copy.deepcopy(tiny_dit)
    quantize(tiny_dit, method_config("kmeans", bits=2, k=16, kmeans_iters=3, activation_aware=True), progress=False)
    layers = [m for m in tiny_dit.modules() if isinstance(m, VQLinear)]
    assert all(m.input_power is not None and m.input_power.shape == (m.in_features,) for m in layers)
    assert all(abs(float(m.input_power.mean()) - 1.0) < 1e-4 for m in layers)   # normalized
    # the power differs between input coordinates of a real layer
    assert float(layers[0].input_power.std()) > 0.01
    assert teacher is not None


# ---- the reference sampler ------------------------------------------------------------------

def test_ddpm_teacher_trajectories_are_stochastic_but_seeded():
    teacher = make_tiny_dit()

    def final_inputs(seed):
        g = torch.Generator().manual_seed(seed)
        labels, noise = random_labels_and_noise(teacher, 2, torch.Generator().manual_seed(0), "cpu")
        steps = list(teacher_trajectory(teacher, labels, noise, 5, 4.0, make_scheduler(kind="ddpm"), g))
        return steps[-1][0]

    a, b, c = final_inputs(1), final_inputs(1), final_inputs(2)
    assert torch.equal(a, b)                       # same generator seed: same trajectory
    assert (a - c).abs().max() > 1e-3              # DDPM adds fresh noise each step
    with pytest.raises(ValueError, match="teacher_sampler"):
        CalibConfig(teacher_sampler="euler")
