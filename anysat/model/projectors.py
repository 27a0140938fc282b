"""Per-modality projectors: the pixels of each sub-patch -> one sub-patch token.

Time series (Sentinel-2, Sentinel-1, Landsat...) go through a per-pixel MLP and a lightweight
temporal attention over their acquisition dates (the official AnySat's LTAE projector); single
images (aerial, DEM) through a pixel-block MLP (the official PatchMLP).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .config import ModalityConfig
from .layers import branch_on_values, mlp, sincos_1d

DAYS_PER_YEAR = 365.2425
DOY_PERIOD = 367.0  # the official encoder's day-of-year table length
PIXELS_PER_CHUNK = 512  # pixel rows per temporal chunk on the CPU: activations stay in cache
# On an accelerator, without autograd (inference, the JEPA target), rows per chunk up to this
# many bytes of MLP output, a 40th of a GPU's memory at most (a chunk's transients are about 4x
# its output: base, fp32, 2.1 GB for a 512 MB chunk, 7.4 GB for 2 GB): few, large kernels.
# Each chunk is ~80 ops the host launches: 512-row chunks made 113 chunks per forward of 16
# tiles of 600 m. With autograd, one chunk: the backward keeps
# every chunk's activations anyway, so chunks would bound no memory, only add launches. A base
# training step launched 4,177 ops at batch 64 and 7,879 at 1024 with 512 MB chunks; 4,015
# and 4,699 now (`benchmarks/train_step_profile.py --gpu-ops 80`).
ACCELERATOR_CHUNK_BYTES = 2 * 2**30
OTHER_ACCELERATOR_CHUNK_BYTES = 512 * 2**20  # where the device's memory is not known


def accelerator_chunk_bytes(device: torch.device) -> int:
    """Bytes of MLP output per temporal chunk without autograd on this accelerator."""
    if device.type != "cuda":
        return OTHER_ACCELERATOR_CHUNK_BYTES
    return gpu_chunk_bytes(torch.cuda.get_device_properties(device).total_memory)


def gpu_chunk_bytes(memory_bytes: int) -> int:
    """Bytes of MLP output per temporal chunk on a GPU of this much memory."""
    return min(ACCELERATOR_CHUNK_BYTES, memory_bytes // 40)


def day_of_year(dates_days: torch.Tensor) -> torch.Tensor:
    """Days since 1970-01-01 -> fractional day of year (off by under a day: fine for encoding)."""
    return torch.remainder(dates_days.to(torch.float64), DAYS_PER_YEAR).to(torch.float32)


def _normalised(x: torch.Tensor, valid: torch.Tensor, mean: torch.Tensor, std: torch.Tensor,
                band_dim: int) -> torch.Tensor:
    """(x - mean) / std with invalid values set to 0 (they never reach an output)."""
    shape = [1] * x.ndim
    shape[band_dim] = -1
    z = (x - mean.view(shape)) / std.view(shape)
    return torch.where(valid.unsqueeze(band_dim), z, 0.0)


class TemporalProjector(nn.Module):
    """[..., T, C] pixel time series + dates -> [..., D] one token per pixel.

    As the official LTAE projector: an MLP C -> D/8 -> D/2 -> D -> 2D with a norm and ReLU
    after every layer, a day-of-year code added to its output, attention pooling over dates
    from a learned master query per head (16 heads, key dim 8), then a linear map 2D -> D and
    a norm. Invalid pixel-dates get no weight.

    Speed: the map 2D -> D is linear and attention pooling is linear in the values, so the map
    is applied once per pixel after pooling, not once per pixel-date (exact).
    """

    def __init__(self, modality: ModalityConfig, dim: int, heads: int = 16, key_dim: int = 8):
        super().__init__()
        self.heads, self.key_dim = heads, key_dim
        self.register_buffer("mean", torch.tensor(modality.mean), persistent=False)
        self.register_buffer("std", torch.tensor(modality.std), persistent=False)
        self.hidden = mlp([len(modality.bands), dim // 8, dim // 2, dim, 2 * dim], norm=True)
        self.out = nn.Linear(2 * dim, dim)            # applied after pooling (see above)
        self.key = nn.Linear(dim, heads * key_dim)
        self.query = nn.Parameter(torch.randn(heads, key_dim) * key_dim ** -0.5)
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor, valid: torch.Tensor, dates_days: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """x [B, P, T, C], valid [B, P, T], dates [B, T] -> tokens [B, P, D], valid [B, P]."""
        b, p, t, c = x.shape
        d = self.out.out_features
        z = _normalised(x, valid, self.mean, self.std, band_dim=3).reshape(b * p, t, c)
        keep = valid.reshape(b * p, t)
        date_code = sincos_1d(day_of_year(dates_days), 2 * d, DOY_PERIOD).to(z.dtype)   # [B, T, 2D]
        sample = torch.arange(b, device=x.device).repeat_interleave(p)                  # row -> sample
        # keys of out(g + date) = (W_k W_out)(g + date) + W_k b_out + b_k
        w_key = self.key.weight @ self.out.weight                                       # [H*K, 2D]
        b_key = self.key.weight @ self.out.bias + self.key.bias
        date_key = F.linear(date_code, w_key)                                           # [B, T, H*K]
        date_value = F.linear(date_code, self.out.weight)                               # [B, T, D]
        step = PIXELS_PER_CHUNK
        if not branch_on_values(z):
            step = (b * p if torch.is_grad_enabled() else
                    max(step, accelerator_chunk_bytes(z.device) // (t * 2 * d * 4)))
        rows = [slice(i, i + step) for i in range(0, b * p, step)]
        parts = [self._pool(z[r], keep[r], date_value[sample[r]], date_key[sample[r]], w_key, b_key)
                 for r in rows]
        tokens = parts[0] if len(parts) == 1 else torch.cat(parts)
        any_valid = keep.any(dim=1)
        tokens = self.norm(tokens) * any_valid[:, None]
        return tokens.view(b, p, d), any_valid.view(b, p)

    def _hidden_valid_only(self, z: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        """The MLP on valid pixel-dates only (clouds and nodata cost nothing); zeros elsewhere.
        Where branching on values costs a host sync, on every pixel-date, then masked."""
        n, t, c = z.shape
        if not branch_on_values(keep):
            return self.hidden(z) * keep[..., None]
        if bool(keep.all()):
            return self.hidden(z)
        flat = keep.reshape(-1).nonzero().squeeze(1)
        g = self.hidden(z.reshape(n * t, c)[flat])
        return g.new_zeros(n * t, g.shape[-1]).index_copy(0, flat, g).view(n, t, -1)

    def _pool(self, z, keep, date_value, date_key, w_key, b_key) -> torch.Tensor:
        """Pixels z [n, T, C] with their dates' codes mapped to values [n, T, D] and keys
        [n, T, H*K] -> pooled tokens [n, D] (before the norm)."""
        n, t, _ = z.shape
        h, k = self.heads, self.key_dim
        g = self._hidden_valid_only(z, keep)                                            # [n, T, 2D]
        keys = (F.linear(g, w_key, b_key) + date_key).view(n, t, h, k)
        logits = (keys * self.query).sum(-1) / math.sqrt(k)                            # [n, T, H]
        logits = logits.masked_fill(~keep[..., None], float("-inf"))
        logits = torch.where(keep.any(1)[:, None, None], logits, 0.0)  # empty pixels: no NaN
        attn = logits.softmax(dim=1)
        pooled = torch.bmm(attn.transpose(1, 2), g)                                     # [n, H, 2D]
        d = self.out.out_features
        w_out = self.out.weight.view(h, d // h, -1)                                     # [H, D/H, 2D]
        values = torch.bmm(pooled.transpose(0, 1), w_out.transpose(1, 2))               # [H, n, D/H]
        # + the pooled date codes, head by head (out(g + date) = out(g) + W_out date)
        dates = (attn[..., None] * date_value.view(n, t, h, d // h)).sum(1)             # [n, H, D/H]
        return values.transpose(0, 1).reshape(n, d) + dates.reshape(n, d) + self.out.bias


class BlockProjector(nn.Module):
    """[..., C, s*s] pixel blocks of a single image -> [..., D] one token per sub-patch.

    A linear map of the whole s x s block (the official strided convolution) then an MLP
    D -> 2D -> D with LayerNorm and ReLU. Invalid pixels enter as zeros; a block with no
    valid pixel is invalid.
    """

    def __init__(self, modality: ModalityConfig, dim: int):
        super().__init__()
        s = modality.subpatch_px
        self.register_buffer("mean", torch.tensor(modality.mean), persistent=False)
        self.register_buffer("std", torch.tensor(modality.std), persistent=False)
        self.embed = nn.Linear(len(modality.bands) * s * s, dim)
        self.mlp = mlp([dim, 2 * dim, dim], norm=True)

    def forward(self, x: torch.Tensor, valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [B, P, C, s*s], valid [B, P, s*s] -> tokens [B, P, D], valid [B, P]."""
        z = _normalised(x, valid, self.mean, self.std, band_dim=2)
        any_valid = valid.any(dim=-1)
        return self.mlp(self.embed(z.flatten(2))) * any_valid[..., None], any_valid
