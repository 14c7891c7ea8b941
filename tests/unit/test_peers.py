"""Peer adapters (vq4dit.peers): each real library on a tiny DiT, through `vq4dit.quantize`.

Bits are checked against a hand count written from each format's layout (not from the adapter),
the layers against `default_filter`, and the evaluation path (block MSE) for finiteness and order.
A peer whose library is not installed is skipped, naming the pip package.
"""
import copy
import math

import numpy as np
import pytest
import torch

from conftest import make_tiny_dit
from vq4dit import quantize, size_summary
from vq4dit.naming import default_filter
from vq4dit.size import BIAS_BITS, quantized_layers, storage_bits
from vq4dit.metrics import block_mse
from vq4dit.peers import LIBRARIES, PEERS, PeerConfig, PeerLinear, available, peer_config, require

pytestmark = pytest.mark.core


def need(library):
    if not available(library):
        pytest.skip(f"peer library {library!r} not installed: pip install {LIBRARIES[library][1]}")


@pytest.fixture(scope="module")
def teacher():
    # hidden 256 (2 heads x 128): every in_features (256, 1024) divides GGUF's 256-weight TQ2_0 blocks
    return make_tiny_dit(layers=1, heads=2, head_dim=128)


@pytest.fixture(scope="module")
def quantized(teacher):
    """name -> model quantized with that peer (built once per module; None when not installed)."""
    cache = {}

    def get(name):
        if name not in cache:
            need(PEERS[name].library)
            m = copy.deepcopy(teacher)
            quantize(m, peer_config(name), progress=False)
            cache[name] = m
        return cache[name]
    return get


# Hand counts of one layer (out, in) with a bias, from each format's documented layout.
GGUF_BLOCK = {"Q4_0": (32, 2 + 16), "Q5_0": (32, 2 + 4 + 16), "Q8_0": (32, 2 + 32), "TQ2_0": (256, 64 + 2)}


def hand_bits(cfg: PeerConfig, out_f: int, in_f: int) -> int:
    n = out_f * in_f
    bias = out_f * 32
    if cfg.library == "gguf":  # per block: fp16 scale + packed codes (bytes from ggml's block structs)
        block, nbytes = GGUF_BLOCK[cfg.scheme]
        return n // block * nbytes * 8 + bias
    groups = n // cfg.group_size
    if cfg.library == "hqq":
        # 2/4 bit pack into uint8; 3 bit packs 10 codes per int32 along the group axis (rows padded)
        codes = math.ceil(groups / 10) * cfg.group_size * 32 if cfg.bits == 3 else n * cfg.bits
        return codes + groups * (16 + 16) + bias            # fp16 scale + fp16 zero per group
    if cfg.library == "torchao":
        return n * cfg.bits + groups * (16 + 8) + bias      # fp16 scale + int8 zero point per group
    if cfg.library == "quanto":
        return n * cfg.bits + groups * (16 + 16) + bias     # fp16 scale + fp16 shift per group
    raise AssertionError(cfg.library)


@pytest.mark.parametrize("name", list(PEERS))
def test_peer_bits_layers_and_weights(name, teacher, quantized):
    cfg = PEERS[name]
    model = quantized(name)
    targets = {n for n, m in teacher.named_modules() if default_filter(m, n)}
    q = quantized_layers(model)
    assert set(q) == targets and all(isinstance(m, PeerLinear) for m in q.values())
    total_bits = total_w = 0
    for n, layer in q.items():
        lin = teacher.get_submodule(n)
        b = storage_bits(layer)
        assert b["index_bits"] + b["side_bits"] + b["bias_bits"] == hand_bits(cfg, lin.out_features, lin.in_features), n
        assert b["bias_bits"] == lin.out_features * BIAS_BITS
        total_bits += hand_bits(cfg, lin.out_features, lin.in_features)
        total_w += lin.weight.numel()
        # the weight really went through the library: changed, but close to FP
        err = (layer.weight - lin.weight).pow(2).mean() / lin.weight.pow(2).mean()
        assert 0 < err < (1.0 if cfg.scheme == "TQ2_0" or cfg.bits == 2 else 0.1), (n, float(err))
        assert torch.equal(layer.bias, lin.bias)
    assert size_summary(model)["bits_per_weight"] == pytest.approx(total_bits / total_w, rel=1e-12)
    # untouched: everything outside the target layers
    fp = dict(teacher.named_parameters())
    for pn, p in model.named_parameters():
        if not any(pn.startswith(t + ".") for t in targets):
            assert torch.equal(p, fp[pn]), pn


