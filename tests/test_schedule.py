"""Schedule math against independent float64 numpy references written here."""

from __future__ import annotations

import logging
import math

import numpy as np
import pytest
import torch

from ldm.modules.diffusionmodules.util import (
    extract_into_tensor,
    make_beta_schedule,
    make_ddim_sampling_parameters,
    make_ddim_timesteps,
    make_schedule_buffers,
    noise_like,
    timestep_embedding,
)
from ldm.sampling import NoiseSchedule, build_plan

T = 1000


def ref_betas(kind: str, n: int, start: float, end: float, s: float = 8e-3) -> np.ndarray:
    if kind == "linear":
        return np.array([(math.sqrt(start) + (math.sqrt(end) - math.sqrt(start)) * i / (n - 1)) ** 2 for i in range(n)])
    if kind == "sqrt_linear":
        return np.array([start + (end - start) * i / (n - 1) for i in range(n)])
    if kind == "sqrt":
        return np.sqrt(ref_betas("sqrt_linear", n, start, end))
    f = [math.cos(((i / n) + s) / (1 + s) * math.pi / 2) ** 2 for i in range(n + 1)]
    return np.clip([1 - f[i + 1] / f[i] for i in range(n)], 0, 0.999)


@pytest.mark.parametrize("kind", ["linear", "cosine", "sqrt_linear", "sqrt"])
@pytest.mark.parametrize("n", [10, 1000])
def test_beta_schedules_match_reference(kind, n):
    got = make_beta_schedule(kind, n, linear_start=0.0015, linear_end=0.0195)
    assert got.dtype == torch.float64 and got.shape == (n,)
    np.testing.assert_allclose(got.numpy(), ref_betas(kind, n, 0.0015, 0.0195), rtol=1e-12, atol=1e-15)


def test_linear_is_ldm_sqrt_space():
    b = make_beta_schedule("linear", T, 0.0015, 0.0195)
    assert b[0].item() == pytest.approx(0.0015, rel=1e-12) and b[-1].item() == pytest.approx(0.0195, rel=1e-12)
    # linear in sqrt space, so not linear in beta space
    assert not np.allclose(np.diff(b.numpy()), np.diff(b.numpy())[0])


def test_unknown_schedule_is_a_clear_error():
    with pytest.raises(ValueError, match="beta_schedule='lin'.*linear"):
        make_beta_schedule("lin", 10)


def test_ddim_uniform_grid_is_ldm():
    grid = make_ddim_timesteps("uniform", 50, T)
    assert grid.tolist() == list(range(1, 1000, 20))
    assert grid[0] == 1 and grid[-1] == 981


@pytest.mark.parametrize("steps", [1, 7, 10, 50, 100, 250, 333, 999, 1000])
def test_ddim_grids_are_valid_indices(steps):
    for method in ("uniform", "quad"):
        grid = make_ddim_timesteps(method, steps, T)
        assert grid.min() >= 1 and grid.max() < T
        assert np.all(np.diff(grid) >= 0)
    c = T // steps
    expect = [t + 1 for t in range(0, T, c) if t + 1 < T]
    assert make_ddim_timesteps("uniform", steps, T).tolist() == expect


def test_ddim_quad_grid():
    grid = make_ddim_timesteps("quad", 50, T)
    ref = (np.linspace(0, np.sqrt(T * 0.8), 50) ** 2).astype(int) + 1
    assert grid.tolist() == ref.tolist()


@pytest.mark.parametrize("bad", [0, -1, 1001])
def test_ddim_steps_out_of_range(bad):
    with pytest.raises(ValueError, match="ddim_num_steps"):
        make_ddim_timesteps("uniform", bad, T)


@pytest.mark.parametrize("eta", [0.0, 1.0, 0.5])
def test_ddim_sampling_parameters_match_reference(eta):
    betas = ref_betas("linear", T, 0.0015, 0.0195)
    acp = np.cumprod(1 - betas)
    grid = make_ddim_timesteps("uniform", 50, T)
    sig, a, ap = make_ddim_sampling_parameters(torch.from_numpy(acp), grid, eta)
    ref_a = acp[grid]
    ref_ap = np.array([acp[0]] + [acp[g] for g in grid[:-1]])
    ref_sig = eta * np.sqrt((1 - ref_ap) / (1 - ref_a) * (1 - ref_a / ref_ap))
    for got, ref in ((a, ref_a), (ap, ref_ap), (sig, ref_sig)):
        assert got.dtype == torch.float64
        np.testing.assert_allclose(got.numpy(), ref, rtol=1e-12, atol=1e-15)
    if eta == 0:
        assert (sig == 0).all()


