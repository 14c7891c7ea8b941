"""The quantized layers: the paper's per-layer concepts, 1:1.

  k-means codebook ........ `VQLinear.from_linear()` (kmeans.py)  (spec step 1)
  candidate set ........... `VQLinear.init_soft()`           (step 2)
  assignment ratios ....... `VQLinear.assignment_ratios()`   (step 3)
  L_r regularizer ......... `VQLinear.ratio_regularizer()`   (step 4)
  progressive freezing .... `VQLinear.freeze_confident()`    (step 7)
  hard switch ............. `VQLinear.make_hard()`           (step 7)
  storage ................. `VQLinear.storage_bits()`        (what a packed layer costs, size.py)
  compact runtime ......... `VQLinear.compact_()`            (indices at packed width, decoded per forward)
Calibration (steps 5-6) lives in `calibrate.py`; the in-place entry point in `quant_api.py`.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import RTNConfig, VQConfig, index_bits
from .kmeans import kmeans_cached, sq_dists
from .size import PackedLayer, rtn_storage_bits, vq_storage_bits


def compact_index_dtype(bits: int) -> torch.dtype:
    """Dtype of a compact layer's index buffer: a bit stream in uint8 up to 8 bits (k <= 256; exactly
    the packed file's bytes), int16 up to 15 bits, int32 above (k = 65536)."""
    return torch.uint8 if bits <= 8 else torch.int16 if bits <= 15 else torch.int32


