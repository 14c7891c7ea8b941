"""Embedded test bed: sklearn digits, a tiny class-conditional DiT and a digit classifier.

Everything here runs on a CPU in minutes, so the quantization code can be exercised end to
end without downloading DiT-XL/2. Not part of the quantization method itself.

  data.py        `load_digit_images`: the 1,797 sklearn 8x8 digits, upsampled to 16x16 in [-1, 1]
  model.py       `make_digits_dit` (a diffusers DiTTransformer2DModel, hidden 256, 6 blocks) and
                 `train_dit`: resumable DDPM training with label dropout for guidance
  classifier.py  `DigitClassifier` and `DigitsEvaluator`: accuracy and FD-digits of samples
  __main__.py    the command line:

  python -m vq4dit.testbed train-classifier
  python -m vq4dit.testbed train-dit --out assets/digits-dit --steps N --ckpt-dir checkpoints/digits-dit
  python -m vq4dit.testbed train-dit --out assets/digits-dit --ckpt-dir checkpoints/digits-dit --export-from-checkpoint
  python -m vq4dit.testbed eval-dit --model assets/digits-dit --grid out/grid.png
"""
from __future__ import annotations

import os
import sys
from pathlib import Path


def assets_dir() -> Path:
    """The shipped models: $VQ4DIT_ASSETS, else `assets/` of a source checkout (or editable install),
    else the copy a regular `pip install` puts under `<prefix>/share/vq4dit/assets`."""
    env = os.environ.get("VQ4DIT_ASSETS")
    if env:
        return Path(env)
    checkout = Path(__file__).resolve().parents[2] / "assets"
    if (checkout / "digits-dit").is_dir():
        return checkout
    installed = Path(sys.prefix) / "share" / "vq4dit" / "assets"
    return installed if (installed / "digits-dit").is_dir() else checkout


ASSETS_DIR = assets_dir()
DIGITS_DIT_DIR = ASSETS_DIR / "digits-dit"  # diffusers-style dir: transformer/ + scheduler/
CLASSIFIER_DIR = ASSETS_DIR / "digit-classifier"  # model.safetensors + config.json

NUM_CLASSES = 10
IMAGE_SIZE = 16
