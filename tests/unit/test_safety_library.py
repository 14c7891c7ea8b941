"""Issue 11, library level: no silent hub fallback, no silent data loss, no silent wrong results."""
import importlib
import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import make_tiny_dit
from vq4dit import method_config, quantize
from vq4dit import io as vio
from vq4dit import checks, fs
from vq4dit.trace import Trace
from vq4dit.io import load_dit, load_quantized, save_quantized
from vq4dit.config import CalibConfig
from vq4dit.kmeans import kmeans_cached
from vq4dit.sampling import sample


def _packed(tmp_path, name="p", method="kmeans", bits=3):
    m = make_tiny_dit()
    kw = {} if method.startswith("rtn") else dict(kmeans_iters=3)  # method_config refuses ignored settings
    quantize(m, method_config(method, bits=bits, **kw), progress=False)
    m.eval()
    return m, save_quantized(m, tmp_path / name)


def _leftovers(folder: Path):
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


# -- item 2: a missing local path never reaches the Hub ------------------------------------

def test_missing_local_model_is_an_error_without_hub(monkeypatch, tmp_path):
    calls = []
    monkeypatch.setattr(vio.loading, "_load_from_hub", lambda *a: calls.append(a))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError, match="out/w2 does not exist.*hf:out/w2"):
        load_dit("out/w2")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_dit("facebook/DiT-XL-2-256")
    assert calls == []
    load_dit("hf:facebook/DiT-XL-2-256")           # only the explicit form goes to the Hub
    assert calls and calls[0][0] == "facebook/DiT-XL-2-256"
    with pytest.raises(ValueError, match="not a Hub id"):
        load_dit("hf:../etc")


