"""Degradation suite: determinism per seed, shape/dtype/range, each family against a reference, registry, folders."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image
from scipy.ndimage import gaussian_filter

from ldm.eval.degrade import (
    DEGRADATIONS,
    JPEG,
    BlurNoise,
    ColourBlotches,
    ElasticWarp,
    PatchShuffle,
    VQRoundTrip,
    build_degradation,
    degradation_from_spec,
)
from ldm.eval.degrade_files import apply_to_uint8, degrade_folder, file_seed
from ldm.imageio import ImageLoadError, read_png_metadata
from ldm.models.autoencoder import VQModel, VQModelInterface

N_EMBED = 64


def _vq_config(ddconfig: dict) -> dict:
    return {
        "target": "ldm.models.autoencoder.VQModelInterface",
        "params": {"embed_dim": 3, "n_embed": N_EMBED, "ddconfig": ddconfig, "lossconfig": {"target": "torch.nn.Identity"}},
    }


@pytest.fixture(scope="module")
def tiny_vq() -> VQModelInterface:
    """f4 VQModelInterface with conftest's TINY_DDCONFIG and random weights (a candidate for conftest)."""
    from conftest import TINY_DDCONFIG

    torch.manual_seed(0)
    return VQModelInterface(copy.deepcopy(TINY_DDCONFIG), {"target": "torch.nn.Identity"}, n_embed=N_EMBED, embed_dim=3)


@pytest.fixture
def images() -> torch.Tensor:
    from conftest import photo_crops

    return photo_crops(3, 32, seed=1)


def _cases(vq: VQModelInterface) -> dict[str, object]:
    return {
        "vq_full": VQRoundTrip(vq),
        "vq_reduced": VQRoundTrip(vq, codebook_fraction=0.25),
        "jpeg": JPEG(quality=15),
        "blur_noise": BlurNoise(sigma=1.0, noise_std=0.05),
        "elastic_warp": ElasticWarp(amplitude=0.05, scale=0.3),
        "patch_duplicate": PatchShuffle(n_patches=2, patch_size=0.25),
        "patch_swap": PatchShuffle(n_patches=2, patch_size=0.25, mode="swap"),
        "colour_blotches": ColourBlotches(n_blobs=2, radius=0.2, strength=0.5),
    }


CASES = ["vq_full", "vq_reduced", "jpeg", "blur_noise", "elastic_warp", "patch_duplicate", "patch_swap", "colour_blotches"]


@pytest.mark.parametrize("case", CASES)
def test_deterministic_shape_dtype_range_and_changes_image(case, tiny_vq, images):
    deg = _cases(tiny_vq)[case]
    rng_before = torch.random.get_rng_state()
    a = deg(images, 7)
    b = deg(images, torch.Generator().manual_seed(7))
    assert torch.equal(torch.random.get_rng_state(), rng_before), "the global RNG must not be touched"
    assert torch.equal(a, b)
    assert a.shape == images.shape and a.dtype == images.dtype and a.device == images.device
    assert a.min() >= -1 and a.max() <= 1
    per_image_change = (a - images).abs().flatten(1).mean(1)
    assert (per_image_change > 1e-3).all(), per_image_change
    c = deg(images, 8)
    if deg.stochastic:
        assert not torch.equal(a, c)
    else:
        assert torch.equal(a, c)


@pytest.mark.parametrize("case", CASES)
def test_dtype_preserved_for_float64_and_bfloat16(case, tiny_vq, images):
    deg = _cases(tiny_vq)[case]
    for dtype in (torch.float64, torch.bfloat16):
        out = deg(images.to(dtype), 3)
        assert out.dtype == dtype and out.shape == images.shape
        assert torch.allclose(out.float(), deg(images, 3), atol=0.05 if dtype == torch.bfloat16 else 1e-4)


def test_stochastic_flags(tiny_vq):
    assert not VQRoundTrip(tiny_vq).stochastic and VQRoundTrip(tiny_vq, 0.5).stochastic
    assert not JPEG().stochastic
    assert not BlurNoise(sigma=1.0, noise_std=0.0).stochastic and BlurNoise().stochastic


def test_generator_is_consumed_across_calls(images):
    g = torch.Generator().manual_seed(0)
    deg = ColourBlotches()
    assert not torch.equal(deg(images, g), deg(images, g))


