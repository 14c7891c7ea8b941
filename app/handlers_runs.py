"""Events of the run lists: the Runs table, the run pickers and the side-by-side comparison.

`Handlers` (handlers.py) inherits these; they read the store and `Views` like every other handler.
"""
from __future__ import annotations

import gradio as gr

from . import plots
from .forms import ImageForm

AUTO_COMPARE = ("automatic: newest finished baseline", "")


class RunsHandlers:
    """The runs list, both run pickers, and the Runs tab's side-by-side multi-select."""

    def _runs_outputs(self, current=None):
        store = self.store
        table = store.table()
        return table, store.readable_ids(), plots.rd_figure(table, current)

    def list_runs(self, sel):
        """Runs table, both run pickers (partial runs labelled) and the rate-distortion plot."""
        table, ids, rd = self._runs_outputs((sel or {}).get("run"))
        cur = (sel or {}).get("run")
        value = cur if cur in ids else (self.views.default_run() or (ids or [None])[-1])
        return table, gr.update(choices=self.views.run_choices(), value=value), rd

    def compare_choices(self, sel):
        other = (sel or {}).get("other") or ""
        choices = self.views.run_choices()
        return gr.update(choices=[AUTO_COMPARE] + choices, value=other if other in {c[1] for c in choices} else "")

    def pick_choices(self, picked):
        """The side-by-side multi-select lists every readable run (new ones too); ticks on runs that
        are gone are dropped."""
        choices = self.views.run_choices()
        ids = {c[1] for c in choices}
        return gr.update(choices=choices, value=[r for r in (picked or []) if r in ids])

    def on_run_row(self, evt: gr.SelectData):
        """A row of the Runs table: load that run."""
        table = self.store.table()
        row = evt.index[0] if isinstance(evt.index, (list, tuple)) else evt.index
        if row is None or row >= len(table):
            return gr.skip()
        if str(table.iloc[row]["status"]).startswith("unreadable"):
            gr.Warning(f"Run {table.iloc[row]['run']} is unreadable ({table.iloc[row]['status']}): skipped.")
            return gr.skip()
        return gr.update(value=table.iloc[row]["run"])

    def compare_runs(self, picked, form: ImageForm):
        """Runs ticked in the side-by-side list: their key metrics side by side at once, and their images
        when no sampling is needed (cached or shipped); otherwise the picture waits for the button."""
        note, fig, table = self.views.side_by_side(picked)
        ids = list(table["run"])
        ready = self.views.images_ready_of(ids, form.labels, form.seed, form.guidance, form.steps)
        if not ids:
            return note, fig, table, None, None
        if not ready:
            return (note + " Press **Images side by side** to sample them.", fig, table, None, None)
        img, itable = self._side_images(ids, form)
        return note, fig, table, img, itable

    def compare_runs_images(self, picked, form: ImageForm):
        """The button: sample (or read from the cache) the picked runs' images, FP first, same noise."""
        _, _, table = self.views.side_by_side(picked)
        if not len(table):
            raise gr.Error("Tick at least one run in the list first.", print_exception=False)
        return self._side_images(list(table["run"]), form)

    def _side_images(self, ids, form: ImageForm):
        try:
            return self.views.images_of(ids, form.labels, form.seed, form.guidance, form.steps)
        except ValueError as e:
            raise gr.Error(str(e), print_exception=False)
