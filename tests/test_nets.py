"""The networks' initial weights follow their layers' order, so a seed means one network."""

from __future__ import annotations

import torch
from torch import nn

from focaltrack.models.nets import AxialConfig, AxialNet, LateralConfig, LateralNet


def _redrawn_in_module_order(make: object, seed: int) -> dict[str, torch.Tensor]:
    """The network's weights if every layer drew its initial values in module order."""
    torch.manual_seed(seed)
    net = make()  # type: ignore[operator]
    torch.manual_seed(seed)
    for m in net.modules():
        if isinstance(m, (nn.Linear, nn.Conv2d)):
            m.reset_parameters()
    return {k: v.clone() for k, v in net.state_dict().items()}


def _built(make: object, seed: int) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    net = make()  # type: ignore[operator]
    return {k: v.clone() for k, v in net.state_dict().items()}


def test_initial_weights_are_drawn_in_layer_order() -> None:
    # A refactor that builds a layer before the ones in front of it (as one did, for a
    # typed handle on the last layer) silently changes what every seed trains.
    for make, fixed_bias in (
        (lambda: AxialNet(AxialConfig()), "head.4.bias"),
        (lambda: LateralNet(LateralConfig()), "head.bias"),
    ):
        built, redrawn = _built(make, 3), _redrawn_in_module_order(make, 3)
        assert built.keys() == redrawn.keys()
        for k in built:
            if k == fixed_bias or not k.endswith(("weight", "bias")) or "bn" in k:
                continue  # set after drawing (the label prior) or not drawn at all
            if built[k].dtype.is_floating_point and built[k].ndim >= 1:
                assert torch.equal(built[k], redrawn[k]), k
