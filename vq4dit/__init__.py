"""vq4dit: VQ4DiT post-training vector quantization for diffusers Diffusion Transformers.

    from vq4dit import quantize, method_config
    trace = quantize(transformer, method_config("vq4dit", bits=2))

Modules, imports flowing one way (each uses only those above it):
    checks       the one number check, the device resolver, loopback hosts
    config       method configs, the METHODS registry, build_config (flat choices -> a config)
    fs           filesystem guards: atomic file and dir replace, protected paths
    naming       which layers a DiT block has, which ones get quantized
    kmeans       k-means codebooks and their on-disk cache
    size         bit accounting of packed layers and models
    layers       VQLinear / RTNLinear
    peers        HQQ / GGUF / torchao / quanto through their own libraries (PeerConfig, PeerLinear)
    distributed  torch.distributed helpers for data-parallel calibration (identity on one process)
    sampling     the CFG sampler (below everything that runs a model)
    trajectories teacher trajectories and block outputs
    trace        the calibration record and its typed reads
    calibrate    zero-data block-wise calibration
    quant_api    `quantize(model, config)`
    metrics      block MSE, image error, Frechet distance
    io/          load DiTs (loading), save / load packed models (packed, validation, bundle)
    runner       one run + evaluation (shared by bench, CLI and app)
    __main__ (CLI), testbed/ (the embedded digits model)
"""
from .config import CalibConfig, RTNConfig, VQConfig, METHODS, VQ_PRESETS, method_config
from .kmeans import kmeans
from .layers import RTNLinear, VQLinear
from .size import quantized_layers, storage_bits
from .trace import Trace
from .calibrate import calibrate, finalize
from .peers import PEERS, PeerConfig, peer_config
from .quant_api import quantize
from .size import size_report, size_summary
from .sampling import sample, make_scheduler

__all__ = ["CalibConfig", "RTNConfig", "VQConfig", "VQLinear", "RTNLinear", "METHODS", "VQ_PRESETS",
           "method_config", "quantize", "size_report", "size_summary", "kmeans", "quantized_layers",
           "storage_bits", "PeerConfig", "PEERS", "peer_config", "Trace", "calibrate", "finalize", "sample", "make_scheduler"]
__version__ = "0.2.0"
