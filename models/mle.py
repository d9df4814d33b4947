"""Batched Poisson maximum-likelihood fit of the spline PSF: Levenberg–Marquardt on torch.

Every emitter's θ = (x_px, y_px, z_um, photons, background) (`focaltrack.models.crlb`) is
fitted to the photo-electrons of a window of the frame around its start, the model being
photons · PSF + background (`focaltrack.sim.spline_psf.SplinePSF`), as SMAP's GPU fitter
does (Li et al. 2018, Nat. Methods 15, 367; Smith et al. 2010, Nat. Methods 7, 373):

- Likelihood: Poisson in photo-electrons; Gaussian read noise of variance σ² (e⁻², one
  number or a per-pixel sCMOS map) by the sCMOS approximation of Huang et al. 2013 (Nat.
  Methods 10, 653): σ² is added to the data and to the model, d' = max(d + σ², 0) and
  μ' = μ + σ², and d' is treated as Poisson with mean μ'. Mean and variance are the real
  pixel's; the likelihood is not exactly the Poisson–Gaussian convolution, which costs a
  little efficiency only where the read noise dominates a pixel. An EMCCD is fitted the
  same way with σ the read noise after the gain (≈ 0); its excess noise is not modelled.
- Steps: Fisher scoring (the Hessian replaced by the Fisher information
  Σ ∂μ' ∂μ'ᵀ / μ', always positive semi-definite) with Marquardt's damping
  (I + λ diag I) δ = ∇ log L, a trial step accepted when the likelihood does not fall
  (λ / 10) and refused otherwise (λ · 10). A step moves x, y by at most 1 px and z by at most
  one calibration step; photons may at most halve per step; the background stays ≥ 0.
- Convergence: per fit, when the Newton decrement ∇ᵀ I⁻¹ ∇ (twice the likelihood a full
  step would still gain) is below ``tol`` per emitter — the fit is then within √tol of its
  own σ of the optimum —, or after ``max_iter`` trial steps. A converged fit stops
  (a convergence mask), and only the fits still moving are evaluated. A parameter held at
  its bound with the likelihood still rising beyond it (z at the calibration's end, x or y
  at the window's edge) is left out of the step and of the decrement: the fit converges
  there, flagged.
- Each fit's σ comes from the same Fisher information at the fitted θ: the Cramér–Rao
  bound of that model, at no extra cost.

Two modes, both one batched tensor computation for all emitters (no Python loop over them):
`fit_windows` / `fit_frames(joint=False)` fit every emitter alone on its window;
`fit_frames(joint=True)` fits all emitters of a frame together: the model of a pixel is the
sum of every covering window's emitter plus the background field (`crlb.joint_model`), and a
frame's step solves its full (5·k)² system, so overlapping emitters (a neighbour, a deep
ring under a focused emitter) share their light instead of each taking it.

Each emitter keeps the window placed around its start: a fit that leaves it is held at its
edge and flagged (`MLEFit.at_bound`), as is a z clamped at the calibration's range.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from focaltrack.calibration import NoiseModel
from focaltrack.calibration.preprocess import DEFAULT_GAIN_E_PER_ADU
from focaltrack.models.crlb import (
    MIN_VARIANCE_E2,
    N_PARAMS,
    JointLayout,
    covariance,
    fisher,
    joint_fisher,
    joint_model,
    per_emitter,
    window_model,
)
from focaltrack.sim.spline_psf import SplinePSF, frame_index, gather

__all__ = [
    "MLEFit",
    "electrons",
    "fit_frames",
    "fit_windows",
    "least_squares",
    "log_likelihood_terms",
    "start_amplitudes",
]

LAMBDA_START = 1e-2
LAMBDA_MIN = 1e-7
LAMBDA_MAX = 1e8  # a fit whose steps are refused until here has stalled: it stops
MAX_STEP_PX = 1.0


@dataclass(frozen=True, slots=True)
class MLEFit:
    """Fitted emitters, (n, …) tensors; θ columns as `focaltrack.models.crlb.PARAMETERS`.

    ``sigma``: √CRLB of each parameter at the fit (jointly for a joint fit), float64.
    ``deviance``: 2 Σ (d' log(d'/μ') − d' + μ') over the emitter's window, ≈ its number of
    pixels for a fit whose model explains the data. ``converged``: the Newton decrement fell
    below the tolerance. ``at_bound``: x or y held at its window's edge or z at the
    calibration's range; ``xy_at_bound``: x or y at its window's edge.
    """

    theta: torch.Tensor
    sigma: torch.Tensor
    deviance: torch.Tensor
    iterations: torch.Tensor
    converged: torch.Tensor
    at_bound: torch.Tensor
    xy_at_bound: torch.Tensor

    @property
    def x_px(self) -> torch.Tensor:
        return self.theta[:, 0]

    @property
    def y_px(self) -> torch.Tensor:
        return self.theta[:, 1]

    @property
    def z_um(self) -> torch.Tensor:
        return self.theta[:, 2]

    @property
    def photons(self) -> torch.Tensor:
        return self.theta[:, 3]

    @property
    def background(self) -> torch.Tensor:
        return self.theta[:, 4]


def electrons(frame_adu: torch.Tensor, noise: NoiseModel) -> tuple[torch.Tensor, float]:
    """A raw frame (ADU) in photo-electrons, and the read-noise variance σ² (e⁻²) to fit it
    with: e = (ADU − offset) · gain. A calibration whose gain could not be estimated (NaN)
    counts ADU as electrons (`DEFAULT_GAIN_E_PER_ADU`, as the networks' input does), which
    mis-states the Poisson weights by the true gain but keeps every fit defined."""
    gain = noise.gain_e_per_adu
    if not (math.isfinite(gain) and gain > 0):
        gain = DEFAULT_GAIN_E_PER_ADU
    read = noise.read_noise_adu * gain if math.isfinite(noise.read_noise_adu) else 0.0
    return (frame_adu.double() - noise.offset_adu) * gain, float(read) ** 2


@dataclass(slots=True)
class _State:
    """What a fit needs at θ, per group (an emitter alone, or a frame jointly)."""

    ll: torch.Tensor  # (G,) float64, log-likelihood up to a constant
    grad: torch.Tensor  # (G, P) float64
    info: torch.Tensor  # (G, P, P) float64

    def take(self, rows: torch.Tensor) -> _State:
        return _State(self.ll[rows], self.grad[rows], self.info[rows])

    def put(self, rows: torch.Tensor, other: _State, accept: torch.Tensor) -> None:
        self.ll[rows] = torch.where(accept, other.ll, self.ll[rows])
        self.grad[rows] = torch.where(accept[:, None], other.grad, self.grad[rows])
        self.info[rows] = torch.where(accept[:, None, None], other.info, self.info[rows])


Evaluate = Callable[[torch.Tensor, torch.Tensor], _State]


def _solve(
    info: torch.Tensor, grad: torch.Tensor, lam: torch.Tensor, free: torch.Tensor
) -> torch.Tensor:
    """δ of (I + λ diag I) δ = ∇ per group over the ``free`` parameters (G, P) (the others'
    rows and columns replaced by the identity: they do not move), on the unit-diagonal
    scaling of I."""
    f = free.to(info.dtype)
    d = info.diagonal(dim1=1, dim2=2).clamp_min(1e-300).rsqrt()
    a = info * (d * f)[:, :, None] * (d * f)[:, None, :]
    a = a + torch.diag_embed(f * (lam[:, None] + 1e-9) + (1.0 - f))
    y, _ = torch.linalg.solve_ex(a, (grad * d * f)[:, :, None])
    delta = y[:, :, 0] * d * f
    return torch.nan_to_num(delta, nan=0.0, posinf=0.0, neginf=0.0)


def _levenberg_marquardt(
    theta: torch.Tensor, evaluate: Evaluate, bounds: _Bounds, tol: torch.Tensor, max_iter: int
) -> tuple[torch.Tensor, _State, torch.Tensor, torch.Tensor]:
    """Fit the groups' parameter vectors θ (G, P); returns θ, the state at θ, the trial
    steps taken per group and whether each converged (Newton decrement < ``tol`` (G,)).

    A parameter held at its bound by a gradient pushing outward (a z at the calibration's
    end) is left out of the step and of the decrement: the fit converges there."""
    g = theta.shape[0]
    dev = theta.device
    all_rows = torch.arange(g, device=dev)
    state = evaluate(theta, all_rows)
    lam = torch.full((g,), LAMBDA_START, dtype=torch.float64, device=dev)
    iterations = torch.zeros(g, dtype=torch.long, device=dev)
    converged = torch.zeros(g, dtype=torch.bool, device=dev)
    active = torch.ones(g, dtype=torch.bool, device=dev)
    for it in range(max_iter + 1):
        rows = torch.nonzero(active).reshape(-1)
        if len(rows) == 0:
            break
        st = state.take(rows)
        free = ~bounds.pinned(theta[rows], st.grad, rows)
        newton = _solve(st.info, st.grad, torch.zeros_like(lam[rows]), free)
        done = (newton * st.grad).sum(-1) < tol[rows]
        converged[rows[done]] = True
        stalled = lam[rows] >= LAMBDA_MAX
        active[rows[done | stalled]] = False
        keep = ~done & ~stalled
        rows, st, free = rows[keep], st.take(torch.nonzero(keep).reshape(-1)), free[keep]
        if len(rows) == 0 or it == max_iter:
            break
        step = _solve(st.info, st.grad, lam[rows], free)
        trial = theta.clone()
        trial[rows] = bounds.step(theta[rows], step.to(theta.dtype), rows)
        new = evaluate(trial, rows)
        accept = new.ll >= st.ll
        theta[rows] = torch.where(accept[:, None], trial[rows], theta[rows])
        state.put(rows, new, accept)
        lam[rows] = torch.where(accept, lam[rows] / 10, lam[rows] * 10).clamp_min(LAMBDA_MIN)
        iterations[rows] += 1
    return theta, state, iterations, converged


def log_likelihood_terms(data: torch.Tensor, model: torch.Tensor) -> torch.Tensor:
    """Per pixel d' log(μ'/d') − (μ' − d') (the log-likelihood less its value at μ' = d'):
    small numbers, whose sum keeps its precision in float32."""
    mu = model.clamp_min(MIN_VARIANCE_E2)
    pos = data > 0
    ratio = torch.where(pos, mu / torch.where(pos, data, torch.ones_like(data)), mu)
    return torch.where(pos, data * torch.log(ratio), torch.zeros_like(data)) - (mu - data)


class _Bounds:
    """Step limits and bounds for groups of k emitters' θ (G, 5·k): ``lo``/``hi`` (G, k, 3)
    bound x, y, z; ``max_step`` caps |δx|, |δy|, |δz|; photons at most halve per step (so
    they stay > 0 and the position keeps its gradient); the background stops at 0."""

    def __init__(
        self, lo: torch.Tensor, hi: torch.Tensor, max_step: tuple[float, float, float]
    ) -> None:
        self.lo, self.hi = lo, hi
        self.cap = torch.tensor(max_step, dtype=lo.dtype, device=lo.device)
        self.eps = 1e-6 * (hi - lo).abs().clamp_min(1.0)

    def step(self, theta: torch.Tensor, step: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        g = theta.shape[0]
        t = theta.reshape(g, -1, N_PARAMS)
        s = step.reshape(g, -1, N_PARAMS)
        xyz = t[..., :3] + torch.maximum(torch.minimum(s[..., :3], self.cap), -self.cap)
        xyz = torch.maximum(torch.minimum(xyz, self.hi[rows]), self.lo[rows])
        photons = torch.maximum(t[..., 3:4] + s[..., 3:4], 0.5 * t[..., 3:4].clamp_min(0.0))
        background = (t[..., 4:] + s[..., 4:]).clamp_min(0.0)
        return torch.cat([xyz, photons, background], -1).reshape(g, -1)

    def pinned(self, theta: torch.Tensor, grad: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """(G, 5·k) bool: x, y or z at a bound with the likelihood rising beyond it, or the
        background at 0 with the likelihood rising below it (a window darker than the
        calibration's offset: its background is 0, and the fit converges there instead of
        spending every step on it)."""
        g = theta.shape[0]
        th = theta.reshape(g, -1, N_PARAMS)
        t = th[..., :3]
        gr = grad.reshape(g, -1, N_PARAMS).to(t.dtype)
        d = gr[..., :3]
        eps = self.eps[rows]
        out = ((t >= self.hi[rows] - eps) & (d > 0)) | ((t <= self.lo[rows] + eps) & (d < 0))
        bg = (th[..., 4:] <= 0.0) & (gr[..., 4:] < 0)
        return torch.cat([out, torch.zeros_like(out[..., :1]), bg], -1).reshape(g, -1)


def _bounds(
    psf: SplinePSF, origin: torch.Tensor, size: tuple[int, int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """(…, 3) lower and upper bounds of x, y, z for emitters on windows at ``origin``
    (…, 2): inside the window (pixel edges), z in the calibration's range."""
    o = origin.to(psf.dtype)
    z0, z1 = psf.z_range_um
    lo = torch.stack([o[..., 1] - 0.5, o[..., 0] - 0.5, torch.full_like(o[..., 0], z0)], -1)
    hi = torch.stack(
        [o[..., 1] + size[1] - 0.5, o[..., 0] + size[0] - 0.5, torch.full_like(o[..., 0], z1)],
        -1,
    )
    return lo, hi


def _at_bound(theta: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    """(n, 3) whether each emitter's x, y and z is at its bound."""
    eps = 1e-4 * (hi - lo).clamp_min(1.0)
    return (theta[:, :3] <= lo + eps) | (theta[:, :3] >= hi - eps)


def _start(psf: SplinePSF, start: torch.Tensor) -> torch.Tensor:
    """(n, 5) from a start of (n, 3) or (n, 5): missing or non-finite photons and
    background are NaN (estimated later), a non-finite z is the middle of the range."""
    s = start.to(psf.device, psf.dtype).reshape(start.shape[0], -1)
    if s.shape[1] not in (3, N_PARAMS):
        raise ValueError(f"a start is (x, y, z) or (x, y, z, photons, background), got {s.shape}")
    if not torch.isfinite(s[:, :2]).all():
        raise ValueError("every start needs a finite x and y: its window is placed there")
    if s.shape[1] == 3:
        s = torch.cat([s, torch.full_like(s[:, :2], math.nan)], 1)
    s = s.clone()
    z0, z1 = psf.z_range_um
    s[:, 2] = torch.where(
        torch.isfinite(s[:, 2]), s[:, 2], torch.full_like(s[:, 2], 0.5 * (z0 + z1))
    )
    s[:, 2] = s[:, 2].clamp(z0, z1)
    return s


def least_squares(
    v: torch.Tensor, data: torch.Tensor, m: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Photons and background of windows (B, P), unconstrained: linear least squares of
    ``data`` on [PSF ``v``, 1] over the pixels ``m`` (0/1)."""
    v, d = v * m, data * m
    svv, sv, s1 = (v * v).sum(1), v.sum(1), m.sum(1)
    svd, sd = (v * d).sum(1), d.sum(1)
    det = (svv * s1 - sv * sv).clamp_min(1e-12)
    return (s1 * svd - sv * sd) / det, (svv * sd - sv * svd) / det


def start_amplitudes(
    psf: SplinePSF,
    theta: torch.Tensor,
    origin: torch.Tensor,
    size: tuple[int, int],
    data: torch.Tensor,
    inside: torch.Tensor,
) -> torch.Tensor:
    """θ with photons and background filled where not finite (or not positive) by linear
    least squares of the data on [PSF at the start, 1] over each window."""
    p = psf.evaluate(theta[:, 0], theta[:, 1], theta[:, 2], origin, size, derivatives=False)
    b = theta.shape[0]
    m = inside.to(psf.dtype).reshape(b, -1)
    v = p.value.reshape(b, -1)
    n_ls, bg_ls = least_squares(v, data.reshape(b, -1), m)
    # a negative background: none, and the photons of the PSF alone
    vm = v * m
    alone = (vm * data.reshape(b, -1) * m).sum(1) / (vm * vm).sum(1).clamp_min(1e-12)
    n_ls = torch.where(bg_ls < 0, alone, n_ls)
    bg_ls = bg_ls.clamp_min(0.0)
    out = theta.clone()
    fill_n = ~(torch.isfinite(out[:, 3]) & (out[:, 3] > 0))
    fill_b = ~(torch.isfinite(out[:, 4]) & (out[:, 4] >= 0))
    out[:, 3] = torch.where(fill_n, n_ls.clamp_min(1.0), out[:, 3])
    out[:, 4] = torch.where(fill_b, bg_ls, out[:, 4])
    return out


def _pixels(value: float | torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    if isinstance(value, torch.Tensor) and value.numel() > 1:
        return value.to(like.device, like.dtype).reshape(like.shape)
    return torch.full_like(like, float(value))


# ------------------------------------------------------------------------- alone
def fit_windows(
    psf: SplinePSF,
    data: torch.Tensor,
    origin: torch.Tensor,
    start: torch.Tensor,
    *,
    read_var: float | torch.Tensor = 0.0,
    inside: torch.Tensor | None = None,
    max_iter: int = 50,
    tol: float = 1e-3,
) -> MLEFit:
    """Fit B emitters, each alone on its window: ``data`` (B, h, w) photo-electrons of
    windows whose top-left frame pixels are ``origin`` (B, 2) (row, column); ``start``
    (B, 3) x, y, z or (B, 5) with photons and background (NaN: estimated by least squares);
    ``read_var`` σ² (e⁻²), a number or (B, h, w); ``inside`` (B, h, w): the pixels that
    were observed (default all)."""
    b, h, w = data.shape
    size = (h, w)
    dev, dt = psf.device, psf.dtype
    org = origin.to(dev).long().reshape(b, 2)
    d = data.to(dev, dt).reshape(b, -1)
    m = torch.ones_like(d) if inside is None else inside.to(dev).reshape(b, -1).to(dt)
    rv = _pixels(read_var, d)
    d_prime = ((d + rv) * m).clamp_min(0.0)
    theta = start_amplitudes(psf, _start(psf, start), org, size, d, m)
    lo, hi = _bounds(psf, org, size)

    def evaluate(th: torch.Tensor, rows: torch.Tensor) -> _State:
        mu, jac = window_model(psf, th[rows], org[rows], size, m[rows])
        mu_p = mu + rv[rows]
        mr = m[rows]
        ll = (log_likelihood_terms(d_prime[rows], mu_p) * mr).sum(-1, dtype=torch.float64)
        rho = mr * (d_prime[rows] / mu_p.clamp_min(MIN_VARIANCE_E2) - 1.0)
        grad = torch.einsum("bip,bp->bi", jac, rho).double()
        return _State(ll, grad, fisher(mu, jac, rv[rows], mr))

    bounds = _Bounds(lo[:, None], hi[:, None], (MAX_STEP_PX, MAX_STEP_PX, psf.z_step_um))
    tolerance = torch.full((b,), tol, dtype=torch.float64, device=dev)
    theta, state, iterations, converged = _levenberg_marquardt(
        theta, evaluate, bounds, tolerance, max_iter
    )
    sigma = covariance(state.info).diagonal(dim1=1, dim2=2).sqrt()
    bounded = _at_bound(theta, lo, hi)
    return MLEFit(
        theta=theta,
        sigma=sigma,
        deviance=-2.0 * state.ll,
        iterations=iterations,
        converged=converged,
        at_bound=bounded.any(-1),
        xy_at_bound=bounded[:, :2].any(-1),
    )


# ------------------------------------------------------------------------ frames
def fit_frames(
    psf: SplinePSF,
    frames: torch.Tensor,
    start: torch.Tensor,
    frame: torch.Tensor | None = None,
    *,
    window: tuple[int, int],
    read_var: float | torch.Tensor = 0.0,
    joint: bool = False,
    max_iter: int = 50,
    tol: float = 1e-3,
) -> MLEFit:
    """Fit n emitters of a stack of frames (F, H, W) (or one frame (H, W)), photo-electrons,
    each on a ``window`` (h, w) placed around its ``start`` (n, 3 or 5; see `fit_windows`),
    in frame ``frame`` (n,) (default 0). ``read_var``: σ² (e⁻²), a number or a (F, H, W)
    map. ``joint``: fit each frame's emitters together (`focaltrack.models.crlb.joint_model`),
    else each alone on its window (its neighbours' light in it unmodelled)."""
    dev, dt = psf.device, psf.dtype
    stack = frames.to(dev, dt)
    if stack.ndim == 2:
        stack = stack[None]
    n_frames, hh, ww = stack.shape
    th0 = _start(psf, start)
    n = th0.shape[0]
    fr = (
        torch.zeros(n, dtype=torch.long, device=dev)
        if frame is None
        else frame.to(dev).long().reshape(-1)
    )
    origin = psf.windows_at(th0[:, 0], th0[:, 1], window)
    rv_map: float | torch.Tensor = read_var
    if isinstance(read_var, torch.Tensor) and read_var.numel() > 1:
        rv_map = read_var.to(dev, dt).expand(n_frames, hh, ww)
    flat, inside = frame_index(origin, window, (hh, ww), fr, n_frames)
    data = gather(stack, flat).reshape(n, *window)
    rv_win: float | torch.Tensor = rv_map
    if isinstance(rv_map, torch.Tensor):
        rv_win = gather(rv_map, flat).reshape(n, *window)
    if not joint or n == 0:
        return fit_windows(
            psf,
            data,
            origin,
            th0,
            read_var=rv_win,
            inside=inside.reshape(n, *window),
            max_iter=max_iter,
            tol=tol,
        )
    theta0 = start_amplitudes(psf, th0, origin, window, data, inside)
    return _fit_joint(psf, stack, theta0, fr, origin, window, rv_map, max_iter, tol)


def _fit_joint(
    psf: SplinePSF,
    stack: torch.Tensor,
    theta0: torch.Tensor,
    frame: torch.Tensor,
    origin: torch.Tensor,
    window: tuple[int, int],
    read_var: float | torch.Tensor,
    max_iter: int,
    tol: float,
) -> MLEFit:
    """All emitters of each frame fitted together: one parameter vector per frame."""
    dev, dt = psf.device, psf.dtype
    n_frames, hh, ww = stack.shape
    layout = JointLayout.build(frame, origin, window, (hh, ww), n_frames, dt)
    s = layout.slots
    rv_canvas = (
        read_var.reshape(-1)
        if isinstance(read_var, torch.Tensor)
        else torch.full((n_frames * hh * ww,), float(read_var), dtype=dt, device=dev)
    )
    rv_win = layout.gather(rv_canvas)
    covered = layout.covered.to(dt)
    d_canvas = ((stack.reshape(-1) + rv_canvas) * covered).clamp_min(0.0)
    d_win = layout.gather(d_canvas)
    lo_e, hi_e = _bounds(psf, origin, window)
    # per frame and slot; unused slots: θ = 0, bounds that hold it, no gradient
    lo = torch.zeros(n_frames, s, 3, dtype=dt, device=dev)
    hi = torch.zeros(n_frames, s, 3, dtype=dt, device=dev)
    lo[layout.frame, layout.slot] = lo_e
    hi[layout.frame, layout.slot] = hi_e
    theta = torch.zeros(n_frames, s, N_PARAMS, dtype=dt, device=dev)
    theta[layout.frame, layout.slot] = theta0
    counts = torch.zeros(n_frames, dtype=torch.float64, device=dev)
    counts.index_add_(0, layout.frame, torch.ones_like(layout.frame, dtype=torch.float64))

    def emitters(th: torch.Tensor) -> torch.Tensor:
        return th.reshape(n_frames, s, N_PARAMS)[layout.frame, layout.slot]

    def evaluate(th: torch.Tensor, rows: torch.Tensor) -> _State:
        model = joint_model(psf, layout, emitters(th))
        mu_canvas = model.canvas[:-1] + rv_canvas
        terms = log_likelihood_terms(d_canvas, mu_canvas) * covered
        ll = terms.reshape(n_frames, -1).sum(-1, dtype=torch.float64)
        mu_p = model.mu + rv_win
        rho = layout.inside * (d_win / mu_p.clamp_min(MIN_VARIANCE_E2) - 1.0)
        g_e = torch.einsum("bip,bp->bi", model.jac, rho).double()
        grad = torch.zeros(n_frames, s, N_PARAMS, dtype=torch.float64, device=dev)
        grad[layout.frame, layout.slot] = g_e
        info = joint_fisher(layout, model.jac, mu_p)
        return _State(ll, grad.reshape(n_frames, -1), info).take(rows)

    bounds = _Bounds(lo, hi, (MAX_STEP_PX, MAX_STEP_PX, psf.z_step_um))
    theta, state, iterations, converged = _levenberg_marquardt(
        theta.reshape(n_frames, -1), evaluate, bounds, tol * counts.clamp_min(1.0), max_iter
    )
    th = emitters(theta)
    model = joint_model(psf, layout, th)
    terms = log_likelihood_terms(d_canvas, model.canvas[:-1] + rv_canvas) * covered
    deviance = -2.0 * (layout.gather(terms) * layout.inside).sum(-1, dtype=torch.float64)
    sigma = per_emitter(layout, covariance(state.info)).diagonal(dim1=1, dim2=2).sqrt()
    bounded = _at_bound(th, lo_e, hi_e)
    return MLEFit(
        theta=th,
        sigma=sigma,
        deviance=deviance,
        iterations=iterations[layout.frame],
        converged=converged[layout.frame],
        at_bound=bounded.any(-1),
        xy_at_bound=bounded[:, :2].any(-1),
    )
