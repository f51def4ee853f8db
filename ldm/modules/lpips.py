"""LPIPS (Zhang et al. 2018) built without network access: the perceptual term of the VQ loss and an evaluation metric.
The linear layers ship inside the ``lpips`` package; the backbone's ImageNet weights (torchvision's) must be on disk."""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import torch
from torch import nn

from ldm.checkpoint import CheckpointError, load_state_dict

logger = logging.getLogger(__name__)

LPIPS_VERSION = "0.1"
# torchvision's ImageNet weights of the LPIPS backbones as named in torch hub's cache (at TORCHVISION_WEIGHTS_URL + name)
TORCHVISION_WEIGHTS_URL = "https://download.pytorch.org/models/"
LPIPS_BACKBONE_FILES: dict[str, str] = {
    "vgg": "vgg16-397923af.pth",
    "alex": "alexnet-owt-7be5be79.pth",
    "squeeze": "squeezenet1_1-b8a52dc0.pth",
}
# The smallest image side each backbone accepts (its strided convolutions and poolings leave no pixel below it; found by
# running every side from 1 px, pinned by tests/test_vqperceptual.py).
LPIPS_MIN_SIDE: dict[str, int] = {"vgg": 16, "alex": 31, "squeeze": 17}


class PerceptualWeightsMissingError(FileNotFoundError):
    """A file the LPIPS perceptual loss needs is not on disk (this project never downloads weights at run time);
    ``missing``: what and where, without the training advice of ``str(err)`` (for the evaluation's note)."""

    def __init__(self, message: str, missing: str) -> None:
        super().__init__(message)
        self.missing = missing


def _check_net(net: str) -> None:
    if net not in LPIPS_BACKBONE_FILES:
        raise ValueError(f"perceptual_net={net!r} is not an LPIPS backbone; choose one of {sorted(LPIPS_BACKBONE_FILES)}")


def lpips_backbone_path(net: str = "vgg") -> Path:
    """Where torch hub caches the ImageNet weights of the LPIPS backbone ``net`` (``$TORCH_HOME/hub/checkpoints``)."""
    _check_net(net)
    return Path(torch.hub.get_dir()) / "checkpoints" / LPIPS_BACKBONE_FILES[net]


def lpips_linear_path(net: str = "vgg") -> Path:
    """The calibrated LPIPS linear-layer weights shipped inside the ``lpips`` package."""
    _check_net(net)
    import lpips

    return Path(lpips.__file__).parent / "weights" / f"v{LPIPS_VERSION}" / f"{net}.pth"


def _missing_weights_error(what: str, path: Path, how: str) -> PerceptualWeightsMissingError:
    return PerceptualWeightsMissingError(
        f"the LPIPS perceptual loss needs {what}, but {str(path)!r} does not exist. {how} "
        "This project never downloads weights at run time. To train without the perceptual term, set "
        "lossconfig.params.perceptual_weight: 0 (no perceptual network is built then).",
        missing=f"{what}: {str(path)!r} does not exist",
    )


def build_lpips(net: str = "vgg", pretrained: bool = True, backbone_path: str | Path | None = None) -> nn.Module:
    """A frozen ``lpips.LPIPS`` module in eval mode; ``pretrained`` loads the backbone's torchvision ImageNet weights
    from ``backbone_path`` (default :func:`lpips_backbone_path`), ``False`` keeps it random (offline tests).  Raises
    :class:`PerceptualWeightsMissingError`, naming the file, when a weights file is absent."""
    linear_path = lpips_linear_path(net)  # checks ``net``
    if not linear_path.exists():
        raise _missing_weights_error(
            "the linear-layer weights of the lpips package", linear_path, "Reinstall the package: pip install lpips."
        )
    if pretrained:
        backbone = Path(backbone_path) if backbone_path is not None else lpips_backbone_path(net)
        if not backbone.exists():
            raise _missing_weights_error(
                f"torchvision's ImageNet weights of its {net} backbone",
                backbone,
                f"Fetch {TORCHVISION_WEIGHTS_URL}{LPIPS_BACKBONE_FILES[net]} on a machine with internet access and put it at "
                "that path (torch hub's cache, $TORCH_HOME/hub/checkpoints), or set lossconfig.params.perceptual_backbone_path "
                "to a local copy.",
            )
    import lpips

    with warnings.catch_warnings():
        # lpips builds its backbone through torchvision's deprecated ``pretrained=`` argument (here always False).
        warnings.filterwarnings("ignore", message=r".*(pretrained|weight enum).*", category=UserWarning)
        model = lpips.LPIPS(pretrained=False, net=net, version=LPIPS_VERSION, pnet_rand=True, use_dropout=True, verbose=False)
    linear = load_state_dict(linear_path)
    own_linear = sorted(k for k in model.state_dict() if k.startswith("lin") and not k.startswith("lins."))
    if sorted(linear) != own_linear:
        raise CheckpointError(
            f"{linear_path} does not hold the LPIPS {net} linear layers {own_linear} (found {sorted(linear)})"
        )
    reinstall = "reinstall the package: pip install --force-reinstall lpips"
    _check_tensors(model.state_dict(), linear, {k: k for k in linear}, linear_path, f"the LPIPS {net} linear layers", reinstall)
    model.load_state_dict(linear, strict=False)  # ``lins.*`` alias ``lin0..``: the same parameters
    if pretrained:
        source = load_state_dict(backbone)
        # lpips slices torchvision's ``features`` Sequential: ``sliceK.N.param`` is ``features.N.param``.
        wanted = {name: "features." + name.split(".", 1)[1] for name in model.net.state_dict()}
        absent = [src for src in wanted.values() if src not in source]
        if absent:
            raise CheckpointError(f"{backbone} is not a torchvision {net} state dict: it lacks {absent[:3]}")
        fetch = f"pass torchvision's ImageNet {net} weights ({TORCHVISION_WEIGHTS_URL}{LPIPS_BACKBONE_FILES[net]})"
        _check_tensors(model.net.state_dict(), source, wanted, backbone, f"a torchvision {net} state dict", fetch)
        model.net.load_state_dict({name: source[src] for name, src in wanted.items()}, strict=True)
        logger.info("LPIPS %s: backbone weights from %s, linear layers from %s", net, backbone, linear_path)
    else:
        logger.info("LPIPS %s: RANDOM backbone (perceptual_pretrained=False), linear layers from %s", net, linear_path)
    model.requires_grad_(False)
    return model.eval()


def _check_tensors(own: dict[str, torch.Tensor], source: dict, wanted: dict[str, str], path: Path, what: str, fix: str) -> None:
    """CheckpointError (one line naming ``path``, ending with ``fix``) when ``source[wanted[name]]`` is not a tensor of
    ``own[name]``'s shape (``load_state_dict`` raised a RuntimeError listing every layer) or holds NaN or inf (every
    distance was nan)."""
    for name, key in wanted.items():
        value = source[key]
        shape = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
        if shape != tuple(own[name].shape):
            raise CheckpointError(f"{path} is not {what}: {key} has shape {shape}, LPIPS needs {tuple(own[name].shape)}; {fix}")
    broken = [key for key in wanted.values() if source[key].is_floating_point() and not bool(torch.isfinite(source[key]).all())]
    if broken:
        raise CheckpointError(
            f"{path}: {len(broken)} tensors hold NaN or inf (first: {broken[:3]}), so every LPIPS distance would be nan; {fix}"
        )