def unpack_indices(stored: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """(n,) int64 codeword ids from a compact index buffer, on its device. Below 8 bits the buffer is
    the MSB-first bit stream of `io.pack_bits` (ceil(n*bits/8) bytes): each index is read from the
    16-bit window of the two bytes it starts in."""
    if bits >= 8:
        return stored.long()
    pos = torch.arange(n, device=stored.device, dtype=torch.int64) * bits      # bit offset of each index
    byte = pos >> 3
    p = torch.cat([stored, stored.new_zeros(1)]).to(torch.int32)              # +1 byte: last window
    window = (p.index_select(0, byte) << 8) | p.index_select(0, byte + 1)      # (n,) 16 bits
    return ((window >> (16 - bits - (pos & 7))) & ((1 << bits) - 1)).long()


def ratio_softmax(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """softmax(logits / T) over candidates (S, n). For the paper's n = 2 it is a sigmoid of the
    logit difference: the same values, ~10x faster on CPU than a softmax over a dim of size 2."""
    if logits.shape[1] == 2:
        p = torch.sigmoid((logits[:, :1] - logits[:, 1:]) / temperature)  # (S, 1)
        return torch.cat([p, 1 - p], 1)
    return torch.softmax(logits / temperature, dim=1)


class VQLinear(PackedLayer):
    """Linear layer whose weight is rebuilt from a codebook.

    W (out, in) is cut row-wise into S = out*in/d sub-vectors of length d. Soft phase:
    w_hat_j = sum_i r_ji * C[cand_ji] with r_j = softmax(logits_j); frozen sub-vectors use a
    one-hot r_j. Hard phase: w_hat_j = C[assignment_j].
    """

    def __init__(self, in_features: int, out_features: int, k: int, d: int, n_candidates: int = 2,
                 bias: bool = True, name: str = "", codebook_dtype: str = "float16", compact: bool = False):
        super().__init__()
        if in_features % d:
            raise ValueError(f"layer {name or '?'}: in_features={in_features} is not divisible by d={d}")
        self.in_features, self.out_features, self.k, self.d = in_features, out_features, k, d
        self.n_candidates, self.name, self.codebook_dtype = n_candidates, name, codebook_dtype
        s = out_features * in_features // d
        self.codebook = nn.Parameter(torch.zeros(k, d))
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None
        # compact=True (a packed model being loaded): the index buffer at packed width from the start,
        # never an int64 one (which the allocator would keep resident after it is replaced)
        bits = index_bits(k)
        idx = (torch.zeros(-(-s * bits // 8), dtype=torch.uint8) if compact and bits <= 8 else
               torch.zeros(s, dtype=compact_index_dtype(bits) if compact else torch.long))
        self.register_buffer("assignment", idx)                                    # hard index
        self.register_buffer("kmeans_assignment", idx if compact else torch.zeros(s, dtype=torch.long))
        self.candidates: Optional[torch.Tensor] = None  # (S, n) codeword ids, soft phase only
        self.logits: Optional[nn.Parameter] = None      # (S, n) assignment logits
        self.frozen_mask: Optional[torch.Tensor] = None  # (S,) bool
        self.hard = True
        self.hard_forward = False  # straight-through soft phase (CalibConfig.hard_forward)
        self.input_power: Optional[torch.Tensor] = None  # (in,) E[x^2], activation-aware distances
        self.temperature = 1.0     # softmax temperature of the ratios (1 = paper; annealed by CalibConfig.temperature_end)
        self.record_weight_grad = False
        self.last_weight: Optional[torch.Tensor] = None  # w_hat of the last forward, for conflict stats
        # Runtime of a hard layer. compact: `assignment` holds the indices at packed width
        # (compact_index_dtype) instead of int64 (calibration keeps int64: it writes them in place).
        # cache_weight: inference keeps the decoded weight between forwards (fast, +4 bytes/weight);
        # off, every forward decodes it (resident size ~ the packed size; `load_quantized(cache=...)`).
        self.compact = compact
        self.cache_weight = True

    @property
    def num_subvectors(self) -> int:
        return self.out_features * self.in_features // self.d

    def indices(self) -> torch.Tensor:
        """(S,) int64 codeword id of every sub-vector (hard assignment), whatever the storage."""
        if not self.compact:
            return self.assignment
        return unpack_indices(self.assignment, self.index_bits, self.num_subvectors)

    @torch.no_grad()
    def set_indices(self, idx: torch.Tensor):
        """Write the hard assignment (S,) in the layer's storage (int64, or compact)."""
        if not self.compact:
            self.assignment.copy_(idx)
            return
        self.assignment = self.encode_indices(idx)

    def encode_indices(self, idx: torch.Tensor) -> torch.Tensor:
        """(S,) ids -> the compact buffer (same bytes as the packed file's for <= 8 bits)."""
        bits = self.index_bits
        if bits < 8:
            from .io.packed import pack_bits  # the packed format's bit stream, one definition
            return pack_bits(idx, bits).to(idx.device)
        return idx.to(compact_index_dtype(bits))

    @torch.no_grad()
    def compact_(self, cache_weight: Optional[bool] = None) -> "VQLinear":
        """Hold the indices at packed width (the hard layers of a finished model); optionally set
        the decoded-weight cache. Idempotent."""
        if not self.hard:
            raise ValueError(f"layer {self.name or '?'} is still soft: compact it after finalize / make_hard")
        if not self.compact:
            same = self.kmeans_assignment is self.assignment
            kmeans = None if same else self.kmeans_assignment.clone()
            self.assignment = self.encode_indices(self.assignment)
            self.compact = True
            # the k-means ids are only statistics: keep them compact too (or share the tensor)
            self.kmeans_assignment = self.assignment if same else self.encode_indices(kmeans)
        if cache_weight is not None:
            self.set_weight_cache(cache_weight)
        return self

    def _apply(self, fn, recurse=True):
        # .to(device) would copy a shared index buffer twice (it maps each buffer name): keep one
        shared = self.kmeans_assignment is self.assignment
        super()._apply(fn, recurse)
        if shared:
            self.kmeans_assignment = self.assignment
        return self

    def set_weight_cache(self, on: bool):
        """Keep (True) or decode per forward (False) the inference weight; off frees the cache."""
        self.cache_weight = bool(on)
        if not on:
            self._cached_weight = self._cache_key = None

    @property
    def index_bits(self) -> int:
        return index_bits(self.k)

    def subvector_weights(self, rows: Optional[slice] = None) -> Optional[torch.Tensor]:
        """(S, d) per-coordinate distance weights from the input power, or None (plain distances)."""
        if self.input_power is None:
            return None
        w = self.input_power.view(1, -1, self.d).expand(self.out_features, -1, -1).reshape(-1, self.d)
        return w if rows is None else w[rows]

    def storage_bits(self) -> dict:
        return vq_storage_bits(self.out_features, self.in_features, self.k, self.d, self.codebook_dtype,
                               self.bias is not None)

    @classmethod
    def from_linear(cls, linear: nn.Linear, cfg: VQConfig, name: str = "", seed: int = 0,
                    input_power: Optional[torch.Tensor] = None) -> "VQLinear":
        """k-means init from a Linear. `input_power` (in,) = E[x_i^2] of the layer input makes the
        k-means and the candidate distances activation-aware (VQConfig.activation_aware)."""
        w = linear.weight.detach()
        q = cls(linear.in_features, linear.out_features, cfg.k, cfg.d, cfg.n_candidates,
                linear.bias is not None, name, cfg.codebook_dtype).to(w.device)
        x = w.float().reshape(-1, cfg.d)  # (S, d)
        if input_power is not None:
            q.input_power = (input_power / input_power.mean().clamp_min(1e-30)).float().to(w.device)
        codebook, assign = kmeans_cached(x, cfg.k, cfg.kmeans_iters, seed, q.subvector_weights(),
                                         cfg.kmeans_points_per_codeword)
        with torch.no_grad():
            q.codebook.copy_(codebook)
            if linear.bias is not None:
                q.bias.copy_(linear.bias.float())
        q.assignment.copy_(assign)
        q.kmeans_assignment.copy_(assign)
        q.round_codebook()
        return q

    # -- soft assignment ratios (spec steps 2-3) --------------------------------------------
    def init_soft(self, weight: torch.Tensor):
        """Candidate set = n nearest codewords of each original sub-vector; logits from distances."""
        x = weight.detach().float().reshape(-1, self.d).to(self.codebook.device)
        n = self.n_candidates
        cands, dists = [], []
        for s in range(0, x.shape[0], 1 << 16):
            d2 = sq_dists(x[s:s + (1 << 16)], self.codebook.detach(),
                           self.subvector_weights(slice(s, s + (1 << 16))))  # (chunk, k)
            own = self.assignment[s:s + (1 << 16), None]
            true_own = d2.gather(1, own)
            d2.scatter_(1, own, -1.0)  # the k-means codeword is always candidate 0 (ties, fp16)
            v, i = d2.topk(n, dim=1, largest=False)  # nearest first
            v[:, :1] = true_own
            cands.append(i)
            dists.append(v.clamp_min(0).sqrt())
        self.candidates = torch.cat(cands)     # (S, n)
        dist = torch.cat(dists)                # (S, n)
        logits = torch.zeros_like(dist)
        # logit_i = log(dist_last / (dist_i + 1e-5)) for i < n-1, logit_last = 0
        logits[:, :-1] = torch.log((dist[:, -1:] + 1e-12) / (dist[:, :-1] + 1e-5))
        self.logits = nn.Parameter(logits)
        self.frozen_mask = torch.zeros(x.shape[0], dtype=torch.bool, device=x.device)
        self.hard = False
        self.assignment.copy_(self.candidates[:, 0])

    def assignment_ratios(self) -> torch.Tensor:
        """(S, n) ratios over candidates; frozen sub-vectors are one-hot at their top candidate."""
        r = ratio_softmax(self.logits, self.temperature)
        # no `if frozen_mask.any()`: that is a host sync per layer per step on a GPU
        onehot = F.one_hot(self.logits.detach().argmax(1), self.n_candidates).to(r.dtype)
        return torch.where(self.frozen_mask[:, None], onehot, r)

    def first_ratio(self) -> torch.Tensor:
        """(S, 1) ratio of candidate 0 for n = 2: assignment_ratios()[:, :1] with the same values and
        gradients, without building (S, 2) ratios and a one-hot (a frozen row is 1 when candidate 0
        is its argmax, ties included, else 0)."""
        diff = self.logits[:, :1] - self.logits[:, 1:]                           # (S, 1)
        p = torch.sigmoid(diff / self.temperature)
        return torch.where(self.frozen_mask[:, None], (diff.detach() >= 0).to(p.dtype), p)  # no host sync

    def ratio_regularizer(self) -> torch.Tensor:
        """L_r = n * mean(r * (1 - r)) over the sub-vectors still soft (0 when hard)."""
        if self.hard:
            return self.codebook.new_zeros(())
        soft = ~self.frozen_mask  # masked means (0 when all frozen): no `soft.any()`/boolean indexing (syncs)
        n_soft = soft.sum().clamp_min(1)
        if self.n_candidates == 2:  # r = (p, 1-p): both entries of r(1-r) equal p(1-p)
            p = torch.sigmoid((self.logits[:, 0] - self.logits[:, 1]) / self.temperature)
            return 2 * (p * (1 - p) * soft).sum() / n_soft
        r = ratio_softmax(self.logits, self.temperature)                  # (S, n)
        return ((r * (1 - r)).sum(1) * soft).sum() / n_soft  # = n * mean over the soft rows' (S_soft, n) entries

    def current_assignment(self) -> torch.Tensor:
        """(S,) codeword each sub-vector uses now (top candidate while soft)."""
        if self.hard:
            return self.indices()
        if self.n_candidates == 2:  # argmax of two logits (ties -> candidate 0, like argmax)
            second = self.logits.detach()[:, 1] > self.logits.detach()[:, 0]
            return torch.where(second, self.candidates[:, 1], self.candidates[:, 0])
        return self.candidates.gather(1, self.logits.detach().argmax(1, keepdim=True)).squeeze(1)

    def top_ratio(self) -> torch.Tensor:
        if self.hard:
            return torch.ones(self.num_subvectors, device=self.assignment.device)
        return self.assignment_ratios().detach().max(1).values

    # -- progressive freezing (spec step 7) ---------------------------------------------------
    @torch.no_grad()
    def freeze_confident(self, freeze_threshold: float, hard_threshold: float) -> bool:
        """Freeze sub-vectors whose top ratio > threshold; go hard when enough are frozen.
        Returns True if the layer switched to hard assignments now."""
        if self.hard:
            return False
        return self.switch_if_frozen(float(self.freeze_confident_rows(freeze_threshold)), hard_threshold)

    @torch.no_grad()
    def freeze_confident_rows(self, freeze_threshold: float) -> torch.Tensor:
        """Freeze rows whose top ratio > threshold; the frozen share as a 0-d float64 tensor on the device (no
        host sync: the caller reads all layers' at once; float64: in float32 99/100 reads 0.99000001 > 0.99)."""
        if self.n_candidates == 2:  # max(p, 1 - p): the same values as the (S, 2) max below
            p = torch.sigmoid((self.logits[:, 0] - self.logits[:, 1]) / self.temperature)
            top = torch.maximum(p, 1 - p)
        else:
            top = ratio_softmax(self.logits, self.temperature).max(1).values
        self.frozen_mask |= top > freeze_threshold
        return self.frozen_mask.double().mean()

    def switch_if_frozen(self, frozen_share: float, hard_threshold: float) -> bool:
        """Go hard when more than `hard_threshold` of the sub-vectors are frozen; True if it did now."""
        if frozen_share > hard_threshold:
            self.make_hard()
        return frozen_share > hard_threshold

    @torch.no_grad()
    def commit_most_confident(self, target_share: float, hard_threshold: float) -> bool:
        """Incremental commitment (ViM-VQ style): freeze the most confident soft sub-vectors until
        `target_share` of the layer is frozen. Returns True if the layer switched to hard now."""
        if self.hard:
            return False
        need = int(round(target_share * self.num_subvectors)) - int(self.frozen_mask.sum())
        if need > 0:
            top = ratio_softmax(self.logits, self.temperature).max(1).values
            top[self.frozen_mask] = -1.0
            self.frozen_mask[top.topk(min(need, int((~self.frozen_mask).sum()))).indices] = True
        if self.frozen_mask.double().mean().item() > hard_threshold:
            self.make_hard()
            return True
        return False

    @torch.no_grad()
    def repick(self, weight: torch.Tensor, hessian: torch.Tensor, n_candidates: int = 4, sweeps: int = 2) -> float:
        """Discrete finishing pass (PV-tuning style), codebook fixed: greedily re-pick each
        sub-vector's codeword among its `n_candidates` nearest to lower the layer's output error
        tr((W_hat - W) H (W_hat - W)^T), H = E[x x^T] of the layer input. Returns the share changed."""
        if not self.hard:
            raise ValueError(f"layer {self.name or '?'}: repick runs on hard layers (after calibration)")
        out_f, in_f, d = self.out_features, self.in_features, self.d
        w = weight.detach().float().to(self.codebook.device)                 # (out, in)
        h = hessian.float().to(self.codebook.device)                          # (in, in)
        cb = self.codebook.detach()
        assign = self.indices().view(out_f, in_f // d).clone()                # (out, in/d)
        cand = sq_dists(w.reshape(-1, d), cb).topk(min(n_candidates, self.k), dim=1, largest=False).indices
        cand = cand.view(out_f, in_f // d, -1)                                # (out, in/d, m)
        w_hat = cb[assign].reshape(out_f, in_f)
        err = w_hat - w                                                       # (out, in)
        before = assign.clone()
        for _ in range(sweeps):
            for b in range(in_f // d):
                cols = slice(b * d, (b + 1) * d)
                g = err @ h[:, cols]                                          # (out, d)
                delta = cb[cand[:, b]] - w_hat[:, None, cols]                 # (out, m, d)
                gain = torch.einsum("omd,de,ome->om", delta, h[cols, cols], delta) \
                    + 2 * torch.einsum("omd,od->om", delta, g)               # change of the error
                best = gain.argmin(1)                                         # (out,)
                better = gain.gather(1, best[:, None]).squeeze(1) < 0
                new = torch.where(better, cand[:, b].gather(1, best[:, None]).squeeze(1), assign[:, b])
                step = cb[new] - w_hat[:, cols]
                w_hat[:, cols] += step
                err[:, cols] += step
                assign[:, b] = new
        self.set_indices(assign.reshape(-1))
        return float((assign != before).float().mean())

    @torch.no_grad()
    def make_hard(self):
        """Switch to hard assignments (top candidate); logits are dropped."""
        if self.hard:
            return
        self.assignment.copy_(self.current_assignment())
        self.candidates = self.logits = self.frozen_mask = None
        self.hard = True

    @torch.no_grad()
    def round_codebook(self):
        """Keep the in-memory codebook at storage precision so packed reload is exact."""
        if self.codebook_dtype == "float16":
            self.codebook.copy_(self.codebook.half().float())

    # -- forward ----------------------------------------------------------------------------
    def weight_hat(self) -> torch.Tensor:
        if self.hard:
            sub = self.codebook.index_select(0, self.indices())  # (S, d); compact: decoded here, per call
        elif self.n_candidates == 2:
            # Same values and gradients as the general mix below, without the (S, n, d) gather:
            # r = (p, 1-p), so sum_i r_i C[c_i] = C[c_1] + p (C[c_0] - C[c_1]).
            p = self.first_ratio()                                                # (S, 1)
            c0, c1 = self.candidates[:, 0], self.candidates[:, 1]
            if self.hard_forward:  # value: the codeword in use; d/dp through the soft mix (STE)
                cb = self.codebook.detach()
                sub = self.codebook[self.current_assignment()] + (p - p.detach()) * (cb[c0] - cb[c1])
            else:  # one gather: its backward (an index-add into the codebook) is the costly part
                g = self.codebook[self.candidates]                                 # (S, 2, d)
                sub = torch.lerp(g[:, 1], g[:, 0], p)  # exact at p = 0 and 1 (frozen rows)
        elif self.hard_forward:
            # value = top candidate's codeword; gradient to logits through the soft mix (STE)
            r = self.assignment_ratios()                                              # (S, n)
            soft = (r.unsqueeze(-1) * self.codebook.detach()[self.candidates]).sum(1)  # (S, d)
            sub = self.codebook[self.current_assignment()] + (soft - soft.detach())
        else:
            r = self.assignment_ratios()                                     # (S, n)
            sub = (r.unsqueeze(-1) * self.codebook[self.candidates]).sum(1)  # (S, d)
        return sub.reshape(self.out_features, self.in_features)

    @property
    def weight(self) -> torch.Tensor:  # so code that reads `.weight` (and diffusers) keeps working
        return self.weight_hat().detach()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.hard and self.cache_weight and not torch.is_grad_enabled():
            # inference: rebuild W only when codebook or indices changed (saves a gather per step)
            key = (self.codebook._version, self.assignment._version, self.codebook.data_ptr(),
                   self.assignment.data_ptr(), x.dtype)
            if getattr(self, "_cache_key", None) != key:
                self._cached_weight = self.weight_hat().detach().to(x.dtype)
                self._cache_key = key
            return F.linear(x, self._cached_weight, None if self.bias is None else self.bias.to(x.dtype))
        if self.hard and not torch.is_grad_enabled() and x.dtype != self.codebook.dtype:
            # half-precision inference: gather from the codebook cast to x's dtype, never an fp32 weight
            w = self.codebook.to(x.dtype).index_select(0, self.indices()).reshape(self.out_features, self.in_features)
            return F.linear(x, w, None if self.bias is None else self.bias.to(x.dtype))
        w = self.weight_hat()
        if self.record_weight_grad and w.requires_grad:
            w.retain_grad()
            self.last_weight = w
        return F.linear(x, w.to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))

    def extra_repr(self) -> str:
        state = "hard" if self.hard else f"soft n={self.n_candidates}"
        if self.compact:
            state += ", compact" + (", cached" if self.cache_weight else ", decode per forward")
        return (f"in={self.in_features}, out={self.out_features}, k={self.k}, d={self.d}, "
                f"bits/weight={self.storage_bits()['bits_per_weight']:.3f}, {state}")


class RTNLinear(PackedLayer):
    """Uniform min-max asymmetric round-to-nearest weights: w = (q - zero) * scale."""

    def __init__(self, in_features: int, out_features: int, bits: int, per_channel: bool = True,
                 bias: bool = True, name: str = ""):
        super().__init__()
        self.in_features, self.out_features, self.bits, self.per_channel, self.name = (
            in_features, out_features, bits, per_channel, name)
        rows = out_features if per_channel else 1
        self.register_buffer("qweight", torch.zeros(out_features, in_features, dtype=torch.uint8))
        self.register_buffer("scale", torch.ones(rows, 1))
        self.register_buffer("zero", torch.zeros(rows, 1))
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None

    @classmethod
    def from_linear(cls, linear: nn.Linear, cfg: RTNConfig, name: str = "") -> "RTNLinear":
        w = linear.weight.detach().float()
        q = cls(linear.in_features, linear.out_features, cfg.bits, cfg.per_channel,
                linear.bias is not None, name).to(w.device)
        levels = 2 ** cfg.bits - 1
        lo = w.min(1, keepdim=True).values if cfg.per_channel else w.min().reshape(1, 1)
        hi = w.max(1, keepdim=True).values if cfg.per_channel else w.max().reshape(1, 1)
        scale = ((hi - lo) / levels).clamp_min(1e-8).half().float()  # stored as fp16
        zero = torch.round(-lo / scale).clamp(0, levels).half().float()
        with torch.no_grad():
            q.qweight.copy_(torch.clamp(torch.round(w / scale) + zero, 0, levels).to(torch.uint8))
            q.scale.copy_(scale)
            q.zero.copy_(zero)
            if linear.bias is not None:
                q.bias.copy_(linear.bias.float())
        return q

    @property
    def weight(self) -> torch.Tensor:
        return (self.qweight.float() - self.zero) * self.scale

    def forward(self, x):
        return F.linear(x, self.weight.to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))

    def extra_repr(self) -> str:
        gran = "per-channel" if self.per_channel else "per-tensor"
        return (f"in={self.in_features}, out={self.out_features}, bits={self.bits}, {gran}, "
                f"bits/weight={self.storage_bits()['bits_per_weight']:.3f}")

    def storage_bits(self) -> dict:
        return rtn_storage_bits(self.out_features, self.in_features, self.bits, self.per_channel,
                                self.bias is not None)
