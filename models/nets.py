"""The two networks: a fully convolutional lateral detector and a crop-wise axial classifier.

`LateralNet` is the paper's sliding-window binary classifier ("is an emitter centred
here?") computed once over the whole frame: a strided stem to 1/4 resolution, then residual
dilated 3×3 convolutions (dilations 1, 2, 4, 8, 16: receptive field ≈ 250 px, enough for
the ~110-px PSF at 100 µm defocus) and a head with three outputs per 4×4-pixel cell: the
detection logit and the emitter's sub-pixel offset (dy, dx) from the cell centre, in
cells.

`AxialNet` takes a window centred on a detection and outputs one logit per calibration z
slice (multi-label, as in the paper): sigmoid probabilities trained against triangle
(linear-interpolation) targets, so the two bins around an emitter share its weight and
their weighted mean recovers z between slices. With ``offsets`` (the default since bundle
schema 2) it also regresses, per z bin, the lateral offset (dy, dx) of the emitter at that
depth from the window centre: every emitter near a detection gets its own full-resolution
lateral position, so two emitters closer than the lateral detector's peak spacing are
separated by depth *and* placed correctly, and copies of one emitter found from
neighbouring windows land on the same point and merge.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn


def _cbr(cin: int, cout: int, k: int = 3, stride: int = 1, dilation: int = 1) -> nn.Sequential:
    pad = dilation * (k - 1) // 2
    return nn.Sequential(
        nn.Conv2d(cin, cout, k, stride=stride, padding=pad, dilation=dilation, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
    )


class _DilatedBlock(nn.Module):
    def __init__(self, ch: int, dilation: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, padding=dilation, dilation=dilation, bias=False)
        self.bn = nn.BatchNorm2d(ch)
        self.act = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(x + self.bn(self.conv(x)))


@dataclass(frozen=True, slots=True)
class LateralConfig:
    stem: tuple[int, int] = (16, 32)  # channels at 1/2 and 1/4 resolution
    # channels at 1/8, 1/16, 1/32 resolution; (32, 48, 64) found ~5 % fewer emitters in
    # crowded frames after the same number of steps, for ~15 % less time per step
    widths: tuple[int, ...] = (48, 64, 96)
    dilations: tuple[int, ...] = (1, 2)  # residual dilated blocks per context level
    stride: int = 4  # output resolution (fixed by the architecture)

    def to_dict(self) -> dict[str, object]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, d: dict[str, object]) -> LateralConfig:
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})  # type: ignore[arg-type]


class LateralNet(nn.Module):
    """(B, 1, H, W), H and W multiples of 32 → (B, 3, H/4, W/4): logit, dy, dx.

    A small U-Net: a strided stem to 1/4 resolution (fine detail: in-focus spots are
    1–2 px), context levels at 1/8, 1/16 and 1/32 resolution (a strided conv and residual
    dilated 3×3 convs each; theoretical receptive field > 500 px, so the ~110-px ring of an
    emitter 100 µm out of focus is seen whole), each upsampled and added to the level
    above, then the head at 1/4 resolution.
    """

    def __init__(self, cfg: LateralConfig | None = None, prior: float = 0.01) -> None:
        super().__init__()
        cfg = cfg or LateralConfig()
        self.cfg = cfg
        c2, c4 = cfg.stem
        self.stem = nn.Sequential(_cbr(1, c2, stride=2), _cbr(c2, c4, stride=2))
        chans = [c4, *cfg.widths]
        self.downs = nn.ModuleList(
            nn.Sequential(
                _cbr(chans[i], chans[i + 1], stride=2),
                *[_DilatedBlock(chans[i + 1], d) for d in cfg.dilations],
            )
            for i in range(len(cfg.widths))
        )
        self.ups = nn.ModuleList(
            nn.Sequential(
                nn.Conv2d(chans[i + 1], chans[i], 1, bias=False), nn.BatchNorm2d(chans[i])
            )
            for i in range(len(cfg.widths))
        )
        self.fuse = _cbr(chans[0], c4)
        self.head = nn.Conv2d(c4, 3, 1)
        with torch.no_grad():
            bias = _bias(self.head)
            bias.zero_()
            bias[0] = float(torch.logit(torch.tensor(prior)))

    @property
    def stride(self) -> int:
        return self.cfg.stride

    @property
    def multiple(self) -> int:
        """Input sizes must be multiples of this."""
        return 4 * 2 ** len(self.cfg.widths)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feats = [self.stem(x)]
        for down in self.downs:
            feats.append(down(feats[-1]))
        t = feats[-1]
        for i in range(len(self.downs) - 1, -1, -1):
            t = torch.relu(
                feats[i] + F.interpolate(self.ups[i](t), scale_factor=2.0, mode="nearest")
            )
        return self.head(self.fuse(t))


@dataclass(frozen=True, slots=True)
class AxialConfig:
    n_bins: int = 51
    window: int = 128
    widths: tuple[int, ...] = (12, 24, 32, 48, 64)
    hidden: int = 192
    offsets: bool = True  # per-bin lateral offsets (see the module docstring)

    @property
    def outputs_per_bin(self) -> int:
        return 3 if self.offsets else 1

    def to_dict(self) -> dict[str, object]:
        d = asdict(self)
        d["widths"] = list(self.widths)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, object]) -> AxialConfig:
        d = dict(d)
        d["widths"] = tuple(d["widths"])  # type: ignore[arg-type]
        d.setdefault("offsets", False)  # bundles written before offsets existed
        return cls(**d)  # type: ignore[arg-type]


class AxialNet(nn.Module):
    """(N, 1, S, S) windows centred on detections → (N, K, n_bins): z-bin logits in
    channel 0 and, with ``offsets`` (K = 3), each bin's emitter offset (dy, dx) from the
    window centre in units of the label radius in channels 1 and 2.

    Five stride-2 stages (S → S/32), strided 3×3 convs (plus a 3×3 conv from the third
    stage on, where it is cheap), then a
    small fully connected head: the window's layout matters (the emitter is at its
    centre, others are not), so the features are flattened rather than pooled.
    """

    def __init__(self, cfg: AxialConfig | None = None) -> None:
        super().__init__()
        cfg = cfg or AxialConfig()
        self.cfg = cfg
        layers: list[nn.Module] = []
        cin = 1
        for i, w in enumerate(cfg.widths):
            layers.append(_cbr(cin, w, stride=2))
            if i > 1:
                layers.append(_cbr(w, w))
            cin = w
        self.features = nn.Sequential(*layers)
        side = cfg.window // 2 ** len(cfg.widths)
        # The layers are made in this order on purpose: their initial weights are drawn from
        # torch's generator in construction order, so a given seed gives the same network.
        hidden = nn.Linear(cin * side * side, cfg.hidden)
        logits = nn.Linear(cfg.hidden, cfg.n_bins)
        self.head = nn.Sequential(
            nn.Flatten(), hidden, nn.ReLU(inplace=True), nn.Dropout(0.2), logits
        )
        # offsets get their own hidden layer: sharing the classifier's, the L1 loss drives
        # its ReLUs to zero early on (a constant 0 offset is its cheapest minimum) and the
        # z logits never leave the prior
        self.offset_head = (
            nn.Sequential(
                nn.Flatten(),
                nn.Linear(cin * side * side, cfg.hidden),
                nn.ReLU(inplace=True),
                nn.Linear(cfg.hidden, 2 * cfg.n_bins),
            )
            if cfg.offsets
            else None
        )
        with torch.no_grad():  # start at the label prior (~1–2 of 51 bins on), not at 0.5
            _bias(logits).fill_(-3.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = self.features(x)
        logits = self.head(f)[:, None]
        if self.offset_head is None:
            return logits
        off = self.offset_head(f).view(len(f), 2, self.cfg.n_bins)
        return torch.cat([logits, off], 1)


def fuse_batchnorm(model: nn.Module) -> nn.Module:
    """Fold every Conv2d → BatchNorm2d pair into the convolution (inference only)."""
    for name, child in list(model.named_children()):
        setattr(model, name, fuse_batchnorm(child))
    if isinstance(model, nn.Sequential):
        mods = list(model)
        out: list[nn.Module] = []
        i = 0
        while i < len(mods):
            m = mods[i]
            nxt = mods[i + 1] if i + 1 < len(mods) else None
            if isinstance(m, nn.Conv2d) and isinstance(nxt, nn.BatchNorm2d):
                out.append(_fold(m, nxt))
                i += 2
            else:
                out.append(m)
                i += 1
        return nn.Sequential(*out)
    if isinstance(model, _DilatedBlock) and isinstance(model.bn, nn.BatchNorm2d):
        model.conv = _fold(model.conv, model.bn)
        model.bn = nn.Identity()  # type: ignore[assignment]
    return model


def _fold(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> nn.Conv2d:
    fused = nn.Conv2d(
        conv.in_channels,
        conv.out_channels,
        conv.kernel_size,  # type: ignore[arg-type]
        stride=conv.stride,  # type: ignore[arg-type]
        padding=conv.padding,  # type: ignore[arg-type]
        dilation=conv.dilation,  # type: ignore[arg-type]
        bias=True,
    ).to(conv.weight.device)
    mean, var = bn.running_mean, bn.running_var
    # Our BatchNorm2d layers are affine and keep running statistics (the defaults).
    if mean is None or var is None:
        raise ValueError("can only fold a BatchNorm2d that tracks running statistics")
    with torch.no_grad():
        scale = bn.weight / torch.sqrt(var + bn.eps)
        fused.weight.copy_(conv.weight * scale[:, None, None, None])
        b = conv.bias if conv.bias is not None else torch.zeros_like(mean)
        _bias(fused).copy_((b - mean) * scale + bn.bias)
    return fused


def _bias(layer: nn.Conv2d | nn.Linear) -> torch.Tensor:
    """The bias of a layer built with one (torch types it Optional)."""
    if layer.bias is None:
        raise ValueError(f"{type(layer).__name__} has no bias")
    return layer.bias
