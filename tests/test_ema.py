"""LitEma: CompVis buffer layout, update rule, exact store/restore, ema_scope."""

from __future__ import annotations

import pytest
import torch

from ldm.modules.ema import LitEma
from ldm.util import instantiate_from_config

from conftest import tiny_ldm_params


def _net() -> torch.nn.Module:
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4), torch.nn.Linear(4, 2))
    net[2].bias.requires_grad_(False)
    return net


def test_buffer_names_follow_litema():
    ema = LitEma(_net())
    names = dict(ema.named_buffers())
    assert names["decay"].dtype == torch.float32 and names["decay"].shape == ()
    assert names["num_updates"].dtype == torch.int32 and int(names["num_updates"]) == 0
    assert {"0weight", "0bias", "1weight", "1bias", "2weight"} <= set(names)
    assert "2bias" not in names and "1running_mean" not in names  # frozen params and buffers are not tracked


def test_update_rule_matches_formula_with_warmup():
    net = _net()
    ema = LitEma(net, decay=0.9)
    shadow0 = ema.get_buffer("0weight").clone()
    with torch.no_grad():
        net[0].weight.add_(1.0)
    ema(net)
    n = 1
    decay = min(0.9, (1 + n) / (10 + n))
    expected = shadow0.double() - (1 - decay) * (shadow0.double() - net[0].weight.double())  # float64 reference
    torch.testing.assert_close(ema.get_buffer("0weight").double(), expected, rtol=0, atol=3e-7)  # ~2 float32 ulps
    assert int(ema.num_updates) == 1
    ema_no_warmup = LitEma(net, decay=0.5, use_num_upates=False)
    assert int(ema_no_warmup.num_updates) == -1


def test_store_copy_restore_is_exact():
    net = _net()
    ema = LitEma(net)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn_like(p))
    ema(net)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    ema.store(net.parameters())
    ema.copy_to(net)
    assert torch.equal(net[0].weight, ema.get_buffer("0weight"))
    ema.restore(net.parameters())
    for k, v in net.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_ema_scope_swaps_and_restores_bit_exactly():
    model = instantiate_from_config({"target": "ldm.models.diffusion.ddpm.LatentDiffusion", "params": tiny_ldm_params()})
    with torch.no_grad():
        for p in model.model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    model.model_ema(model.model)
    train_w = {k: v.clone() for k, v in model.model.state_dict().items()}
    key = "diffusion_model.input_blocks.0.0.weight"
    with model.ema_scope("test"):
        ema_w = model.model.state_dict()[key].clone()
        assert torch.equal(ema_w, model.model_ema.get_buffer(key.replace(".", "")))
        assert not torch.equal(ema_w, train_w[key])
    for k, v in model.model.state_dict().items():
        assert torch.equal(v, train_w[k]), k


def test_update_reads_nothing_back_and_resumes_the_warm_up_after_loading():
    from conftest import HostReads

    net = _net()
    ema = LitEma(net, decay=0.9)
    ema(net)  # the first update reads decay and num_updates once
    with pytest.MonkeyPatch.context() as monkeypatch, HostReads(monkeypatch) as mode:
        ema(net)
        ema(net)
    assert mode.reads == [] and int(ema.num_updates) == 3
    state = {**ema.state_dict(), "num_updates": torch.tensor(40, dtype=torch.int)}
    resumed = LitEma(net, decay=0.9)
    resumed(net)  # its host copy says 1 ...
    resumed.load_state_dict(state)  # ... until a checkpoint is loaded
    shadow = resumed.get_buffer("0weight").clone()
    with torch.no_grad():
        net[0].weight.add_(1.0)
    resumed(net)
    decay = min(0.9, 42 / 51)  # n = 41 after the update
    expected = shadow.double() + (1 - decay) * (net[0].weight.double() - shadow.double())
    torch.testing.assert_close(resumed.get_buffer("0weight").double(), expected, rtol=0, atol=3e-7)
    assert int(resumed.num_updates) == 41
    resumed.num_updates.copy_(torch.tensor(100))  # any in-place change of the buffers is seen too
    resumed(net)
    assert int(resumed.num_updates) == 101
    resumed.decay.fill_(0.5)
    shadow = resumed.get_buffer("0weight").clone()
    resumed(net)
    expected = shadow.double() + 0.5 * (net[0].weight.double() - shadow.double())  # min(0.5, 103/112) = 0.5
    torch.testing.assert_close(resumed.get_buffer("0weight").double(), expected, rtol=0, atol=3e-7)


def test_a_decay_that_is_not_a_number_in_0_1_is_one_line():
    """``model.params.ema_decay=nan`` (a string in YAML) said "'<=' not supported between 'float' and 'str'"."""
    for bad in ("nan", float("nan"), 1.5, -0.1, True):
        with pytest.raises(ValueError, match=r"EMA decay=.* must be a number in \[0, 1\]"):
            LitEma(torch.nn.Linear(2, 2), decay=bad)
