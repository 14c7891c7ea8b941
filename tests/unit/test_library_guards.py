"""Library guards: one number check, atomic file writes, the config a packed model records,
the trace's record replacement, and the runner's single config path."""
import argparse
import json
import math

import numpy as np
import pytest
import torch

from vq4dit import RTNConfig, VQConfig, method_config, quantize
from vq4dit.checks import bounded_float, bounded_int, check_number, resolve_device
from vq4dit.config import CalibConfig, build_config, config_from_dict
from vq4dit.fs import atomic_file
from vq4dit.io import PACKED_CONFIG, load_quantized, save_quantized
from vq4dit.layers import VQLinear
from vq4dit.runner import run_method
from vq4dit.size import PackedLayer, storage_bits
from vq4dit.trace import Trace

pytestmark = pytest.mark.core


# -- check_number: the one validator --------------------------------------------------------

@pytest.mark.parametrize("value,kw,msg", [
    (True, dict(integer=True), "x must be an integer, got True"),
    (2.5, dict(integer=True), "x must be an integer, got 2.5"),
    ("3", dict(), "x must be a number, got '3'"),
    (float("nan"), dict(), "x must be a finite number, got nan"),
    (float("inf"), dict(lo=0), "x must be a finite number, got inf"),
    (0, dict(lo=1, integer=True), "x must be >= 1, got 0"),
    (11.0, dict(hi=10), "x must be <= 10, got 11.0"),
    (-1, dict(lo=0, hi=1), r"x must be in \[0, 1\], got -1"),
])
def test_check_number_refuses_with_the_name_and_value(value, kw, msg):
    with pytest.raises(ValueError, match=f"^{msg}$"):
        check_number("x", value, **kw)


def test_check_number_returns_good_values_and_accepts_numpy_numbers():
    assert check_number("x", 3, 1, 10, integer=True) == 3
    assert check_number("x", np.int64(4), 1, 10, integer=True) == 4
    assert check_number("x", 0.5, 0, 1) == 0.5 and check_number("x", 1, 0, 1) == 1   # bounds inclusive


def test_argparse_types_use_the_same_check():
    assert bounded_int(1, 5)("3") == 3 and bounded_float(0)("0.25") == 0.25
    for parse, text, msg in [(bounded_int(1, 5), "6", "must be in [1, 5], got '6'"),
                             (bounded_float(0), "nan", "must be a finite number, got 'nan'"),
                             (bounded_int(1), "x", "expected an integer, got 'x'")]:
        with pytest.raises(argparse.ArgumentTypeError) as e:
            parse(text)
        assert str(e.value) == msg


def test_configs_check_their_numbers():
    with pytest.raises(ValueError, match="CalibConfig.iterations must be an integer"):
        CalibConfig(iterations=2.5)
    with pytest.raises(ValueError, match="CalibConfig.lambda_r must be a finite number"):
        CalibConfig(lambda_r=math.nan)
    with pytest.raises(ValueError, match="d \\(sub-vector length\\) must be in \\[1, 64\\]"):
        VQConfig(k=16, d=65)
    with pytest.raises(ValueError, match="k must be an integer"):
        VQConfig(k=True, d=4)
    with pytest.raises(ValueError, match="unsupported bits=True for RTN"):
        RTNConfig(bits=True)


def test_one_device_resolver():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device(None).type in ("cpu", "cuda")
    with pytest.raises(ValueError, match="unknown device 'banana'"):
        resolve_device("banana")


# -- atomic_file ------------------------------------------------------------------------------

def test_atomic_file_replaces_or_leaves_the_old_file(tmp_path):
    f = tmp_path / "a.txt"
    f.write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_file(f) as tmp:
            tmp.write_text("half")
            raise RuntimeError("died mid-write")
    assert f.read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["a.txt"]
    with atomic_file(f) as tmp:
        assert tmp.parent == f.parent and tmp != f
        tmp.write_text("new")
    assert f.read_text() == "new" and sorted(p.name for p in tmp_path.iterdir()) == ["a.txt"]


def test_atomic_file_without_overwrite_never_replaces_a_file_that_appeared(tmp_path):
    """No-clobber (`sample --out` without --overwrite, via viz.save_grid): a file that appears while the
    temp file is written stays as it is, and no temp file is left; a new name is written whole."""
    from vq4dit.viz import save_grid
    f = tmp_path / "g.png"
    with pytest.raises(FileExistsError):
        with atomic_file(f, overwrite=False) as tmp:
            tmp.write_text("ours")
            f.write_text("theirs")   # appeared meanwhile
    assert f.read_text() == "theirs" and sorted(p.name for p in tmp_path.iterdir()) == ["g.png"]
    with pytest.raises(FileExistsError, match="appeared while sampling"):
        save_grid(torch.zeros(2, 1, 8, 8), f, overwrite=False)
    assert f.read_text() == "theirs" and sorted(p.name for p in tmp_path.iterdir()) == ["g.png"]
    save_grid(torch.zeros(2, 1, 8, 8), tmp_path / "new.png", overwrite=False)
    assert (tmp_path / "new.png").read_bytes()[:4] == b"\x89PNG" and len(list(tmp_path.iterdir())) == 2


# -- the config a packed model records -------------------------------------------------------