def test_hub_offline_is_honoured(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    with pytest.raises(ValueError, match="HF_HUB_OFFLINE is set"):
        load_dit("hf:nobody/no-such-dit")


# -- item 4: --overwrite only replaces a previous vq4dit output ------------------------------

def test_overwrite_refuses_foreign_dirs_model_and_cwd(tmp_path, monkeypatch, tiny_dit_dir):
    m, out = _packed(tmp_path)
    foreign = tmp_path / "photos"
    foreign.mkdir()
    (foreign / "a.jpg").write_text("x")
    with pytest.raises(FileExistsError, match="not a previous packed vq4dit output"):
        save_quantized(m, foreign, overwrite=True)
    assert (foreign / "a.jpg").read_text() == "x"
    with pytest.raises(FileExistsError, match="input model"):          # the model being quantized
        save_quantized(m, out, overwrite=True, protect=[out])
    with pytest.raises(FileExistsError, match="input model"):          # a parent of the input model
        save_quantized(m, tiny_dit_dir, overwrite=True, protect=[tiny_dit_dir / "transformer"])
    monkeypatch.chdir(out / "scheduler")
    with pytest.raises(FileExistsError, match="working directory"):    # a parent of the cwd
        save_quantized(m, out, overwrite=True)
    assert (out / vio.PACKED_CONFIG).is_file() and (tiny_dit_dir / "transformer" / "config.json").is_file()
    monkeypatch.chdir(tmp_path)
    save_quantized(m, out, overwrite=True)                              # a previous output: replaced
    assert load_quantized(out).transformer is not None


# -- item 5: atomic overwrite, backups restored, temps cleaned ------------------------------

def test_failed_replace_keeps_old_output_and_cleans_up(tmp_path, monkeypatch):
    m, out = _packed(tmp_path)
    (out / "marker-old.txt").write_text("old")
    real = os.replace
    calls = []

    def flaky(src, dst):
        calls.append((Path(src).name, Path(dst).name))
        if len(calls) == 2:  # the tmp -> OUT rename, after OUT went to the backup
            raise OSError("disk full")
        return real(src, dst)

    monkeypatch.setattr(fs.os, "replace", flaky)
    with pytest.raises(ValueError, match="disk full"):  # one line naming OUT (and keeping the old output)
        save_quantized(m, out, overwrite=True)
    monkeypatch.setattr(fs.os, "replace", real)
    assert (out / "marker-old.txt").read_text() == "old"   # old output complete at OUT
    assert load_quantized(out).transformer is not None
    assert _leftovers(tmp_path) == []                       # no .p-tmp*, no backup


def test_crash_between_renames_is_restored_by_next_run(tmp_path):
    m, out = _packed(tmp_path)
    (out / "marker-old.txt").write_text("old")
    os.replace(out, fs.backup_path(out))                # process died right after the first rename
    assert not out.exists()
    with pytest.raises(FileExistsError, match="already exists"):  # next run first restores the backup
        save_quantized(m, out)
    assert (out / "marker-old.txt").read_text() == "old"
    assert _leftovers(tmp_path) == []


def test_failure_while_writing_and_stale_temps_are_cleaned(tmp_path, monkeypatch):
    m, out = _packed(tmp_path)
    stale = tmp_path / ".p-tmp999999999-abc"                # a temp dir of a dead process
    stale.mkdir()

    def boom(tmp):
        raise RuntimeError("failed half way")

    with pytest.raises(RuntimeError, match="half way"):
        save_quantized(m, out, overwrite=True, write_extra=boom)
    assert _leftovers(tmp_path) == []
    assert load_quantized(out).transformer is not None


def test_trace_save_is_atomic_and_only_replaces_traces(tmp_path, monkeypatch):
    tr = Trace(dict(a=1))
    tr.add("steps", dict(step=1, loss=0.5))
    tr.save(tmp_path / "t")
    tr2 = Trace(dict(a=2))
    real = os.replace
    n = []

    def flaky(src, dst):
        n.append(1)
        if len(n) == 2:
            raise OSError("rename failed")
        return real(src, dst)

    monkeypatch.setattr(fs.os, "replace", flaky)
    with pytest.raises(OSError):
        tr2.save(tmp_path / "t")
    monkeypatch.setattr(fs.os, "replace", real)
    assert Trace.load(tmp_path / "t").meta == dict(a=1)
    assert _leftovers(tmp_path) == []
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "x.txt").write_text("keep")
    with pytest.raises(FileExistsError, match="not a previous calibration trace"):
        tr2.save(tmp_path / "docs")
    assert (tmp_path / "docs" / "x.txt").read_text() == "keep"
    tr2.save(tmp_path / "t")
    assert Trace.load(tmp_path / "t").meta == dict(a=2)


# -- item 8: invalid numbers are errors -----------------------------------------------------

@pytest.mark.parametrize("kw,msg", [
    (dict(lambda_r=-1e6), "lambda_r"), (dict(lambda_r=float("nan")), "lambda_r"),
    (dict(lambda_r=float("inf")), "lambda_r"), (dict(lr_logits=1e6), "lr_logits"),
    (dict(lr_codebook=float("nan")), "lr_codebook"), (dict(max_seconds=float("nan")), "max_seconds"),
    (dict(guidance_scale=float("nan")), "guidance_scale"), (dict(iterations=-4), "iterations"),
])
def test_calib_config_rejects_bad_numbers(kw, msg):
    with pytest.raises(ValueError, match=msg):
        CalibConfig(**kw)


@pytest.mark.parametrize("kw,msg", [(dict(num_steps=0), "num_steps"), (dict(num_steps=-1), "num_steps"),
                                    (dict(num_steps=10 ** 9), "num_steps"),
                                    (dict(guidance_scale=float("nan")), "guidance_scale"),
                                    (dict(guidance_scale=float("inf")), "guidance_scale")])
def test_sample_rejects_bad_steps_and_guidance(tiny_dit, kw, msg):
    with pytest.raises(ValueError, match=msg):
        sample(tiny_dit, [1, 2], **{**dict(num_steps=2), **kw})


# -- item 13: sampling in batches: model batch bounded, same images ---------------------------

