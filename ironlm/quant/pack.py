"""Repack plain-form weights into the interleaved tiles the kernels read (layout in csrc/kernels.h):
16 output rows per tile, each 64-byte vector holding 4 columns (int) or 2 columns (bf16) of every row."""

import torch

from ironlm.quant.formats import BLOCK, PlainWeight

TILE = 16


def _pad_rows(t: torch.Tensor, n_padded: int) -> torch.Tensor:
    if t.shape[0] == n_padded:
        return t
    pad = torch.zeros((n_padded - t.shape[0], *t.shape[1:]), dtype=t.dtype)
    return torch.cat([t, pad])


def _tiles_of_scales(s: torch.Tensor, num_tiles: int) -> torch.Tensor:
    # (Np, Kb) fp16 -> (tiles, Kb, 32 bytes): 16 rows' scales per (tile, block)
    return s.reshape(num_tiles, TILE, -1).permute(0, 2, 1).contiguous().view(torch.uint8)


def pack(plain: PlainWeight) -> torch.Tensor:
    """Plain form -> 1-D uint8 tensor of packed tiles."""
    num_tiles = -(-plain.n // TILE)
    n_padded = num_tiles * TILE
    if plain.fmt == "bf16":
        w = _pad_rows(plain.qs, n_padded).view(torch.int16).reshape(num_tiles, TILE, -1, 2)  # (tiles, 16, Kp/2, 2)
        return w.permute(0, 2, 1, 3).contiguous().view(torch.uint8).reshape(-1)
    parts = []
    if plain.fmt == "int8":  # stored as q + 128; padding rows stay 0 bytes (their scales are 0)
        qs = _pad_rows(plain.qs.view(torch.uint8) ^ 0x80, n_padded)
        q = qs.reshape(num_tiles, TILE, -1, 8, 4)  # (tiles, 16, Kb, g, 4)
        parts.append(q.permute(0, 2, 3, 1, 4).reshape(num_tiles, -1, 8 * 64))
    else:
        q = _pad_rows(plain.qs, n_padded).reshape(num_tiles, TILE, -1, 4, 4)  # (tiles, 16, Kb, v, 4)
        parts.append(q.permute(0, 2, 3, 1, 4).reshape(num_tiles, -1, 4 * 64))
    parts.append(_tiles_of_scales(_pad_rows(plain.d, n_padded), num_tiles))
    if plain.fmt == "int4":
        parts.append(_tiles_of_scales(_pad_rows(plain.m, n_padded), num_tiles))
    return torch.cat(parts, dim=-1).reshape(-1).contiguous()


def unpack(packed: torch.Tensor, fmt: str, n: int, k: int) -> PlainWeight:
    """The inverse of pack (for tests, conversion and the reference path)."""
    num_tiles = -(-n // TILE)
    k_padded = -(-k // BLOCK) * BLOCK
    kb = k_padded // BLOCK
    if fmt == "bf16":
        w = packed.view(torch.int16).reshape(num_tiles, -1, TILE, 2).permute(0, 2, 1, 3)
        return PlainWeight(fmt, n, k, w.reshape(num_tiles * TILE, k_padded)[:n].view(torch.bfloat16).contiguous())
    qbytes = 8 * 64 if fmt == "int8" else 4 * 64
    units = packed.reshape(num_tiles, kb, -1)

    def scales(offset: int) -> torch.Tensor:
        s = units[..., offset : offset + 32].contiguous().view(torch.float16)  # (tiles, Kb, 16)
        return s.permute(0, 2, 1).reshape(num_tiles * TILE, kb)[:n].contiguous()

    if fmt == "int8":
        q = units[..., :qbytes].reshape(num_tiles, kb, 8, TILE, 4).permute(0, 3, 1, 2, 4)
        qs = (q.reshape(num_tiles * TILE, k_padded)[:n] ^ 0x80).view(torch.int8).contiguous()
        return PlainWeight(fmt, n, k, qs, scales(qbytes))
    q = units[..., :qbytes].reshape(num_tiles, kb, 4, TILE, 4).permute(0, 3, 1, 2, 4)
    qs = q.reshape(num_tiles * TILE, kb, 16)[:n].contiguous()
    m = scales(qbytes + 32) if fmt == "int4" else None
    return PlainWeight(fmt, n, k, qs, scales(qbytes), m)
