"""Loading DiT models and the packed quantized format.

    loading     load_dit: full-precision DiTs (local dirs, `hf:` Hub ids) and packed dirs; VAEs
    packed      bit packing, save_quantized / load_quantized, fp-tensor dedupe
    validation  the packed format's checks (run before anything is built from a file)
    bundle      DiTBundle (what a load returns) and a model dir's scheduler
"""
from .bundle import DiTBundle
from .loading import HUB_PREFIX, hub_offline, load_dit, load_vae
from .packed import (check_output, dedupe_tensors, dir_bytes, load_quantized, pack_bits, save_quantized,
                     unpack_bits)
from .validation import FORMAT_VERSION, PACKED_CONFIG, PACKED_WEIGHTS, READ_VERSIONS

__all__ = ["HUB_PREFIX", "DiTBundle", "hub_offline", "load_dit", "load_vae", "check_output", "dedupe_tensors",
           "dir_bytes", "load_quantized", "pack_bits", "save_quantized", "unpack_bits", "FORMAT_VERSION",
           "PACKED_CONFIG", "PACKED_WEIGHTS", "READ_VERSIONS"]
