"""Zero-data calibration mechanics (../shared/method.md steps 5-7) and the sampler, on the tiny DiT:
CFG teacher trajectories, block-loss hooks, the loss, what each method trains, the optimizer
wiring, force_hard_at and freeze_after. Each test fails when its mechanic is broken (checked with
tools/mutation_check.py)."""
import copy
import importlib

import pytest
import torch
from diffusers import DDIMScheduler

from conftest import make_tiny_dit
from vq4dit import method_config, quantize, sample
from vq4dit.trajectories import block_losses, capture_blocks, teacher_trajectory
from vq4dit.size import quantized_layers
from vq4dit.sampling import cfg_batch, combine_cfg, guided_eps, make_scheduler

pytestmark = pytest.mark.core
calibrate_mod = importlib.import_module("vq4dit.calibrate")  # `vq4dit.calibrate` the attribute is the function

NULL = 10  # tiny DiT: num_embeds_ada_norm = 10 classes, label 10 is the null class
TINY = dict(iterations=1, num_sampling_steps=4, labels_per_iteration=2)


def _noise(n=2, seed=0):
    return torch.randn(n, 1, 8, 8, generator=torch.Generator().manual_seed(seed))


class RecordingDDIM(DDIMScheduler):
    """DDIM that keeps every state it steps to (the trajectory's states, final one included)."""

    def step(self, *args, **kw):
        out = super().step(*args, **kw)
        self.states.append(out.prev_sample.clone())
        return out


def _recording_scheduler():
    s = RecordingDDIM.from_config(make_scheduler().config)
    s.states = []
    return s


# ---------------------------------------------------------------------------------------------
# The sampler and classifier-free guidance
# ---------------------------------------------------------------------------------------------

def _manual_ddim(model, labels, noise, steps, g):
    """DDIM with CFG written out: conditional and null-class passes separately."""
    sched = make_scheduler()
    sched.set_timesteps(steps)
    x = noise * sched.init_noise_sigma
    with torch.no_grad():
        for t in sched.timesteps:
            tt = t.reshape(1).expand(len(labels))
            cond = model(x, timestep=tt, class_labels=labels).sample
            unc = model(x, timestep=tt, class_labels=torch.full_like(labels, NULL)).sample
            x = sched.step(unc + g * (cond - unc), t, x).prev_sample
    return x


@pytest.mark.parametrize("g", [1.0, 4.0])
def test_sampler_is_ddim_with_cfg_against_the_null_class(g):
    """sample(): DDIM, eps = uncond + g (cond - uncond) with the null class; g = 1 is the conditional
    model alone. Output clamped to [-1, 1]; one on_step per denoising step."""
    model = make_tiny_dit()
    labels, noise = torch.tensor([1, 7]), _noise()
    states = []
    out = sample(model, labels, num_steps=5, guidance_scale=g, noise=noise,
                 on_step=lambda i, x: states.append(x.clone()))
    ref = _manual_ddim(model, labels, noise, 5, g)
    assert len(states) == 5
    assert torch.allclose(states[-1], ref, atol=1e-4, rtol=1e-4)
    assert torch.allclose(out, ref.clamp(-1, 1), atol=1e-4)


def test_sampler_seed_noise_and_label_checks():
    model = make_tiny_dit()
    a = sample(model, [1, 2], num_steps=3, seed=3)
    assert torch.equal(a, sample(model, [1, 2], num_steps=3, seed=3))
    assert not torch.allclose(a, sample(model, [1, 2], num_steps=3, seed=4))
    assert not torch.allclose(a, sample(model, [1, 3], num_steps=3, seed=3))
    with pytest.raises(ValueError, match="class labels must be in"):
        sample(model, [NULL], num_steps=2)


