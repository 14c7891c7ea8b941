"""A randomly initialised pipeline laid out exactly like the Hub's `facebook/DiT-XL-2-256`.

The real weights cannot be downloaded here, so scale tests run on this stand-in: the same
directory layout and configs (`model_index.json` of a `DiTPipeline`; `transformer/` whose config
names the legacy `Transformer2DModel`; the SD `vae/`; `scheduler/`), safetensors weights, and, as
in the converted checkpoint, every block's timestep/label embedder an identical copy.

    python -m vq4dit.testbed write-xl out/dit-xl-shaped              # 28 blocks, 675M parameters
    python -m vq4dit.testbed write-xl out/dit-xl-2blocks --blocks 2   # XL-wide, 2 blocks (tests)
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

# transformer/config.json of facebook/DiT-XL-2-256 (diffusers' conversion of DiT-XL/2)
XL_TRANSFORMER_CONFIG = dict(
    activation_fn="gelu-approximate", attention_bias=True, attention_head_dim=72, cross_attention_dim=None,
    dropout=0.0, in_channels=4, norm_elementwise_affine=False, norm_num_groups=32, norm_type="ada_norm_zero",
    num_attention_heads=16, num_embeds_ada_norm=1000, num_layers=28, num_vector_embeds=None,
    only_cross_attention=False, out_channels=8, patch_size=2, sample_size=32, upcast_attention=False,
    use_linear_projection=False,
)
# vae/config.json: the Stable Diffusion VAE (sd-vae-ft-ema), latent 4 x 32 x 32 for 256 x 256 images
XL_VAE_CONFIG = dict(
    act_fn="silu", block_out_channels=[128, 256, 512, 512], down_block_types=["DownEncoderBlock2D"] * 4,
    in_channels=3, latent_channels=4, layers_per_block=2, norm_num_groups=32, out_channels=3, sample_size=256,
    scaling_factor=0.18215, up_block_types=["UpDecoderBlock2D"] * 4,
)
XL_SCHEDULER_CONFIG = dict(
    _class_name="DDIMScheduler", beta_end=0.02, beta_schedule="linear", beta_start=0.0001, clip_sample=False,
    num_train_timesteps=1000, set_alpha_to_one=True, steps_offset=0, trained_betas=None,
)
_DIT_ARGS = ("activation_fn", "attention_bias", "attention_head_dim", "dropout", "in_channels",
             "norm_elementwise_affine", "norm_type", "num_attention_heads", "num_embeds_ada_norm", "num_layers",
             "out_channels", "patch_size", "sample_size", "upcast_attention")


def make_xl_transformer(num_layers: int = 28, seed: int = 0):
    """The XL/2 transformer with random weights: diffusers' default init (uniform, cheap), then
    block 0's timestep/label embedder copied into every block, as in the converted checkpoint."""
    from diffusers import DiTTransformer2DModel
    torch.manual_seed(seed)
    cfg = dict(XL_TRANSFORMER_CONFIG, num_layers=num_layers)
    model = DiTTransformer2DModel(**{k: cfg[k] for k in _DIT_ARGS})
    with torch.no_grad():
        first = model.transformer_blocks[0].norm1.emb.state_dict()
        for block in model.transformer_blocks[1:]:
            block.norm1.emb.load_state_dict(first)
    return model.eval()


def write_xl_pipeline(out, num_layers: int = 28, seed: int = 0, overwrite: bool = False) -> Path:
    """Write the XL-shaped pipeline to `out` (built in a temp dir next to it, then renamed).
    Peak memory is about twice the transformer's fp32 size (2.7 GB for 28 blocks)."""
    from diffusers import AutoencoderKL

    from ..fs import replace_dir, temp_dir_for
    out = Path(out)
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} already exists (use --overwrite)")
    if out.exists() and not (out / "model_index.json").is_file():
        raise ValueError(f"{out} exists and is not a pipeline written by write-xl: not replacing it")
    tmp = temp_dir_for(out)
    try:
        model = make_xl_transformer(num_layers, seed)
        model.save_pretrained(tmp / "transformer", safe_serialization=True)
        del model
        # the Hub config: legacy class name and the fields the old Transformer2DModel carried
        cfg_file = tmp / "transformer" / "config.json"
        saved = json.loads(cfg_file.read_text())
        cfg = dict(XL_TRANSFORMER_CONFIG, num_layers=num_layers, _class_name="Transformer2DModel",
                   _diffusers_version=saved.get("_diffusers_version"))
        cfg_file.write_text(json.dumps(dict(sorted(cfg.items())), indent=2))
        torch.manual_seed(seed + 1)
        AutoencoderKL(**XL_VAE_CONFIG).eval().save_pretrained(tmp / "vae", safe_serialization=True)
        (tmp / "scheduler").mkdir()
        (tmp / "scheduler" / "scheduler_config.json").write_text(json.dumps(XL_SCHEDULER_CONFIG, indent=2))
        index = dict(_class_name="DiTPipeline", _diffusers_version=saved.get("_diffusers_version"),
                     scheduler=["diffusers", "DDIMScheduler"], transformer=["diffusers", "Transformer2DModel"],
                     vae=["diffusers", "AutoencoderKL"],
                     id2label={str(i): f"class {i}" for i in range(XL_TRANSFORMER_CONFIG["num_embeds_ada_norm"])})
        (tmp / "model_index.json").write_text(json.dumps(index, indent=2))
        replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
