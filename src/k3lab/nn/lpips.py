"""LPIPS perceptual distance (Zhang et al. 2018, arXiv 1801.03924) from local weight files only.

The linear-layer weights ship inside the ``lpips`` wheel; the VGG16 backbone must be a local
torchvision state dict (``vgg16-397923af.pth`` or a features-only file): nothing is downloaded.
"""

from __future__ import annotations

from pathlib import Path

from torch import nn

# torchvision VGG16 ``features`` index ranges that make up LPIPS' five slices.
_SLICES = ((0, 4), (4, 9), (9, 16), (16, 23), (23, 30))


def _vgg_key_to_lpips(key: str) -> str | None:
    parts = key.split(".")
    if parts[0] != "features":
        return None  # classifier weights are not used
    index = int(parts[1])
    for s, (lo, hi) in enumerate(_SLICES, start=1):
        if lo <= index < hi:
            return f"net.slice{s}.{index}.{parts[2]}"
    return None


def build_lpips(vgg_weights: str | Path) -> nn.Module:
    """A frozen ``lpips.LPIPS(net='vgg')`` whose backbone is loaded from ``vgg_weights``.

    Raises FileNotFoundError naming the path when the file is missing.
    """
    path = Path(vgg_weights)
    if not path.is_file():
        raise FileNotFoundError(
            f"LPIPS needs VGG16 weights at {path} (a torchvision vgg16 state dict, e.g. vgg16-397923af.pth); "
            "nothing is downloaded. Place the file there or set stage.loss.perceptual_weight=0."
        )
    import lpips  # local import: only needed when the perceptual loss is on

    model = lpips.LPIPS(net="vgg", pretrained=True, pnet_rand=True, verbose=False)
    from k3lab.nn.weights import load_state_dict

    state = load_state_dict(path)
    mapped = {k2: v for k, v in state.items() if (k2 := _vgg_key_to_lpips(k)) is not None}
    expected = {k for k in model.state_dict() if k.startswith("net.slice")}
    missing = sorted(expected - set(mapped))
    if missing:
        raise ValueError(f"{path}: not a VGG16 state dict, missing features for {missing[:3]} ...")
    model.load_state_dict(mapped, strict=False)
    return model.eval().requires_grad_(False)