def test_cfg_batch_and_combination():
    """CFG batch = conditional half then null-class half; combine keeps eps channels (learned sigma
    models output 2C) and returns uncond + g (cond - uncond)."""
    model = make_tiny_dit()
    x = _noise(3)
    x_in, y_in = cfg_batch(model, x, torch.tensor([0, 4, 9]))
    assert torch.equal(x_in, torch.cat([x, x])) and y_in.tolist() == [0, 4, 9, NULL, NULL, NULL]
    out = torch.randn(6, 2, 8, 8)
    cond, unc = out[:3, :1], out[3:, :1]
    assert torch.allclose(combine_cfg(out, 1, 3.0), unc + 3.0 * (cond - unc))
    t = torch.tensor(500)
    with torch.no_grad():
        eps = guided_eps(model, x, t, torch.tensor([0, 4, 9]), 2.0)
        c = model(x, timestep=t.expand(3), class_labels=torch.tensor([0, 4, 9])).sample
        u = model(x, timestep=t.expand(3), class_labels=torch.full((3,), NULL)).sample
    assert torch.allclose(eps, u + 2.0 * (c - u), atol=1e-5)


def test_teacher_trajectory_follows_the_cfg_sampler():
    """Step 5: the teacher's calibration trajectory at guidance 4 ends where sample() at guidance 4
    ends (same noise and labels), and not where guidance 1 ends; both models see the CFG batch."""
    model = make_tiny_dit()
    labels, noise = torch.tensor([2, 5]), _noise(seed=1)
    sched = _recording_scheduler()
    seen = list(teacher_trajectory(model, labels, noise, 6, 4.0, scheduler=sched))
    assert len(seen) == 6 and len(sched.states) == 6
    x_in, t_in, y_in, targets = seen[0]
    assert x_in.shape[0] == 4 and y_in.tolist() == [2, 5, NULL, NULL] and t_in.shape == (4,)
    assert len(targets) == len(model.transformer_blocks) and targets[0].shape[0] == 4
    final = sched.states[-1]
    at = {}
    for g in (4.0, 1.0):
        states = []
        sample(model, labels, num_steps=6, guidance_scale=g, noise=noise, on_step=lambda i, x: states.append(x))
        at[g] = states
    assert torch.allclose(final, at[4.0][-1], atol=1e-4, rtol=1e-4)
    for i in range(5):  # and every state in between: the next step's input is the sampler's state
        assert torch.allclose(seen[i + 1][0][:2], at[4.0][i], atol=1e-4, rtol=1e-4)
    assert (final - at[1.0][-1]).abs().max() > 100 * (final - at[4.0][-1]).abs().max() + 1e-3


# ---------------------------------------------------------------------------------------------
# Block-wise loss
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("b", [0, 1, 2])
def test_block_losses_localise_a_perturbed_block(b):
    """Step 5: hooks capture every block's output: perturbing block b leaves the losses of blocks < b
    exactly 0, makes block b's > 0, and each loss is the MSE of that block's outputs."""
    teacher = make_tiny_dit(layers=3)
    x_in, t_in, y_in, targets = next(teacher_trajectory(teacher, torch.tensor([3, 8]), _noise(), 4, 4.0))
    student = copy.deepcopy(teacher)
    assert [v.item() for v in block_losses(student, x_in, t_in, y_in, targets)] == [0.0, 0.0, 0.0]
    with torch.no_grad():
        student.transformer_blocks[b].ff.net[2].weight.add_(0.05 * torch.randn(64, 256))
    outs = {}
    hooks = [blk.register_forward_hook(lambda m, i, o, j=j: outs.__setitem__(j, o))
             for j, blk in enumerate(student.transformer_blocks)]
    losses = [v.item() for v in block_losses(student, x_in, t_in, y_in, targets)]
    for h in hooks:
        h.remove()
    assert losses[:b] == [0.0] * b
    assert losses[b] > 0
    for j in range(3):
        assert losses[j] == pytest.approx(torch.mean((outs[j] - targets[j]) ** 2).item(), rel=1e-5, abs=1e-12)
    with torch.no_grad(), capture_blocks(teacher) as t_outs:  # the targets are the teacher's block outputs
        teacher(x_in, timestep=t_in, class_labels=y_in)
    assert all(torch.equal(a, c) for a, c in zip(t_outs, targets))


