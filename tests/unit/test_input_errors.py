"""Bad input gets a clear, specific error and writes nothing."""
import json

import pytest
import torch

from conftest import make_tiny_dit
from vq4dit import CalibConfig, RTNConfig, VQConfig, method_config, quantize
from vq4dit.io import load_dit

pytestmark = pytest.mark.core


@pytest.mark.parametrize("kw,msg", [
    (dict(bits=5), "unsupported bits=5"),
    (dict(bits=2, k=100, d=4), "power of two"),
    (dict(bits=2, k=256, d=0), "d (sub-vector length)"),
    (dict(bits=2, n_candidates=0), "n_candidates"),
])
def test_bad_vq_config(kw, msg):
    with pytest.raises(ValueError, match=msg.replace("(", r"\(").replace(")", r"\)")):
        VQConfig(**kw)


def test_bad_method_and_rtn_bits_and_calib():
    with pytest.raises(ValueError, match="unknown method 'gptq'"):
        method_config("gptq")
    with pytest.raises(ValueError, match="unsupported bits=5 for RTN"):
        RTNConfig(bits=5)
    with pytest.raises(ValueError, match="iterations must be >= 1"):
        CalibConfig(iterations=0)
    with pytest.raises(ValueError, match="lr_logits"):
        CalibConfig(lr_logits=float("nan"))


def test_d_not_dividing_in_features_names_the_layer():
    m = make_tiny_dit()
    before = {k: v.clone() for k, v in m.state_dict().items()}
    with pytest.raises(ValueError, match=r"layer transformer_blocks\.0\..*in_features=64 is not divisible by d=3"):
        quantize(m, VQConfig(k=16, d=3), progress=False)
    assert all(torch.equal(before[k], v) for k, v in m.state_dict().items())  # untouched


def test_nan_weights_rejected():
    m = make_tiny_dit()
    with torch.no_grad():
        m.transformer_blocks[1].ff.net[2].weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"transformer_blocks\.1\.ff\.net\.2\.weight has 1 NaN/Inf"):
        quantize(m, VQConfig(bits=3), progress=False)


def test_non_dit_model_rejected():
    with pytest.raises(ValueError, match="no target layers"):
        quantize(torch.nn.Sequential(torch.nn.Linear(4, 4)), VQConfig(bits=3), progress=False)


def test_missing_dir(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_dit(tmp_path / "nope")


def test_dir_that_is_not_a_dit(tmp_path):
    (tmp_path / "x.txt").write_text("hi")
    with pytest.raises(ValueError, match="is not a DiT model directory"):
        load_dit(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"_class_name": "UNet2DModel"}))
    with pytest.raises(ValueError, match="not a DiTTransformer2DModel"):
        load_dit(tmp_path)


def test_pickle_weights_refused(tiny_dit_dir):
    tdir = tiny_dit_dir / "transformer"
    (tdir / "diffusion_pytorch_model.safetensors").rename(tdir / "diffusion_pytorch_model.bin")
    with pytest.raises(ValueError, match=r"no \.safetensors weights .*pickle-based files are not loaded"):
        load_dit(tiny_dit_dir)


def test_corrupt_safetensors(tiny_dit_dir):
    f = tiny_dit_dir / "transformer" / "diffusion_pytorch_model.safetensors"
    f.write_bytes(f.read_bytes()[:1000])
    with pytest.raises(ValueError, match="corrupt|could not load"):
        load_dit(tiny_dit_dir)


def test_nan_in_saved_model(tiny_dit_dir):
    from safetensors.torch import load_file, save_file
    f = tiny_dit_dir / "transformer" / "diffusion_pytorch_model.safetensors"
    t = load_file(str(f))
    key = next(k for k in t if k.endswith("attn1.to_q.weight"))
    t[key][0, 0] = float("inf")
    save_file(t, str(f))
    with pytest.raises(ValueError, match="NaN/Inf"):
        load_dit(tiny_dit_dir)