def test_ddim_negative_eta_rejected():
    with pytest.raises(ValueError, match="eta"):
        make_ddim_sampling_parameters(torch.linspace(0.99, 0.01, 10), [1, 5], -0.1)


@pytest.mark.parametrize("dim", [6, 7, 32])
def test_timestep_embedding_cos_first(dim):
    t = torch.tensor([0, 1, 17, 999])
    emb = timestep_embedding(t, dim)
    half = dim // 2
    freqs = np.exp(-math.log(10000) * np.arange(half) / half)
    args = t.numpy()[:, None].astype(np.float64) * freqs[None]
    ref = np.concatenate([np.cos(args), np.sin(args)], axis=1)
    if dim % 2:
        ref = np.concatenate([ref, np.zeros((4, 1))], axis=1)
    np.testing.assert_allclose(emb.numpy(), ref, atol=2e-4)
    assert emb.shape == (4, dim)


def test_extract_into_tensor():
    a = torch.arange(10.0)
    out = extract_into_tensor(a, torch.tensor([3, 7]), (2, 3, 4, 4))
    assert out.shape == (2, 1, 1, 1) and out.flatten().tolist() == [3.0, 7.0]


@pytest.mark.parametrize("v_posterior", [0.0, 0.3])
def test_schedule_buffers_match_reference(v_posterior):
    betas = ref_betas("linear", T, 0.0015, 0.0195)
    got = {k: v.numpy() for k, v in make_schedule_buffers(torch.from_numpy(betas), v_posterior).items()}
    alphas = 1 - betas
    acp = np.cumprod(alphas)
    acp_prev = np.append(1.0, acp[:-1])
    post_var = (1 - v_posterior) * betas * (1 - acp_prev) / (1 - acp) + v_posterior * betas
    ref = {
        "alphas_cumprod": acp,
        "alphas_cumprod_prev": acp_prev,
        "sqrt_alphas_cumprod": np.sqrt(acp),
        "sqrt_one_minus_alphas_cumprod": np.sqrt(1 - acp),
        "log_one_minus_alphas_cumprod": np.log(1 - acp),
        "sqrt_recip_alphas_cumprod": np.sqrt(1 / acp),
        "sqrt_recipm1_alphas_cumprod": np.sqrt(1 / acp - 1),
        "posterior_variance": post_var,
        "posterior_log_variance_clipped": np.log(np.maximum(post_var, 1e-20)),
        "posterior_mean_coef1": betas * np.sqrt(acp_prev) / (1 - acp),
        "posterior_mean_coef2": (1 - acp_prev) * np.sqrt(alphas) / (1 - acp),
    }
    for k, v in ref.items():
        np.testing.assert_allclose(got[k], v, rtol=1e-10, atol=1e-14, err_msg=k)
    with np.errstate(divide="ignore"):  # t = 0 has zero posterior variance; replaced by t = 1 as in latent-diffusion
        lvlb = betas**2 / (2 * post_var * alphas * (1 - acp))
    lvlb[0] = lvlb[1]
    np.testing.assert_allclose(got["lvlb_weights"], lvlb, rtol=1e-10)


def test_schedule_buffers_reject_bad_betas():
    with pytest.raises(ValueError, match="betas"):
        make_schedule_buffers(torch.tensor([0.1, 1.5]))


def test_ddim_helpers_take_compvis_verbose_and_log_instead_of_printing(caplog, capsys):
    acp = torch.from_numpy(np.cumprod(1 - ref_betas("linear", T, 0.0015, 0.0195)))
    with caplog.at_level(logging.INFO, logger="ldm.modules.diffusionmodules.util"):
        grid = make_ddim_timesteps("uniform", 50, T, True)
        quiet = make_ddim_timesteps(ddim_discr_method="uniform", num_ddim_timesteps=50, num_ddpm_timesteps=T, verbose=False)
        assert np.array_equal(grid, quiet) and len(caplog.records) == 1 and "981" in caplog.text
        loud = make_ddim_sampling_parameters(acp, grid, 0.5, True)
        assert len(caplog.records) == 3 and "sigma_t" in caplog.text
        caplog.clear()
        silent = make_ddim_sampling_parameters(alphacums=acp, ddim_timesteps=grid, eta=0.5, verbose=False)
        assert not caplog.records
    assert all(torch.equal(a, b) for a, b in zip(loud, silent))
    assert capsys.readouterr().out == ""


