"""Mutation check for the `core` tests: break one named mechanic at a time, run `-m core -x`.

    python tools/mutation_check.py              # every mutant (about 10-20 min on 2 cores)
    python tools/mutation_check.py --list       # names and what each breaks
    python tools/mutation_check.py -k freeze    # mutants whose name contains 'freeze'
    python tools/mutation_check.py --jobs 2
    python tools/mutation_check.py --dedicated  # each mutant against only the test meant to guard it

Each mutant is a source edit (exact text -> replacement, each text must occur exactly once) applied
to a temporary copy of vq4dit/, benchmarks/ and tests/; the copy's core tests run with the k-means cache off.
A mutant is CAUGHT when the tests fail. Not part of CI (it runs the core suite once per mutant).
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# (name, what it breaks (method.md step), [(file, exact old text, new text), ...])
MUTANTS = [
    ("kmeans-no-lloyd", "step 1: k-means returns its k-means++ init, no Lloyd iterations",
     [("vq4dit/kmeans.py", "    for it in range(iters):\n", "    for it in range(0):\n")]),
    ("kmeans-empty-cluster-at-zero", "step 1: empty clusters are not re-seeded (centroid left at 0)",
     [("vq4dit/kmeans.py", "        if empty.any():  # re-seed", "        if False:  # re-seed")]),
    ("candidates-farthest", "step 2: second candidate is the farthest codeword, not the 2nd nearest",
     [("vq4dit/layers.py", "v, i = d2.topk(n, dim=1, largest=False)", "v, i = d2.topk(n, dim=1, largest=True)")]),
    ("logit-init-squared-dist", "step 3: logit init from squared distances",
     [("vq4dit/layers.py", "dists.append(v.clamp_min(0).sqrt())", "dists.append(v.clamp_min(0))")]),
    ("logit-init-eps", "step 3: logit init epsilon 1e-2 instead of 1e-5",
     [("vq4dit/layers.py", "(dist[:, :-1] + 1e-5))", "(dist[:, :-1] + 1e-2))")]),
    ("ratios-softmax-wrong-axis", "step 3: softmax over sub-vectors instead of over candidates",
     [("vq4dit/layers.py", ("r = torch.softmax(self.logits, dim=1)\n        if self.frozen_mask.any():",
                            "r = ratio_softmax(self.logits, self.temperature)\n        if self.frozen_mask.any():"),
       "r = torch.softmax(self.logits, dim=0)\n        if self.frozen_mask.any():")]),
    ("ratios-detached", "steps 3/6: ratios carry no gradient to the logits",
     [("vq4dit/layers.py", ("r = torch.softmax(self.logits, dim=1)\n        if self.frozen_mask.any():",
                            "r = ratio_softmax(self.logits, self.temperature)\n        if self.frozen_mask.any():"),
       "r = torch.softmax(self.logits.detach(), dim=1)\n        if self.frozen_mask.any():")]),
    ("l_r-missing-n", "step 4: L_r = mean(r(1-r)) without the factor n",
     [("vq4dit/layers.py", "return self.n_candidates * (r * (1 - r)).mean()", "return (r * (1 - r)).mean()")]),
    ("l_r-counts-frozen", "step 4: L_r also averages over frozen sub-vectors",
     [("vq4dit/layers.py", "soft = ~self.frozen_mask\n", "soft = torch.ones_like(self.frozen_mask)\n")]),
    ("frozen-not-one-hot", "step 7: frozen sub-vectors keep their soft ratios",
     [("vq4dit/layers.py", "r = torch.where(self.frozen_mask[:, None], onehot, r)", "r = r")]),
    ("freeze-not-monotone", "step 7: frozen mask recomputed each step (frozen rows can thaw)",
     [("vq4dit/layers.py", "self.frozen_mask |= r.max(1).values > freeze_threshold",
       "self.frozen_mask = r.max(1).values > freeze_threshold")]),
    ("freeze-threshold-ge-0.98", "step 7: freezes at top ratio >= 0.98 instead of > 0.99",
     [("vq4dit/layers.py", "self.frozen_mask |= r.max(1).values > freeze_threshold",
       "self.frozen_mask |= r.max(1).values >= freeze_threshold - 0.01")]),
    ("hard-switch-at-threshold", "step 7: switch to hard at >= threshold share instead of more than",
     [("vq4dit/layers.py", "if self.frozen_mask.double().mean().item() > hard_threshold:",
       "if self.frozen_mask.double().mean().item() >= hard_threshold:")]),
    ("hard-keeps-candidate-0", "step 7: hard index = k-means candidate instead of the top candidate",
     [("vq4dit/layers.py", "self.assignment.copy_(self.current_assignment())\n        self.candidates",
       "self.assignment.copy_(self.candidates[:, 0])\n        self.candidates")]),
    ("vq4dit-codebook-frozen-while-soft", "step 6: codebook not trained with the ratios (paper: it is)",
     [("vq4dit/calibrate.py", "m.codebook.requires_grad_(m.hard or cfg.train_codebook_soft)",
       "m.codebook.requires_grad_(m.hard)")]),
    ("logits-not-optimized", "step 6: assignment logits left out of the optimizer",
     [("vq4dit/calibrate.py", "    if cfg.train_assignments:\n        groups.append",
       "    if False:\n        groups.append")]),
    ("codebook-only-trains-assignments", "step 6: codebook-only also gets soft assignments",
     [("vq4dit/calibrate.py", "    for name, m in layers.items():\n        if cfg.train_assignments:",
       "    for name, m in layers.items():\n        if True:")]),
    ("hard-layers-codebook-frozen", "step 7: a layer switched to hard no longer trains its codebook",
     [("vq4dit/calibrate.py", "m.codebook.requires_grad_(True)  # hard layers train their codebook",
       "m.codebook.requires_grad_(m.codebook.requires_grad)")]),
    ("ste-soft-forward", "vq4dit-ste: hard_forward ignored in the layer (soft forward)",
     [("vq4dit/layers.py", "elif self.hard_forward:", "elif False:")]),
    ("ste-no-ratio-gradient", "vq4dit-ste: straight-through without the soft term (ratios get no grad)",
     [("vq4dit/layers.py", "sub = self.codebook[self.current_assignment()] + (soft - soft.detach())",
       "sub = self.codebook[self.current_assignment()]")]),
    ("calib-ignores-hard-forward", "vq4dit-ste: calibrate never sets hard_forward on the layers",
     [("vq4dit/calibrate.py", "m.hard_forward = cfg.hard_forward", "m.hard_forward = False")]),
    ("teacher-no-cfg", "step 5: teacher trajectory without classifier-free guidance",
     [("vq4dit/trajectories.py", "combine_cfg(out, c, guidance_scale)", "combine_cfg(out, c, 1.0)")]),
    ("sampler-no-cfg", "sampler: guidance ignored (conditional model only)",
     [("vq4dit/sampling.py", "if guidance_scale == 1.0:  # guidance 1", "if True:  # guidance 1")]),
    ("cfg-wrong-null-class", "CFG: unconditional half uses the last real class, not the null class",
     [("vq4dit/sampling.py", "null = torch.full_like(labels, null_class_id(transformer))",
       "null = torch.full_like(labels, null_class_id(transformer) - 1)")]),
    ("block-hook-captures-input", "step 5: hooks capture each block's input instead of its output",
     [("vq4dit/trajectories.py", "outs.append(out[0] if isinstance(out, tuple) else out)",
       "outs.append(_inp[0])")]),
    ("block-loss-sum", "step 5: block loss is a sum of squares, not the MSE",
     [("vq4dit/trajectories.py", "torch.mean((o.float() - tgt.float()) ** 2)", "torch.sum((o.float() - tgt.float()) ** 2)")]),
    ("loss-ignores-lambda_r", "step 5: L = block MSE + L_r (lambda_r ignored)",
     [("vq4dit/calibrate.py", "loss = block_loss + cfg.lambda_r * l_r", "loss = block_loss + l_r")]),
    ("codebook-lr-is-logit-lr", "step 5: codebooks trained at the logits' learning rate",
     [("vq4dit/calibrate.py", "lr=cfg.lr_codebook, name=\"codebook\"", "lr=cfg.lr_logits, name=\"codebook\"")]),
    ("labels-per-iteration-fixed", "step 5: always 4 labels per trajectory",
     [("vq4dit/calibrate.py", "random_labels_and_noise(teacher, cfg.labels_per_iteration, g, device)\n"
                              "            for x_in",
       "random_labels_and_noise(teacher, 4, g, device)\n            for x_in")]),
    ("force-hard-at-ignored", "force_hard_at: never forces layers hard",
     [("vq4dit/calibrate.py", "force = cfg.force_hard_at is not None and", "force = False and")]),
    ("freeze-after-ignored", "freeze_after: freezing starts at step 1 regardless",
     [("vq4dit/calibrate.py", "if step > cfg.freeze_after or force:", "if step > 0 or force:")]),
    ("conflict-sign-flipped", "conflict share counts positive cosines",
     [("vq4dit/trace.py", "(cos[in_valid] < 0)", "(cos[in_valid] > 0)")]),
    ("coherence-by-count", "coherence divides by the count instead of sum |g_j|",
     [("vq4dit/trace.py", "coherence = g_sum.norm(dim=1) / norm_sum.clamp_min(1e-30)",
       "coherence = g_sum.norm(dim=1) / count.clamp_min(1)")]),
    ("indices-one-byte", "step 8: indices stored one byte each (still round-trips)",
     [("vq4dit/io/packed.py", "pack_bits(m.indices(), m.index_bits)", "pack_bits(m.indices(), max(m.index_bits, 8))"),
      ("vq4dit/io/packed.py", "unpack_bits(t[f\"vq/{name}/indices\"], q.index_bits,",
       "unpack_bits(t[f\"vq/{name}/indices\"], max(q.index_bits, 8),")]),
    ("rtn-always-per-tensor", "rtn: per_channel ignored (one grid per tensor)",
     [("vq4dit/layers.py", "lo = w.min(1, keepdim=True).values if cfg.per_channel else",
       "lo = w.min(1, keepdim=True).values if False else"),
      ("vq4dit/layers.py", "hi = w.max(1, keepdim=True).values if cfg.per_channel else",
       "hi = w.max(1, keepdim=True).values if False else")]),
    ("rtn-floor", "rtn: floor instead of round to nearest",
     [("vq4dit/layers.py", "torch.round(w / scale) + zero", "torch.floor(w / scale) + zero")]),
]

# The test meant to guard each mechanic (pytest -k expression); `--dedicated` checks that it alone
# catches the mutant (the default run reports whichever core test fails first).
GUARDS = {
    "kmeans-no-lloyd": "test_kmeans_is_a_lloyd_fixed_point",
    "kmeans-empty-cluster-at-zero": "test_kmeans_handles_empty_clusters",
    "candidates-farthest": "test_candidates_are_nearest_codewords",
    "logit-init-squared-dist": "test_logit_init_on_a_hand_computed_case",
    "logit-init-eps": "test_logit_init_on_a_hand_computed_case",
    "ratios-softmax-wrong-axis": "test_ratios_are_softmax_over_candidates",
    "ratios-detached": "test_soft_weight_sends_gradients_to_logits",
    "l_r-missing-n": "test_ratio_regularizer_value_on_known_ratios",
    "l_r-counts-frozen": "test_ratio_regularizer_value_on_known_ratios",
    "frozen-not-one-hot": "test_freezing_picks_rows_above_threshold",
    "freeze-not-monotone": "test_frozen_rows_stay_put_while_others_train",
    "freeze-threshold-ge-0.98": "test_freezing_picks_rows_above_threshold",
    "hard-switch-at-threshold": "test_hard_switch_only_when_more_than_threshold",
    "hard-keeps-candidate-0": "test_hard_switch_keeps_the_top_candidate",
    "vq4dit-codebook-frozen-while-soft": "test_vq4dit_trains_codebook_and_assignment_logits",
    "logits-not-optimized": "test_vq4dit_trains_codebook_and_assignment_logits",
    "codebook-only-trains-assignments": "test_codebook_only_trains_only_the_codebook",
    "hard-layers-codebook-frozen": "test_vq4dit_ref_freezes_codebooks_while_soft",
    "ste-soft-forward": "test_straight_through_forward_is_hard",
    "ste-no-ratio-gradient": "test_straight_through_forward_is_hard",
    "calib-ignores-hard-forward": "test_vq4dit_ste_forwards_the_hard_weights",
    "teacher-no-cfg": "test_teacher_trajectory_follows_the_cfg_sampler",
    "sampler-no-cfg": "test_sampler_is_ddim_with_cfg_against_the_null_class",
    "cfg-wrong-null-class": "test_cfg_batch_and_combination",
    "block-hook-captures-input": "test_block_losses_localise_a_perturbed_block",
    "block-loss-sum": "test_block_losses_localise_a_perturbed_block",
    "loss-ignores-lambda_r": "test_calibration_loss_is_mean_block_mse_plus_lambda_r",
    "codebook-lr-is-logit-lr": "test_calibration_uses_the_configured_optimizer_groups",
    "labels-per-iteration-fixed": "test_calibration_draws_labels_and_noise",
    "force-hard-at-ignored": "test_force_hard_at_makes_every_layer_hard",
    "freeze-after-ignored": "test_freeze_after_delays_freezing",
    "conflict-sign-flipped": "test_gradient_conflict_on_a_hand_made_case",
    "coherence-by-count": "test_gradient_conflict_on_a_hand_made_case",
    "indices-one-byte": "test_packed_indices_take_log2_k_bits_on_disk",
    "rtn-always-per-tensor": "test_rtn_rounds_to_nearest_level_and_per_channel_beats_per_tensor",
    "rtn-floor": "test_rtn_rounds_to_nearest_level_and_per_channel_beats_per_tensor",
}


def make_copy(edits) -> Path:
    tmp = Path(tempfile.mkdtemp(prefix="vq4dit-mut-"))
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", ".pytest_cache")
    for d in ("vq4dit", "benchmarks", "tests"):  # benchmarks: one core test covers the bench's report
        shutil.copytree(ROOT / d, tmp / d, ignore=ignore)
    shutil.copy(ROOT / "pyproject.toml", tmp / "pyproject.toml")  # pytest settings (pythonpath)
    if (ROOT / "assets").exists():
        os.symlink(ROOT / "assets", tmp / "assets")
    for rel, olds, new in edits:
        f = tmp / rel
        src = f.read_text()
        # `old` may list alternatives (the same spot in older / newer versions of the library)
        old = next((o for o in ((olds,) if isinstance(olds, str) else olds) if src.count(o) == 1), olds)
        n = src.count(old) if isinstance(old, str) else 0
        if n != 1:
            shutil.rmtree(tmp, ignore_errors=True)
            raise SystemExit(f"mutation text found {n} times in {rel} (need exactly 1): {old!r}")
        f.write_text(src.replace(old, new))
    return tmp


def run_core(tmp: Path, timeout: float, extra: list[str]) -> tuple[int, str, float]:
    env = dict(os.environ, OMP_NUM_THREADS="1", VQ4DIT_CACHE="off", PYTHONDONTWRITEBYTECODE="1")
    cmd = [sys.executable, "-m", "pytest", "-q", "-m", "core", "-x", "-p", "no:cacheprovider", "tests", *extra]
    t0 = time.time()
    try:
        p = subprocess.run(cmd, cwd=tmp, env=env, capture_output=True, text=True, timeout=timeout)
        return p.returncode, p.stdout + p.stderr, time.time() - t0
    except subprocess.TimeoutExpired:
        return -1, "timeout", time.time() - t0


def first_failure(out: str) -> str:
    m = re.search(r"^FAILED (\S+)", out, re.M) or re.search(r"^ERROR (\S+)", out, re.M)
    return m.group(1) if m else out.strip().splitlines()[-1] if out.strip() else "?"


def check(name, edits, timeout, extra):
    tmp = make_copy(edits)
    extra = [a.replace("{guard}", GUARDS.get(name, " or ".join(sorted(set(GUARDS.values()))))) for a in extra]
    try:
        rc, out, secs = run_core(tmp, timeout, extra)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return name, rc, out, secs


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-k", default="", help="only mutants whose name contains this")
    ap.add_argument("--list", action="store_true", help="list the mutants and exit")
    ap.add_argument("--jobs", type=int, default=1, help="mutants run in parallel (default 1)")
    ap.add_argument("--timeout", type=float, default=600, help="seconds per mutant run (default 600)")
    ap.add_argument("--no-baseline", action="store_true", help="skip the unmutated run")
    ap.add_argument("--dedicated", action="store_true",
                    help="run each mutant against only its guarding test (GUARDS) instead of all core tests")
    args, extra = ap.parse_known_args(argv)
    if args.dedicated:
        extra = [*extra, "-k", "{guard}"]
    mutants = [m for m in MUTANTS if args.k in m[0]]
    missing = [m[0] for m in MUTANTS if m[0] not in GUARDS]
    if missing:
        raise SystemExit(f"no guarding test named for {missing}")
    if args.list:
        for name, what, _ in mutants:
            print(f"{name:36s} {what}")
        return 0
    for name, _, edits in mutants:  # fail fast on a stale mutation text
        shutil.rmtree(make_copy(edits), ignore_errors=True)
    if not args.no_baseline:
        _, rc, out, secs = check("baseline", [], args.timeout, extra)
        print(f"baseline (no mutation): {'PASS' if rc == 0 else 'FAIL'} in {secs:.0f}s", flush=True)
        if rc != 0:
            print(out[-3000:])
            return 2
    caught = []
    with ThreadPoolExecutor(max(1, args.jobs)) as pool:
        futs = [pool.submit(check, name, edits, args.timeout, extra) for name, _, edits in mutants]
        for fut in futs:
            name, rc, out, secs = fut.result()
            ok = rc != 0
            caught.append(ok)
            how = f"caught by {first_failure(out)}" if ok else "SURVIVED"
            print(f"{name:36s} {how}  ({secs:.0f}s)", flush=True)
    print(f"\nscore: {sum(caught)}/{len(caught)} mutants caught")
    survivors = [m[0] for m, c in zip(mutants, caught) if not c]
    if survivors:
        print("survived:", ", ".join(survivors))
    return 0 if not survivors else 1


if __name__ == "__main__":
    sys.exit(main())
