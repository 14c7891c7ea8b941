"""The benchmark (benchmarks/bench.py): the quick mode produces every row, plans keep pairs
complete and share the init, the paired report says "beats" only when the interval excludes 0."""
import csv
import math
from pathlib import Path

import pytest


@pytest.fixture(scope="module")
def quick_bench(tmp_path_factory):
    import os
    from benchmarks import bench
    tmp = tmp_path_factory.mktemp("bench")
    old = os.environ.get("VQ4DIT_CACHE")
    os.environ["VQ4DIT_CACHE"] = str(tmp / "cache")  # k-means once per setting, shared by the methods
    try:
        rows = bench.run(quick=True, out_csv=str(tmp / "quick.csv"), log=lambda s: None)
    finally:
        os.environ["VQ4DIT_CACHE"] = old if old is not None else "off"
    return rows, tmp / "quick.csv"


def test_bench_quick_has_every_row(quick_bench):
    from benchmarks import bench
    rows, out = quick_bench
    with open(out) as f:
        got = list(csv.DictReader(f))
    assert got[0]["method"] == "fp32"
    expected = {(j.setting, j.label) for j in bench.plan_jobs("quick", ["W2", "XL-sharing"], None, [0])}
    assert {(r["setting"], r["label"]) for r in got[1:]} == expected
    for r in got[1:]:
        assert 0 <= float(r["acc_cfg4"]) <= 1 and math.isfinite(float(r["img_mse_cfg4"]))
        assert math.isfinite(float(r["block_mse"])) and float(r["bits_per_weight"]) > 0
        assert r["machine"]
    calibrated = [r for r in got if r["method"] in bench.CALIBRATED]
    assert all(0 <= float(r["conflict_share"]) <= 1 for r in calibrated)


def test_bench_quick_orderings(quick_bench):
    """Robust orderings even at the smoke budget: calibrated < k-means < per-tensor RTN at W2, and at
    the XL-sharing setting the default method beats codebook-only by a wide margin."""
    from vq4dit.config import DEFAULT_METHOD
    rows, _ = quick_bench
    w2 = {r["label"]: r for r in rows if r["setting"] == "W2"}
    xl = {r["label"]: r for r in rows if r["setting"] == "XL-sharing"}
    assert w2[DEFAULT_METHOD]["block_mse"] < w2["kmeans"]["block_mse"] < w2["rtn-tensor"]["block_mse"]
    assert w2["codebook-only"]["block_mse"] < w2["kmeans"]["block_mse"]
    assert w2["rtn"]["block_mse"] < w2["rtn-tensor"]["block_mse"]
    assert xl[DEFAULT_METHOD]["block_mse"] < 0.7 * xl["codebook-only"]["block_mse"]
    assert w2[DEFAULT_METHOD]["acc_cfg4"] > w2["rtn-tensor"]["acc_cfg4"]


def test_bench_plan_is_seed_major_so_a_stopped_run_leaves_complete_pairs():
    """Every method of seed 3 comes before any row of seed 4: stopping after the first pair still
    gives a paired comparison. Baselines run once, at the first seed."""
    from benchmarks import bench
    jobs = bench.plan_jobs("main", ["W2-budget"], ["codebook-only", "vq4dit-ste", "kmeans"], [3, 4, 5])
    assert [(j.label, j.seed) for j in jobs] == [("codebook-only", 3), ("vq4dit-ste", 3), ("kmeans", 3),
                                               ("codebook-only", 4), ("vq4dit-ste", 4),
                                               ("codebook-only", 5), ("vq4dit-ste", 5)]
    abl = bench.plan_jobs("ablations", ["XL-sharing"], None, [0, 1], labels=["vq4dit-ste", "vq4dit-ste n=1"])
    assert [(j.label, j.seed) for j in abl] == [("vq4dit-ste", 0), ("vq4dit-ste n=1", 0),
                                              ("vq4dit-ste", 1), ("vq4dit-ste n=1", 1)]


