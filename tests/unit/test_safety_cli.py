"""Issue 11, command line (subprocess): clear one-line errors before any work, no data loss, SIGTERM."""
import json
import os
import re
import signal
import subprocess
import sys

import pytest

from conftest import CLI_ENV, ROOT, cli, error_line  # noqa: F401

ENV = CLI_ENV


# -- item 2 --------------------------------------------------------------------------------

def test_cli_missing_model_never_reaches_hub(tmp_path):
    env = {k: v for k, v in ENV.items() if k != "HF_HUB_OFFLINE"}
    env["HF_HUB_OFFLINE"] = "0"
    r = cli("quantize", "--model", "out/w2", "--out", "o", "--method", "rtn", cwd=tmp_path, env=env)
    assert r.returncode == 2
    assert "out/w2 does not exist" in error_line(r) and "hf:out/w2" in error_line(r)
    r = cli("sample", "--model", "hf:nobody/no-such-dit", "--out", tmp_path / "g.png")  # HF_HUB_OFFLINE=1
    assert r.returncode == 2 and "HF_HUB_OFFLINE" in error_line(r)
    assert not (tmp_path / "o").exists() and not (tmp_path / "g.png").exists()


# -- item 4 --------------------------------------------------------------------------------

def test_cli_overwrite_never_deletes_model_cwd_or_foreign_dirs(tiny_dit_dir, tmp_path):
    before = sorted(p.name for p in tiny_dit_dir.rglob("*"))
    r = cli("quantize", "--model", tiny_dit_dir, "--out", tiny_dit_dir, "--overwrite", "--method", "rtn")
    assert r.returncode == 2 and "input model" in error_line(r)
    r = cli("quantize", "--model", tiny_dit_dir, "--out", ".", "--overwrite", "--method", "rtn", cwd=tmp_path)
    assert r.returncode == 2 and "working directory" in error_line(r)
    foreign = tmp_path / "thesis"
    foreign.mkdir()
    (foreign / "ch1.tex").write_text("precious")
    r = cli("quantize", "--model", tiny_dit_dir, "--out", foreign, "--overwrite", "--method", "rtn")
    assert r.returncode == 2 and "not a previous packed vq4dit output" in error_line(r)
    assert (foreign / "ch1.tex").read_text() == "precious"
    assert sorted(p.name for p in tiny_dit_dir.rglob("*")) == before
    out = tmp_path / "w2"
    assert cli("quantize", "--model", tiny_dit_dir, "--out", out, "--method", "rtn").returncode == 0
    r = cli("quantize", "--model", tiny_dit_dir, "--out", out, "--method", "rtn", "--bits", "3", "--overwrite")
    assert r.returncode == 0, r.stderr[-2000:]
    meta = json.loads((out / "vq4dit_config.json").read_text())
    assert meta["config"]["bits"] == 3
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


# -- item 6 --------------------------------------------------------------------------------

def test_cli_sigterm_keeps_partial_trace_like_sigint(tiny_dit_dir, tmp_path):
    out = tmp_path / "w2"
    p = subprocess.Popen([sys.executable, "-m", "vq4dit", "quantize", "--model", str(tiny_dit_dir), "--out",
                          str(out), "--iterations", "100000", "--sampling-steps", "5", "--kmeans-iters", "3",
                          "--device", "cpu"], cwd=ROOT, env=ENV, stderr=subprocess.PIPE, stdout=subprocess.PIPE)
    buf = b""
    try:
        while not re.search(rb"calibrate vq4dit[\w+=.,-]*:.*?\s[1-9]\d*/\d+", buf):  # a few optimizer steps done
            chunk = os.read(p.stderr.fileno(), 4096)
            assert chunk, buf.decode(errors="replace")[-2000:]
            buf += chunk
        p.send_signal(signal.SIGTERM)
        _, rest = p.communicate(timeout=300)
        err = (buf + (rest or b"")).decode(errors="replace")
    finally:
        if p.poll() is None:
            p.kill()
    assert p.returncode == 143, err[-2000:]
    assert "Traceback" not in err and "terminated (SIGTERM) after" in err
    from vq4dit.trace import Trace
    tr = Trace.load(tmp_path / "w2.partial-trace")
    assert tr.meta["stopped"] == "interrupted" and tr.meta["steps_done"] >= 1
    assert len(tr.steps) == tr.meta["steps_done"]
    assert not out.exists()
    assert [q.name for q in tmp_path.iterdir() if q.name.startswith(".")] == []


