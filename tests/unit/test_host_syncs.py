"""Host syncs in the calibration step (issue 20): on a GPU every `.item()`, `.tolist()` or
`bool(tensor)` stalls the launch queue, so a step reads its scalars in a fixed number of transfers,
not one (or more) per layer. Counted on CPU by wrapping the Tensor methods that copy to the host,
for calls made from the library's own code (the scheduler's CPU timesteps are not device reads), on
steps that record no layer statistics (those run every `trace_every` steps and may read more)."""
import traceback
import copy

import pytest
import torch

from conftest import make_tiny_dit
from vq4dit import method_config, quantize
from vq4dit.calibrate import calibrate
from vq4dit.size import quantized_layers

TINY = dict(iterations=1, num_sampling_steps=6, labels_per_iteration=2, freeze_after=0)


class SyncCounter:
    """Counts host reads of tensor values while `armed` (the steps after the first)."""
    NAMES = ("item", "tolist", "__bool__", "__float__", "__int__")

    def __init__(self, monkeypatch):
        self.armed, self.calls, self.last = False, [], []
        for name in self.NAMES:
            orig = getattr(torch.Tensor, name)

            def wrapped(t, *a, _orig=orig, _name=name, **kw):
                if self.armed:
                    caller = next(f for f in reversed(traceback.extract_stack()[:-1]) if "/torch/" not in f.filename)
                    if "/vq4dit/" in caller.filename:
                        self.calls.append(f"{_name} {caller.filename.split('/')[-1]}:{caller.lineno}")
                return _orig(t, *a, **kw)
            monkeypatch.setattr(torch.Tensor, name, wrapped)


@pytest.mark.parametrize("method,layers", [("vq4dit", 2), ("vq4dit", 4), ("vq4dit-ref", 4), ("vq4dit-ste", 4)])
def test_calibration_step_reads_the_host_a_fixed_number_of_times_whatever_the_layer_count(monkeypatch, method, layers):
    teacher = make_tiny_dit(layers=layers)
    student = copy.deepcopy(teacher)
    quantize(student, method_config("kmeans", bits=3, kmeans_iters=2), progress=False)  # k-means outside the count
    counter = SyncCounter(monkeypatch)
    per_step = []

    def on_step(row):  # called after each step: count that step's reads, then arm for the next one
        if counter.armed and row["step"] < 6:  # the last step is a snapshot (the final record)
            per_step.append(len(counter.calls))
            counter.last = list(counter.calls)
        counter.calls.clear()
        counter.armed = row["step"] >= 1
        return True

    cfg = method_config(method, bits=3, kmeans_iters=2, calib=dict(TINY, trace_every=1000, n_snapshots=0, freeze_threshold=0.999))
    originals = {n: teacher.get_submodule(n).weight.detach().clone() for n in quantized_layers(student)}
    calibrate(student, teacher, cfg, originals, on_step=on_step, progress=False)
    n_layers = len(originals)
    assert n_layers == 7 * layers and len(per_step) >= 3
    # scalars + the freezing check's shares (the row reuses them): 2 reads a step, not 2 + n_layers
    assert max(per_step) <= 2, f"{method}, {n_layers} layers: host reads per step {per_step}: {counter.last}"
