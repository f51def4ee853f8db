"""The sweep's baselines (ldm/eval/baselines.py): the noise estimate, the classical filters against scipy, identity, and
the autoencoder round trip."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.ndimage import median_filter

from ldm.eval.baselines import FILTERS, autoencoder_baseline, estimate_noise_sigma, filter_baseline, identity_baseline
from ldm.eval.sources import heldout_images
from ldm.refine import Refiner


@pytest.fixture(scope="module")
def refiner(expert_checkpoints):
    return Refiner.from_checkpoints(expert_checkpoints, device="cpu")


def test_noise_sigma_estimate_on_pure_noise():
    rng = np.random.default_rng(0)
    flat = np.full((128, 128, 3), 0.5)
    assert estimate_noise_sigma(flat) == 0.0
    assert estimate_noise_sigma(flat + rng.normal(0, 0.05, flat.shape)) == pytest.approx(0.05, rel=0.05)


@pytest.mark.parametrize("name", FILTERS)
def test_filters_reduce_noise_and_keep_shape(name):
    g = torch.Generator().manual_seed(0)
    clean = torch.linspace(-0.5, 0.5, 32).expand(2, 3, 32, 32).contiguous()
    noisy = (clean + 0.1 * torch.randn(clean.shape, generator=g)).clamp(-1, 1)
    out = filter_baseline(name)(noisy)
    assert out.shape == noisy.shape and out.dtype == noisy.dtype
    assert float(((out - clean) ** 2).mean()) < 0.5 * float(((noisy - clean) ** 2).mean())


def test_median_filter_matches_scipy():
    x = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(1)) * 2 - 1
    out = filter_baseline("median")(x)
    unit = ((x.double() + 1) / 2)[0].permute(1, 2, 0).numpy()
    expected = median_filter(unit, size=(3, 3, 1), mode="mirror")
    np.testing.assert_allclose(((out.double()[0] + 1) / 2).permute(1, 2, 0).numpy(), expected, atol=1e-6)


def test_identity():
    x = torch.zeros(1, 3, 4, 4)
    assert torch.equal(identity_baseline()(x), x)


def test_autoencoder_baseline_is_the_first_stage_round_trip(refiner):
    x = heldout_images(1, 28, seed=0)[0].image  # 28 px: padded to 28 (multiple of 4) -> no padding needed
    model = refiner.model
    with torch.inference_mode():
        expected = model.decode_first_stage(model.get_first_stage_encoding(model.encode_first_stage(x))).clamp(-1, 1)
    torch.testing.assert_close(autoencoder_baseline(model)(x), expected)
    odd = heldout_images(1, 30, seed=0)[0].image  # padded to 32 and cropped back
    assert autoencoder_baseline(model)(odd).shape == odd.shape
