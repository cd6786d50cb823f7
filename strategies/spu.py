"""SPU — the Spectrum Pruning Unit of LUVC (arXiv 2512.09010), as `shared/spec/luvc.md` interprets it.

At the input of each scheduled LLM layer, the visual tokens still present are low-pass filtered in the
frequency domain (FFT, Hamming window with cutoff ``σ_t``); each token is scored by the share of its energy
the low-pass field keeps, and the top ``N_t`` go on. ``N_t`` falls linearly to zero, so no visual token
enters the stage's last layer. No attention is read: FlashAttention stays usable.

The pure functions (`hamming_lowpass`, `lowpass`, `spu_scores`, `cascade_keep`) carry the method; the
`SPU` strategy only applies them to a `tokcomp.LLMView`.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import ClassVar, Literal

import torch

from tokcomp.contracts import LLMDecision, LLMStrategy, LLMView, check_keep_ratio
from tokcomp.errors import ScheduleError

__all__ = ["SPU", "cascade_keep", "cutoff_at", "hamming_lowpass", "lowpass", "spu_scores"]


def hamming_lowpass(num_freqs: int, length: int, cutoff: float, device: torch.device | None = None) -> torch.Tensor:
    """Half-Hamming low-pass window over the ``rfft`` bins of a length-``length`` signal.

    The window is ``0.54 + 0.46 cos(π f / cutoff)`` for normalised frequency ``f = k / (length / 2)`` up to
    ``cutoff`` (a fraction of the Nyquist band) and 0 above it; the DC bin always passes (weight 1).

    Args:
        num_freqs: Number of rfft bins (``length // 2 + 1``).
        length: Signal length.
        cutoff: Cutoff as a fraction of Nyquist, in ``[0, 1]``.
        device: Where to build the window.
    """
    k = torch.arange(num_freqs, device=device, dtype=torch.float32)
    f = k / max(length / 2.0, 1e-9)
    if cutoff <= 0:
        w = torch.zeros_like(f)
    else:
        w = torch.where(f <= cutoff, 0.54 + 0.46 * torch.cos(math.pi * f / cutoff), torch.zeros_like(f))
    w[0] = 1.0
    return w


def lowpass(x: torch.Tensor, cutoff: float, dim: int) -> torch.Tensor:
    """Low-pass filter ``x`` along ``dim`` with `hamming_lowpass`: the circular (length-``n`` DFT) filter,
    computed in float32 (CPUs have no bfloat16 FFT)."""
    return _lowpass_last(x.float().movedim(dim, -1), cutoff).movedim(-1, dim)


def _largest_prime_factor(n: int) -> int:
    p, largest = 2, 1
    while p * p <= n:
        while n % p == 0:
            n //= p
            largest = p
        p += 1
    return max(largest, n) if n > 1 else largest


def _is_smooth(n: int) -> bool:
    for p in (2, 3, 5):
        while n % p == 0:
            n //= p
    return n == 1


def _fast_fft_length(n: int) -> int:
    """The smallest even ``2^a 3^b 5^c`` at least ``n``: lengths the FFT handles at full speed."""
    m = n + (n % 2)
    while not _is_smooth(m):
        m += 2
    return m


def _lowpass_last(x: torch.Tensor, cutoff: float) -> torch.Tensor:
    """`lowpass` along the last axis of float ``x``, exact for every length (see `_lowpass_filter`)."""
    n = x.shape[-1]
    return _lowpass_filter(n, cutoff, x.device)(x) if n else x


def _lowpass_filter(n: int, cutoff: float, device: torch.device) -> Callable[[torch.Tensor], torch.Tensor]:
    """The `hamming_lowpass` circular filter for length-``n`` signals along the last axis (float input).

    The token counts of a pruning cascade are arbitrary, and on CPU a real FFT of odd length, or of an even
    length with a prime factor above ~64, runs 1.3-3x slower than one of twice that length that is even and
    smooth (measured at 1536 channels, 100-3000 tokens). For those lengths the same circular filter is
    therefore computed as a circular convolution with its kernel ``h = irfft(window)`` on a zero-padded
    signal of a fast length ``M >= 2n - 1``: with ``h`` laid out periodically around index 0, the first
    ``n`` outputs of the length-``M`` convolution are exactly the length-``n`` circular ones (the wrap-around
    terms land in outputs ``n..M-1``, which are dropped).
    """
    window = hamming_lowpass(n // 2 + 1, n, cutoff, device=device)
    if n <= 64 or (n % 2 == 0 and _largest_prime_factor(n) <= 64):
        return lambda x: torch.fft.irfft(torch.fft.rfft(x, dim=-1) * window, n=n, dim=-1)
    m = _fast_fft_length(2 * n - 1)
    h = torch.fft.irfft(window, n=n)
    kernel = torch.zeros(m, device=device)
    kernel[:n] = h
    kernel[m - n + 1:] = h[1:]
    response = torch.fft.rfft(kernel)

    def apply(x: torch.Tensor) -> torch.Tensor:
        spec = torch.fft.rfft(x, n=m, dim=-1)
        spec *= response
        return torch.fft.irfft(spec, n=m, dim=-1)[..., :n]

    return apply


def spu_scores(
    x: torch.Tensor,
    cutoff: float,
    *,
    axis: Literal["tokens", "hidden", "grid"] = "tokens",
    score: Literal["lowpass_share", "residual"] = "lowpass_share",
    groups: torch.Tensor | None = None,
    coords: torch.Tensor | None = None,
) -> torch.Tensor:
    """Importance of each token (higher = keep) from its low-pass spectrum.

    Args:
        x: ``(n, D)`` tokens, in raster order within each group.
        cutoff: Low-pass cutoff (fraction of Nyquist).
        axis: ``"tokens"``: FFT along the token axis per group (image); ``"hidden"``: along the hidden
            dimension per token; ``"grid"``: 2-D FFT over each frame's ``(row, col)`` grid, absent tokens
            zero-filled.
        score: ``"lowpass_share"``: ``‖x̂_i‖² / ‖x_i‖²``; ``"residual"``: ``-‖x_i − x̂_i‖²`` (keep the tokens
            with the least high-frequency energy).
        groups: ``(n,)`` group id per token (image/video item); one group if None.
        coords: ``(n, 3)`` ``(t, row, col)`` per token, required for ``axis="grid"``.

    Returns:
        ``(n,)`` float32 scores, finite.
    """
    n = x.shape[0]
    if n == 0:
        return torch.zeros(0, device=x.device)
    if groups is None:
        groups = torch.zeros(n, dtype=torch.long, device=x.device)
    if axis == "tokens":
        return _token_axis_scores(x, cutoff, score, groups)
    xf = x.float()
    xh = torch.empty_like(xf)
    if axis == "hidden":
        xh = lowpass(xf, cutoff, dim=1)
    elif axis == "grid":
        if coords is None:
            raise ValueError("axis='grid' needs coords")
        for g in torch.unique(groups):
            sel = (groups == g).nonzero().squeeze(1)
            c = coords[sel]
            T, H, W = (int(c[:, i].max()) + 1 for i in range(3))
            grid = torch.zeros(T, H, W, xf.shape[1], device=x.device)
            grid[c[:, 0], c[:, 1], c[:, 2]] = xf[sel]
            spec = torch.fft.rfft2(grid, dim=(1, 2))
            wh = _radial_window(H, W, cutoff, x.device)
            filt = torch.fft.irfft2(spec * wh[None, :, :, None], s=(H, W), dim=(1, 2))
            xh[sel] = filt[c[:, 0], c[:, 1], c[:, 2]]
    else:
        raise ValueError(f"unknown axis {axis!r}")
    energy = xf.pow(2).sum(1)
    if score == "lowpass_share":
        s = xh.pow(2).sum(1) / energy.clamp(min=1e-12)
        return torch.where(energy > 0, s, torch.ones_like(s))
    if score == "residual":
        return -(xf - xh).pow(2).sum(1)
    raise ValueError(f"unknown score {score!r}")


def _token_axis_scores(x: torch.Tensor, cutoff: float, score: str, groups: torch.Tensor) -> torch.Tensor:
    if score not in ("lowpass_share", "residual"):
        raise ValueError(f"unknown score {score!r}")
    if not bool((groups[1:] >= groups[:-1]).all()):
        raise ValueError("groups must be sorted (tokens of one item contiguous, in raster order)")
    # Channels-first (D, n) makes the FFT run along contiguous memory and the per-token energies reduce
    # over rows: about twice as fast as filtering (n, D) along dim 0 on CPU.
    xt = x.T.contiguous()  # transpose in the input dtype: half the bytes to move
    out = torch.empty(x.shape[0], device=x.device)
    bounds = torch.searchsorted(groups, torch.unique_consecutive(groups)).tolist() + [x.shape[0]]
    for a, b in itertools.pairwise(bounds):
        n = b - a
        filt = _lowpass_filter(n, cutoff, x.device)
        kept = torch.zeros(n, device=x.device)  # low-pass energy (share) or high-pass energy (residual)
        energy = torch.zeros(n, device=x.device)
        # A few channels at a time: each chunk's spectrum stays in cache and is reduced to per-token
        # energies at once (1.2-1.7x faster than filtering all 1536 channels in one call at 1-2k tokens).
        # square().sum(0), not vector_norm(dim=0): the latter is ~50x slower on CPU for this layout.
        for part in torch.split(xt[:, a:b], _CHANNEL_CHUNK):
            seg = part.float()
            low = filt(seg)
            if score == "lowpass_share":
                kept += low.square().sum(0)
                energy += seg.square().sum(0)
            else:
                kept += (seg - low).square().sum(0)
        if score == "lowpass_share":
            share = kept / energy.clamp(min=1e-12)
            out[a:b] = torch.where(energy > 0, share, torch.ones_like(share))
        else:
            out[a:b] = -kept
    return out


_CHANNEL_CHUNK = 128


def _radial_window(h: int, w: int, cutoff: float, device: torch.device) -> torch.Tensor:
    fy = torch.fft.fftfreq(h, device=device).abs() * 2  # fraction of Nyquist
    fx = torch.fft.rfftfreq(w, device=device) * 2
    f = torch.sqrt(fy[:, None] ** 2 + fx[None, :] ** 2)
    if cutoff <= 0:
        win = torch.zeros_like(f)
    else:
        win = torch.where(f <= cutoff, 0.54 + 0.46 * torch.cos(math.pi * f / cutoff), torch.zeros_like(f))
    win[0, 0] = 1.0
    return win


def cutoff_at(layer: int, num_layers: int, cutoff: float, decay: bool) -> float:
    """``σ_t = σ_0 (1 − t / L)`` when ``decay``, else ``σ_0``."""
    return cutoff * (1.0 - layer / num_layers) if decay else cutoff


def cascade_keep(n0: int, layer: int, first: int, last: int, schedule: str = "linear", decay: float = 0.7) -> int:
    """Visual tokens allowed into ``layer`` under the progressive schedule.

    Linear: ``N_t = ⌈N_0 (last − t) / (last − first + 1)⌉`` for ``first <= t <= last`` — the first stage layer
    already prunes and no visual token enters ``last``. Geometric: ``N_t = ⌈N_0 decay^(t − first + 1)⌉``,
    and 0 at ``last``.

    Args:
        n0: Visual tokens at the LLM input.
        layer: The layer ``t``.
        first: The stage's first layer.
        last: The stage's last layer (no visual token enters it).
        schedule: ``"linear"`` or ``"geometric"``.
        decay: Geometric ratio per layer.
    """
    if layer < first:
        return n0
    if layer >= last:
        return 0
    if schedule == "linear":
        return math.ceil(n0 * (last - layer) / (last - first + 1))
    if schedule == "geometric":
        return math.ceil(n0 * decay ** (layer - first + 1))
    raise ValueError(f"unknown schedule {schedule!r}")


@dataclass
class SPU(LLMStrategy):
    """Spectrum Pruning Unit: FFT low-pass energy scores, progressive pruning down to zero visual tokens.

    Args:
        cutoff: ``σ_0``, the low-pass cutoff as a fraction of the Nyquist band.
        cutoff_decay: Lower the cutoff with depth, ``σ_t = σ_0 (1 − t/L)``.
        axis: ``"tokens"`` (default), ``"hidden"`` or ``"grid"``; see `spu_scores`.
        score: ``"lowpass_share"`` (default) or ``"residual"``.
        schedule: ``"linear"`` (default) or ``"geometric"`` token cascade; see `cascade_keep`.
        decay: Ratio per layer of the geometric cascade.
        steps: Explicit ``[(layer, keep_ratio), ...]``: from each listed layer on, keep that fraction of the
            original visual tokens (overrides the cascade; a ratio of 0 removes every visual token).
        start: First layer when the stage gives no layers (the stage then runs from ``start`` to the last
            layer).
    """

    name: ClassVar[str] = "spu"
    cutoff: float = 0.5
    cutoff_decay: bool = True
    axis: Literal["tokens", "hidden", "grid"] = "tokens"
    score: Literal["lowpass_share", "residual"] = "lowpass_share"
    schedule: Literal["linear", "geometric"] = "linear"
    decay: float = 0.7
    steps: Sequence[tuple[int, float]] | None = None
    start: int = 2

    def check(self) -> None:
        """Parameter ranges."""
        if not 0.0 < self.cutoff <= 1.0:
            raise ScheduleError(f"spu: cutoff must be in (0, 1] (a fraction of Nyquist), got {self.cutoff}")
        if self.axis not in ("tokens", "hidden", "grid"):
            raise ScheduleError(f"spu: axis must be 'tokens', 'hidden' or 'grid', got {self.axis!r}")
        if self.score not in ("lowpass_share", "residual"):
            raise ScheduleError(f"spu: score must be 'lowpass_share' or 'residual', got {self.score!r}")
        if self.schedule not in ("linear", "geometric"):
            raise ScheduleError(f"spu: schedule must be 'linear' or 'geometric', got {self.schedule!r}")
        if not 0.0 < self.decay < 1.0:
            raise ScheduleError(f"spu: decay must be in (0, 1), got {self.decay}")
        for layer, ratio in self.steps or ():
            if ratio != 0:
                check_keep_ratio(f"spu step at layer {layer}", ratio)

    def default_layers(self, num_layers: int) -> list[int]:
        """From ``start`` to the last layer."""
        if self.start >= num_layers:
            raise ScheduleError(f"spu: start={self.start} but the LLM has only {num_layers} layers")
        return list(range(self.start, num_layers))

    def validate(self, stage, adapter) -> None:
        """Steps must name layers of the stage."""
        layers = stage.layers if stage.layers is not None else self.default_layers(adapter.num_layers)
        for layer, _ in self.steps or ():
            if layer not in layers:
                raise ScheduleError(f"spu: step layer {layer} is not one of the stage's layers {list(layers)}")

    def target(self, view: LLMView) -> int:
        """How many visual tokens may enter ``view.layer``."""
        n0 = view.num_original
        if self.steps:
            ratio = 1.0
            for layer, r in sorted(self.steps):
                if layer <= view.layer:
                    ratio = r
            return math.ceil(n0 * ratio)
        return cascade_keep(n0, view.layer, view.stage_layers[0], view.stage_layers[-1], self.schedule, self.decay)

    def select(self, view: LLMView) -> LLMDecision:
        """Keep the ``N_t`` tokens with the highest spectral score."""
        n = view.num_present
        k = min(self.target(view), n)
        sigma = cutoff_at(view.layer, view.num_layers, self.cutoff, self.cutoff_decay)
        if k >= n:
            return LLMDecision(keep=torch.arange(n, device=view.hidden.device), info={"cutoff": sigma})
        s = spu_scores(view.hidden, sigma, axis=self.axis, score=self.score, groups=view.item_of,
                       coords=view.coords)
        order = torch.sort(s, descending=True, stable=True).indices
        return LLMDecision(keep=order[:k].sort().values, info={"cutoff": sigma})
