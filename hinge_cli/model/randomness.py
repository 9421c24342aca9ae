"""Counter-based random numbers: every draw a pure function of (seed, stream, spot, sample, gene).

A generator seeded per spot needs a Python loop over spots to keep results independent of how
spots are batched; hashing the counter instead gives the same property to one vectorised
computation over the whole batch. The hash chains splitmix64's finaliser over the counter's
parts (a Weyl step, then a full mix, per part) in wrap-around uint64 arithmetic. Each stream
is a distinct constant below, so draws for different purposes are independent.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

ORDER_STREAM = 1  # the order in which the reverse process reveals genes
FILL_STREAM = 2  # the noise standing in for hidden genes
REVEAL_STREAM = 3  # the draw of each gene's value at the step that reveals it
RIDGE_STREAM = 4  # the ridge baseline's draws from its per-gene Gaussian

_WEYL = np.uint64(0x9E3779B97F4A7C15)  # 2⁶⁴ / golden ratio, odd: i ↦ i·WEYL is a bijection
_ROUNDS = ((np.uint64(30), np.uint64(0xBF58476D1CE4E5B9)), (np.uint64(27), np.uint64(0x94D049BB133111EB)))
_LAST_SHIFT = np.uint64(31)
_UNIFORM_WORD, _RADIUS_WORD, _ANGLE_WORD = 0, 1, 2  # normals use two words of their stream, uniforms a third


def _mix(z: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser, in place: a bijection of uint64 in which every output bit depends on every input bit."""
    shifted = np.empty_like(z)
    for shift, multiplier in _ROUNDS:
        np.right_shift(z, shift, out=shifted)
        z ^= shifted
        z *= multiplier
    np.right_shift(z, _LAST_SHIFT, out=shifted)
    z ^= shifted
    return z


def _spots(spot_index: Tensor | np.ndarray | list[int]) -> np.ndarray:
    spots = np.asarray(spot_index.cpu() if isinstance(spot_index, Tensor) else spot_index, dtype=np.int64)
    if spots.ndim != 1 or (spots < 0).any():
        raise ValueError("spot_index must be a 1-D array of non-negative spot indices")
    return spots.astype(np.uint64)


def _words(seed: int, spot_index: Tensor | np.ndarray | list[int], n_samples: int, n_genes: int, stream: int,
           word: int) -> np.ndarray:
    """(B*n_samples, n_genes) uint64 hashes of (seed, stream, word, spot, sample, gene), spot-major rows."""
    parts = (np.array([seed % 2**64], np.uint64), np.array([stream % 2**64], np.uint64), np.array([word], np.uint64),
             _spots(spot_index)[:, None, None], np.arange(n_samples, dtype=np.uint64)[:, None],
             np.arange(n_genes, dtype=np.uint64))
    hashed = np.zeros(1, np.uint64)
    with np.errstate(over="ignore"):
        for part in parts:  # broadcasting grows (1,) -> (B, 1, 1) -> (B, n, 1) -> (B, n, G)
            hashed = _mix(hashed + part * _WEYL)
    return hashed.reshape(-1, n_genes)


def _unit(words: np.ndarray) -> np.ndarray:
    """The top 52 bits as odd multiples of 2⁻⁵³: uniform on a 53-bit grid, never 0 or 1 (`words` is overwritten)."""
    np.right_shift(words, np.uint64(12), out=words)
    unit = words.astype(np.float64)
    unit += 0.5
    unit *= 2.0**-52
    return unit


def uniforms(seed: int, spot_index: Tensor | np.ndarray | list[int], n_samples: int, n_genes: int,
             stream: int) -> np.ndarray:
    """(B*n_samples, n_genes) float64 uniforms strictly inside (0, 1); row b*n_samples + s is spot b's sample s."""
    return _unit(_words(seed, spot_index, n_samples, n_genes, stream, _UNIFORM_WORD))


def normals(seed: int, spot_index: Tensor | np.ndarray | list[int], n_samples: int, n_genes: int,
            stream: int) -> np.ndarray:
    """(B*n_samples, n_genes) float64 standard normals (Box–Muller), laid out as `uniforms`."""
    radius = _unit(_words(seed, spot_index, n_samples, n_genes, stream, _RADIUS_WORD))
    angle = _unit(_words(seed, spot_index, n_samples, n_genes, stream, _ANGLE_WORD))
    np.log(radius, out=radius)
    radius *= -2.0
    np.sqrt(radius, out=radius)
    angle *= 2 * np.pi
    np.cos(angle, out=angle)
    return radius * angle


def spot_randomness(spot_index: Tensor, seed: int, n_samples: int, n_genes: int) -> tuple[Tensor, Tensor, Tensor]:
    """Gene ranks (B*n, G) long, fill noise and reveal noise (B*n, G) float64, each a function of (seed, spot) only.

    A row's ranks are a uniformly random permutation of 0..G-1: the order its genes are revealed in.
    """
    order = np.argsort(uniforms(seed, spot_index, n_samples, n_genes, ORDER_STREAM), axis=1)
    ranks = np.empty_like(order)
    np.put_along_axis(ranks, order, np.arange(n_genes), axis=1)  # the inverse permutation: argsort of the argsort
    fill = normals(seed, spot_index, n_samples, n_genes, FILL_STREAM)
    reveal = normals(seed, spot_index, n_samples, n_genes, REVEAL_STREAM)
    return torch.from_numpy(ranks), torch.from_numpy(fill), torch.from_numpy(reveal)
