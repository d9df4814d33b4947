"""Fisher information and Cramér–Rao bounds of the spline PSF model, alone and jointly.

An emitter's parameters are θ = (x_px, y_px, z_um, photons, background) (`PARAMETERS`);
its expected image on a window of the frame is μ = photons · PSF(x, y, z) + background
(photo-electrons per pixel, `focaltrack.sim.spline_psf.SplinePSF`).

Noise: each pixel is Poisson in photo-electrons plus Gaussian read noise of variance σ²
(e⁻², one number or a per-pixel sCMOS map). Its likelihood is approximated as the
likelihood of a Poisson variable of mean μ + σ² observed at d + σ² (Huang et al. 2013,
Nat. Methods 10, 653: the sCMOS fit that SMAP's GPU fitter uses; for an EMCCD give the
read noise after the gain, usually 0): the mean and variance match the real pixel's, and
the Fisher information of a pixel is (∂μ)(∂μ)ᵀ / (μ + σ²). With σ = 0 this is the exact
Poisson information; the bound an EMCCD's excess noise doubles is not modelled here.

Jointly: emitters of one frame whose windows overlap share pixels. The model of a pixel
is the sum of every covering emitter's photons · PSF plus the background field, the mean of
the covering windows' backgrounds (each window keeps its own background parameter: an
isolated emitter's model is exactly its single-emitter model). The Fisher information of
all of a frame's parameters (`joint_fisher`) holds every pair of overlapping emitters'
cross terms, so the bound counts what crowding costs; where no windows overlap it is
block-diagonal and each block is the single-emitter information.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from focaltrack.sim.spline_psf import SplinePSF, frame_index, gather

__all__ = [
    "N_PARAMS",
    "PARAMETERS",
    "JointLayout",
    "JointModel",
    "covariance",
    "crlb",
    "fisher",
    "joint_crlb",
    "joint_fisher",
    "joint_model",
    "per_emitter",
    "window_model",
]

PARAMETERS = ("x_px", "y_px", "z_um", "photons", "background")
N_PARAMS = len(PARAMETERS)
MIN_VARIANCE_E2 = 1e-6  # a pixel's model variance is never taken below this (e⁻²)
PAIR_CHUNK_ELEMENTS = 1 << 18  # gathered Jacobian elements per chunk of overlapping pairs


# ----------------------------------------------------------------------- one window each
def window_model(
    psf: SplinePSF,
    theta: torch.Tensor,
    origin: torch.Tensor,
    size: tuple[int, int],
    inside: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Expected image μ (B, h·w) and its Jacobian ∂μ/∂θ (B, 5, h·w) of B emitters, each on
    its own window (top-left ``origin`` (B, 2)); ``inside`` (B, h·w) zeroes pixels that are
    not observed (off the frame), in μ and in the Jacobian."""
    th = theta.to(psf.device, psf.dtype)
    b = th.shape[0]
    p = psf.evaluate(th[:, 0], th[:, 1], th[:, 2], origin, size)
    assert p.dx is not None and p.dy is not None and p.dz is not None
    n = th[:, 3, None]
    v = p.value.reshape(b, -1)
    jac = torch.stack(
        [
            n * p.dx.reshape(b, -1),
            n * p.dy.reshape(b, -1),
            n * p.dz.reshape(b, -1),
            v,
            torch.ones_like(v),
        ],
        1,
    )
    mu = n * v + th[:, 4, None]
    if inside is not None:
        m = inside.to(psf.dtype).reshape(b, -1)
        mu, jac = mu * m, jac * m[:, None]
    return mu, jac


def fisher(
    mu: torch.Tensor,
    jac: torch.Tensor,
    read_var: float | torch.Tensor = 0.0,
    inside: torch.Tensor | None = None,
) -> torch.Tensor:
    """Fisher information (B, 5, 5), float64, of windows with expected image ``mu`` (B, P)
    and Jacobian ``jac`` (B, 5, P): Σ_p ∂μ ∂μᵀ / (μ + σ²) over the observed pixels."""
    b = mu.shape[0]
    rv = _as_pixels(read_var, mu)
    w = 1.0 / (mu + rv).clamp_min(MIN_VARIANCE_E2)
    if inside is not None:
        w = w * inside.to(w.dtype).reshape(b, -1)
    return torch.einsum("bip,bjp->bij", jac * w[:, None], jac).double()