def test_bench_act_aware_init_gives_both_sides_of_the_pair_the_same_init(tmp_path):
    """--init act-aware: every k-means-based method (the codebook-only baseline included) gets the
    act-aware init and a label saying so; the report pairs each row with the baseline of the same
    init, never with the plain-k-means codebook-only row."""
    from benchmarks import bench
    jobs = bench.plan_jobs("main", ["W2"], ["codebook-only", "vq4dit-ste", "kmeans", "rtn"], [3, 4], init="act-aware")
    assert [(j.label, j.seed) for j in jobs] == [
        ("codebook-only +act-aware init", 3), ("vq4dit-ste-aa", 3), ("kmeans +act-aware init", 3),
        ("codebook-only +act-aware init", 4), ("vq4dit-ste-aa", 4)]  # no RTN: no codebook
    assert all(j.vq == {"activation_aware": True} for j in jobs)
    assert all(j.vq == {} for j in bench.plan_jobs("main", ["W2"], ["codebook-only"], [3]))
    # a method that owns the act-aware init brings its baseline with the same init into the plan
    own = bench.plan_jobs("main", ["W2"], ["vq4dit-ste-aa"], [3])
    assert [(j.label, j.method, j.vq) for j in own] == [
        ("codebook-only +act-aware init", "codebook-only", {"activation_aware": True}), ("vq4dit-ste-aa", "vq4dit-ste-aa", {})]
    with pytest.raises(ValueError, match="init"):
        bench.plan_jobs("main", ["W2"], None, [3], init="random")
    # the report's pairing: a plain row against plain codebook-only, an act-aware row against act-aware
    rows = []
    for seed, (cb, ste, cb_aa, ste_aa) in {3: (1.0, 0.5, 0.4, 0.3), 4: (1.0, 0.6, 0.4, 0.3)}.items():
        for label, v in [("codebook-only", cb), ("vq4dit-ste", ste), ("codebook-only +act-aware init", cb_aa),
                         ("vq4dit-ste +act-aware init", ste_aa)]:  # an older CSV's label for vq4dit-ste-aa
            rows.append(dict(plan="main", setting="W2", label=label, method=label.split()[0], seed=seed,
                             k=256, d=4, bits_per_weight=2.2, block_mse=v))
    bench.write_csv(rows, tmp_path / "b.csv", bench.COLUMNS)
    assert bench.paired(rows, "block_mse", "vq4dit-ste +act-aware init")[0] == pytest.approx(-25.0)
    assert bench.baseline_label("vq4dit-ste-aa") == "codebook-only +act-aware init"
    assert bench.paired(rows, "block_mse", "vq4dit-ste")[0] == pytest.approx(-45.0)
    text = bench.report(tmp_path / "b.csv")
    assert text.count("(baseline)") == 6  # 3 metrics x 2 codebook-only rows
    assert "| vq4dit-ste-aa | 2 |" in text and "-25.0% [-25.0, -25.0] **beats**" in text


@pytest.mark.core
def test_paired_interval_says_beats_only_when_it_excludes_zero(tmp_path):
    from benchmarks.bench import COLUMNS, paired, report, write_csv
    rows = []
    for seed, (cb, a, b) in enumerate([(1.0, 0.50, 0.9), (1.2, 0.62, 1.3), (0.9, 0.44, 0.85)]):
        for label, v in (("codebook-only", cb), ("ours", a), ("noise", b)):
            rows.append(dict(plan="main", setting="W2", label=label, method=label, seed=seed, k=256, d=4,
                             bits_per_weight=2.2, block_mse=v, machine="test"))
    m, lo, hi, n = paired(rows, "block_mse", "ours")
    assert n == 3 and m == pytest.approx(-49.5, abs=0.5) and hi < 0
    m2, lo2, hi2, _ = paired(rows, "block_mse", "noise")
    assert lo2 < 0 < hi2
    write_csv(rows, tmp_path / "b.csv", COLUMNS)
    text = report(tmp_path / "b.csv")
    line = {ln.split("|")[1].strip(): ln for ln in text.splitlines() if ln.startswith("| ")}
    assert "**beats**" in line["ours"] and "beats" not in line["noise"]
    assert math.isfinite(float(line["ours"].split("|")[4].split("±")[0]))
    assert list(csv.DictReader(open(tmp_path / "b.csv")))[0]["label"] == "codebook-only"