def test_vq_full_codebook_matches_model_round_trip(tiny_vq, images):
    with torch.no_grad():
        expected = tiny_vq.decode(tiny_vq.encode(images)).clamp(-1, 1)
    assert torch.allclose(VQRoundTrip(tiny_vq)(images, 0), expected, atol=1e-5)


def test_vq_reduced_codebook_snaps_to_seeded_subset(tiny_vq, images):
    # one code left: every latent position becomes the same codebook row, so the output is one of N_EMBED flat decodes
    out = VQRoundTrip(tiny_vq, codebook_fraction=1 / N_EMBED)(images[:1], 5)
    codebook = tiny_vq.quantize.embedding.weight.detach()
    with torch.no_grad():
        flat = tiny_vq.decode(codebook[:, :, None, None].expand(-1, -1, 8, 8).contiguous(), force_not_quantize=True)
    distances = (flat.clamp(-1, 1) - out).abs().flatten(1).amax(1)
    assert distances.min() < 1e-5
    outs = [VQRoundTrip(tiny_vq, codebook_fraction=1 / N_EMBED)(images[:1], s) for s in range(6)]
    assert len({int((flat.clamp(-1, 1) - o).abs().flatten(1).amax(1).argmin()) for o in outs}) > 1


def test_vq_f8_vqmodel_pads_odd_sizes(tiny_ddconfig):
    torch.manual_seed(1)
    f8 = VQModel({**tiny_ddconfig, "ch_mult": [1, 1, 2, 2]}, {"target": "torch.nn.Identity"}, n_embed=16, embed_dim=3)
    assert f8.downsampling_factor == 8
    x = torch.rand(2, 3, 36, 28, generator=torch.Generator().manual_seed(0)) * 2 - 1
    out = VQRoundTrip(f8, codebook_fraction=0.5)(x, 0)
    assert out.shape == x.shape and (out - x).abs().mean() > 1e-3
    assert f8.training, "the model's train/eval mode must be restored"


def test_vq_first_stage_from_config_and_yaml(tmp_path, tiny_ddconfig, images):
    config = _vq_config(tiny_ddconfig)
    torch.manual_seed(2)
    from_mapping = VQRoundTrip(config, codebook_fraction=0.5)
    assert isinstance(from_mapping.first_stage, VQModelInterface)
    path = tmp_path / "vq.yaml"
    OmegaConf.save(OmegaConf.create({"model": config}), path)
    deg = degradation_from_spec(f"vq_roundtrip:first_stage={path},codebook_fraction=0.5")
    assert deg.params()["first_stage"] == str(path) and deg.codebook_fraction == 0.5
    assert deg(images, 0).shape == images.shape
    with pytest.raises(FileNotFoundError, match="not a file"):
        VQRoundTrip(str(tmp_path / "missing.yaml"))
    with pytest.raises(TypeError, match="VQModel"):
        VQRoundTrip(torch.nn.Conv2d(3, 3, 1))
    with pytest.raises(ValueError, match="codebook_fraction"):
        VQRoundTrip(from_mapping.first_stage, codebook_fraction=1.5)