# -- item 8 --------------------------------------------------------------------------------

@pytest.mark.parametrize("args,msg", [
    (["sample", "--cfg", "nan"], "--cfg: must be a finite number"),
    (["sample", "--steps", "-1"], "--steps: must be in"),
    (["sample", "--steps", "0"], "--steps: must be in"),
    (["quantize", "--lambda-r=-1e6"], "--lambda-r: must be in"),
    (["quantize", "--lambda-r", "nan"], "--lambda-r: must be a finite number"),
    (["quantize", "--lr-logits", "1e30"], "--lr-logits: must be in"),
    (["quantize", "--method", "rtn", "--k", "4", "--d", "4", "--iterations", "4"],
     "--method rtn does not use --k, --d, --iterations"),
    (["quantize", "--method", "kmeans", "--lambda-r", "2"], "--method kmeans does not use --lambda-r"),
    (["quantize", "--method", "rtn", "--init", "act-aware"], "--method rtn does not use --init"),
])
def test_cli_silent_wrong_results_are_errors(tmp_path, args, msg):
    out = tmp_path / ("g.png" if args[0] == "sample" else "o")
    r = cli(*args, "--out", out)
    assert r.returncode == 2
    assert msg in error_line(r)
    assert not out.exists()


# -- item 9 / 11 through the CLI ------------------------------------------------------------

def test_cli_mismatched_or_tampered_models_are_errors(tiny_dit_dir, tmp_path):
    f = tiny_dit_dir / "transformer" / "config.json"
    cfg = json.loads(f.read_text())
    cfg["num_layers"] = 3
    f.write_text(json.dumps(cfg))
    r = cli("quantize", "--model", tiny_dit_dir, "--out", tmp_path / "o", "--method", "rtn")
    line = error_line(r)  # found from the safetensors headers before the model is built (issue 21 item 8)
    assert r.returncode == 2 and "num_layers=3 but the weights hold 2" in line and not (tmp_path / "o").exists()
    cfg["num_layers"] = 2
    f.write_text(json.dumps(cfg))
    out = tmp_path / "p"
    assert cli("quantize", "--model", tiny_dit_dir, "--out", out, "--method", "rtn").returncode == 0
    meta = json.loads((out / "vq4dit_config.json").read_text())
    meta["transformer_config"]["num_layers"] = 50
    (out / "vq4dit_config.json").write_text(json.dumps(meta))
    r = cli("sample", "--model", out, "--out", tmp_path / "g.png", "--steps", "2")
    assert r.returncode == 2 and "num_layers=50 but the weights hold 2 blocks" in error_line(r)


# -- item 13 -------------------------------------------------------------------------------

NUMERIC = {
    "quantize": ["--bits", "--k", "--d", "--candidates", "--kmeans-iters", "--iterations", "--sampling-steps",
                 "--labels-per-iteration", "--lr-logits", "--lr-codebook", "--lambda-r", "--max-seconds", "--seed",
                 "--max-steps"],
    "sample": ["--steps", "--cfg", "--seed", "--nrow", "--labels"],
}
ZERO_OK = {"--lr-logits", "--lr-codebook", "--lambda-r", "--seed", "--cfg", "--labels"}