@pytest.mark.core
def test_log_ratio_interval_mirrors_when_the_pair_is_swapped_and_the_plain_one_need_not():
    from benchmarks.bench import paired
    # the W2 tuned CFG-1 case in miniature: one seed where A is 2x B, two where it is a bit lower
    rows = [dict(label=lab, seed=s, v=v) for s, (a, b) in enumerate([(2.0, 1.0), (0.9, 1.0), (0.95, 1.0)])
            for lab, v in (("A", a), ("B", b))]
    ab, ba = paired(rows, "v", "A", base="B"), paired(rows, "v", "B", base="A")
    assert ab[0] == pytest.approx(100 * 0.85 / 3)  # plain relative difference
    assert abs(ab[0]) != pytest.approx(abs(ba[0]), rel=0.05)  # not mirrored: base-dependent
    lab_, lba = paired(rows, "v", "A", base="B", log_ratio=True), paired(rows, "v", "B", base="A", log_ratio=True)
    geo = 100 * ((2.0 * 0.9 * 0.95) ** (1 / 3) - 1)
    assert lab_[0] == pytest.approx(geo) and lab_[3] == 3
    for x, y in ((lab_[0], lba[0]), (lab_[1], lba[2]), (lab_[2], lba[1])):  # mean and the ends swap
        assert (1 + x / 100) * (1 + y / 100) == pytest.approx(1.0)


def test_every_main_plan_row_is_the_cli_config_of_the_same_flags():
    """A main-plan row's config is `python -m vq4dit quantize --recipe small --method M --seed S
    [--k K --d D] [--init act-aware]` exactly: both are built by vq4dit.config.build_config."""
    from benchmarks import bench
    from vq4dit.__main__ import build_parser, config_from_args
    from vq4dit.config import SETTINGS
    jobs = [j for init in bench.INITS for j in bench.plan_jobs("main", list(SETTINGS), None, [3, 4], init=init)]
    assert len(jobs) > 40
    for job in jobs:
        flags = ["quantize", "--out", "o", "--recipe", "small", "--method", job.method, "--seed", str(job.seed),
                 "--bits", str(SETTINGS[job.setting]["bits"]), "--device", "cpu"]
        if "k" in SETTINGS[job.setting]:
            flags += ["--k", str(SETTINGS[job.setting]["k"]), "--d", str(SETTINGS[job.setting]["d"])]
        if job.vq.get("activation_aware"):
            flags += ["--init", "act-aware"]
        cli = config_from_args(build_parser().parse_args(flags))
        assert bench.job_config(job, device="cpu") == cli, (job, flags)


def test_merge_keeps_the_first_row_and_its_conflicts(tmp_path):
    """`bench merge`: the first CSV's row of a (setting, label, seed) wins, with that CSV's conflict
    rows; older labels are read under the registry name; --by-plan writes one CSV per plan."""
    from benchmarks import bench

    def write(name, rows):
        bench.write_csv([dict(plan=p, setting="W2", label=lab, method=lab.split()[0], seed=s, block_mse=v)
                         for p, lab, s, v in rows], tmp_path / f"{name}.csv", bench.COLUMNS)
        bench.write_csv([dict(plan=p, setting="W2", label=lab, seed=s, layer="l0", conflict_share=v)
                         for p, lab, s, v in rows], tmp_path / f"{name}_conflicts.csv", bench.CONFLICT_COLUMNS)
    write("a", [("main", "codebook-only", 3, 1.0), ("main", "vq4dit-ste +act-aware init", 3, 0.5)])
    write("b", [("main", "codebook-only", 3, 9.0), ("main", "codebook-only", 4, 2.0),
                ("ablations", "vq4dit-ste n=3", 0, 0.7)])
    n = bench.merge([tmp_path / "a.csv", tmp_path / "b.csv"], out=tmp_path / "m.csv")
    assert n == {str(tmp_path / "m.csv"): 4}
    rows = bench.read_rows(tmp_path / "m.csv")
    assert [(r["label"], r["seed"], float(r["block_mse"])) for r in rows] == [
        ("codebook-only", "3", 1.0), ("vq4dit-ste-aa", "3", 0.5), ("codebook-only", "4", 2.0), ("vq4dit-ste n=3", "0", 0.7)]
    conflicts = bench.read_rows(tmp_path / "m_conflicts.csv")
    assert [float(r["conflict_share"]) for r in conflicts] == [1.0, 0.5, 2.0, 0.7]  # b's 9.0 lost with its row
    bench.merge([tmp_path / "a.csv", tmp_path / "b.csv"], by_plan=tmp_path / "plans")
    assert len(bench.read_rows(tmp_path / "plans" / "bench_main.csv")) == 3
    assert [r["label"] for r in bench.read_rows(tmp_path / "plans" / "bench_ablations.csv")] == ["vq4dit-ste n=3"]