def test_calibration_loss_is_mean_block_mse_plus_lambda_r_times_l_r():
    """Step 5: L = mean_b MSE_b + lambda_r * L_r, with L_r the mean over soft layers (step 4); at step 1
    L_r is that of the initial logits."""
    teacher = make_tiny_dit()
    ref = copy.deepcopy(teacher)
    quantize(ref, method_config("kmeans", bits=3, kmeans_iters=5), progress=False)
    l_r0 = []
    for name, q in quantized_layers(ref).items():
        q.init_soft(teacher.get_submodule(name).weight)
        l_r0.append(q.ratio_regularizer().item())
    student = copy.deepcopy(teacher)
    trace = quantize(student, method_config("vq4dit", bits=3, kmeans_iters=5,
                                            calib=dict(TINY, lambda_r=2.5, freeze_threshold=1.0)),
                     teacher=teacher, progress=False)
    st = trace.steps
    assert len(st) == 4
    assert st.block_loss.tolist() == pytest.approx(((st.block_0 + st.block_1) / 2).tolist(), rel=1e-5)
    assert st.loss.tolist() == pytest.approx((st.block_loss + 2.5 * st.l_r).tolist(), rel=1e-5)
    assert st.l_r.iloc[0] == pytest.approx(sum(l_r0) / len(l_r0), rel=1e-4)
    assert (st.block_loss > 0).all()


# ---------------------------------------------------------------------------------------------
# What each method trains (step 6), progressive freezing in the loop (step 7)
# ---------------------------------------------------------------------------------------------

def _kmeans_reference(teacher):
    """Codebooks, k-means assignments and initial logits the calibration starts from."""
    ref = copy.deepcopy(teacher)
    quantize(ref, method_config("kmeans", bits=3, kmeans_iters=5), progress=False)
    out = {}
    for name, q in quantized_layers(ref).items():
        cb, assign = q.codebook.detach().clone(), q.assignment.clone()
        q.init_soft(teacher.get_submodule(name).weight)
        out[name] = dict(codebook=cb, assignment=assign, logits=q.logits.detach().clone())
    return out


def _probe(method, at_step=1, **calib):
    """Calibrate, stop after `at_step` and return each layer's state then (grads of that step)."""
    teacher = make_tiny_dit()
    student = copy.deepcopy(teacher)
    seen = {}

    def on_step(info):
        if info["step"] == at_step:
            for n, m in quantized_layers(student).items():
                grad = lambda p: None if p is None or p.grad is None else p.grad.detach().clone()  # noqa: E731
                seen[n] = dict(hard=m.hard, hard_forward=m.hard_forward, codebook=m.codebook.detach().clone(),
                               codebook_grad=grad(m.codebook), bias_grad=grad(m.bias),
                               logits=None if m.logits is None else m.logits.detach().clone(),
                               logits_grad=grad(m.logits), assignment=m.current_assignment().clone(),
                               weight=m.weight_hat().detach().reshape(-1, m.d).clone(),
                               lookup=m.codebook.detach()[m.current_assignment()].clone())
            return False
        return True

    cfg = method_config(method, bits=3, kmeans_iters=5, calib=dict(TINY, freeze_threshold=1.0, **calib))
    trace = quantize(student, cfg, teacher=teacher, on_step=on_step, progress=False)
    assert trace.meta["steps_done"] == at_step
    return seen, _kmeans_reference(teacher)


def _nonzero(t):
    return t is not None and t.abs().sum().item() > 0


def test_vq4dit_trains_codebook_and_assignment_logits_together():
    """Step 6 (paper): in the soft phase codebooks, assignment logits and biases all get gradients
    and move; the forward uses the soft mix."""
    seen, ref = _probe("vq4dit")
    for n, s in seen.items():
        assert not s["hard"] and not s["hard_forward"]
        assert _nonzero(s["codebook_grad"]) and _nonzero(s["logits_grad"]) and _nonzero(s["bias_grad"]), n
        assert not torch.equal(s["codebook"], ref[n]["codebook"]), n
        assert not torch.allclose(s["logits"], ref[n]["logits"]), n
        assert not torch.allclose(s["weight"], s["lookup"], atol=1e-4), n  # soft forward