def _quantized(tiny_dit, **calib):
    cfg = method_config("vq4dit", bits=2, kmeans_iters=3,
                        calib=dict(iterations=1, num_sampling_steps=2, labels_per_iteration=2, **calib))
    quantize(tiny_dit, cfg, progress=False)
    return tiny_dit, cfg


def test_packed_model_restores_its_config_with_calibration(tiny_dit, tmp_path):
    m, cfg = _quantized(tiny_dit, lambda_r=0.5)
    assert m.vq4dit_config is cfg
    back = load_quantized(save_quantized(m, tmp_path / "p")).transformer
    assert isinstance(back.vq4dit_config, VQConfig) and back.vq4dit_config.to_dict() == cfg.to_dict()
    assert back.vq4dit_config.calib.lambda_r == 0.5


def test_save_quantized_records_an_explicit_config(tiny_dit, tmp_path):
    m, _ = _quantized(tiny_dit)
    other = method_config("kmeans", bits=2, kmeans_iters=7)
    out = save_quantized(m, tmp_path / "p", config=other)
    meta = json.loads((out / PACKED_CONFIG).read_text())
    assert meta["method"] == "kmeans" and meta["config"]["kmeans_iters"] == 7 and meta["config"]["calib"] is None


def test_unreadable_saved_config_is_a_warning_naming_the_file(tiny_dit, tmp_path):
    m, _ = _quantized(tiny_dit)
    out = save_quantized(m, tmp_path / "p")
    meta = json.loads((out / PACKED_CONFIG).read_text())
    meta["config"]["calib"]["no_such_setting"] = 1
    (out / PACKED_CONFIG).write_text(json.dumps(meta))
    with pytest.warns(UserWarning, match=f"{PACKED_CONFIG}: its method config could not be rebuilt.*no_such_setting"):
        back = load_quantized(out).transformer
    assert back.vq4dit_config is None      # the weights still load
    assert torch.equal(back.transformer_blocks[0].attn1.to_q.assignment, m.transformer_blocks[0].attn1.to_q.assignment)


def test_config_from_dict_round_trips():
    for cfg in (method_config("vq4dit", bits=3, calib=dict(iterations=2)), method_config("rtn-tensor", bits=4)):
        assert config_from_dict(cfg.to_dict()) == cfg


def test_packed_format_refuses_an_unknown_layer_kind(tiny_dit, tmp_path):
    class Other(PackedLayer):
        in_features, out_features, bias = 4, 4, None

        def storage_bits(self):
            return dict(bits_per_weight=1.0)

    m, _ = _quantized(tiny_dit)
    m.transformer_blocks[0].ff.net[2] = Other()
    with pytest.raises(TypeError, match="is a Other: the packed format stores VQLinear and RTNLinear only"):
        save_quantized(m, tmp_path / "p")
    assert not (tmp_path / "p").exists()
    assert storage_bits(Other()) == dict(bits_per_weight=1.0)
    with pytest.raises(TypeError, match="not a quantized layer: Linear"):
        storage_bits(torch.nn.Linear(2, 2))


def test_repick_on_a_soft_layer_is_a_value_error():
    q = VQLinear(8, 4, k=4, d=2, name="blk.q")
    q.init_soft(torch.randn(4, 8))
    with pytest.raises(ValueError, match="layer blk.q: repick runs on hard layers"):
        q.repick(torch.randn(4, 8), torch.eye(8))


# -- the trace's final record -------------------------------------------------------------------

def test_trace_drop_layer_records_removes_only_that_step():
    tr = Trace()
    for step in (0, 5):
        tr.add("layers", dict(step=step, layer="a", frozen_frac=step / 10))
        tr.add("ratios", dict(step=step, layer="a", sample=0, ratio_nearest=1.0, codeword=0))
    assert list(tr.layers["step"]) == [0, 5]          # frames are built ...
    tr.drop_layer_records(5)
    assert list(tr.layers["step"]) == [0] and list(tr.ratios["step"]) == [0]   # ... and rebuilt


def test_calibration_trace_ends_with_one_final_record_per_layer(tiny_dit):
    cfg = method_config("vq4dit", bits=2, kmeans_iters=3,
                        calib=dict(iterations=1, num_sampling_steps=3, labels_per_iteration=2, trace_every=1))
    tr = quantize(tiny_dit, cfg, progress=False)
    last = tr.layers[tr.layers["step"] == 3]
    assert len(last) == len(tr.layer_names) and last["hard"].all()
    assert tr.steps_done == 3 and list(tr.steps["step"]) == [1, 2, 3]


# -- the runner builds its config through build_config --------------------------------------------

def test_run_method_uses_the_models_recipe_by_default(tiny_dit):
    res = run_method(tiny_dit, "kmeans", bits=2, vq=dict(kmeans_iters=2), measure_block_mse=False, progress=False)
    want = build_config("kmeans", bits=2, recipe="auto", model=tiny_dit, kmeans_iters=2)
    assert res.config == want and res.config.kmeans_points_per_codeword is None   # tiny model: "small" recipe
    ref = run_method(tiny_dit, "kmeans", bits=2, vq=dict(kmeans_iters=2), recipe="reference",
                     measure_block_mse=False, progress=False)
    assert ref.config.kmeans_points_per_codeword == 256
    given = run_method(tiny_dit, config=method_config("rtn", bits=3), measure_block_mse=False, progress=False)
    assert given.method == "rtn" and given.bits == 3
    with pytest.raises(ValueError, match="needs a method name or a built config"):
        run_method(tiny_dit)
