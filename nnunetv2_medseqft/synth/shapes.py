"""Geometry helpers: sampling grids, signed-distance primitives and smooth random fields.

Organs are implicit surfaces (signed distance, negative inside) in *body units* rather than voxel
masks. One case can then be sampled on any site's grid, and partial volume follows from the
distance to the surface (``soft``) instead of from costly supersampling.
"""

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Grid:
    """A cubic field of view of ``fov_mm`` sampled with ``spacing`` (mm, SimpleITK order x, y, z).

    Body units map the field of view to [-1, 1]: x patient right -> left, y anterior -> posterior,
    z feet -> head (the LPS axes of an identity-direction NIfTI written by SimpleITK).
    """

    fov_mm: float
    spacing: tuple[float, float, float]

    @property
    def shape(self) -> tuple[int, int, int]:
        """Array shape in numpy order (z, y, x)."""
        return tuple(max(1, round(self.fov_mm / s)) for s in reversed(self.spacing))

    @property
    def origin(self) -> tuple[float, float, float]:
        """Physical position (mm) of voxel (0, 0, 0) so that the grid is centred on 0."""
        sizes = reversed(self.shape)
        return tuple(-(n - 1) / 2 * s for n, s in zip(sizes, self.spacing, strict=True))

    @property
    def voxel_size(self) -> float:
        """Mean voxel edge in body units; the width of the partial-volume ramp."""
        return float(np.mean(self.spacing)) / (self.fov_mm / 2)

    def points(self) -> np.ndarray:
        """Body-unit coordinates of all voxel centres, shape (3, z, y, x), component order x, y, z."""
        axes = [
            (o + s * np.arange(n, dtype=np.float32)) / (self.fov_mm / 2)
            for o, s, n in zip(self.origin, self.spacing, reversed(self.shape), strict=True)
        ]
        z, y, x = np.meshgrid(axes[2], axes[1], axes[0], indexing="ij")
        return np.stack([x, y, z])

    def sigma_voxels(self, sigma_mm: float) -> tuple[float, float, float]:
        """A physical Gaussian width expressed per numpy axis (z, y, x)."""
        return tuple(sigma_mm / s for s in reversed(self.spacing))


def _column(v, p: np.ndarray) -> np.ndarray:
    """Broadcast a length-3 vector against points of shape (3, ...)."""
    return np.asarray(v, dtype=p.dtype).reshape(3, *([1] * (p.ndim - 1)))


def rotation(angles) -> np.ndarray:
    """Rotation matrix (local -> world) from angles (rad) about x, then y, then z."""
    ax, ay, az = angles
    rx = np.array([[1, 0, 0], [0, np.cos(ax), -np.sin(ax)], [0, np.sin(ax), np.cos(ax)]])
    ry = np.array([[np.cos(ay), 0, np.sin(ay)], [0, 1, 0], [-np.sin(ay), 0, np.cos(ay)]])
    rz = np.array([[np.cos(az), -np.sin(az), 0], [np.sin(az), np.cos(az), 0], [0, 0, 1]])
    return rz @ ry @ rx


def to_local(p: np.ndarray, center, angles=(0.0, 0.0, 0.0)) -> np.ndarray:
    """Coordinates of ``p`` in a frame centred at ``center`` and rotated by ``angles``."""
    return np.tensordot(rotation(angles).T.astype(p.dtype), p - _column(center, p), axes=1)


def ellipsoid(p: np.ndarray, center, radii, angles=(0.0, 0.0, 0.0)) -> np.ndarray:
    """Approximate signed distance to an ellipsoid (exact on the axes, good near the surface)."""
    q = to_local(p, center, angles)
    r = _column(radii, p)
    k0 = np.sqrt(((q / r) ** 2).sum(0))
    k1 = np.sqrt(((q / r**2) ** 2).sum(0))
    # k0 / k1 lies between the smallest and largest radius; at the very centre use the smallest
    ratio = np.divide(k0, k1, out=np.full_like(k0, min(radii)), where=k1 > 0)
    return (k0 - 1) * ratio


def ellipse_xy(p: np.ndarray, cx: float, cy: float, a, b, n: float = 2.0) -> np.ndarray:
    """Approximate signed distance to a (super-)elliptic prism along z; ``a``/``b`` may vary per voxel."""
    f = (np.abs((p[0] - cx) / a) ** n + np.abs((p[1] - cy) / b) ** n) ** (1 / n)
    return (f - 1) * np.minimum(a, b)


def capsule_chain(p: np.ndarray, points, radii) -> np.ndarray:
    """Signed distance to a tube through ``points`` whose radius tapers linearly between them."""
    d = np.full(p.shape[1:], np.inf, dtype=p.dtype)
    for a, b, ra, rb in zip(points[:-1], points[1:], radii[:-1], radii[1:], strict=True):
        pa, ba = p - _column(a, p), _column(np.subtract(b, a), p)
        h = np.clip((pa * ba).sum(0) / (ba * ba).sum(), 0, 1)
        d = np.minimum(d, np.sqrt(((pa - ba * h) ** 2).sum(0)) - (ra + (rb - ra) * h))
    return d


def smooth_union(a: np.ndarray, b: np.ndarray, k: float) -> np.ndarray:
    """Union that blends the two surfaces over distance ``k`` (no crease where lobes meet)."""
    h = np.maximum(k - np.abs(a - b), 0) / k
    return np.minimum(a, b) - h * h * k / 4


def soft(d: np.ndarray, width: float) -> np.ndarray:
    """Fraction of a voxel of edge ``width`` inside the surface: a linear partial-volume ramp."""
    return np.clip(0.5 - d / width, 0, 1)


class RandomField:
    """Smooth random function of position: a sum of random low-frequency sinusoids.

    Being a function of continuous position (not a voxel array), the same field gives the same
    anatomy whatever grid a site samples it on.
    """

    def __init__(
        self, rng: np.random.Generator, components: int, modes: int, frequency: float, amplitude: float
    ):
        # float32 like the grids: numpy scalars of float64 would silently upcast whole volumes
        self.freqs = rng.normal(0, frequency, size=(components, modes, 3)).astype(np.float32)
        self.phases = rng.uniform(0, 2 * np.pi, size=(components, modes)).astype(np.float32)
        self.amps = rng.normal(0, amplitude / np.sqrt(modes / 2), size=(components, modes)).astype(np.float32)

    def __call__(self, p: np.ndarray) -> np.ndarray:
        out = np.zeros((self.amps.shape[0], *p.shape[1:]), dtype=np.float32)
        for c in range(self.amps.shape[0]):
            for (fx, fy, fz), phase, amp in zip(self.freqs[c], self.phases[c], self.amps[c], strict=True):
                out[c] += amp * np.sin(fx * p[0] + fy * p[1] + fz * p[2] + phase)
        return out
