"""Loading, library level: no pickle by any route, strict configs and schedulers, sizes checked
against the weights before anything is allocated."""
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from vq4dit.io import load_dit, load_vae


def _shard_as_pickle(tr: Path, shard_name="diffusion_pytorch_model-00001-of-00001.bin"):
    """Replace the transformer's safetensors file by an index that maps every weight to a pickle shard."""
    st = tr / "diffusion_pytorch_model.safetensors"
    sd = load_file(st)
    torch.save(sd, tr / shard_name)
    index = {"metadata": {}, "weight_map": {k: shard_name for k in sd}}
    (tr / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps(index))
    return st, sd


@pytest.fixture
def no_torch_load(monkeypatch):
    calls = []
    real = torch.load

    def spy(*a, **k):
        calls.append(a)
        return real(*a, **k)
    monkeypatch.setattr(torch, "load", spy)
    return calls


# -- item 3: only .safetensors files are ever read --------------------------------------------

def test_safetensors_index_pointing_at_pickle_is_refused(tiny_dit_dir, no_torch_load):
    tr = tiny_dit_dir / "transformer"
    st, _ = _shard_as_pickle(tr)
    st.unlink()
    # a stray safetensors file keeps the "is there any .safetensors" check happy
    save_file({"x": torch.zeros(1)}, tr / "unrelated.safetensors")
    with pytest.raises(ValueError, match=r"index.json.*\.bin.*only \.safetensors"):
        load_dit(tiny_dit_dir)
    assert no_torch_load == []


def test_index_next_to_a_valid_file_is_still_checked(tiny_dit_dir, no_torch_load):
    tr = tiny_dit_dir / "transformer"
    _shard_as_pickle(tr, "weights.pt")                  # the .safetensors file is still there
    with pytest.raises(ValueError, match="weights.pt"):
        load_dit(tiny_dit_dir)
    assert no_torch_load == []


@pytest.mark.parametrize("shard", ["../outside.safetensors", "/etc/x.safetensors", "sub/../../a.safetensors",
                                   "model.gguf", "missing.safetensors", 7])
