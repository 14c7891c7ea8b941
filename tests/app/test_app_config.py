"""One config path: the app, the CLI and the bench build equal configs for the same choices.

Every front end calls `vq4dit.config.build_config` with the model's recipe (`small` on the embedded
digits DiT). The app side here is the real one: an Engine on the embedded model, the Set-up form as
the page opens it, `Engine.run_config` (what `start_run` hands the worker).
"""
import pytest

from vq4dit.config import SETTINGS, setting_kd

pytestmark = pytest.mark.core

CASES = [(m, s) for s in ("W2", "W3", "W4", "XL-sharing") for m in ("vq4dit-ste-aa", "codebook-only")] + [
    ("vq4dit", "W2"), ("vq4dit-ref", "W3"), ("kmeans", "W2"), ("rtn", "W3")]


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    from app.config import AppConfig
    from app.engine import Engine
    return Engine(AppConfig(runs_dir=str(tmp_path_factory.mktemp("runs")), warm_umap=False, demo_runs=False,
                            device="cpu"))


def app_config(engine, method, setting, seed):
    """What pressing Run with the Set-up panel's defaults builds (the page's initial form values)."""
    from app.forms import SetupForm
    k, d = setting_kd(setting)
    cd = engine.calib_defaults
    form = SetupForm(method, SETTINGS[setting]["bits"], k, d, 2, cd["iterations"], cd["num_sampling_steps"],
                     engine.kmeans_default, cd["lr_logits"], cd["lr_codebook"], cd["lambda_r"], seed)
    return engine.run_config(form.settings(cd))


def cli_config(engine, method, setting, seed):
    from vq4dit.__main__ import build_parser, config_from_args
    k, d = setting_kd(setting)
    argv = ["quantize", "--out", "unused", "--method", method, "--bits", str(SETTINGS[setting]["bits"]),
            "--seed", str(seed), "--device", "cpu"]
    if method not in ("rtn", "rtn-tensor"):
        argv += ["--k", str(k), "--d", str(d)]
    return config_from_args(build_parser().parse_args(argv), engine.teacher)


def bench_config(method, setting, seed):
    from benchmarks.bench import Job, job_config
    return job_config(Job("main", setting, method, method, seed), "small", {}, "cpu")


@pytest.mark.parametrize("method,setting", CASES)
def test_app_cli_and_bench_build_the_same_config(engine, method, setting):
    a = app_config(engine, method, setting, seed=3)
    c = cli_config(engine, method, setting, seed=3)
    b = bench_config(method, setting, seed=3)
    assert a.to_dict() == c.to_dict() == b.to_dict()
    if getattr(a, "calib", None) is not None:
        assert a.calib.recipe == "small" and a.calib.teacher_sampler == "ddim" and a.calib.seed == 3
    if hasattr(a, "kmeans_points_per_codeword"):  # the small recipe's full Lloyd, not the subsampled one
        assert a.kmeans_points_per_codeword is None and a.kmeans_iters == 50 and a.seed == 3


def test_app_opens_with_the_models_recipe(engine):
    from vq4dit.config import RECIPES
    assert engine.recipe == "small"
    small = RECIPES["small"]
    assert engine.calib_defaults["iterations"] == small["iterations"]
    assert engine.calib_defaults["lr_logits"] == small["lr_logits"]
    assert engine.kmeans_default == 50