def test_codebook_only_trains_only_the_codebook():
    """Step 6 (classic VQ): assignments stay the k-means ones, no logits; codebooks (and biases) train."""
    seen, ref = _probe("codebook-only")
    for n, s in seen.items():
        assert s["hard"] and s["logits"] is None and s["logits_grad"] is None
        assert _nonzero(s["codebook_grad"]) and _nonzero(s["bias_grad"]), n
        assert torch.equal(s["assignment"], ref[n]["assignment"]), n
        assert not torch.equal(s["codebook"], ref[n]["codebook"]), n


def test_vq4dit_ref_freezes_codebooks_while_soft_and_trains_them_once_hard():
    """Step 6 (reference code): soft layers train only logits; a layer made hard trains its codebook."""
    seen, ref = _probe("vq4dit-ref")
    for n, s in seen.items():
        assert not s["hard"] and s["codebook_grad"] is None and _nonzero(s["logits_grad"]), n
        assert torch.equal(s["codebook"], ref[n]["codebook"]), n
    seen, _ = _probe("vq4dit-ref", at_step=3, force_hard_at=0.5)
    for n, s in seen.items():
        assert s["hard"] and _nonzero(s["codebook_grad"]), n


def test_vq4dit_ste_forwards_the_hard_weights_and_trains_the_ratios():
    """vq4dit-ste: the forward weight is the top candidate's codeword; logits and codebook train."""
    seen, ref = _probe("vq4dit-ste")
    for n, s in seen.items():
        assert not s["hard"] and s["hard_forward"]
        assert torch.allclose(s["weight"], s["lookup"], atol=1e-6), n
        assert _nonzero(s["logits_grad"]) and _nonzero(s["codebook_grad"]), n
        assert not torch.allclose(s["logits"], ref[n]["logits"]), n


def test_calibration_uses_the_configured_optimizer_groups(monkeypatch):
    """Step 5: RMSprop(alpha) with one lr per group: logits, codebooks, biases."""
    made = []

    class Spy(torch.optim.RMSprop):
        def __init__(self, *a, **kw):
            super().__init__(*a, **kw)
            made.append(self)

    monkeypatch.setattr(torch.optim, "RMSprop", Spy)
    teacher = make_tiny_dit()
    student = copy.deepcopy(teacher)
    cfg = method_config("vq4dit", bits=3, kmeans_iters=3,
                        calib=dict(TINY, num_sampling_steps=1, lr_logits=0.031, lr_codebook=7e-4, lr_bias=3e-4,
                                   rmsprop_alpha=0.8))
    quantize(student, cfg, teacher=teacher, progress=False)
    (opt,) = made
    layers = list(quantized_layers(student).values())
    lr_of = {id(p): grp["lr"] for grp in opt.param_groups for p in grp["params"]}
    assert all(grp["alpha"] == 0.8 for grp in opt.param_groups)
    assert {lr_of[id(m.codebook)] for m in layers} == {7e-4}
    assert {lr_of[id(m.bias)] for m in layers} == {3e-4}
    logits = [p for grp in opt.param_groups for p in grp["params"] if p.dim() == 2 and p.shape[1] == 2
              and lr_of[id(p)] not in (7e-4, 3e-4)]
    assert len(logits) == len(layers) and {lr_of[id(p)] for p in logits} == {0.031}