def test_bench_budget_plan_gives_every_method_the_same_budget_and_the_report_flags_forced_rows(tmp_path):
    """Issue 19: the budget plan runs every method of a setting at one step budget (until_hard as a
    safety net), pairs included; the report flags, and gives no verdict to, rows where finalize
    forced layers or whose steps differ from their codebook-only pair."""
    from benchmarks import bench
    jobs = bench.plan_jobs("budget", ["XL-sharing"], ["vq4dit", "vq4dit-ste-aa"], [3])
    assert [(j.label, j.method) for j in jobs] == [
        ("codebook-only", "codebook-only"), ("vq4dit", "vq4dit"),
        ("codebook-only +act-aware init", "codebook-only"), ("vq4dit-ste-aa", "vq4dit-ste-aa")]
    n = bench.BUDGET_ITERATIONS["XL-sharing"]
    assert all(j.calib == dict(iterations=n, until_hard=True, max_steps=bench.BUDGET_MAX_STEPS) for j in jobs)
    assert all(j.plan == "budget" and j.images and not j.fd for j in jobs)
    sweep = bench.plan_jobs("sweep", ["XL-sharing"], ["vq4dit", "codebook-only"], [0])
    assert [j.label for j in sweep] == [f"vq4dit lr {a}/{b}" for a in ("0.02", "0.05") for b in ("0.0001", "0.0003", "0.001")] \
        + ["codebook-only lr 0.0001", "codebook-only lr 0.0003", "codebook-only lr 0.001"]
    assert sweep[4].calib["lr_logits"] == 5e-2 and sweep[4].calib["lr_codebook"] == 3e-4 and not sweep[4].images
    picked = ["vq4dit lr 0.05/0.0003", "codebook-only lr 0.001"]  # --labels: a check of chosen cells only
    assert [j.label for j in bench.plan_jobs("sweep", ["XL-sharing"], ["vq4dit", "codebook-only"], [1],
                                             labels=picked)] == picked
    rows = []
    for seed in (3, 4):
        for label, mse, forced, steps in [("codebook-only", 1.0, 0, 600), ("vq4dit", 0.5, 0, 600),
                                          ("vq4dit-ref", 0.4, 3 if seed == 4 else 0, 600),
                                          ("vq4dit-ste", 0.3, 0, 650 if seed == 3 else 600)]:
            rows.append(dict(plan="budget", setting="XL-sharing", label=label, method=label, seed=seed, k=16, d=4,
                             bits_per_weight=1.2, block_mse=mse * (1 + 0.1 * seed), steps=steps, soft_steps=steps // 2,
                             last_switch_step=400 + 2 * seed, forced_layers=forced))
    bench.write_csv(rows, tmp_path / "b.csv", bench.COLUMNS)
    assert bench.forced_rows(rows, "vq4dit-ref") == 1 and bench.forced_rows(rows, "vq4dit") == 0
    assert bench.unequal_steps(rows, "vq4dit-ste") == 1 and bench.unequal_steps(rows, "vq4dit") == 0
    lines = {ln.split(" |")[0].lstrip("| "): ln for ln in bench.report(tmp_path / "b.csv").splitlines()
             if ln.startswith("| ")}
    assert "**beats**" in lines["vq4dit"] and "unranked" not in lines["vq4dit"]
    ref = next(v for k, v in lines.items() if k.startswith("vq4dit-ref"))
    assert "forced layers in 1 run(s): not ranked" in ref and "(unranked)" in ref and "**beats**" not in ref
    ste = next(v for k, v in lines.items() if k.startswith("vq4dit-ste"))
    assert "steps differ from its pair at 1 seed(s)" in ste and "**beats**" not in ste
    assert ref.rstrip(" |").endswith("| 3") and "| 600 (300) | 407 (max 408) |" in lines["vq4dit"]
    # against the paper's vq4dit: only rows that finished with its steps (not ref: forced; not ste: steps differ)
    paper = [ln for ln in bench.report(tmp_path / "b.csv").splitlines() if ln.startswith("| XL-sharing |")]
    assert len(paper) == 1 and paper[0].startswith("| XL-sharing | codebook-only | +100.0% [+100.0, +100.0] loses")
    bench.write_csv([dict(r, forced_layers="") for r in rows], tmp_path / "old.csv", bench.COLUMNS)
    assert "Against the paper" not in bench.report(tmp_path / "old.csv")  # no record: it may have been forced