def covariance(info: torch.Tensor, free: Sequence[bool] | None = None) -> torch.Tensor:
    """Inverse of Fisher matrices (G, P, P), float64, over the ``free`` parameters (a mask
    of the 5 per emitter, repeated over the P / 5 emitters; default all): the rows and
    columns of the fixed ones are zero. The matrices are scaled to a unit diagonal before
    the inversion (positions in pixels, photons in thousands: raw, the conditioning would
    be lost in the scales). A singular matrix gives +inf on its diagonal."""
    g, p, _ = info.shape
    mask = torch.ones(p, dtype=torch.bool, device=info.device)
    if free is not None:
        if len(free) != N_PARAMS:
            raise ValueError(f"free must name the {N_PARAMS} parameters, got {len(free)}")
        mask = torch.as_tensor(list(free), device=info.device).repeat(p // N_PARAMS)
    idx = torch.nonzero(mask).reshape(-1)
    sub = info.double()[:, idx][:, :, idx]
    d = sub.diagonal(dim1=1, dim2=2).clamp_min(1e-300).rsqrt()
    scaled = sub * d[:, :, None] * d[:, None, :]
    inv, status = torch.linalg.inv_ex(scaled)
    cov_sub = inv * d[:, :, None] * d[:, None, :]
    bad = (status != 0) | ~torch.isfinite(cov_sub).all(-1).all(-1)
    bad = bad | (cov_sub.diagonal(dim1=1, dim2=2) <= 0).any(-1)
    eye_inf = torch.diag_embed(torch.full_like(d, torch.inf))
    cov_sub = torch.where(bad[:, None, None], eye_inf, cov_sub)
    out = torch.zeros(g, p, p, dtype=torch.float64, device=info.device)
    out[:, idx[:, None], idx[None, :]] = cov_sub
    return out


def crlb(
    psf: SplinePSF,
    theta: torch.Tensor,
    *,
    window: tuple[int, int],
    read_var: float = 0.0,
    free: Sequence[bool] | None = None,
) -> torch.Tensor:
    """Single-emitter Cramér–Rao bounds (B, 5), variances, float64, of B emitters θ (B, 5),
    each alone on a ``window`` (h, w) centred on it (the window a fit would use); the fixed
    parameters' entries are 0."""
    th = theta.to(psf.device, psf.dtype).reshape(-1, N_PARAMS)
    origin = psf.windows_at(th[:, 0], th[:, 1], window)
    mu, jac = window_model(psf, th, origin, window)
    return covariance(fisher(mu, jac, read_var), free).diagonal(dim1=1, dim2=2)


# ------------------------------------------------------------------------------ jointly
@dataclass(frozen=True, slots=True)
class JointLayout:
    """Where n emitters' windows lie in a stack of F frames, and which of them overlap.

    ``slot``: each emitter's index among its frame's emitters (< ``slots``); a frame's
    parameter vector holds its emitters' θ at 5·slot … 5·slot + 4. ``pair_e`` < ``pair_f``:
    emitters of one frame whose windows share pixels; ``pair_src`` (p, h·w): for each pixel
    of e's window, the same pixel's index in f's window (``pair_valid`` where it is in it).
    """

    n_frames: int
    shape: tuple[int, int]
    size: tuple[int, int]
    frame: torch.Tensor  # (n,) long
    origin: torch.Tensor  # (n, 2) long, (row, column) of each window's top-left pixel
    flat: torch.Tensor  # (n, h·w) long into the frames flattened, off-frame: F·H·W
    inside: torch.Tensor  # (n, h·w) float, 1 where the pixel is in the frame
    coverage: torch.Tensor  # (n, h·w) float, how many windows hold each pixel (≥ 1 inside)
    covered: torch.Tensor  # (F·H·W,) bool, pixels in any window: the likelihood's domain
    slot: torch.Tensor  # (n,) long
    slots: int
    pair_e: torch.Tensor  # (p,) long
    pair_f: torch.Tensor  # (p,) long
    pair_src: torch.Tensor  # (p, h·w) long
    pair_valid: torch.Tensor  # (p, h·w) float

    @classmethod
    def build(
        cls,
        frame: torch.Tensor,
        origin: torch.Tensor,
        size: tuple[int, int],
        shape: tuple[int, int],
        n_frames: int,
        dtype: torch.dtype = torch.float32,
    ) -> JointLayout:
        dev = origin.device
        fr = frame.to(dev).long().reshape(-1)
        org = origin.to(dev).long().reshape(-1, 2)
        n = len(fr)
        h, w = size
        flat, inside_b = frame_index(org, size, shape, fr, n_frames)
        inside = inside_b.to(dtype)
        total = n_frames * shape[0] * shape[1]
        count = torch.zeros(total + 1, dtype=dtype, device=dev)
        count.index_add_(0, flat.reshape(-1), inside.reshape(-1))
        coverage = torch.where(inside_b, count[flat], torch.ones_like(inside))
        idx = torch.arange(n, device=dev)
        same = fr[:, None] == fr[None, :]
        slot = (same & (idx[None, :] < idx[:, None])).sum(1)
        slots = int(slot.max()) + 1 if n else 1
        near = (
            same
            & ((org[:, None, 0] - org[None, :, 0]).abs() < h)
            & ((org[:, None, 1] - org[None, :, 1]).abs() < w)
            & (idx[:, None] < idx[None, :])
        )
        pe, pf = torch.nonzero(near, as_tuple=True)
        dy = (org[pe, 0] - org[pf, 0])[:, None, None]
        dx = (org[pe, 1] - org[pf, 1])[:, None, None]
        r = torch.arange(h, device=dev)[None, :, None] + dy
        c = torch.arange(w, device=dev)[None, None, :] + dx
        valid = (r >= 0) & (r < h) & (c >= 0) & (c < w)
        src = torch.where(valid, r * w + c, torch.zeros_like(r * w + c))
        return cls(
            n_frames=n_frames,
            shape=(int(shape[0]), int(shape[1])),
            size=(h, w),
            frame=fr,
            origin=org,
            flat=flat,
            inside=inside,
            coverage=coverage,
            covered=count[:-1] > 0,
            slot=slot,
            slots=slots,
            pair_e=pe,
            pair_f=pf,
            pair_src=src.reshape(len(pe), h * w),
            pair_valid=valid.reshape(len(pe), h * w).to(dtype),
        )

    def gather(self, stack: torch.Tensor) -> torch.Tensor:
        """Each window's pixels (n, h·w) of a (F, H, W) stack (or anything of F·H·W
        elements); off-frame pixels read 0."""
        return gather(stack, self.flat)


@dataclass(frozen=True, slots=True)
class JointModel:
    """The model of a stack of frames at θ: ``canvas`` (F·H·W + 1,) the expected image
    (photons · PSF of every emitter + the background field, e⁻, the last element a sink),
    and per window ``mu`` (n, h·w) (that image on the window) and ``jac`` (n, 5, h·w)."""

    canvas: torch.Tensor
    mu: torch.Tensor
    jac: torch.Tensor


def joint_model(psf: SplinePSF, layout: JointLayout, theta: torch.Tensor) -> JointModel:
    """The joint model of n emitters θ (n, 5) laid out by ``layout``."""
    th = theta.to(psf.device, psf.dtype).reshape(-1, N_PARAMS)
    n = th.shape[0]
    p = psf.evaluate(th[:, 0], th[:, 1], th[:, 2], layout.origin, layout.size)
    assert p.dx is not None and p.dy is not None and p.dz is not None
    m = layout.inside
    nph = th[:, 3, None]
    v = p.value.reshape(n, -1) * m
    share = m / layout.coverage  # ∂(background field)/∂(this window's background)
    jac = torch.stack(
        [
            nph * p.dx.reshape(n, -1) * m,
            nph * p.dy.reshape(n, -1) * m,
            nph * p.dz.reshape(n, -1) * m,
            v,
            share,
        ],
        1,
    )
    total = layout.n_frames * layout.shape[0] * layout.shape[1]
    canvas = torch.zeros(total + 1, dtype=psf.dtype, device=psf.device)
    canvas.index_add_(0, layout.flat.reshape(-1), (nph * v + th[:, 4, None] * share).reshape(-1))
    canvas[-1] = 0.0
    return JointModel(canvas=canvas, mu=canvas[layout.flat], jac=jac)


def joint_fisher(layout: JointLayout, jac: torch.Tensor, variance: torch.Tensor) -> torch.Tensor:
    """Fisher information of every frame's parameters (F, 5·S, 5·S), float64 (S =
    ``layout.slots``; unused slots hold an identity block), from the windows' Jacobians
    (n, 5, h·w) and each window pixel's model variance μ + σ² (n, h·w)."""
    n = jac.shape[0]
    s = layout.slots
    w = layout.inside / variance.clamp_min(MIN_VARIANCE_E2)
    jw = jac * w[:, None]
    diag = torch.einsum("bip,bjp->bij", jw, jac).double()
    out = torch.zeros(layout.n_frames, s * N_PARAMS, s * N_PARAMS, dtype=torch.float64)
    out = out.to(jac.device)
    k = torch.arange(N_PARAMS, device=jac.device)
    used = torch.zeros(layout.n_frames, s, dtype=torch.bool, device=jac.device)
    used[layout.frame, layout.slot] = True
    free_slot = torch.nonzero(~used)
    if len(free_slot):
        fi = free_slot[:, 0, None].expand(-1, N_PARAMS)
        di = free_slot[:, 1, None] * N_PARAMS + k
        out[fi, di, di] = 1.0
    rows = layout.slot[:, None] * N_PARAMS + k  # (n, 5)

    def put(fr: torch.Tensor, r: torch.Tensor, c: torch.Tensor, blocks: torch.Tensor) -> None:
        out.index_put_((fr[:, None, None], r[:, :, None], c[:, None, :]), blocks, accumulate=True)

    if n:
        put(layout.frame, rows, rows, diag)
    # the overlapping pairs' cross terms, a cache-sized chunk of pairs at a time (all at
    # once, 20 windows of 128² in a 256² frame run 2–3x slower: the gathered Jacobians
    # outgrow the cache)
    p_len = jac.shape[2]
    chunk = max(1, PAIR_CHUNK_ELEMENTS // (N_PARAMS * max(p_len, 1)))
    flat_jac = jac.reshape(-1)
    for i in range(0, len(layout.pair_e), chunk):
        pe, pf = layout.pair_e[i : i + chunk], layout.pair_f[i : i + chunk]
        idx = (pf[:, None, None] * N_PARAMS + k[:, None]) * p_len + layout.pair_src[
            i : i + chunk, None
        ]
        jf = flat_jac[idx] * layout.pair_valid[i : i + chunk, None]
        cross = torch.bmm(jw[pe], jf.transpose(1, 2)).double()
        put(layout.frame[pe], rows[pe], rows[pf], cross)
        put(layout.frame[pe], rows[pf], rows[pe], cross.transpose(1, 2))
    return out


def per_emitter(layout: JointLayout, frame_matrix: torch.Tensor) -> torch.Tensor:
    """Each emitter's 5 × 5 diagonal block (n, 5, 5) of per-frame (F, 5·S, 5·S) matrices."""
    k = torch.arange(N_PARAMS, device=frame_matrix.device)
    rows = layout.slot[:, None] * N_PARAMS + k
    return frame_matrix[layout.frame[:, None, None], rows[:, :, None], rows[:, None, :]]


def joint_crlb(
    psf: SplinePSF,
    theta: torch.Tensor,
    frame: torch.Tensor,
    *,
    shape: tuple[int, int],
    n_frames: int,
    window: tuple[int, int],
    read_var: float | torch.Tensor = 0.0,
    free: Sequence[bool] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Cramér–Rao bounds (n, 5), variances, float64, of n emitters θ (n, 5) in frames
    ``frame`` (n,) of a stack of ``n_frames`` frames of ``shape``: (jointly — the Fisher
    information of all of a frame's emitters together —, each alone on the same window).

    Each emitter's window (``window`` px) is centred on it, clipped at the frame's edges;
    ``read_var``: σ² in e⁻², one number or a (F, H, W) map.
    """
    th = theta.to(psf.device, psf.dtype).reshape(-1, N_PARAMS)
    origin = psf.windows_at(th[:, 0], th[:, 1], window)
    layout = JointLayout.build(frame, origin, window, shape, n_frames, psf.dtype)
    model = joint_model(psf, layout, th)
    rv = _frame_pixels(read_var, layout, psf.dtype)
    info = joint_fisher(layout, model.jac, model.mu + rv)
    joint = per_emitter(layout, covariance(info, free)).diagonal(dim1=1, dim2=2)
    mu, jac = window_model(psf, th, origin, window, layout.inside)
    alone = covariance(fisher(mu, jac, rv, layout.inside), free).diagonal(dim1=1, dim2=2)
    return joint, alone


def _as_pixels(read_var: float | torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """σ² as (B, P) like ``like`` (B, P): a number or a tensor of B·P elements."""
    if isinstance(read_var, torch.Tensor) and read_var.numel() > 1:
        return read_var.to(like.device, like.dtype).reshape(like.shape)
    return torch.full_like(like, float(read_var))


def _frame_pixels(
    read_var: float | torch.Tensor, layout: JointLayout, dtype: torch.dtype
) -> torch.Tensor:
    """σ² at every window pixel (n, h·w): a number, or read from a (F, H, W) map."""
    if isinstance(read_var, torch.Tensor) and read_var.numel() > 1:
        return layout.gather(read_var.to(layout.flat.device, dtype))
    return torch.full(layout.flat.shape, float(read_var), dtype=dtype, device=layout.flat.device)