# Within a library, more bits must give a smaller block MSE on held-out trajectories.
LADDERS = [["hqq-w2-g64", "hqq-w3-g64", "hqq-w4-g64"], ["hqq-w2-g128", "hqq-w3-g128", "hqq-w4-g128"],
           ["gguf-tq2_0", "gguf-q4_0", "gguf-q5_0", "gguf-q8_0"],
           ["torchao-int2-g64", "torchao-int3-g64", "torchao-int4-g64"], ["quanto-qint2-g128", "quanto-qint4-g128"]]


@pytest.mark.parametrize("ladder", LADDERS, ids=lambda lad: lad[0].split("-")[0])
def test_peer_block_mse_finite_positive_and_falls_with_bits(ladder, teacher, quantized):
    mses = [block_mse(quantized(n), teacher, n_labels=4, num_steps=4)["mean"] for n in ladder]
    assert all(math.isfinite(m) and m > 0 for m in mses), mses
    assert all(a > b for a, b in zip(mses, mses[1:])), dict(zip(ladder, mses))


def test_peer_through_run_method_and_deterministic(teacher):
    need("hqq")
    from vq4dit.runner import run_method
    a = run_method(teacher, "hqq-w2-g128", progress=False, measure_block_mse=False)
    b = run_method(teacher, "hqq-w2-g128", progress=False, measure_block_mse=False)
    assert a.method == "hqq-w2-g128" and a.trace is None
    for (n, la), lb in zip(quantized_layers(a.model).items(), quantized_layers(b.model).values()):
        assert torch.equal(la.weight, lb.weight), n  # no seed: one bench row per peer is the whole story
    assert a.size["bits_per_weight"] == pytest.approx(size_summary(b.model)["bits_per_weight"])


def test_peer_configs_reject_bad_input(tiny_dit):
    with pytest.raises(ValueError, match="unknown peer 'hqq-w5'"):
        peer_config("hqq-w5")
    with pytest.raises(ValueError, match="unknown peer library"):
        PeerConfig("bitsandbytes", bits=4, group_size=64)
    with pytest.raises(ValueError, match="fix their own bits"):
        PeerConfig("gguf", "Q4_0", bits=4)
    with pytest.raises(ValueError, match="cannot be quantized"):
        PeerConfig("gguf", "Q4_K")  # the gguf package decodes K-quants only
    with pytest.raises(ValueError, match="bits in"):
        PeerConfig("quanto", bits=3, group_size=128)
    with pytest.raises(ValueError, match="group_size"):
        PeerConfig("hqq", bits=2, group_size=48)
    # hidden 64 does not divide TQ2_0's 256-weight blocks: a clear error, model untouched
    need("gguf")
    before = {n: p.clone() for n, p in tiny_dit.named_parameters()}
    with pytest.raises(ValueError, match="divisible by 256"):
        quantize(tiny_dit, peer_config("gguf-tq2_0"), progress=False)
    assert not quantized_layers(tiny_dit)
    assert all(torch.equal(p, before[n]) for n, p in tiny_dit.named_parameters())


def test_missing_library_names_the_pip_package(monkeypatch):
    import importlib
    real = importlib.import_module

    def fake(name, *a, **k):
        if name.startswith("optimum"):
            raise ImportError("No module named 'optimum'")
        return real(name, *a, **k)
    monkeypatch.setattr(importlib, "import_module", fake)
    with pytest.raises(ImportError, match="pip install optimum-quanto"):
        require("quanto")
    assert not available("quanto")