def test_every_numeric_flag_is_bounded(capsys):
    """Negative, 0, nan, inf and huge values of every numeric flag: argparse error, exit 2."""
    from vq4dit.__main__ import build_parser
    parser = build_parser()
    sub = parser._subparsers._group_actions[0].choices
    for cmd, flags in NUMERIC.items():
        numeric = {a.option_strings[0] for a in sub[cmd]._actions
                   if a.option_strings and getattr(a.type, "__name__", "") in ("int", "float")}
        assert numeric == set(flags), f"{cmd}: untested numeric flags {numeric ^ set(flags)}"
        for flag in flags:
            for v in ["-1", "0", "nan", "inf", "-inf", "1e300", "99999999999999999999", "abc"]:
                if v == "0" and flag in ZERO_OK:
                    continue
                with pytest.raises(SystemExit) as e:
                    parser.parse_args([cmd, "--out", "x", f"{flag}={v}"])
                assert e.value.code == 2, (cmd, flag, v)
                err = capsys.readouterr().err
                assert re.search(f"argument {flag}: (must be|expected an integer|expected a number)", err), (cmd, flag, v, err)


def test_cli_sample_many_labels_in_batches(tiny_dit_dir, tmp_path):
    r = cli("sample", "--model", tiny_dit_dir, "--labels", *([3] * 150), "--out", tmp_path / "g.png",
            "--steps", "2", "--device", "cpu")
    assert r.returncode == 0, r.stderr[-2000:]
    from PIL import Image
    img = Image.open(tmp_path / "g.png")
    assert img.size[0] > 32 * 8 and img.size[1] > 4 * 8   # 150 tiles, 32 per row
    r = cli("sample", "--model", tiny_dit_dir, "--labels", *([1] * 1025), "--out", tmp_path / "h.png")
    assert r.returncode == 2 and "at most 1024 labels" in error_line(r)


# -- item 14 -------------------------------------------------------------------------------

def test_cli_outputs_and_devices_checked_before_compute(tiny_dit_dir, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    r = cli("quantize", "--model", tiny_dit_dir, "--out", blocker / "w2", "--iterations", "1",
            "--sampling-steps", "2")
    assert r.returncode == 2 and "cannot write" in error_line(r)
    assert "k-means" not in r.stderr and "calibrate" not in r.stderr   # found before any work
    r = cli("sample", "--model", tiny_dit_dir, "--out", blocker / "g.png")
    assert r.returncode == 2 and "cannot write" in error_line(r)
    r = cli("quantize", "--model", tiny_dit_dir, "--out", tmp_path / "o", "--device", "banana")
    assert r.returncode == 2 and "unknown device 'banana'" in error_line(r)
    import torch
    if not torch.cuda.is_available():
        r = cli("sample", "--model", tiny_dit_dir, "--out", tmp_path / "g.png", "--device", "cuda")
        assert r.returncode == 2 and "CUDA is not available" in error_line(r)
    assert not (tmp_path / "o").exists() and not (tmp_path / "g.png").exists()


def test_cli_nan_loss_is_one_clear_line(tiny_dit_dir, tmp_path, monkeypatch, capsys):
    import vq4dit.quant_api as q
    from vq4dit.__main__ import main

    def nan_quantize(*a, **k):
        raise FloatingPointError("calibration loss became nan at step 3: lower the learning rates")

    monkeypatch.setattr(q, "quantize", nan_quantize)
    rc = main(["quantize", "--model", str(tiny_dit_dir), "--out", str(tmp_path / "o"), "--iterations", "1"])
    err = capsys.readouterr().err
    assert rc == 2 and err.strip() == "error: calibration loss became nan at step 3: lower the learning rates"
    assert not (tmp_path / "o").exists()


def test_cli_in_process_restores_the_sigterm_handler(tmp_path):
    """main() treats SIGTERM like Ctrl-C only while a command runs (a caller's handler comes back)."""
    import signal
    from vq4dit.__main__ import main
    before = signal.getsignal(signal.SIGTERM)
    assert main(["quantize", "--model", str(tmp_path / "none"), "--out", str(tmp_path / "o"), "--method", "rtn"]) == 2
    assert signal.getsignal(signal.SIGTERM) is before