def test_calibration_draws_labels_and_noise_and_runs_the_configured_trajectory(monkeypatch):
    """Step 5: per iteration, labels_per_iteration random real classes and Gaussian noise; the teacher
    trajectory runs num_sampling_steps steps at guidance_scale; one optimizer step per timestep."""
    calls = []
    real = calibrate_mod.teacher_trajectory

    def spy(teacher, labels, noise, num_steps, guidance_scale, *args, **kw):
        calls.append((labels.clone(), noise.clone(), num_steps, guidance_scale))
        return real(teacher, labels, noise, num_steps, guidance_scale, *args, **kw)

    monkeypatch.setattr(calibrate_mod, "teacher_trajectory", spy)
    teacher = make_tiny_dit()
    trace = quantize(copy.deepcopy(teacher), method_config(
        "vq4dit", bits=3, kmeans_iters=3,
        calib=dict(iterations=3, num_sampling_steps=2, labels_per_iteration=5, guidance_scale=2.5)),
        teacher=teacher, progress=False)
    assert len(calls) == 3 and len(trace.steps) == 6
    for labels, noise, steps, g in calls:
        assert labels.shape == (5,) and ((labels >= 0) & (labels < NULL)).all()
        assert noise.shape == (5, 1, 8, 8) and steps == 2 and g == 2.5
    assert not torch.equal(calls[0][1], calls[1][1])
    assert abs(torch.cat([c[1] for c in calls]).std().item() - 1) < 0.1


def test_force_hard_at_makes_every_layer_hard_at_that_fraction():
    """force_hard_at=0.5 of 4 steps: no layer freezes on its own (threshold 1), all go hard at step 2."""
    teacher = make_tiny_dit()
    trace = quantize(copy.deepcopy(teacher), method_config(
        "vq4dit", bits=3, kmeans_iters=3, calib=dict(TINY, freeze_threshold=1.0, force_hard_at=0.5)),
        teacher=teacher, progress=False)
    assert trace.steps.hard_layers.tolist() == [0, 14, 14, 14]
    assert set(trace.hard_steps().values()) == {2} and len(trace.hard_steps()) == 14


@pytest.mark.parametrize("freeze_after,first", [(0, 1), (2, 3)])
def test_freeze_after_delays_freezing(freeze_after, first):
    """freeze_after=N: no sub-vector freezes during the first N steps. With freeze threshold 0.5 every
    sub-vector is confident, so the first eligible step freezes all and switches every layer hard."""
    teacher = make_tiny_dit()
    trace = quantize(copy.deepcopy(teacher), method_config(
        "vq4dit", bits=3, kmeans_iters=3, calib=dict(TINY, freeze_threshold=0.5, freeze_after=freeze_after)),
        teacher=teacher, progress=False)
    st = trace.steps
    assert (st.frozen_frac[:first - 1] == 0).all() and (st.hard_layers[:first - 1] == 0).all()
    assert st.frozen_frac.iloc[first - 1] == 1.0 and st.hard_layers.iloc[first - 1] == 14
    assert set(trace.hard_steps().values()) == {first}


def test_max_seconds_stops_early_with_a_hard_model():
    teacher = make_tiny_dit()
    student = copy.deepcopy(teacher)
    trace = quantize(student, method_config("vq4dit", bits=3, kmeans_iters=3,
                                            calib=dict(iterations=5, num_sampling_steps=4, max_seconds=1e-9)),
                     teacher=teacher, progress=False)
    assert trace.meta["stopped"] == "time budget" and trace.meta["steps_done"] == 1 and len(trace.steps) == 1
    assert all(q.hard for q in quantized_layers(student).values())


def test_calibration_seed_fixes_the_labels_and_noise():
    teacher = make_tiny_dit()

    def losses(seed):
        cfg = method_config("codebook-only", bits=3, kmeans_iters=3, calib=dict(TINY, num_sampling_steps=2, seed=seed))
        return quantize(copy.deepcopy(teacher), cfg, teacher=teacher, progress=False).steps.block_loss.tolist()

    a = losses(0)
    assert a == losses(0) and a != losses(1)


def test_n_candidates_reaches_the_calibrated_layers():
    """n_candidates = 3: each sub-vector's ratios run over its 3 nearest codewords during calibration."""
    teacher = make_tiny_dit()
    student = copy.deepcopy(teacher)
    shapes = []

    def on_step(info):
        shapes.extend({tuple(q.logits.shape[1:]) for q in quantized_layers(student).values()})
        return False

    quantize(student, method_config("vq4dit", bits=3, kmeans_iters=3, n_candidates=3,
                                    calib=dict(TINY, freeze_threshold=1.0)),
             teacher=teacher, on_step=on_step, progress=False)
    assert set(shapes) == {(3,)}


