"""vq4dit: VQ4DiT post-training vector quantization for diffusers Diffusion Transformers.

    from vq4dit import quantize, method_config
    trace = quantize(transformer, method_config("vq4dit", bits=2))
"""
from .quant import (CalibConfig, RTNConfig, VQConfig, VQLinear, RTNLinear, METHODS, VQ_PRESETS,
                    method_config, quantize, size_report, size_summary, kmeans)
from .calibrate import Trace, calibrate, finalize
from .sampling import sample, make_scheduler

__all__ = ["CalibConfig", "RTNConfig", "VQConfig", "VQLinear", "RTNLinear", "METHODS", "VQ_PRESETS",
           "method_config", "quantize", "size_report", "size_summary", "kmeans", "Trace", "calibrate",
           "finalize", "sample", "make_scheduler"]
__version__ = "0.1.0"
