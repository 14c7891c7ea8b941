"""Packed export/reload, loading layouts, and the CLI."""

import pytest
import torch

from conftest import make_tiny_dit
from vq4dit import METHODS, method_config, quantize
from vq4dit.__main__ import build_parser, main
from vq4dit.io import load_dit, load_quantized, pack_bits, save_quantized, unpack_bits
from vq4dit.size import quantized_layers

pytestmark = pytest.mark.core


@pytest.mark.parametrize("bits", [2, 3, 4, 6, 8])
def test_pack_bits_round_trip(bits):
    v = torch.randint(0, 2 ** bits, (1003,))
    p = pack_bits(v, bits)
    assert p.dtype == torch.uint8 and p.numel() == -(-1003 * bits // 8)
    assert torch.equal(unpack_bits(p, bits, 1003), v)


def _out(m, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(3, 1, 8, 8, generator=g)
    with torch.no_grad():
        return m(x, timestep=torch.tensor([5, 400, 900]), class_labels=torch.tensor([0, 3, 10])).sample


@pytest.mark.parametrize("method,bits", [("vq4dit", 2), ("kmeans", 3), ("codebook-only", 4), ("rtn", 2), ("rtn-tensor", 3)])
def test_packed_round_trip_is_exact(tmp_path, method, bits):
    m = make_tiny_dit()
    spec = METHODS[method]
    kw = {} if spec.kind == "rtn" else dict(kmeans_iters=5)
    if spec.calibrated:
        kw["calib"] = dict(iterations=1, num_sampling_steps=5)
    quantize(m, method_config(method, bits=bits, **kw), progress=False)
    m.eval()
    save_quantized(m, tmp_path / "packed")
    back = load_quantized(tmp_path / "packed").transformer
    assert torch.equal(_out(m), _out(back))
    meta = load_dit(tmp_path / "packed").quantized_meta
    q = next(iter(quantized_layers(m).values()))
    if method.startswith("rtn"):
        assert meta["layers"][q.name]["bits"] == bits
    else:
        idx_bytes = (tmp_path / "packed" / "model.safetensors").stat().st_size
        assert meta["size"]["index_bytes"] * 8 == bits * meta["size"]["quantized_weights"]
        assert idx_bytes > meta["size"]["index_bytes"]


def test_save_refuses_existing_dir_and_soft_layers(tmp_path):
    m = make_tiny_dit()
    quantize(m, method_config("kmeans", bits=3, kmeans_iters=3), progress=False)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("precious")
    with pytest.raises(FileExistsError, match="already exists"):
        save_quantized(m, tmp_path / "out")
    assert (tmp_path / "out" / "keep.txt").read_text() == "precious"
    with pytest.raises(FileExistsError, match="not a previous"):  # issue 11: only a previous output is replaced
        save_quantized(m, tmp_path / "out", overwrite=True)
    assert (tmp_path / "out" / "keep.txt").read_text() == "precious"
    save_quantized(m, tmp_path / "out3")
    (tmp_path / "out3" / "stale.txt").write_text("old output")
    save_quantized(m, tmp_path / "out3", overwrite=True)
    assert not (tmp_path / "out3" / "stale.txt").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp dirs left
    lay = next(iter(quantized_layers(m).values()))
    lay.init_soft(torch.randn(lay.out_features, lay.in_features))
    with pytest.raises(ValueError, match="soft assignments"):
        save_quantized(m, tmp_path / "out2")
    assert not (tmp_path / "out2").exists()


def test_corrupt_packed_model(tmp_path):
    m = make_tiny_dit()
    quantize(m, method_config("kmeans", bits=3, kmeans_iters=3), progress=False)
    save_quantized(m, tmp_path / "p")
    f = tmp_path / "p" / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-100])
    with pytest.raises(ValueError, match="corrupt|not a valid"):
        load_quantized(tmp_path / "p")


def test_load_transformer_dir_and_pipeline_dir(tiny_dit_dir):
    a = load_dit(tiny_dit_dir)
    b = load_dit(tiny_dit_dir / "transformer")
    assert a.vae is None and a.scheduler.config.clip_sample is False
    assert torch.equal(_out(a.transformer), _out(b.transformer))