# ---------------------------------------------------------------------------------------------
# Budget (issue 19): forced layers, the until_hard stop rule, vq4dit-ref's L_r gate
# ---------------------------------------------------------------------------------------------

def _budget_run(method="vq4dit", **calib):
    teacher = make_tiny_dit()
    student = copy.deepcopy(teacher)
    cfg = method_config(method, bits=3, kmeans_iters=3, calib=dict(TINY, **calib))
    return quantize(student, cfg, teacher=teacher, progress=False), student


def test_layers_still_soft_at_the_end_are_recorded_as_forced():
    """4 steps are too few for any layer to switch by itself: finalize forces all 14, recorded as
    "forced" events (not "hard" ones) and in the meta; a run that lets every layer switch (threshold
    0.5: all switch at step 1) has none forced and records the switch step."""
    trace, student = _budget_run()
    assert trace.meta["forced_layers"] == 14 and sorted(trace.forced) == sorted(quantized_layers(student))
    assert trace.hard_steps() == {} and trace.meta["last_switch_step"] == 0
    assert (trace.events["event"] == "forced").sum() == 14 and set(trace.events["step"]) == {4}
    assert trace.meta["soft_steps"] == 4
    assert all(q.hard for q in quantized_layers(student).values())
    done, _ = _budget_run(freeze_threshold=0.5)
    assert done.meta["forced_layers"] == 0 and done.forced == []
    assert done.meta["last_switch_step"] == 1 and set(done.meta["hard_switch_steps"].values()) == {1}
    assert done.meta["soft_steps"] == 1
    cb, _ = _budget_run("codebook-only")  # never soft: nothing to force
    assert cb.meta["forced_layers"] == 0 and cb.meta["soft_steps"] == 0


def test_until_hard_runs_past_the_planned_steps_until_every_layer_switched_plus_margin():
    """until_hard: trajectories continue (same seeded data: the 4 planned steps are an exact prefix)
    until every layer switched by itself, then hard_margin steps; nothing forced."""
    fixed, _ = _budget_run()
    trace, student = _budget_run(until_hard=True, hard_margin=3, max_steps=400)
    last = trace.meta["last_switch_step"]
    assert trace.meta["forced_layers"] == 0 and len(trace.hard_steps()) == 14
    assert last > 4 and trace.meta["steps_done"] == last + 3 == len(trace.steps)
    assert max(trace.hard_steps().values()) == last
    assert trace.steps.block_loss[:4].tolist() == pytest.approx(fixed.steps.block_loss.tolist(), rel=1e-6)
    assert trace.steps.iteration.max() == (len(trace.steps) - 1) // 4  # 4 steps per trajectory
    # the cap wins: layers still soft at max_steps are forced, and recorded as such
    capped, _ = _budget_run(until_hard=True, hard_margin=3, max_steps=6)
    assert capped.meta["steps_done"] == 6 and capped.meta["forced_layers"] > 0
    # done before the planned steps: until_hard never shortens a run
    early, _ = _budget_run(until_hard=True, freeze_threshold=0.5, hard_margin=0)
    assert early.meta["steps_done"] == 4 and early.meta["forced_layers"] == 0
    with pytest.raises(ValueError, match="max_steps"):
        method_config("vq4dit", calib=dict(TINY, until_hard=True, max_steps=3))