def test_timestep_embedding_repeat_only_is_compvis():
    t = torch.tensor([0, 3, 999])
    emb = timestep_embedding(t, 5, 10000, True)
    assert emb.shape == (3, 5) and emb.dtype == t.dtype and (emb == t[:, None]).all()
    assert torch.equal(timestep_embedding(t, 6, repeat_only=False), timestep_embedding(t, 6))


def test_noise_like_compvis_signature_draws_from_the_generator():
    state = torch.get_rng_state()
    a = noise_like((3, 2, 4, 4), "cpu", generator=torch.Generator().manual_seed(5))
    assert torch.equal(a, torch.randn(3, 2, 4, 4, generator=torch.Generator().manual_seed(5)))
    shared = noise_like(torch.Size([3, 2, 4, 4]), torch.device("cpu"), True, generator=torch.Generator().manual_seed(5))
    assert shared.shape == (3, 2, 4, 4) and torch.equal(shared[0], a[0]) and torch.equal(shared[2], a[0])
    assert torch.equal(torch.get_rng_state(), state)  # the global RNG is untouched
    assert noise_like((2, 3), "cpu").shape == (2, 3)  # no generator: the device's RNG, as latent-diffusion


def repo_schedules() -> list[torch.Tensor]:
    """alphas_cumprod of every schedule this repo builds: each beta_schedule with latent-diffusion's, the configs' and
    Stable Diffusion's (scaled_linear) ranges, the tests' T = 10000 one, and a model's float32 buffer."""
    out = []
    for kind in ("linear", "cosine", "sqrt_linear", "sqrt"):
        for start, end in ((1e-4, 2e-2), (0.0015, 0.0195), (0.00085, 0.012)):
            for n in (10, 1000):
                out.append(torch.cumprod(1 - make_beta_schedule(kind, n, start, end), 0))
    out.append(torch.cumprod(1 - make_beta_schedule("linear", 10_000, 1.5e-4, 1.95e-3), 0))
    out.append(torch.cumprod(1 - make_beta_schedule("linear", 1000, 0.00085, 0.012), 0).float())
    return out


def test_every_schedule_the_repo_builds_is_accepted():
    for acp in repo_schedules():
        schedule = NoiseSchedule.from_alphas_cumprod(acp)
        assert torch.equal(schedule.alphas_cumprod, acp.double())


def _acp(values):
    return torch.tensor(values, dtype=torch.float64)


@pytest.mark.parametrize(
    "acp, match",
    [
        (torch.linspace(0.01, 0.999, 1000, dtype=torch.float64), r"alphas_cumprod\[1\]=.* not below alphas_cumprod\[0\]"),
        (_acp([1.0, 0.9, 0.5]), r"alphas_cumprod\[0\]=1.0 is not a finite value strictly inside \(0, 1\)"),
        (_acp([0.9, 0.5, 0.0]), r"alphas_cumprod\[2\]=0.0 is not a finite"),
        (_acp([0.9, float("nan"), 0.1]), r"alphas_cumprod\[1\]=nan"),
        (_acp([0.9, 0.5, float("-inf")]), r"alphas_cumprod\[2\]=-inf"),
        (_acp([0.9, 0.5, 0.5, 0.1]), r"alphas_cumprod\[2\]=0.5 is not below alphas_cumprod\[1\]=0.5"),
        (_acp([[0.9, 0.5]]), r"shape \(1, 2\); a noise schedule is 1-D"),
        (_acp([]), r"shape \(0,\)"),
    ],
)
def test_from_alphas_cumprod_rejects_invalid_schedules_in_one_line(acp, match):
    with pytest.raises(ValueError, match=match) as err:
        NoiseSchedule.from_alphas_cumprod(acp)
    assert "\n" not in str(err.value) and "torch.cumprod(1 - betas, 0)" in str(err.value)


def test_a_schedule_starting_at_one_no_longer_reaches_the_tail_planner():
    """alphas_cumprod[0] == 1 used to pass and fail later in exact_tail with "cannot convert float NaN to integer"."""
    acp = torch.cat([torch.ones(1, dtype=torch.float64), torch.linspace(0.999, 0.01, 999, dtype=torch.float64)])
    with pytest.raises(ValueError, match=r"alphas_cumprod\[0\]=1.0"):
        build_plan(NoiseSchedule.from_alphas_cumprod(acp), 500, [lambda x, t, c=None: x], "cpu", tail_steps=5)