def test_sample_in_batches_bounds_model_batch(tiny_dit):
    labels = [0, 1, 2, 3, 4, 5, 6]
    full = sample(tiny_dit, labels, num_steps=2, seed=3)
    seen = []
    h = tiny_dit.pos_embed.register_forward_hook(lambda m, i, o: seen.append(i[0].shape[0]))
    batched = sample(tiny_dit, labels, num_steps=2, seed=3, batch_size=3)
    h.remove()
    assert max(seen) == 6          # 3 labels x 2 (CFG), never 14
    assert torch.allclose(full, batched, atol=1e-5)


# -- item 9: weights that do not match the config ---------------------------------------------

@pytest.mark.parametrize("layers,msg", [(3, "num_layers=3 but the weights hold 2"),
                                        (1, "num_layers=1 but the weights hold 2")])
def test_config_weight_mismatch_is_an_error(tiny_dit_dir, layers, msg):
    f = tiny_dit_dir / "transformer" / "config.json"
    cfg = json.loads(f.read_text())
    cfg["num_layers"] = layers
    f.write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=f"config.json: {msg}"):  # found from the headers, before building
        load_dit(tiny_dit_dir)


@pytest.mark.parametrize("edit,msg", [("drop", "missing"), ("add", "unexpected")])
def test_missing_or_unexpected_weights_are_an_error(tiny_dit_dir, edit, msg):
    st = tiny_dit_dir / "transformer" / "diffusion_pytorch_model.safetensors"
    sd = load_file(st)
    if edit == "drop":
        sd.pop("proj_out_2.weight")
    else:
        sd["extra.weight"] = torch.zeros(2)
    save_file(sd, st)
    with pytest.raises(ValueError, match=f"do not match its config.json.*{msg}"):
        load_dit(tiny_dit_dir)


# -- item 10: k-means cache entries are verified ----------------------------------------------

def test_corrupt_kmeans_cache_entry_is_recomputed(tmp_path, monkeypatch):
    q = importlib.import_module("vq4dit.kmeans")  # the module (vq4dit.kmeans is also the function)
    monkeypatch.setenv("VQ4DIT_CACHE", str(tmp_path / "cache"))
    x = torch.randn(600, 4, generator=torch.Generator().manual_seed(0))
    c0, a0 = kmeans_cached(x, 16, 10, 0)
    (entry,) = list((tmp_path / "cache" / "kmeans").glob("*.safetensors"))
    calls = []
    real = q.kmeans
    monkeypatch.setattr(q, "kmeans", lambda *a, **k: calls.append(1) or real(*a, **k))
    c1, a1 = kmeans_cached(x, 16, 10, 0)                       # valid entry: a cache hit
    assert calls == [] and torch.equal(c1, c0) and torch.equal(a1, a0)
    from safetensors import safe_open
    with safe_open(str(entry), framework="pt") as fh:
        meta = fh.metadata()
    t = load_file(str(entry))
    bad_entries = [
        ({"codebook": t["codebook"] + 0.5, "assignment": t["assignment"]}, meta),          # content changed
        ({"codebook": t["codebook"], "assignment": t["assignment"]}, None),                # no checksum
        ({"codebook": t["codebook"][:8].contiguous(), "assignment": t["assignment"]}, meta),  # wrong shape
        ({"codebook": torch.full_like(t["codebook"], float("nan")), "assignment": t["assignment"]}, meta),
    ]
    for tensors, md in bad_entries:
        save_file(tensors, str(entry), metadata=md)
        calls.clear()
        c2, a2 = kmeans_cached(x, 16, 10, 0)
        assert calls == [1]                                    # recomputed
        assert torch.equal(c2, c0) and torch.equal(a2, a0)
    c3, _ = kmeans_cached(x, 16, 10, 0)                          # and the entry was rewritten
    assert torch.equal(c3, c0)


# -- item 11: the packed loader validates everything -----------------------------------------

