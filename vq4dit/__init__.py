"""vq4dit: VQ4DiT post-training vector quantization for diffusers Diffusion Transformers.

    from vq4dit import quantize, method_config
    trace = quantize(transformer, method_config("vq4dit", bits=2))

Modules, imports flowing one way (each uses only those above it):
    config      method configs and the METHODS registry
    distributed torch.distributed helpers for data-parallel calibration (identity on one process)
    layers      k-means, VQLinear / RTNLinear, bit accounting
    peers       HQQ / GGUF / torchao / quanto through their own libraries (PeerConfig, PeerLinear)
    sampling    the CFG sampler (below everything that runs a model)
    trace       the calibration record and its typed reads
    calibrate   zero-data block-wise calibration
    quant_api   `quantize(model, config)`, size reports
    metrics     block MSE, image error, Frechet distance
    io          load DiTs, save / load packed models
    experiment  one run + evaluation (shared by bench, CLI and app)
    bench, __main__ (CLI), testbed/ (the embedded digits model)
"""
from .config import CalibConfig, RTNConfig, VQConfig, METHODS, VQ_PRESETS, method_config
from .layers import VQLinear, RTNLinear, kmeans, quantized_layers, storage_bits
from .trace import Trace
from .calibrate import calibrate, finalize
from .peers import PEERS, PeerConfig, peer_config
from .quant_api import quantize, size_report, size_summary
from .sampling import sample, make_scheduler

__all__ = ["CalibConfig", "RTNConfig", "VQConfig", "VQLinear", "RTNLinear", "METHODS", "VQ_PRESETS",
           "method_config", "quantize", "size_report", "size_summary", "kmeans", "quantized_layers",
           "storage_bits", "PeerConfig", "PEERS", "peer_config", "Trace", "calibrate", "finalize", "sample", "make_scheduler"]
__version__ = "0.2.0"