def test_blur_matches_scipy_and_noise_has_requested_std():
    x = torch.rand(2, 3, 40, 40, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 2 - 1
    blurred = BlurNoise(sigma=1.5, noise_std=0.0)(x, 0)
    ref = gaussian_filter(x.numpy(), sigma=(0, 0, 1.5, 1.5), mode="nearest", truncate=3.0)
    np.testing.assert_allclose(blurred.numpy(), ref, atol=1e-12)
    grey = torch.zeros(4, 3, 64, 64)
    noise = BlurNoise(sigma=0.0, noise_std=0.1)(grey, 0)
    assert abs(float(noise.std()) - 0.1) < 0.005 and abs(float(noise.mean())) < 0.005


def test_jpeg_lower_quality_is_further_from_input(images):
    err = {q: float((JPEG(quality=q)(images, 0) - images).pow(2).mean()) for q in (5, 30, 95)}
    assert err[5] > err[30] > err[95] > 0


def test_elastic_displacement_amplitude_and_smoothness(images):
    warp = ElasticWarp(amplitude=0.05, scale=0.5)
    disp = warp.displacement(2, 32, 48, torch.Generator().manual_seed(0), images)
    assert disp.shape == (2, 2, 32, 48)
    assert torch.allclose(disp.abs().amax(dim=(1, 2, 3)), torch.full((2,), 0.05 * 32))
    # smooth: neighbouring displacements differ by a small fraction of the amplitude
    assert disp.diff(dim=-1).abs().max() < 0.25 * 0.05 * 32
    small = (ElasticWarp(amplitude=0.005)(images, 0) - images).abs().mean()
    large = (ElasticWarp(amplitude=0.08)(images, 0) - images).abs().mean()
    assert large > 2 * small


@pytest.mark.parametrize("mode", ["duplicate", "swap"])
def test_patch_shuffle_moves_exact_patches_without_feather(mode, images):
    deg = PatchShuffle(n_patches=1, patch_size=0.25, mode=mode, feather=0.0)
    x = images[:1]
    out = deg(x, 11)
    p, [(sy, sx, dy, dx)] = deg.patch_pairs(32, 32, torch.Generator().manual_seed(11))
    assert p == 8 and (abs(sy - dy) >= p or abs(sx - dx) >= p)
    assert torch.equal(out[..., dy : dy + p, dx : dx + p], x[..., sy : sy + p, sx : sx + p])
    changed = torch.zeros(32, 32, dtype=torch.bool)
    changed[dy : dy + p, dx : dx + p] = True
    if mode == "swap":
        assert torch.equal(out[..., sy : sy + p, sx : sx + p], x[..., dy : dy + p, dx : dx + p])
        changed[sy : sy + p, sx : sx + p] = True
    assert torch.equal(out[..., ~changed], x[..., ~changed])


def test_patch_shuffle_rejects_patches_that_do_not_fit(images):
    with pytest.raises(ValueError, match="two disjoint patches"):
        PatchShuffle(patch_size=0.25)(images[:, :, :3, :3], 0)
    # the largest allowed patch in a tight image: only the positions that admit a disjoint partner are drawn
    tight = images[:, :, :20, :20]
    for seed in range(5):
        p, pairs = PatchShuffle(patch_size=0.5).patch_pairs(20, 20, torch.Generator().manual_seed(seed))
        assert p == 10 and all(abs(sy - dy) >= p or abs(sx - dx) >= p for sy, sx, dy, dx in pairs)
    assert PatchShuffle(patch_size=0.5)(tight, 0).shape == tight.shape


def test_colour_blotch_peak_shift_equals_strength():
    grey = torch.zeros(3, 3, 64, 64)
    out = ColourBlotches(n_blobs=1, radius=0.15, strength=0.3)(grey, 4)
    peak = out.norm(dim=1).flatten(1).amax(1)
    assert ((peak > 0.28) & (peak <= 0.3 + 1e-6)).all(), peak
    # smooth: the shift varies little between neighbouring pixels
    assert out.diff(dim=-1).abs().max() < 0.1


def test_registry_lists_and_errors(tiny_vq):
    assert set(DEGRADATIONS) == {
        "vq_roundtrip",
        "jpeg",
        "blur_noise",
        "elastic_warp",
        "patch_shuffle",
        "colour_blotches",
        "local_warp",
        "local_blotch",
        "local_shuffle",
        "local_vq",
        "local_paint",
        "local_noise",
        "local_smear",
        "local_block",
        "local_none",
    }
    assert isinstance(build_degradation("jpeg", quality=40), JPEG)
    with pytest.raises(KeyError, match=r"unknown degradation 'jpg'.*jpeg\(quality=20\)"):
        build_degradation("jpg")
    with pytest.raises(TypeError, match=r"unknown parameters \['qualty'\].*jpeg\(quality=20\)"):
        build_degradation("jpeg", qualty=3)
    with pytest.raises(TypeError, match=r"missing required parameters \['first_stage'\]"):
        build_degradation("vq_roundtrip")
    with pytest.raises(ValueError, match="quality"):
        build_degradation("jpeg", quality=0)
    with pytest.raises(ValueError, match="mode"):
        build_degradation("patch_shuffle", mode="scramble")
    with pytest.raises(ValueError, match="sigma"):
        build_degradation("blur_noise", sigma="wide")
    with pytest.raises(ValueError, match="does nothing"):
        build_degradation("blur_noise", sigma=0, noise_std=0)


@pytest.mark.parametrize("case", ["jpeg", "blur_noise", "elastic_warp", "patch_swap", "colour_blotches"])
def test_spec_round_trip(case, tiny_vq, images):
    deg = _cases(tiny_vq)[case]
    rebuilt = degradation_from_spec(deg.spec)
    assert type(rebuilt) is type(deg) and rebuilt.params() == deg.params()
    assert torch.equal(rebuilt(images, 1), deg(images, 1))


def test_spec_parse_errors():
    assert degradation_from_spec("jpeg").quality == 20
    assert degradation_from_spec("blur_noise:sigma=2, noise_std=0.01").params() == {"sigma": 2.0, "noise_std": 0.01}
    with pytest.raises(ValueError, match="key=value"):
        degradation_from_spec("jpeg:quality")
    # numbers are ASCII digits: int() would read "٥٠" (Arabic-Indic) and "1_0" as 50 and 10, unseen by the user
    for value in ("\u0665\u0660", "\uff15\uff10", "1_0"):
        with pytest.raises(ValueError, match=r"quality must be an integer in \[1, 100\]"):
            degradation_from_spec(f"jpeg:quality={value}")


def test_input_validation(images):
    deg = JPEG()
    with pytest.raises(ValueError, match=r"\[B, 3, H, W\]"):
        deg(images.permute(0, 2, 3, 1), 0)
    with pytest.raises(ValueError, match="floating"):
        deg((images * 127.5 + 127.5).to(torch.uint8), 0)
    with pytest.raises(ValueError, match=r"in \[-1, 1\]"):
        deg(images * 127.5 + 127.5, 0)
    with pytest.raises(TypeError, match="seed"):
        deg(images, 0.5)


def test_apply_to_uint8_shapes_and_alpha():
    rng = np.random.default_rng(0)
    rgba = rng.integers(0, 256, (24, 20, 4), dtype=np.uint8)
    deg = ColourBlotches(strength=0.6)
    out = apply_to_uint8(deg, rgba, 3)
    assert out.shape == rgba.shape and out.dtype == np.uint8
    assert np.array_equal(out[..., 3], rgba[..., 3]) and not np.array_equal(out[..., :3], rgba[..., :3])
    assert np.array_equal(out, apply_to_uint8(deg, rgba, 3))
    batch = rng.integers(0, 256, (2, 16, 16, 3), dtype=np.uint8)
    assert apply_to_uint8(deg, batch, 0).shape == batch.shape
    with pytest.raises(ValueError, match="uint8"):
        apply_to_uint8(deg, batch.astype(np.float32), 0)


def _write_folder(root, photos) -> None:
    (root / "sub").mkdir(parents=True)
    Image.fromarray(photos[0][::8, ::8]).save(root / "a.png")
    Image.fromarray(photos[1][::8, ::8]).save(root / "sub" / "b.jpg", quality=95)
    rgba = np.concatenate([photos[2][::8, ::8], np.full((*photos[2][::8, ::8].shape[:2], 1), 128, np.uint8)], axis=-1)
    Image.fromarray(rgba).save(root / "c.png")
    (root / "notes.txt").write_text("not an image")
    Image.fromarray(photos[0][::8, ::8]).save(root / ".hidden.png")


def test_degrade_folder_deterministic_per_file(tmp_path, photos):
    src = tmp_path / "src"
    _write_folder(src, photos)
    written = degrade_folder(src, tmp_path / "out1", "colour_blotches", seed=3, strength=0.5)
    rel = sorted(p.relative_to(tmp_path / "out1").as_posix() for p in written)
    assert rel == ["a.png", "c.png", "sub/b.png"]
    for name, source_name in zip(rel, ["a.png", "c.png", "sub/b.jpg"]):
        out = np.asarray(Image.open(tmp_path / "out1" / name))
        source = np.asarray(Image.open(src / source_name))
        assert out.shape == source.shape and not np.array_equal(out[..., :3], source[..., :3])
    meta = read_png_metadata(tmp_path / "out1" / "a.png")
    assert meta["degradation"] == "colour_blotches:n_blobs=3,radius=0.15,strength=0.5"
    assert meta["degradation_seed"] == str(file_seed(3, "a.png"))
    c_alpha = np.asarray(Image.open(tmp_path / "out1" / "c.png"))[..., 3]
    assert np.array_equal(c_alpha, np.asarray(Image.open(src / "c.png"))[..., 3])
    # same seed -> same bytes; a folder holding only one of the files gives that file the same output
    degrade_folder(src, tmp_path / "out2", ColourBlotches(strength=0.5), seed=3)
    for name in rel:
        assert (tmp_path / "out1" / name).read_bytes() == (tmp_path / "out2" / name).read_bytes()
    solo = tmp_path / "solo"
    solo.mkdir()
    (solo / "a.png").write_bytes((src / "a.png").read_bytes())
    degrade_folder(solo, tmp_path / "out3", "colour_blotches", seed=3, strength=0.5)
    assert (tmp_path / "out3" / "a.png").read_bytes() == (tmp_path / "out1" / "a.png").read_bytes()
    degrade_folder(solo, tmp_path / "out4", "colour_blotches", seed=4, strength=0.5)
    assert (tmp_path / "out4" / "a.png").read_bytes() != (tmp_path / "out1" / "a.png").read_bytes()
    assert file_seed(3, "a.png") != file_seed(3, "sub/b.jpg") and file_seed(3, "a.png") == file_seed(3, "a.png")


def _tree(root) -> dict:
    """``{path: bytes}`` of every file under ``root`` (links not followed into)."""
    return {p: p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file() and not p.is_symlink()}


def test_degrade_folder_never_writes_over_or_into_its_input(tmp_path, photos):
    """An output folder above the source folder mapped ``d/clean/clean/x.png`` onto the input ``d/clean/x.png`` and
    overwrote it (only an output folder inside the source was refused); refused now before anything is written."""
    d = tmp_path / "d"
    (d / "clean" / "clean").mkdir(parents=True)
    Image.fromarray(photos[0][::8, ::8]).save(d / "clean" / "x.png")
    Image.fromarray(photos[1][::8, ::8]).save(d / "clean" / "clean" / "x.png")
    before = _tree(tmp_path)
    with pytest.raises(ValueError, match="over the input image .*x.png' of the source folder") as info:
        degrade_folder(d / "clean", d, "jpeg", seed=0)
    assert "\n" not in str(info.value) and "choose an output folder that does not contain the source folder" in str(info.value)
    assert _tree(tmp_path) == before  # d/x.png (the first output) was not written either
    (d / "clean" / "x.png").unlink()  # no collision left, but d/clean/clean/x.png -> d/clean/x.png: into the input
    before = _tree(tmp_path)
    with pytest.raises(ValueError, match="inside the source folder"):
        degrade_folder(d / "clean", d, "jpeg", seed=0)
    assert _tree(tmp_path) == before
    # a link in the output folder that leads into the source folder is followed
    src, dst = tmp_path / "src", tmp_path / "dst"
    (src / "sub").mkdir(parents=True)
    Image.fromarray(photos[0][::8, ::8]).save(src / "a.png")
    Image.fromarray(photos[1][::8, ::8]).save(src / "sub" / "a.png")
    dst.mkdir()
    (dst / "sub").symlink_to(src)
    before = _tree(src)
    with pytest.raises(ValueError, match="over the input image"):
        degrade_folder(src, dst, "jpeg", seed=0)
    assert _tree(src) == before and not (dst / "a.png").exists()
    # an output folder above the source folder is fine where every output lands outside it
    written = degrade_folder(src / "sub", tmp_path, "jpeg", seed=0)
    assert written == [tmp_path / "a.png"] and _tree(src) == before


def test_degrade_folder_errors(tmp_path, photos):
    src = tmp_path / "src"
    _write_folder(src, photos)
    with pytest.raises(ValueError, match="must not be the source folder"):
        degrade_folder(src, src / "out", "jpeg", seed=0)
    with pytest.raises(TypeError, match="already built"):
        degrade_folder(src, tmp_path / "o", JPEG(), seed=0, quality=3)
    with pytest.raises(TypeError, match="unknown parameters"):
        degrade_folder(src, tmp_path / "o", "jpeg", seed=0, qualty=3)
    Image.fromarray(photos[0][::8, ::8]).save(src / "a.jpg")
    with pytest.raises(ValueError, match="both be written"):
        degrade_folder(src, tmp_path / "o", "jpeg", seed=0)
    (src / "a.jpg").unlink()
    (src / "broken.png").write_bytes(b"not a png")
    with pytest.raises(ImageLoadError, match="broken.png"):
        degrade_folder(src, tmp_path / "o", "jpeg", seed=0)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="holds no images"):
        degrade_folder(tmp_path / "empty", tmp_path / "o", "jpeg", seed=0)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        degrade_folder(tmp_path / "nope", tmp_path / "o", "jpeg", seed=0)