def test_sweep_picks_each_methods_best_lr_and_the_tuned_plan_runs_or_reuses_it(tmp_path, monkeypatch):
    """Issue 19: the sweep's report marks, per setting and method, the lr pair with the lowest block MSE
    on the tuning seeds (never one whose runs had forced layers); the tuned plan runs the budget rows at
    those lrs, and copies a budget row only where its recorded lrs are the tuned ones."""
    from benchmarks import bench
    rows = [dict(plan="sweep", setting="W2", label=lab, method=lab.split(" lr ")[0], seed=seed, block_mse=mse * (1 + seed),
                 steps=450, soft_steps=300, forced_layers=forced)
            for seed in (0, 1) for lab, mse, forced in [
                ("vq4dit lr 0.02/0.0003", 1.0, 0), ("vq4dit lr 0.05/0.0003", 0.8, 0), ("vq4dit lr 0.05/0.001", 0.5, 2),
                ("codebook-only lr 0.0003", 2.0, 0), ("codebook-only lr 0.0001", 2.2, 0)]]
    assert bench.best_lr(rows) == {("W2", "vq4dit"): dict(lr_logits=0.05, lr_codebook=3e-4),
                                   ("W2", "codebook-only"): dict(lr_codebook=3e-4)}
    bench.write_csv(rows, tmp_path / "sweep.csv", bench.COLUMNS)
    lines = [ln for ln in bench.report(tmp_path / "sweep.csv").splitlines() if ln.startswith("| W2")]
    assert len(lines) == 5 and not any("vs codebook-only" in ln for ln in lines)  # only the sweep table
    best = [ln for ln in lines if "**best**" in ln]
    assert [ln.split(" | ")[1:3] for ln in best] == [["vq4dit", "0.05 / 0.0003"], ["codebook-only", "- / 0.0003"]]
    assert "| -20.0% |" in best[0] and "(recipe)" in next(ln for ln in lines if "0.02 / 0.0003" in ln)

    monkeypatch.setattr(bench, "TUNED_LR", {("W2", "vq4dit"): dict(lr_logits=0.05)})
    tuned = bench.plan_jobs("tuned", ["W2"], ["vq4dit"], [3])
    assert [(j.plan, j.label, j.calib.get("lr_logits")) for j in tuned] == [
        ("tuned", "codebook-only", None), ("tuned", "vq4dit", 0.05)]
    assert bench.plan_jobs("budget", ["W2"], ["vq4dit"], [3])[1].calib.get("lr_logits") is None
    extra = dict(trace_every=25)
    cfg = bench.job_config(tuned[1], "small", extra)
    assert bench.learning_rates(cfg) == dict(lr_logits=0.05, lr_codebook=3e-4)
    assert bench.learning_rates(bench.job_config(tuned[0], "small", extra)) == dict(lr_codebook=3e-4)
    budget = [dict(plan="budget", setting="W2", label=lab, method=lab, seed=3, block_mse=0.1, **lr)
              for lab, lr in [("codebook-only", dict(lr_codebook=3e-4)), ("vq4dit", dict(lr_logits=0.02, lr_codebook=3e-4))]]
    bench.write_csv(budget, tmp_path / "budget.csv", bench.COLUMNS)
    got, conflicts = [], []
    left = bench._reuse_rows(tuned, tmp_path / "budget.csv", got, conflicts, extra, "cpu", log=lambda s: None)
    assert [j.label for j in left] == ["vq4dit"]  # its lrs changed: runs again
    assert [(r["label"], r["plan"]) for r in got] == [("codebook-only", "tuned")]  # same config: copied


def test_tuned_lr_table_is_the_committed_sweeps_pick():
    """TUNED_LR is written out by hand from the sweep: it must be exactly `best_lr` of the committed
    benchmarks/results/budget/sweep.csv, for every setting the sweep has rows for, and nothing else."""
    from benchmarks import bench
    rows = bench.read_rows(Path(bench.__file__).parent / "results" / "budget" / "sweep.csv")
    assert rows, "the committed sweep CSV is missing"
    assert bench.best_lr(rows) == bench.TUNED_LR
