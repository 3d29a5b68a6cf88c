"""A tiny AutoencoderKL whose weights are set by hand so that it is a faithful autoencoder.

A random VAE decodes every latent to the same grey: each GroupNorm subtracts its group's mean,
so the image's brightness, contrast and colour never reach the pixels (bench/tiny_vae_probe.py
measured 0.456..0.461 brightness for any input). Then no edit of the latents, and no LoRA, can
move an image statistic, and the tiny stack cannot show a measured effect. This one is the real
AutoencoderKL class with weights that make it an 8x box-downscale of RGB into latent channels
0-2 (channel 3 unused) and a nearest-neighbour upscale back: a decoded pixel is half its latent
value (pixels in [-1, 1] encode to scaled latents in [-2, 2], so random diffusion latents decode
to a visible spread of colours).

How it passes the normalisations: every residual branch and attention output is zeroed, so each
block is the identity (its shortcut). Before the two GroupNorms that are not bypassed (the
encoder's and decoder's `conv_norm_out`, one group each), each signal channel has a negated twin
and the other channels hold constants +K / -K in equal numbers: the group mean is exactly 0, and
the variance is K^2 x (constants share) up to 1e-5, so the norm is a known scale, undone by its
affine weight. The SiLU after it runs at +16, where it is the identity to 1e-6, and the output
conv takes the difference of twins, which cancels that offset exactly.
"""

from __future__ import annotations

import math

import torch

_K = 100.0  # the constant channels' magnitude: dominates the group variance
_SHIFT = 16.0  # the signal's offset into SiLU's linear range


def _twins_and_constants(conv: torch.nn.Conv2d, taps: torch.Tensor, n_in: int) -> None:
    """conv's outputs: channels 0..n_in-1 = taps · x, n_in..2n_in-1 = -(taps · x), the rest
    alternately +K and -K (zero weight). `taps` is (n_in, in_channels, kh, kw)."""
    w = torch.zeros_like(conv.weight)
    w[:n_in] = taps
    w[n_in : 2 * n_in] = -taps
    conv.weight.copy_(w)
    b = torch.zeros_like(conv.bias)
    for c in range(2 * n_in, b.numel()):
        b[c] = _K if c % 2 == 0 else -_K
    conv.bias.copy_(b)


def _unnormalise(norm: torch.nn.GroupNorm, n_signal: int) -> None:
    """Affine of a one-group GroupNorm over twins + constants: signal channels come out as
    x + _SHIFT; constants as 0."""
    channels = norm.num_channels
    n_const = channels - 2 * n_signal
    sigma = _K * math.sqrt(n_const / channels)  # the group's std; the signal adds ~1e-5
    norm.weight.zero_()
    norm.bias.zero_()
    norm.weight[: 2 * n_signal] = sigma
    norm.bias[: 2 * n_signal] = _SHIFT


def _twin_difference(conv: torch.nn.Conv2d, n_signal: int, scale: float) -> None:
    """Output channel i (< n_signal) = scale/2 · (in_i - in_{n_signal+i}), centre tap; rest 0."""
    conv.weight.zero_()
    conv.bias.zero_()
    for i in range(n_signal):
        conv.weight[i, i, 1, 1] = scale / 2
        conv.weight[i, n_signal + i, 1, 1] = -scale / 2


def _identity_1x1(conv: torch.nn.Conv2d) -> None:
    conv.weight.zero_()
    conv.bias.zero_()
    for c in range(min(conv.in_channels, conv.out_channels)):
        conv.weight[c, c, 0, 0] = 1.0


def _identity_blocks(module: torch.nn.Module) -> None:
    """Zero every residual branch and attention output, make resamplers box/nearest copies and
    channel-changing shortcuts identity embeddings (new channels: constants, see above)."""
    from diffusers.models.attention_processor import Attention
    from diffusers.models.downsampling import Downsample2D
    from diffusers.models.resnet import ResnetBlock2D
    from diffusers.models.upsampling import Upsample2D

    for m in module.modules():
        if isinstance(m, ResnetBlock2D):
            m.conv2.weight.zero_()
            m.conv2.bias.zero_()
            if m.conv_shortcut is not None:
                _identity_1x1(m.conv_shortcut)
                for c in range(m.conv_shortcut.in_channels, m.conv_shortcut.out_channels):
                    m.conv_shortcut.bias[c] = _K if c % 2 == 0 else -_K
        elif isinstance(m, Attention):
            m.to_out[0].weight.zero_()
            m.to_out[0].bias.zero_()
        elif isinstance(m, Downsample2D):
            # 3x3 stride 2 after a (0, 1, 0, 1) pad: the top-left 2x2 taps are a 2x2 box mean
            # that never reads the padding.
            m.conv.weight.zero_()
            m.conv.bias.zero_()
            for c in range(m.conv.out_channels):
                m.conv.weight[c, c, :2, :2] = 0.25
        elif isinstance(m, Upsample2D):
            m.conv.weight.zero_()
            m.conv.bias.zero_()
            for c in range(m.conv.out_channels):
                m.conv.weight[c, c, 1, 1] = 1.0


def faithful_tiny_vae(config: dict):
    """An AutoencoderKL (config as for the constructor, `norm_num_groups` 1) set up as the
    RGB box-downscale autoencoder described above."""
    from diffusers import AutoencoderKL

    if config.get("norm_num_groups") != 1 or config.get("in_channels", 3) != 3:
        raise ValueError("faithful_tiny_vae needs norm_num_groups=1 and RGB input")
    vae = AutoencoderKL(**config)
    latent = vae.config.latent_channels
    shift = vae.config.shift_factor or 0.0
    # Scaled latent = 2 x pixel: z = latent / scaling_factor + shift, so z - shift = 2 x / sf.
    per_pixel = 2.0 / vae.config.scaling_factor
    rgb = torch.zeros(3, 3, 3, 3)  # (out, in, kh, kw): centre taps, pixel channel i -> i
    rgb[range(3), range(3), 1, 1] = 1.0
    with torch.no_grad():
        _identity_blocks(vae)
        enc, dec = vae.encoder, vae.decoder
        _twins_and_constants(enc.conv_in, rgb, 3)
        _unnormalise(enc.conv_norm_out, 3)
        _twin_difference(enc.conv_out, 3, per_pixel)  # twins differ by 2x: mean_i = z_i
        enc.conv_out.bias[:latent] = shift  # channel 3 carries nothing but the shift
        enc.conv_out.bias[latent:] = -30.0  # log-variance: sampling adds ~3e-7 noise
        z_taps = torch.zeros(3, latent, 3, 3)
        z_taps[range(3), range(3), 1, 1] = 1.0 / per_pixel
        _twins_and_constants(dec.conv_in, z_taps, 3)
        dec.conv_in.bias[:3] = -shift / per_pixel  # (z - shift) / per_pixel = x
        dec.conv_in.bias[3:6] = shift / per_pixel
        _unnormalise(dec.conv_norm_out, 3)
        _twin_difference(dec.conv_out, 3, 1.0)
        for conv in (vae.quant_conv, vae.post_quant_conv):
            if conv is not None:
                _identity_1x1(conv)
    return vae