def test_index_shards_must_be_safetensors_files_in_the_folder(tiny_dit_dir, shard):
    tr = tiny_dit_dir / "transformer"
    (tiny_dit_dir / "outside.safetensors").write_bytes(b"")
    sd = load_file(tr / "diffusion_pytorch_model.safetensors")
    (tr / "diffusion_pytorch_model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {k: shard for k in sd}}))
    with pytest.raises(ValueError, match="index.json"):
        load_dit(tiny_dit_dir)


@pytest.mark.parametrize("text", ["[1, 2]", "{not json", '{"weight_map": [1]}', "[" * 5000 + "]" * 5000])
def test_bad_index_json_is_one_clear_error(tiny_dit_dir, text):
    tr = tiny_dit_dir / "transformer"
    (tr / "diffusion_pytorch_model.safetensors.index.json").write_text(text)
    with pytest.raises(ValueError, match="diffusion_pytorch_model.safetensors.index.json"):
        load_dit(tiny_dit_dir)


def test_no_route_calls_torch_load(tiny_dit_dir, monkeypatch):
    """Even if a check were missed, the loaders refuse to unpickle: torch.load raises inside them."""
    from vq4dit.io import loading
    called = []
    monkeypatch.setattr(loading, "check_safetensors", lambda folder: called.append(folder))  # bypass the checks
    monkeypatch.setattr(loading, "check_transformer_config", lambda cfg, folder: None)
    tr = tiny_dit_dir / "transformer"
    st, _ = _shard_as_pickle(tr)
    st.unlink()
    with pytest.raises(ValueError, match="pickle"):
        load_dit(tiny_dit_dir)
    assert called


def test_vae_index_pointing_at_pickle_is_refused(tmp_path, no_torch_load):
    from diffusers import AutoencoderKL
    vae = AutoencoderKL(block_out_channels=(8,), norm_num_groups=4, latent_channels=2, sample_size=8)
    d = tmp_path / "vae"
    vae.save_pretrained(d, safe_serialization=True)
    st, _ = _shard_as_pickle(d)
    st.unlink()
    save_file({"x": torch.zeros(1)}, d / "other.safetensors")
    with pytest.raises(ValueError, match="only .safetensors"):
        load_vae(d)
    assert no_torch_load == []


# -- items 6, 8, 10: configs, weights and schedulers as strict as packed files ----------------------

def _edit(path: Path, **changes):
    cfg = json.loads(path.read_text())
    cfg.update(changes)
    path.write_text(json.dumps(cfg))


@pytest.mark.parametrize("changes,msg", [
    (dict(norm_eps=float("nan")), "norm_eps is nan"),
    (dict(norm_eps=-1.0), "norm_eps must be a number in"),
    (dict(dropout=float("inf")), "dropout is inf"),
    (dict(num_layers=3), "num_layers=3 but the weights hold 2"),
    (dict(num_layers=100000), "num_layers must be an integer in"),
    (dict(num_layers="2"), "num_layers must be an integer"),
    (dict(sample_size=6000), "positional table"),
    (dict(attention_head_dim=16), "pos_embed.proj.weight has shape"),
])
def test_fp_config_is_checked_against_the_weights_before_building(tiny_dit_dir, monkeypatch, changes, msg):
    from diffusers import DiTTransformer2DModel
    built = []
    monkeypatch.setattr(DiTTransformer2DModel, "__init__", lambda *a, **k: built.append(1) or 1 / 0)
    _edit(tiny_dit_dir / "transformer" / "config.json", **changes)
    with pytest.raises(ValueError, match=msg) as e:
        load_dit(tiny_dit_dir)
    assert "config.json" in str(e.value) and built == []          # nothing was allocated


@pytest.mark.parametrize("dtype", [torch.int64, torch.bool])
def test_integer_or_bool_weights_are_refused(tiny_dit_dir, dtype):
    st = tiny_dit_dir / "transformer" / "diffusion_pytorch_model.safetensors"
    sd = load_file(st)
    key = next(k for k in sd if k.endswith("proj_out_2.weight"))
    sd[key] = sd[key].to(dtype)
    save_file(sd, st)
    with pytest.raises(ValueError, match=f"{key} has dtype"):
        load_dit(tiny_dit_dir)


@pytest.mark.parametrize("changes,msg", [
    (dict(beta_end=float("nan")), "beta_end is nan"),
    (dict(beta_end=2.0), "beta_end must be a number in"),
    (dict(beta_end="0.02"), "beta_end must be a number in"),
    (dict(beta_start=0.5, beta_end=0.01), "larger than beta_end"),
    (dict(prediction_type="v_prediction"), "prediction_type 'v_prediction'"),
    (dict(num_train_timesteps=10 ** 9), "num_train_timesteps must be an integer"),
    (dict(num_train_timesteps="1000"), "num_train_timesteps must be an integer"),
    (dict(beta_schedule="cosine-ish"), "beta_schedule 'cosine-ish' is not one of"),
    (dict(trained_betas=[0.1] * 1000), "trained_betas"),
    # found when attacking the fix: these passed through (or failed without the file name)
    (dict(timestep_spacing="bogus"), "timestep_spacing 'bogus'"),
    (dict(set_alpha_to_one="x"), "set_alpha_to_one must be true or false"),
    (dict(rescale_betas_zero_snr="yes"), "rescale_betas_zero_snr must be true or false"),
    (dict(thresholding=True), "thresholding is on"),
])
def test_scheduler_config_is_validated(tiny_dit_dir, changes, msg):
    f = tiny_dit_dir / "scheduler" / "scheduler_config.json"
    _edit(f, **changes)
    with pytest.raises(ValueError, match=msg) as e:
        load_dit(tiny_dit_dir)
    assert str(f) in str(e.value)


@pytest.mark.parametrize("which", ["transformer/config.json", "scheduler/scheduler_config.json"])
@pytest.mark.parametrize("text,msg", [("[1, 2]", "holds a JSON list"), ("{oops", "not valid JSON"),
                                      ("[" * 100000 + "]" * 100000, "nested too deeply|not valid JSON")])
def test_bad_json_files_are_one_line_naming_the_file(tiny_dit_dir, which, text, msg):
    f = tiny_dit_dir / which
    f.write_text(text)
    with pytest.raises(ValueError, match=msg) as e:
        load_dit(tiny_dit_dir)
    assert str(f) in str(e.value) and "\n" not in str(e.value)


def test_packed_sizes_bounded_by_bytes_on_disk(tmp_path):
    from conftest import make_tiny_dit
    from vq4dit import method_config, quantize
    from vq4dit.io import load_quantized, save_quantized
    m = make_tiny_dit()
    quantize(m, method_config("rtn", bits=4), progress=False)
    out = save_quantized(m.eval(), tmp_path / "p")
    cfg = out / "vq4dit_config.json"
    meta = json.loads(cfg.read_text())
    keep = cfg.read_text()
    meta["transformer_config"]["sample_size"] = 65536
    cfg.write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="positional table"):
        load_quantized(out)
    # aliases: every block's fp tensors pointing at one stored tensor, many times over
    meta = json.loads(keep)
    big = "fp/pos_embed.proj.weight"
    meta["aliases"] = {f"fp/x{i}": big for i in range(300000)}  # 300 MB of copies from a 1 KB tensor
    cfg.write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="aliases would expand"):
        load_quantized(out)