def test_peer_model_refuses_vq4dit_packing(tmp_path, quantized):
    from vq4dit.io import save_quantized
    with pytest.raises(TypeError, match="fake-quantized by a peer library"):
        save_quantized(quantized("hqq-w4-g64"), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_bench_peer_plan_one_row_per_peer_at_first_seed():
    from benchmarks import bench
    jobs = bench.plan_jobs("peers", [], None, [3, 4, 5])
    assert [j.label for j in jobs] == list(PEERS) and {j.seed for j in jobs} == {3}
    assert {j.setting for j in jobs} == {"peers"} and all(j.images and not j.fd for j in jobs)
    assert [j.label for j in bench.plan_jobs("peers", [], ["gguf-q4_0"], [3])] == ["gguf-q4_0"]


def _row(setting, label, seed, bpw, block, img4, img1):
    return dict(plan="main", setting=setting, label=label, method=label, seed=str(seed), k="", d="",
                bits_per_weight=str(bpw), block_mse=str(block), img_mse_cfg4=str(img4), img_mse_cfg1=str(img1),
                acc_cfg4="0.9", machine="test")


def _report_rows():
    ours = [_row("W2", "vq4dit-ste-aa", s, 2.2, b, i4, i1)
            for s, b, i4, i1 in [(3, 0.002, 0.004, 0.001), (4, 0.003, 0.005, 0.002), (5, 0.0025, 0.006, 0.0015)]]
    peers = [_row("peers", "hqq-w2-g128", 3, 2.1, 0.02, 0.02, 0.01),   # fits, best at <= 2.2
             _row("peers", "gguf-tq2_0", 3, 2.17, 0.3, 0.3, 0.2),      # fits, worse
             _row("peers", "hqq-w2-g64", 3, 2.6, 0.01, 0.01, 0.005),   # better but more bits: excluded
             dict(_row("peers", "quanto-qint2-g128", 3, 2.0, 0.001, "", ""), acc_cfg4="")]  # no images: not ranked
    return ours + peers


def test_peer_report_picks_best_peer_at_or_below_our_bits_and_ratio_interval():
    from benchmarks import bench
    lines = bench.peer_report(_report_rows())

    def cells(window, crit):
        line = next(x for x in lines if x.startswith(f"| W2 | 2.200 | 3 | {window} | {crit} |"))
        return [c.strip() for c in line.strip("|").split("|")]
    img = cells("<= ours", "image MSE CFG4")
    assert img[5:7] == ["hqq-w2-g128", "2.100"]  # the block-only quanto row has no images: not ranked by them
    r = np.array([0.004, 0.005, 0.006]) / 0.02           # ours / peer per seed, by hand
    h = 4.303 * r.std(ddof=1) / np.sqrt(3)
    assert img[8] == f"{r.mean():.3g} [{r.mean() - h:.3g}, {r.mean() + h:.3g}] **ours lower**"
    blk = cells("<= ours", "block MSE")
    assert blk[5] == "quanto-qint2-g128" and blk[8] == "-"  # lowest block MSE; its image cells stay empty
    r = np.array([0.002, 0.003, 0.0025]) / 0.001
    h = 4.303 * r.std(ddof=1) / np.sqrt(3)
    assert blk[7] == f"{r.mean():.3g} [{r.mean() - h:.3g}, {r.mean() + h:.3g}] peer lower"
    assert cells("<= ours + 0.5", "image MSE CFG4")[5] == "hqq-w2-g64"  # 2.6 <= 2.7: in the wider window
    assert any(line.startswith("| hqq-w2-g64 | 2.600 |") for line in lines)  # every peer in its table
    assert "| quanto-qint2-g128 | 2.000 | 0.001 | - | - | - |" in lines
    # no peer at or below our bits: said so, not a ratio against a bigger peer
    rows = [dict(r, bits_per_weight="1.2") if r["label"] == "vq4dit-ste-aa" else r for r in _report_rows()]
    assert any("none at <= 1.200" in line for line in bench.peer_report(rows))


def test_rate_distortion_chart_points_and_png(tmp_path):
    pytest.importorskip("matplotlib", reason="the chart needs matplotlib: pip install matplotlib")
    from benchmarks import rate_distortion as rd
    from benchmarks.common import write_csv
    from benchmarks.bench import COLUMNS
    write_csv(_report_rows(), tmp_path / "rows.csv", COLUMNS)
    rows = rd.load([tmp_path / "rows.csv"])
    pts = rd.points(rows, "img_mse_cfg4")
    bw, mean, half, n, unranked = pts[("W2", "vq4dit-ste-aa")]
    assert unranked is False  # hard-forward method, no forced layers recorded: ranked
    # the paper's soft-forward method: unranked unless its runs record 0 forced layers (issue 19)
    soft = [dict(r, label="vq4dit", method="vq4dit") for r in rows if r["label"] == "vq4dit-ste-aa"]
    assert rd.unranked([dict(r, forced_layers="") for r in soft])
    assert not rd.unranked([dict(r, forced_layers="0") for r in soft])
    assert rd.unranked([dict(r, forced_layers="0") for r in soft[:2]] + [dict(soft[2], forced_layers="3")])
    v = np.array([0.004, 0.005, 0.006])
    assert (bw, n) == (pytest.approx(2.2), 3) and mean == pytest.approx(v.mean())
    assert half == pytest.approx(4.303 * v.std(ddof=1) / np.sqrt(3))
    assert pts[("peers", "gguf-tq2_0")][2] == 0.0  # one deterministic run: no interval
    # the budget plan's rows (same labels, more steps) are their own points, never merged into the main ones
    write_csv([dict(r, plan="budget", img_mse_cfg4=float(r["img_mse_cfg4"]) / 2) for r in _report_rows()
               if r["label"] == "vq4dit-ste-aa"], tmp_path / "budget.csv", COLUMNS)
    both = rd.points(rd.load([tmp_path / "rows.csv", tmp_path / "budget.csv"]), "img_mse_cfg4")
    assert both[("W2", "vq4dit-ste-aa")][1] == pytest.approx(v.mean())
    assert both[("W2", "vq4dit-ste-aa" + rd.BUDGET)][1] == pytest.approx(v.mean() / 2)
    # a tuned-lr row (the tuned plan) stands for the finished budget where it ran, listed first: it wins
    write_csv([dict(r, plan="tuned", img_mse_cfg4=float(r["img_mse_cfg4"]) / 4) for r in _report_rows()
               if r["label"] == "vq4dit-ste-aa"], tmp_path / "tuned.csv", COLUMNS)
    three = rd.points(rd.load([tmp_path / "rows.csv", tmp_path / "tuned.csv", tmp_path / "budget.csv"]), "img_mse_cfg4")
    assert three[("W2", "vq4dit-ste-aa" + rd.BUDGET)][1] == pytest.approx(v.mean() / 4)
    assert [c.rsplit("/", 1)[-1] for c in rd.DEFAULT_CSVS[-2:]] == ["tuned.csv", "budget.csv"]
    out = tmp_path / "rd.png"
    assert rd.main([str(tmp_path / "rows.csv"), "--out", str(out)]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 10_000
    assert rd.main([str(tmp_path / "missing.csv"), "--out", str(tmp_path / "x.png")]) == 2
    assert not (tmp_path / "x.png").exists()


def test_bench_peer_rows_without_images_have_bits_and_block_mse(tmp_path):
    """`--plan peers --images 0`: block MSE and bits only, no FP row (no images generated)."""
    need("gguf")
    from benchmarks import bench
    out = tmp_path / "peers.csv"
    rows = bench.run("peers", str(out), methods=["gguf-q8_0"], seeds=[3], n_images=0, log=lambda s: None)
    assert [(r["setting"], r["label"]) for r in rows] == [("peers", "gguf-q8_0")]
    (r,) = bench.read_rows(out)
    assert float(r["bits_per_weight"]) == pytest.approx(rows[0]["bits_per_weight"]) and 8.5 < float(r["bits_per_weight"]) < 9
    assert 0 < float(r["block_mse"]) < 1e-4 and r["img_mse_cfg4"] == ""
    # resumable: a second run finds the row done and adds nothing
    assert len(bench.run("peers", str(out), methods=["gguf-q8_0"], seeds=[3], n_images=0, log=lambda s: None)) == 1