def test_lr_gate_adds_l_r_only_above_its_running_minimum_within_the_trajectory(monkeypatch):
    """vq4dit-ref (reference code): L_r joins the loss only on steps where it rose above its running
    minimum in the trajectory (the first step of a trajectory never); vq4dit (paper): every step.
    Here L_r only falls, so a scripted factor makes it rise above the running minimum but below the
    previous step (2.0 -> 1.5), and fall back below it (0.5)."""
    from vq4dit.layers import VQLinear
    orig, done = VQLinear.ratio_regularizer, [0]
    factors = [1.0, 3.0, 2.0, 1.5, 0.5]
    monkeypatch.setattr(VQLinear, "ratio_regularizer", lambda self: orig(self) * factors[done[0] % 5])
    teacher = make_tiny_dit()
    cfg = method_config("vq4dit-ref", bits=3, kmeans_iters=3,
                        calib=dict(TINY, iterations=3, num_sampling_steps=5, lambda_r=5.0, freeze_threshold=1.0))
    trace = quantize(copy.deepcopy(teacher), cfg, teacher=teacher, progress=False,
                     on_step=lambda info: done.__setitem__(0, info["step"]))
    st = trace.steps
    assert st.l_r_on.tolist() == [0, 1, 1, 1, 0] * 3  # a fresh running minimum per trajectory
    expect = []
    for _, traj in st.groupby("iteration"):
        lo = float("inf")
        for v in traj.l_r:
            expect.append(float(v > lo))
            lo = min(lo, v)
    assert st.l_r_on.tolist() == expect and st.l_r_on.iloc[0] == 0.0
    assert st.loss.tolist() == pytest.approx((st.block_loss + 5.0 * st.l_r_on * st.l_r).tolist(), rel=1e-5)
    paper, _ = _budget_run("vq4dit", lambda_r=50.0, freeze_threshold=1.0)
    assert (paper.steps.l_r_on == 1.0).all()
    assert paper.steps.loss.tolist() == pytest.approx((paper.steps.block_loss + 50 * paper.steps.l_r).tolist(), rel=1e-5)
    assert method_config("vq4dit-ref").calib.lr_gate and not method_config("vq4dit").calib.lr_gate
    assert method_config("vq4dit", calib=dict(lr_gate=True)).method == "vq4dit+lr_gate=True"


@pytest.mark.parametrize("method,gated", [("vq4dit-ref", True), ("vq4dit", False)])
def test_lr_gate_keeps_l_r_out_of_the_gradient_on_gated_steps(method, gated):
    """Step 1 is below L_r's running minimum (inf): under the gate its logits gradient is that of the
    block loss alone, whatever lambda_r; without the gate lambda_r changes it."""
    grads = {}
    for lam in (0.0, 500.0):
        seen, _ = _probe(method, at_step=1, lambda_r=lam)
        grads[lam] = torch.cat([s["logits_grad"].flatten() for s in seen.values()])
    same = torch.allclose(grads[0.0], grads[500.0], rtol=1e-5, atol=1e-9)
    assert same is gated


def test_bf16_autocast_runs_the_forwards_in_bf16_with_fp32_master_parameters(monkeypatch):
    """Issue 20: CalibConfig.autocast="bf16" puts the block forwards under bf16 autocast (the
    first step's losses differ from fp32's by bf16 rounding, not more), while codebooks, logits and
    biases stay fp32 parameters."""
    teacher = make_tiny_dit()
    seen = {}
    real = calibrate_mod.block_losses

    def spy(student, *a, **kw):
        seen.setdefault("autocast", torch.is_autocast_enabled("cpu"))
        return real(student, *a, **kw)
    monkeypatch.setattr(calibrate_mod, "block_losses", spy)

    def run(autocast):
        seen.clear()
        student = copy.deepcopy(teacher)
        cfg = method_config("vq4dit", bits=3, kmeans_iters=3, calib=dict(TINY, num_sampling_steps=2, autocast=autocast))
        tr = quantize(student, cfg, teacher=teacher, progress=False)
        return tr.steps.block_loss.tolist(), student, seen.get("autocast")

    fp32, _, on32 = run(None)
    bf16, student, on16 = run("bf16")
    assert on32 is False and on16 is True
    assert fp32[0] != bf16[0] and abs(bf16[0] - fp32[0]) <= 0.05 * fp32[0]
    for q in quantized_layers(student).values():
        assert q.codebook.dtype == torch.float32 and q.bias.dtype == torch.float32
    with pytest.raises(ValueError, match="autocast"):
        method_config("vq4dit", bits=3, calib=dict(autocast="fp8"))
