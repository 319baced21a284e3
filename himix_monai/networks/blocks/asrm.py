"""Adaptive Spectrum Refinement Module (ASRM) of HiMix (paper Sec. 3.3, Eq. 3; supplement Sec. 7)."""

from __future__ import annotations

import math

import torch
import torch.nn as nn

__all__ = ["AdaptiveSpectrumRefinement", "gaussian_spectrum_filter", "gaussian_spectrum_operator", "SPECTRAL_FORMS"]

SPECTRAL_FORMS = ("auto", "fft", "matrix")


def gaussian_spectrum_filter(height: int, width: int, sigma: torch.Tensor) -> torch.Tensor:
    """The Gaussian filtering coefficient map ``g_sigma`` on the half spectrum of ``torch.fft.rfft2``.

    The map is ``g = 1 - exp(-r^2 / (2 sigma^2))`` where ``r`` is the distance (in frequency-index units) from
    the highest frequency ``(H/2, W/2)``. It is 0 at the highest frequency and grows towards 1 at the lowest
    ones, i.e. a low-pass whose stop band widens with ``sigma``: a LARGER sigma removes more of the high
    frequencies and keeps a smoother, more global feature; a SMALL sigma (``-> 0``) passes nearly everything,
    so the branch keeps local detail. This is the direction the paper describes (large sigma at the coarse
    stage for global context, small sigma at the fine stage for lesion margins) and the official code's
    ``1 - G`` with ``G`` centred on the highest frequencies.

    Even sizes (56, 28, 14 at a 224 input): equal to the official filter. Odd sizes (the 7x7 stage at 224): the
    official code centres ``G`` on the index ``(H // 2, W // 2)`` of the unshifted spectrum, i.e. on the
    frequency ``+(H-1)/2`` only; that filter is not symmetric under ``k -> -k``, its inverse FFT is complex and
    the code keeps the real part, which amounts to filtering with the average of the filter and its mirror
    image. This function instead measures the distance from the real-valued centre ``(H/2, W/2)`` (3.5 for 7),
    which is symmetric, so the inverse transform is real and the real FFT can be used. A deliberate fix, not
    an option; the two filters differ at odd sizes only (``tests/test_equations.py`` asserts both facts).

    Args:
        height: spatial height of the feature map.
        width: spatial width of the feature map (the half spectrum has ``width // 2 + 1`` columns).
        sigma: scalar bandwidth tensor (kept in the autograd graph).

    Returns:
        float32 tensor ``(height, width // 2 + 1)``.
    """
    device = sigma.device
    rows = torch.arange(height, device=device, dtype=torch.float32)
    freq_y = torch.minimum(rows, height - rows)  # |k_y| in 0..H/2, the layout of torch.fft.fftfreq
    freq_x = torch.arange(width // 2 + 1, device=device, dtype=torch.float32)  # k_x in 0..W/2 (rfftfreq)
    dist_y = height / 2.0 - freq_y
    dist_x = width / 2.0 - freq_x
    radius_sq = dist_y[:, None] ** 2 + dist_x[None, :] ** 2
    return 1.0 - torch.exp(-radius_sq / (2.0 * sigma.float() ** 2))


def gaussian_spectrum_operator(size: int, sigma: torch.Tensor) -> torch.Tensor:
    """The 1-D Gaussian part of :func:`gaussian_spectrum_filter` as a real ``(size, size)`` matrix in signal space.

    :func:`gaussian_spectrum_filter` is ``g = 1 - G_y G_x`` with ``G_n(k) = exp(-(n/2 - |k|)^2 / (2 sigma^2))``
    (``|k| = min(k, n - k)``, the distance of frequency ``k`` from the highest one along one axis); because the
    full-spectrum filter is real and even in each frequency axis, ``IFFT2(FFT2(d) * g) = d - A_H d A_W^T`` with
    ``A_n = F^-1 diag(G_n) F``, which is real, symmetric and circulant:
    ``A_n[i, j] = (1/n) sum_k G_n(k) cos(2 pi k (i - j) / n)``. This is the exact spectral filter written with
    cosines and matrix products only (no complex numbers, no FFT), so every exporter and runtime translates it,
    and ``size`` may be a symbolic size under ``torch.export`` (the exported image size stays dynamic). Its cost
    is ``O(n^3)`` per channel instead of ``O(n^2 log n)``, small at the feature sizes of ASRM (7 to 28 at 224x224).

    Args:
        size: the length ``n`` of the axis.
        sigma: scalar bandwidth tensor (kept in the autograd graph).

    Returns:
        float32 tensor ``(size, size)``.

    Examples::

        >>> a = gaussian_spectrum_operator(7, torch.tensor(5.0))
        >>> d = torch.randn(7, 7)
        >>> torch.allclose(d - a @ d @ a.T, torch.fft.irfft2(torch.fft.rfft2(d) * gaussian_spectrum_filter(7, 7,
        ...     torch.tensor(5.0)), s=(7, 7)), atol=1e-5)
        True
    """
    device = sigma.device
    index = torch.arange(size, device=device)
    freq = torch.minimum(index, size - index).float()  # |k|
    gaussian = torch.exp(-((size / 2.0 - freq) ** 2) / (2.0 * sigma.float() ** 2))  # G_n(k)
    # n as a tensor: the ONNX exporter cannot translate a remainder by a symbolic integer, but by a tensor it can
    count = index[-1:] + 1
    # cos(2 pi k d / n) for offsets d = 0..n-1, the product k d taken modulo n in integers (exact for any n)
    phase = torch.remainder(index[:, None] * index[None, :], count).float() * (2.0 * math.pi / size)
    kernel = (torch.cos(phase) @ gaussian) / size  # (n,): A_n[i, j] = kernel[(i - j) mod n]
    offsets = torch.remainder(index[:, None] - index[None, :], count)
    return kernel[offsets]


class AdaptiveSpectrumRefinement(nn.Module):
    """Refine a feature map in the Fourier domain with a learnable Gaussian bandwidth (Eq. 3 of HiMix).

    ``d_hat = IFFT(FFT(d) * g_sigma) + d``. Real FFTs (``rfft2``/``irfft2``) are used: the filter is real and
    symmetric, so the result equals the complex-FFT formulation at about half the cost. The FFTs always run in
    float32, also under bf16/fp16 autocast, and the result is cast back to the input dtype.
    See :func:`gaussian_spectrum_filter` for which way ``sigma`` moves the filter.

    The same filter has a second, export form (``spectral_form="matrix"``): ``d - A_H d A_W^T`` with the real
    matrices of :func:`gaussian_spectrum_operator`, built in the graph from the feature size. ONNX has no real FFT
    (the dynamo exporter's ``DFT`` translation of ``rfft2``/``irfft2`` fails in ONNX Runtime 1.32 with a buffer
    shape mismatch), and other runtimes may lack FFTs too, while every one has ``MatMul`` and ``Cos``: the export
    form keeps batch and image size dynamic. It equals the FFT form up to float32 rounding, in value and gradient.
    ``"auto"`` (the default) uses the FFT in eager mode, ``torch.compile`` and TorchScript, and the matrix form
    while ``torch.export`` traces the module (``torch.compiler.is_exporting()``, which the ONNX exporter uses too).

    Args:
        sigma_init: initial bandwidth; the paper initialises every stage to 5.
        min_sigma: lower bound applied to sigma in the forward pass so the filter stays defined.
        spectral_form: ``"auto"``, ``"fft"`` or ``"matrix"`` (see above); also settable as an attribute.

    Examples::

        >>> asrm = AdaptiveSpectrumRefinement(sigma_init=5.0)
        >>> asrm(torch.randn(2, 768, 7, 7)).shape
        torch.Size([2, 768, 7, 7])
    """

    def __init__(self, sigma_init: float = 5.0, min_sigma: float = 1e-3, spectral_form: str = "auto") -> None:
        super().__init__()
        if sigma_init <= 0:
            raise ValueError(f"sigma_init must be positive, got {sigma_init}.")
        if spectral_form not in SPECTRAL_FORMS:
            raise ValueError(f"spectral_form must be one of {list(SPECTRAL_FORMS)}, got {spectral_form!r}.")
        self.spectral_form = spectral_form
        self.sigma = nn.Parameter(torch.tensor(float(sigma_init)))
        self.min_sigma = min_sigma

    def coefficient_map(self, height: int, width: int) -> torch.Tensor:
        """The current ``g_sigma`` for a ``height x width`` feature map (supplement Fig. 3)."""
        return gaussian_spectrum_filter(height, width, self.sigma.clamp(min=self.min_sigma))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """
        Args:
            x: feature map ``(B, C, H, W)``.
        """
        if torch.jit.is_scripting():  # TorchScript: no autocast context to leave
            return x + self._refinement(x).to(x.dtype)
        matrix = self.spectral_form == "matrix" or (self.spectral_form == "auto" and torch.compiler.is_exporting())
        with torch.autocast(device_type=x.device.type, enabled=False):
            filtered = self._matrix_refinement(x) if matrix else self._refinement(x)
        return x + filtered.to(x.dtype)

    def _refinement(self, x: torch.Tensor) -> torch.Tensor:
        height, width = x.shape[-2], x.shape[-1]
        spectrum = torch.fft.rfft2(x.float(), norm="ortho")
        return torch.fft.irfft2(spectrum * self.coefficient_map(height, width), s=(height, width), norm="ortho")

    @torch.jit.unused
    def _matrix_refinement(self, x: torch.Tensor) -> torch.Tensor:
        # IFFT2(FFT2(x) * g) with g = 1 - G_H G_W: x - A_H x A_W^T (see gaussian_spectrum_operator)
        sigma = self.sigma.clamp(min=self.min_sigma)
        x = x.float()
        rows = gaussian_spectrum_operator(x.shape[-2], sigma)
        cols = gaussian_spectrum_operator(x.shape[-1], sigma)
        return x - rows @ x @ cols.transpose(0, 1)
