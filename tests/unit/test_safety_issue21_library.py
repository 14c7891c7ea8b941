"""Issue 21, library level: no pickle by any route, strict configs and schedulers, sizes checked
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
