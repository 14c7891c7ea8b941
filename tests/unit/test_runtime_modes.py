"""Runtime modes of a packed model (issue 20, item 1): compact (indices at packed width, weight
decoded per forward) and cached (decoded weights kept). Memory is counted as the bytes of the
tensors a module holds, not timed or measured by RSS (that is benchmarks/runtime_memory.py)."""
import math

import pytest
import torch

from conftest import make_tiny_dit
from vq4dit import VQConfig, quantize
from vq4dit.io import load_quantized, pack_bits, save_quantized, unpack_bits
from vq4dit.layers import VQLinear, compact_index_dtype, unpack_indices
from vq4dit.size import quantized_layers

pytestmark = pytest.mark.core


def resident_bytes(model) -> int:
    """Bytes of every distinct tensor storage the model holds: parameters, buffers and the VQ
    layers' decoded-weight caches."""
    seen, total = set(), 0
    tensors = list(model.parameters()) + list(model.buffers())
    tensors += [m._cached_weight for m in model.modules()
                if isinstance(m, VQLinear) and getattr(m, "_cached_weight", None) is not None]
    for t in tensors:
        ptr = t.untyped_storage().data_ptr()
        if ptr not in seen:
            seen.add(ptr)
            total += t.untyped_storage().nbytes()
    return total


def _forward(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 1, 8, 8, generator=g)
    with torch.no_grad():
        return model(x, timestep=torch.tensor([10, 700]), class_labels=torch.tensor([1, 3])).sample


@pytest.fixture(scope="module")
def packed_w2(tmp_path_factory):
    """A W2 (k=256, d=4) packed tiny DiT and its FP source."""
    fp = make_tiny_dit(layers=2)
    m = make_tiny_dit(layers=2)
    quantize(m, VQConfig(k=256, d=4, kmeans_iters=2), progress=False)
    out = save_quantized(m, tmp_path_factory.mktemp("rt") / "w2")
    return fp, m, out


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 5, 6, 7, 8])
def test_unpack_indices_reads_the_packed_bit_stream(bits):
    """The per-forward torch decoder reads exactly the file's bit stream (io.pack_bits), at lengths
    that do not fill the last byte."""
    n = 1003
    ids = torch.randint(0, 2 ** bits, (n,), generator=torch.Generator().manual_seed(bits))
    packed = pack_bits(ids, bits)
    assert packed.numel() == math.ceil(n * bits / 8)
    assert torch.equal(unpack_indices(packed, bits, n), ids)
    assert torch.equal(unpack_bits(packed, bits, n), ids)
    assert compact_index_dtype(bits) == torch.uint8 and compact_index_dtype(10) == torch.int16


def test_loaded_packed_model_holds_less_than_fp(packed_w2):
    """Compact: the loaded W2 model holds fewer bytes than the FP model, before and after a forward
    (nothing decoded is kept); cached: after a forward it holds the decoded weights too."""
    fp, _, out = packed_w2
    compact = load_quantized(out).transformer
    cached = load_quantized(out, cache=True).transformer
    fp_bytes = resident_bytes(fp)
    before = resident_bytes(compact)
    _forward(compact)
    _forward(cached)
    assert before < 0.75 * fp_bytes, (before, fp_bytes)
    assert resident_bytes(compact) == before
    for q in quantized_layers(compact).values():  # indices at packed width: one byte per k=256 id
        assert q.compact and q.assignment.dtype == torch.uint8 and q.assignment.numel() == q.num_subvectors
    decoded = sum(q.out_features * q.in_features * 4 for q in quantized_layers(cached).values())
    assert resident_bytes(cached) == before + decoded
    compact._apply(lambda t: t.clone())  # what .to(other device) does to every tensor
    assert resident_bytes(compact) == before  # the index buffer shared with kmeans_assignment stays one


def test_compact_and_cached_outputs_identical_and_see_codebook_changes(packed_w2):
    """Both modes give the in-memory model's outputs bit for bit, and both see a codebook edit."""
    _, m, out = packed_w2
    compact = load_quantized(out).transformer
    cached = load_quantized(out, cache=True).transformer
    ref = _forward(m)
    a, b = _forward(compact), _forward(cached)
    assert torch.equal(a, ref) and torch.equal(b, ref)
    for model in (compact, cached):
        with torch.no_grad():
            next(iter(quantized_layers(model).values())).codebook.mul_(1.5)
    a2, b2 = _forward(compact), _forward(cached)
    assert torch.equal(a2, b2) and not torch.allclose(a2, a)


def test_compact_in_memory_layers_w3_bit_packed_and_set_indices():
    """compact_() on a finalized model (k=64: a 6-bit stream) keeps outputs; set_indices writes in
    the compact storage and the cached weight follows it; a soft layer refuses to compact."""
    m = make_tiny_dit(layers=1)
    quantize(m, VQConfig(k=64, d=2, kmeans_iters=2), progress=False)
    ref = _forward(m)
    layers = quantized_layers(m)
    ids = {n: q.assignment.clone() for n, q in layers.items()}
    for q in layers.values():
        q.compact_(cache_weight=True)
        assert q.assignment.numel() == math.ceil(q.num_subvectors * 6 / 8)
    assert torch.equal(_forward(m), ref)
    name, q = next(iter(layers.items()))
    assert torch.equal(q.indices(), ids[name])
    q.set_indices(torch.roll(ids[name], 1))
    assert torch.equal(q.indices(), torch.roll(ids[name], 1))
    assert not torch.equal(_forward(m), ref)       # the cache was rebuilt from the new indices
    q.set_indices(ids[name])
    assert torch.equal(_forward(m), ref)
    soft = VQLinear(8, 4, 4, 2, bias=False)
    soft.init_soft(torch.randn(4, 8))
    with pytest.raises(ValueError, match="still soft"):
        soft.compact_()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_inference_decodes_in_the_input_dtype_with_the_same_values(dtype, monkeypatch):
    """A hard VQLinear fed bf16/fp16 activations (GPU inference) gathers from the codebook cast to
    that dtype: the output equals the fp32 decode cast down, and no fp32 (out, in) weight is built."""
    from vq4dit import method_config
    torch.manual_seed(0)
    lin = torch.nn.Linear(64, 96)
    q = VQLinear.from_linear(lin, method_config("kmeans", bits=2, kmeans_iters=2), name="blocks.0.ff.net.0.proj")
    q.compact_(cache_weight=False)   # the compact runtime mode (the default of a loaded model)
    x = torch.randn(5, 64).to(dtype)
    want = torch.nn.functional.linear(x, q.weight_hat().detach().to(dtype), q.bias.to(dtype))
    built = []
    orig = VQLinear.weight_hat
    monkeypatch.setattr(VQLinear, "weight_hat", lambda self: built.append(1) or orig(self))
    with torch.no_grad():
        got = q(x)
    assert got.dtype == dtype and torch.equal(got, want)
    assert not built  # the fp32 decode (weight_hat) was not called
    with torch.no_grad():  # fp32 input: the usual fp32 decode
        q(x.float())
    assert built