def test_cli_help_documents_every_flag(capsys):
    parser = build_parser()
    sub = parser._subparsers._group_actions[0].choices
    for name, sp in sub.items():
        for action in sp._actions:
            if action.option_strings and action.dest != "help":
                assert action.help, f"{name} {action.option_strings} has no help"
    with pytest.raises(SystemExit):
        main(["quantize", "--help"])
    assert "--iterations" in capsys.readouterr().out


def test_cli_init_reproduces_every_bench_row_and_names_it_by_its_switches():
    """--init gives any k-means-based method the act-aware init (the bench's --init act-aware rows);
    the config is named by its switches, so vq4dit-ste + act-aware is saved as vq4dit-ste-aa."""
    from vq4dit.__main__ import config_from_args
    parse = build_parser().parse_args

    def cfg(*a):
        return config_from_args(parse(["quantize", "--out", "o", *a]))
    assert cfg().method == "vq4dit-ste-aa" and cfg().activation_aware           # the default
    assert cfg("--method", "vq4dit").activation_aware is False                   # the paper: plain k-means
    c = cfg("--method", "codebook-only", "--init", "act-aware")
    assert c.activation_aware and c.method == "codebook-only+activation_aware"
    assert cfg("--method", "vq4dit-ste", "--init", "act-aware").method == "vq4dit-ste-aa"
    c = cfg("--method", "vq4dit-ste-aa", "--init", "kmeans")
    assert not c.activation_aware and c.method == "vq4dit-ste"


def test_cli_until_hard_is_a_budget_flag_not_a_method_change():
    """--until-hard / --max-steps set the stop rule and keep the method's name (a budget, like
    --iterations); without them runs end at the planned steps; a method without calibration refuses them."""
    from vq4dit.__main__ import _unused_flags, config_from_args
    parse = build_parser().parse_args
    c = config_from_args(parse(["quantize", "--out", "o", "--method", "vq4dit", "--until-hard", "--max-steps", "900"]))
    assert c.calib.until_hard and c.calib.step_cap == 900 and c.method == "vq4dit"
    c = config_from_args(parse(["quantize", "--out", "o", "--method", "vq4dit"]))
    assert not c.calib.until_hard and c.calib.step_cap == c.calib.total_steps
    assert _unused_flags(parse(["quantize", "--out", "o", "--method", "kmeans", "--until-hard"])) == ["until_hard"]


def test_cli_quantize_then_sample(tiny_dit_dir, tmp_path, capsys):
    out = tmp_path / "w3"
    rc = main(["quantize", "--model", str(tiny_dit_dir), "--bits", "3", "--method", "vq4dit", "--out", str(out),
               "--iterations", "1", "--sampling-steps", "4", "--kmeans-iters", "5", "--device", "cpu"])
    assert rc == 0
    assert (out / "model.safetensors").is_file() and (out / "trace" / "steps.csv").is_file()
    assert main(["quantize", "--model", str(tiny_dit_dir), "--out", str(out), "--method", "kmeans"]) == 2
    assert "already exists" in capsys.readouterr().err
    rc = main(["sample", "--model", str(out), "--labels", "1", "2", "--out", str(tmp_path / "g.png"), "--steps", "3"])
    assert rc == 0 and (tmp_path / "g.png").stat().st_size > 100
    # the cached runtime (--cache-weights) draws the same picture as the default compact one
    rc = main(["sample", "--model", str(out), "--labels", "1", "2", "--out", str(tmp_path / "c.png"), "--steps", "3",
               "--cache-weights"])
    assert rc == 0 and (tmp_path / "c.png").read_bytes() == (tmp_path / "g.png").read_bytes()
    assert main(["sample", "--model", str(out), "--labels", "12", "--out", str(tmp_path / "h.png")]) == 2
    assert main(["quantize", "--model", str(tmp_path / "missing"), "--out", str(tmp_path / "o")]) == 2
    assert "does not exist" in capsys.readouterr().err
