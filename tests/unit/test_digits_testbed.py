"""Fast tests (< 60 s on a 2-core CPU) for the embedded digits data, DiT and classifier."""
from __future__ import annotations

import torch
import pytest

from vq4dit.testbed import CLASSIFIER_DIR, DIGITS_DIT_DIR
from vq4dit.testbed.classifier import classifier_accuracy, load_classifier
from vq4dit.testbed.data import digit_split_indices, load_digit_images, random_shift
from vq4dit.testbed.model import (
    DiTTrainConfig,
    dit_loss,
    disable_builtin_label_dropout,
    label_embedders,
    load_digits_dit,
    make_ddpm_scheduler,
    make_digits_dit,
    train_dit,
)

TINY = dict(num_layers=1, num_attention_heads=2, attention_head_dim=16)


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# ---- data --------------------------------------------------------------------------------------

def test_data_shapes_and_range():
    x, y = load_digit_images("all")
    assert x.shape == (1797, 1, 16, 16) and x.dtype == torch.float32
    assert y.shape == (1797,) and y.dtype == torch.long
    assert x.min() >= -1.0 and x.max() <= 1.0
    assert x.min() == -1.0 and x.max() > 0.9  # background is -1, strokes reach ~1
    assert set(y.tolist()) == set(range(10))


def test_split_is_disjoint_stratified_and_deterministic():
    tr, te = digit_split_indices(0)
    assert len(set(tr.tolist()) & set(te.tolist())) == 0
    assert sorted(tr.tolist() + te.tolist()) == list(range(1797))
    assert len(te) == 360
    x, y = load_digit_images("all")
    xte, yte = load_digit_images("test")
    assert torch.equal(xte, x[te]) and torch.equal(yte, y[te])
    assert yte.bincount(minlength=10).min() >= 35  # every class ~20% held out
    tr2, te2 = digit_split_indices(0)
    assert torch.equal(te, te2)
    assert not torch.equal(te, digit_split_indices(1)[1])


def test_random_shift_keeps_shape_and_range():
    x, _ = load_digit_images("test")
    g = torch.Generator().manual_seed(0)
    s = random_shift(x[:32], 1, g)
    assert s.shape == (32, 1, 16, 16) and s.min() >= -1 and s.max() <= 1
    assert torch.equal(random_shift(x[:4], 0, g), x[:4])


# ---- classifier --------------------------------------------------------------------------------

def test_shipped_classifier_beats_97_percent_on_held_out_split():
    clf = load_classifier()
    x, y = load_digit_images("test")
    assert clf(x[:5]).shape == (5, 10)
    f = clf.features(x[:5])
    assert f.shape[0] == 5 and 64 <= f.shape[1] <= 128
    assert classifier_accuracy(clf, x, y) >= 0.97
    assert load_classifier(CLASSIFIER_DIR) is not None


# ---- DiT ---------------------------------------------------------------------------------------

def test_make_digits_dit_structure_and_zero_init():
    m = make_digits_dit()
    assert m.config.sample_size == 16 and m.config.num_embeds_ada_norm == 10
    assert m.inner_dim == 256 and len(m.transformer_blocks) == 6
    # null class (index 10) has an embedding row in every block
    for emb in label_embedders(m):
        assert emb.embedding_table.num_embeddings == 11
    assert all(float(b.norm1.linear.weight.detach().abs().max()) == 0 for b in m.transformer_blocks)
    assert float(m.proj_out_2.weight.detach().abs().max()) == 0
    with torch.no_grad():
        out = m(torch.randn(2, 1, 16, 16), timestep=torch.tensor([1, 999]), class_labels=torch.tensor([3, 10])).sample
    assert out.shape == (2, 1, 16, 16) and float(out.abs().max()) == 0  # adaLN-zero: eps = 0 at init


def test_builtin_label_dropout_disabled_in_train_mode():
    torch.manual_seed(0)
    m = make_digits_dit(**TINY)
    for p in m.parameters():  # make the output depend on the labels
        torch.nn.init.normal_(p, std=0.3)
    disable_builtin_label_dropout(m)
    m.train()
    x, t, y = torch.randn(64, 1, 16, 16), torch.full((64,), 500), torch.zeros(64, dtype=torch.long)
    a = m(x, timestep=t, class_labels=y).sample
    b = m(x, timestep=t, class_labels=y).sample
    assert torch.equal(a, b)


def test_shipped_dit_loads_and_samples():
    from vq4dit.sampling import null_class_id, sample

    if not (DIGITS_DIT_DIR / "transformer" / "config.json").exists():
        pytest.skip("assets/digits-dit not exported yet")
    model, scheduler = load_digits_dit()
    assert null_class_id(model) == 10
    assert model.transformer_blocks[0].norm1.emb.class_embedder.embedding_table.num_embeddings == 11
    assert next(model.parameters()).dtype == torch.float32
    x = sample(model, [0, 7], num_steps=3, guidance_scale=4.0, seed=0, scheduler=scheduler)
    assert x.shape == (2, 1, 16, 16)
    assert torch.isfinite(x).all() and x.min() >= -1 and x.max() <= 1


def test_training_lowers_loss_on_fixed_batch(tmp_path):
    x, y = load_digit_images("all")
    cfg = DiTTrainConfig(**TINY, batch_size=32, steps=40, warmup_steps=5, lr=2e-3, log_every=1000,
                         ckpt_every=20)
    g = torch.Generator().manual_seed(123)
    idx = torch.randint(0, len(y), (64,), generator=g)
    x0, labels = x[idx], y[idx]
    noise = torch.randn(x0.shape, generator=g)
    t = torch.randint(0, 1000, (64,), generator=g)
    ddpm = make_ddpm_scheduler(cfg)

    torch.manual_seed(cfg.seed)
    init = make_digits_dit(**TINY)
    with torch.no_grad():
        before = dit_loss(init, x0, labels, noise, t, ddpm).item()
    res = train_dit(cfg, ckpt_dir=tmp_path / "ck", out_dir=tmp_path / "out", verbose=False)
    with torch.no_grad():
        after = dit_loss(res["model"].eval(), x0, labels, noise, t, ddpm).item()
    assert after < 0.8 * before, (before, after)
    # the export is a loadable diffusers dir
    m, _ = load_digits_dit(tmp_path / "out")
    assert m.config.num_layers == 1

    # resuming from the step-20 checkpoint reproduces the straight run exactly
    for p in (tmp_path / "ck").glob("ckpt-0000040.*"):
        p.unlink()
    res2 = train_dit(cfg, ckpt_dir=tmp_path / "ck", verbose=False)
    assert res2["losses"] == res["losses"][20:]
