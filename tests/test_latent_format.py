"""The cached-latent format (ldm/data/latent_format.py): the first stage's hash, .npy headers checked before anything
is allocated, and the variant draw shared with the image dataset."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from test_latent_cache import first_stage_config

from ldm.data.latent_format import cached_first_stage_sha256, choose_variant, decode_npy, encode_npy, first_stage_sha256
from ldm.util import instantiate_from_config


def test_first_stage_sha256_follows_the_weights_not_the_object_or_key_order():
    torch.manual_seed(0)
    a = instantiate_from_config(first_stage_config(None))
    b = instantiate_from_config(first_stage_config(None))
    b.load_state_dict(dict(reversed(list(a.state_dict().items()))))
    assert first_stage_sha256(a) == first_stage_sha256(b) == cached_first_stage_sha256(b)
    with torch.no_grad():
        b.encoder.conv_in.weight[0, 0, 0, 0] += 1e-3
    assert cached_first_stage_sha256(b) != first_stage_sha256(a)  # in-place change: the cached value is recomputed
    assert len(first_stage_sha256(a)) == 64


def test_decode_npy_checks_the_header_before_allocating():
    array = np.arange(24, dtype=np.float32).reshape(2, 3, 2, 2)
    data = encode_npy(array)
    assert data == encode_npy(array.copy())
    np.testing.assert_array_equal(decode_npy(data, (2, 3, -1, -1)), array)
    assert np.array_equal(decode_npy(encode_npy(array.astype(np.float16)), (2, 3, 2, 2)), array.astype(np.float16))
    cases = {
        "shape": (data, (2, 3, 2, 3)),
        "holds": (data[:-4], None),
        "dtype": (encode_npy(array.astype(np.float64)), None),
        "Fortran": (
            encode_npy(np.asfortranarray(array[0, 0])).replace(b"'fortran_order': False", b"'fortran_order': True "),
            None,
        ),
        "valid .npy": (b"garbage", None),
    }
    for expected, (blob, shape) in cases.items():
        with pytest.raises(ValueError, match=expected):
            decode_npy(blob, shape)
    buffer = io.BytesIO()
    np.save(buffer, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(ValueError, match="dtype object"):
        decode_npy(buffer.getvalue())


def test_variant_draw_is_the_image_datasets_flip_draw():
    for index in range(50):
        image_rng, cache_rng = np.random.default_rng([3, 1, index]), np.random.default_rng([3, 1, index])
        assert choose_variant(cache_rng, 1, True, True, True) == int(image_rng.random() < 0.5)
    assert choose_variant(np.random.default_rng(0), 3, False, False, True) == 1  # middle crop, no stored flips
