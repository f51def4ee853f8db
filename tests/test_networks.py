"""UNet and first-stage networks: shapes over config sweeps, gradients, attention numerics vs float64 references."""

from __future__ import annotations

import copy

import pytest
import torch

from ldm.modules.attention import CrossAttention, SpatialTransformer, multihead_attention
from ldm.modules.diffusionmodules.model import AttnBlock, Decoder, Encoder
from ldm.modules.diffusionmodules.openaimodel import AttentionBlock, UNetModel
from ldm.modules.diffusionmodules.util import checkpoint

from conftest import TINY_DDCONFIG, TINY_UNET_PARAMS


def reference_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) v in float64; q, k, v [..., N, d]."""
    q, k, v = q.double(), k.double(), v.double()
    w = torch.softmax(q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5, dim=-1)
    return w @ v


UNET_SWEEP = [
    {},
    {"use_scale_shift_norm": True},
    {"resblock_updown": True},
    {"num_head_channels": -1, "num_heads": 4},
    {"channel_mult": [1, 2, 2], "attention_resolutions": [2, 4], "num_res_blocks": 2},
    {"use_new_attention_order": True},
    {"out_channels": 6},
    {"in_channels": 6},
]


@pytest.mark.parametrize("overrides", UNET_SWEEP)
def test_unet_shapes_and_gradients(overrides):
    params = {**copy.deepcopy(TINY_UNET_PARAMS), **overrides}
    net = UNetModel(**params)
    size = 16
    x = torch.randn(2, params["in_channels"], size, size, requires_grad=True)
    out = net(x, torch.tensor([3, 900]))
    assert out.shape == (2, params["out_channels"], size, size)
    # a linear loss: with the zero-initialised output conv, a squared loss would have zero gradient everywhere
    (out * torch.randn_like(out)).sum().backward()
    grads = [p.grad for p in net.parameters() if p.grad is not None]
    assert net.out[2].weight.grad is not None and net.out[2].weight.grad.abs().sum() > 0
    assert len(grads) > 0 and all(torch.isfinite(g).all() for g in grads)


def test_unet_gradient_reaches_input_once_output_is_nonzero():
    net = UNetModel(**TINY_UNET_PARAMS)
    torch.nn.init.normal_(net.out[2].weight, std=0.02)
    x = torch.randn(1, 3, 8, 8, requires_grad=True)
    net(x, torch.tensor([10])).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_unet_cross_attention_and_class_labels():
    params = {
        **TINY_UNET_PARAMS,
        "use_spatial_transformer": True,
        "context_dim": 12,
        "num_heads": 2,
        "num_head_channels": -1,
        "num_classes": 5,
    }
    net = UNetModel(**params)
    for p in net.parameters():  # make the zero-initialised projections live so that context matters
        if p.abs().sum() == 0:
            torch.nn.init.normal_(p, std=0.05)
    x = torch.randn(2, 3, 8, 8)
    t = torch.tensor([1, 2])
    ctx = torch.randn(2, 7, 12)
    y = torch.tensor([0, 4])
    out = net(x, t, context=ctx, y=y)
    assert out.shape == x.shape
    assert not torch.allclose(out, net(x, t, context=torch.randn(2, 7, 12), y=y))
    assert not torch.allclose(out, net(x, t, context=ctx, y=torch.tensor([1, 3])))
    with pytest.raises(ValueError, match="class labels"):
        net(x, t, context=ctx)


def test_unet_rejects_inconsistent_arguments():
    with pytest.raises(ValueError, match="context_dim"):
        UNetModel(**{**TINY_UNET_PARAMS, "use_spatial_transformer": True})
    with pytest.raises(ValueError, match="divisible"):
        UNetModel(**TINY_UNET_PARAMS)(torch.randn(1, 3, 9, 9), torch.tensor([1]))


def test_unet_gradient_checkpointing_is_numerically_identical():
    torch.manual_seed(0)
    a = UNetModel(**TINY_UNET_PARAMS)
    torch.nn.init.normal_(a.out[2].weight, std=0.02)
    b = UNetModel(**{**TINY_UNET_PARAMS, "use_checkpoint": True})
    b.load_state_dict(a.state_dict())
    x = torch.randn(2, 3, 8, 8)
    t = torch.tensor([5, 50])
    la, lb = a(x, t).square().sum(), b(x, t).square().sum()
    la.backward()
    lb.backward()
    assert torch.allclose(la, lb)
    for (n, pa), pb in zip(a.named_parameters(), b.parameters()):
        assert torch.allclose(pa.grad, pb.grad, atol=1e-6), n


def test_checkpoint_takes_compvis_four_arguments():
    """latent-diffusion's checkpoint(func, inputs, params, flag): same values and gradients as without checkpointing;
    the blocks call it that way (a three-argument form read the flag as params)."""
    torch.manual_seed(0)
    lin = torch.nn.Linear(4, 4)
    x = torch.randn(3, 4, requires_grad=True)

    def run(*args):
        lin.zero_grad()
        x.grad = None
        out = checkpoint(lambda v: lin(v).tanh(), (x,), *args)
        out.square().sum().backward()
        return out.detach(), x.grad.clone(), lin.weight.grad.clone()

    plain = run(lin.parameters(), False)
    for args in ((lin.parameters(), True), (list(lin.parameters()), True)):
        for got, ref in zip(run(*args), plain):
            torch.testing.assert_close(got, ref, rtol=0, atol=1e-7)
    with torch.no_grad():
        assert torch.equal(checkpoint(lin, (x,), lin.parameters(), True), lin(x))
    with pytest.raises(TypeError, match="flag"):
        checkpoint(lin, (x,), lin.parameters())


@pytest.mark.parametrize("new_order", [False, True])
def test_attention_block_matches_float64_reference(new_order):
    torch.manual_seed(0)
    c, heads, n = 64, 4, 9
    blk = AttentionBlock(c, num_heads=heads, use_new_attention_order=new_order)
    torch.nn.init.normal_(blk.proj_out.weight, std=0.1)
    x = torch.randn(2, c, 3, 3)
    out = blk(x)
    xf = x.reshape(2, c, n)
    qkv = blk.qkv(blk.norm(xf)).double()
    ch = c // heads
    if new_order:
        q, k, v = (t.reshape(2, heads, ch, n) for t in qkv.chunk(3, dim=1))
    else:
        q, k, v = qkv.reshape(2, heads, 3 * ch, n).split(ch, dim=2)
    h = reference_attention(q.transpose(-1, -2), k.transpose(-1, -2), v.transpose(-1, -2)).transpose(-1, -2)
    ref = xf.double() + torch.nn.functional.conv1d(h.reshape(2, c, n), blk.proj_out.weight.double(), blk.proj_out.bias.double())
    torch.testing.assert_close(out.reshape(2, c, n).double(), ref, atol=1e-5, rtol=1e-5)


def test_multihead_sdpa_matches_float64_reference():
    torch.manual_seed(1)
    q, k, v = torch.randn(2, 10, 24), torch.randn(2, 7, 24), torch.randn(2, 7, 24)
    out = multihead_attention(q, k, v, heads=3)
    split = lambda t: t.reshape(2, -1, 3, 8).permute(0, 2, 1, 3)  # noqa: E731
    ref = reference_attention(split(q), split(k), split(v)).permute(0, 2, 1, 3).reshape(2, 10, 24)
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-5)


def test_cross_attention_and_spatial_transformer_shapes():
    attn = CrossAttention(16, context_dim=8, heads=2, dim_head=4)
    assert attn(torch.randn(2, 5, 16), torch.randn(2, 3, 8)).shape == (2, 5, 16)
    st = SpatialTransformer(32, n_heads=2, d_head=8, depth=2, context_dim=8)
    x = torch.randn(1, 32, 4, 6)
    assert st(x, torch.randn(1, 3, 8)).shape == x.shape
    assert torch.equal(st(x, torch.randn(1, 3, 8)), x)  # zero-initialised proj_out: identity at init


def test_first_stage_attn_block_matches_float64_reference():
    torch.manual_seed(2)
    blk = AttnBlock(32)
    x = torch.randn(2, 32, 5, 3)
    h = blk.norm(x)
    q, k, v = (conv(h).reshape(2, 32, 15).transpose(1, 2) for conv in (blk.q, blk.k, blk.v))
    att = reference_attention(q, k, v).transpose(1, 2).reshape(2, 32, 5, 3)
    ref = x.double() + torch.nn.functional.conv2d(att, blk.proj_out.weight.double(), blk.proj_out.bias.double())
    torch.testing.assert_close(blk(x).double(), ref, atol=1e-5, rtol=1e-5)


ENC_SWEEP = [
    ({}, 4),
    ({"ch_mult": [1, 2, 4, 4]}, 8),
    ({"attn_resolutions": [16], "num_res_blocks": 2}, 4),
    ({"double_z": True}, 4),
]


@pytest.mark.parametrize("overrides,factor", ENC_SWEEP)
def test_encoder_decoder_shapes(overrides, factor):
    cfg = {**copy.deepcopy(TINY_DDCONFIG), **overrides}
    enc, dec = Encoder(**cfg), Decoder(**cfg)
    x = torch.randn(2, 3, 32, 48, requires_grad=True)
    z = enc(x)
    zc = cfg["z_channels"] * (2 if cfg["double_z"] else 1)
    assert z.shape == (2, zc, 32 // factor, 48 // factor)
    rec = dec(z[:, : cfg["z_channels"]])
    assert rec.shape == x.shape
    rec.mean().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
