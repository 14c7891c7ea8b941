"""Metrics: Frechet distance, PSNR, FD-digits on the embedded classifier's features."""
import numpy as np
import pytest
import torch

from vq4dit.metrics import frechet_distance, psnr


@pytest.mark.core
def test_frechet_distance_basics():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(500, 8))
    b = rng.normal(size=(500, 8))
    shifted = b + 3.0
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-6)
    assert frechet_distance(a, b) < 0.5
    assert frechet_distance(a, shifted) == pytest.approx(9 * 8, rel=0.1)  # |mu diff|^2 = 8 * 3^2
    with pytest.raises(ValueError, match="same F"):
        frechet_distance(a, rng.normal(size=(10, 3)))


@pytest.mark.core
def test_psnr():
    x = torch.rand(4, 1, 16, 16) * 2 - 1
    assert torch.isinf(psnr(x, x)).all() or (psnr(x, x) > 100).all()
    noisy = x + 0.1 * torch.randn_like(x)
    p = psnr(noisy, x)
    assert p.shape == (4,) and ((p > 20) & (p < 40)).all()  # 10*log10(4/0.01) = 26 dB


def test_fd_digits_real_vs_real_small_and_noise_large():
    from vq4dit.testbed.classifier import DigitsEvaluator
    from vq4dit.testbed.data import load_digit_images
    ev = DigitsEvaluator()
    test, _ = load_digit_images("test")
    train, _ = load_digit_images("train")
    fd_real = frechet_distance(ev.features(test), ev.features(train))
    noise = torch.randn(300, 1, 16, 16).clamp(-1, 1)
    fd_noise = frechet_distance(ev.features(noise), ev.real_features)
    assert fd_real < 0.05 * fd_noise, (fd_real, fd_noise)
