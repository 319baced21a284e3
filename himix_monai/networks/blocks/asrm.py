"""Adaptive Spectrum Refinement Module (ASRM) of HiMix (paper Sec. 3.3, Eq. 3; supplement Sec. 7)."""

from __future__ import annotations

import torch
import torch.nn as nn

__all__ = ["AdaptiveSpectrumRefinement", "gaussian_spectrum_filter"]


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


class AdaptiveSpectrumRefinement(nn.Module):
    """Refine a feature map in the Fourier domain with a learnable Gaussian bandwidth (Eq. 3 of HiMix).

    ``d_hat = IFFT(FFT(d) * g_sigma) + d``. Real FFTs (``rfft2``/``irfft2``) are used: the filter is real and
    symmetric, so the result equals the complex-FFT formulation at about half the cost. The FFTs always run in
    float32, also under bf16/fp16 autocast, and the result is cast back to the input dtype.
    See :func:`gaussian_spectrum_filter` for which way ``sigma`` moves the filter.

    Args:
        sigma_init: initial bandwidth; the paper initialises every stage to 5.
        min_sigma: lower bound applied to sigma in the forward pass so the filter stays defined.

    Examples::

        >>> asrm = AdaptiveSpectrumRefinement(sigma_init=5.0)
        >>> asrm(torch.randn(2, 768, 7, 7)).shape
        torch.Size([2, 768, 7, 7])
    """

    def __init__(self, sigma_init: float = 5.0, min_sigma: float = 1e-3) -> None:
        super().__init__()
        if sigma_init <= 0:
            raise ValueError(f"sigma_init must be positive, got {sigma_init}.")
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
        with torch.autocast(device_type=x.device.type, enabled=False):
            filtered = self._refinement(x)
        return x + filtered.to(x.dtype)

    def _refinement(self, x: torch.Tensor) -> torch.Tensor:
        height, width = x.shape[-2], x.shape[-1]
        spectrum = torch.fft.rfft2(x.float(), norm="ortho")
        return torch.fft.irfft2(spectrum * self.coefficient_map(height, width), s=(height, width), norm="ortho")