# ---------------------------------------------------------------------------------------------------------------------
# bounds (unbounded, colour_blotches:n_blobs=1000000 takes 18 GB and patch_shuffle:n_patches=1000000000 runs for hours)

INTENSITIES = {"noise_std", "strength"}  # amplitudes in [-1, 1] units: a large one clips, it costs nothing


def test_every_count_and_size_parameter_is_bounded_when_built(tiny_vq):
    """Every numeric parameter of every registered degradation, but the intensities, refuses a huge value when the
    degradation is built (before any image is read), naming its range; a new parameter without a bound fails here."""
    import inspect

    from ldm.eval.degrade import degradation_parameters

    checked = []
    for name in sorted(DEGRADATIONS):
        required = {"first_stage": tiny_vq} if "first_stage" in degradation_parameters(name) else {}
        for param, default in degradation_parameters(name).items():
            if param in INTENSITIES or isinstance(default, (bool, str)) or default is inspect.Parameter.empty:
                continue
            with pytest.raises(ValueError, match=rf"{param}.* (in [\[(]|<= )") as info:  # the allowed range
                build_degradation(name, **required, **{param: 10**9 if isinstance(default, int) else 1e9})
            with pytest.raises(ValueError, match=param) as info:  # 401 digits: one short line
                build_degradation(name, **required, **{param: 10**400})
            assert "\n" not in str(info.value) and len(str(info.value)) < 250
            checked.append(f"{name}.{param}")
    assert {
        "colour_blotches.n_blobs",
        "patch_shuffle.n_patches",
        "blur_noise.sigma",
        "local_blotch.n_blobs",
        "local_shuffle.n_patches",
        "local_smear.sigma",
        "local_block.block",
    } <= set(checked)


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("colour_blotches:n_blobs=1000000", "n_blobs must be an integer in [1, 256]"),
        ("patch_shuffle:n_patches=1000000000", "n_patches must be an integer in [1, 256]"),
        ("blur_noise:sigma=1e9", "sigma must be in [0, 1024] (pixels), got 1000000000.0"),
        ("elastic_warp:amplitude=5", "amplitude must be in (0, 4]"),
        (
            "colour_blotches:radius=1" + "0" * 400,
            "radius must be in (0, 4] (a fraction of the image's or box's shorter "
            "side), got 10000000000000000000... (401 characters)",
        ),
        ("blur_noise:noise_std=1" + "0" * 400, "noise_std must be a finite number >= 0"),
    ],
)
def test_bounds_are_named_in_the_error(spec, message):
    with pytest.raises(ValueError) as info:
        degradation_from_spec(spec)
    assert message in str(info.value)


def test_the_largest_counts_run_in_bounded_memory():
    """256 blobs are computed BLOB_CHUNK at a time, to the same result as all at once; 256 patches run."""
    images = torch.rand(2, 3, 24, 20, generator=torch.Generator().manual_seed(0)) * 2 - 1
    blotches = ColourBlotches(n_blobs=256)
    chunked = blotches(images, 5)
    blotches.BLOB_CHUNK = 256  # all at once, as before the chunks
    torch.testing.assert_close(blotches(images, 5), chunked)
    assert ColourBlotches(n_blobs=3)(images, 5).shape == images.shape
    assert PatchShuffle(n_patches=256)(images, 0).shape == images.shape


def test_a_pixel_space_first_stage_is_named_plainly():
    from ldm.models.autoencoder import IdentityFirstStage

    with pytest.raises(
        TypeError,
        match=r"first_stage is an IdentityFirstStage, the first stage of a pixel-space "
        r"model: it has no VQ codebook .* pass first_stage=<VQ config.yaml>",
    ):
        VQRoundTrip(IdentityFirstStage())
