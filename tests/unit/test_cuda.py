"""CUDA-only checks (issue 20): the compact runtime and the bf16 calibration path on a GPU. They skip
without one; benchmarks/gpu_check.sh runs them on the device machine."""
import copy

import pytest
import torch

from conftest import make_tiny_dit
from vq4dit import VQConfig, method_config, quantize
from vq4dit.io import load_quantized, save_quantized
from vq4dit.size import quantized_layers

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _forward(model, device):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 1, 8, 8, generator=g).to(device)
    with torch.no_grad():
        return model(x, timestep=torch.tensor([10, 700], device=device),
                     class_labels=torch.tensor([1, 3], device=device)).sample


def test_compact_and_cached_runtime_agree_on_cuda(tmp_path):
    m = make_tiny_dit()
    quantize(m, VQConfig(k=256, d=4, kmeans_iters=2), progress=False)
    out = save_quantized(m, tmp_path / "w2")
    compact = load_quantized(out, device="cuda").transformer
    cached = load_quantized(out, device="cuda", cache=True).transformer
    q = next(iter(quantized_layers(compact).values()))
    assert q.assignment.is_cuda and q.assignment.dtype == torch.uint8
    a, b = _forward(compact, "cuda"), _forward(cached, "cuda")
    assert torch.equal(a, b)
    torch.testing.assert_close(a.cpu(), _forward(m, "cpu"), rtol=1e-3, atol=1e-4)


def test_bf16_calibration_on_cuda_keeps_fp32_parameters():
    teacher = make_tiny_dit().cuda()
    student = copy.deepcopy(teacher)
    cfg = method_config("vq4dit", bits=2, kmeans_iters=2,
                        calib=dict(iterations=1, num_sampling_steps=3, device="cuda", autocast="bf16"))
    tr = quantize(student, cfg, teacher=teacher, progress=False)
    assert tr.meta["steps_done"] == 3 and all(torch.isfinite(torch.tensor(tr.steps.loss.tolist())))
    for q in quantized_layers(student).values():
        assert q.codebook.dtype == torch.float32 and q.codebook.is_cuda