def _tamper(out, tensors=None, meta=None):
    t = load_file(str(out / "model.safetensors"))
    if tensors:
        tensors(t)
        save_file({k: v.contiguous() for k, v in t.items()}, str(out / "model.safetensors"))
    if meta:
        m = json.loads((out / "vq4dit_config.json").read_text())
        meta(m)
        (out / "vq4dit_config.json").write_text(json.dumps(m))


def _first(t, suffix):
    return next(k for k in sorted(t) if k.endswith(suffix))


def _set(d, key, value):
    d[key] = value


def _layer(m):
    return m["layers"][sorted(m["layers"])[0]]


TAMPERS = [
    ("nan codebook", lambda t: t[_first(t, "/codebook")].fill_(float("nan")), None, "NaN"),
    ("short codebook", lambda t: t.__setitem__(_first(t, "/codebook"), t[_first(t, "/codebook")][:3]), None,
     "codebook has shape"),
    ("float indices", lambda t: t.__setitem__(_first(t, "/indices"), t[_first(t, "/indices")].float()), None,
     "dtype"),
    ("nan fp weight", lambda t: t["fp/proj_out_1.weight"].fill_(float("nan")), None, "NaN"),
    ("extra tensor", lambda t: t.__setitem__("fp/evil", torch.zeros(2)), None, "unexpected tensors"),
    ("num_layers huge", None, lambda m: _set(m["transformer_config"], "num_layers", 1000000), "num_layers"),
    ("num_layers str", None, lambda m: _set(m["transformer_config"], "num_layers", "2"), "num_layers"),
    ("heads huge", None, lambda m: _set(m["transformer_config"], "num_attention_heads", 4096), "pos_embed"),
    ("k str", None, lambda m: _set(_layer(m), "k", "abc"), "k must be"),
    ("k smaller", None, lambda m: _set(_layer(m), "k", 4), "shape"),
    ("k not pow2", None, lambda m: _set(_layer(m), "k", 63), "power of two"),
    ("shape wrong", None, lambda m: _set(_layer(m), "shape", [1, "x"]), "shape"),
    ("kind", None, lambda m: _set(_layer(m), "kind", "zip"), "kind"),
    ("layers str", None, lambda m: _set(m, "layers", "oops"), "layers"),
    ("layer name", None, lambda m: m["layers"].__setitem__("pos_embed", _layer(m)), "not a Linear"),
    ("config list", None, lambda m: _set(m, "transformer_config", [1]), "transformer_config"),
]


@pytest.mark.parametrize("name,tensors,meta,msg", TAMPERS, ids=[t[0] for t in TAMPERS])
def test_packed_loader_validates_fields_and_tensors(tmp_path, name, tensors, meta, msg):
    _, out = _packed(tmp_path)
    _tamper(out, tensors, meta)
    with pytest.raises(ValueError, match=msg):
        load_quantized(out)


def test_packed_loader_validates_rtn(tmp_path):
    _, out = _packed(tmp_path, method="rtn", bits=2)
    _tamper(out, lambda t: t[_first(t, "/scale")].fill_(float("inf")))
    with pytest.raises(ValueError, match="NaN/Inf"):
        load_quantized(out)
    _, out = _packed(tmp_path, name="r2", method="rtn", bits=2)
    _tamper(out, meta=lambda m: _set(_layer(m), "bits", 7))
    with pytest.raises(ValueError, match="bits must be one of"):
        load_quantized(out)


# -- item 14: devices and outputs checked before computing -----------------------------------

def test_device_and_writability_checks(tmp_path):
    with pytest.raises(ValueError, match="unknown device 'banana'"):
        checks.resolve_device("banana")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            checks.resolve_device("cuda")
    assert checks.resolve_device("cpu") == torch.device("cpu")
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    with pytest.raises(PermissionError, match="cannot write"):      # parent is a file: unwritable
        vio.check_output(blocker / "out", overwrite=False)
    assert blocker.read_text() == "not a directory"
