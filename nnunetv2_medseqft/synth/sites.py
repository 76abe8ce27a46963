"""Acquisition sites: how a scanner turns the ideal phantom into the stored image.

Sites differ in voxel spacing, resolution (blur), a smooth multiplicative attenuation field
(beam-hardening-like bias), calibration (HU scale/offset) and noise. The pre-training pool uses
the pool sites; sequential tasks add the strongly shifted site C; unseen tasks come from site D,
which appears nowhere else.

Site C is a low-dose protocol on a sharp reconstruction kernel from another vendor: about three times
the pool's noise (organs stay visible to a reader), little blur, thicker slices and another
calibration. MDS must find its cases unlike the pool, and noise is what masked reconstruction cannot
predict; a blurred, low-contrast site would do the opposite (smooth images are easier to inpaint, so
they get the LOWEST SSL loss).
"""

from dataclasses import asdict, dataclass

import numpy as np
from scipy import ndimage

from nnunetv2_medseqft.synth.shapes import Grid, RandomField

HU_RANGE = (-1024, 3071)  # what a 12-bit CT scanner stores


@dataclass(frozen=True)
class Site:
    name: str
    spacing: tuple[float, float, float]  # mm, SimpleITK order (x, y, z)
    blur_mm: float  # Gaussian point-spread sigma
    bias: float  # amplitude of the smooth multiplicative attenuation field
    scale: float  # stored = scale * HU + offset: calibration / reconstruction differences
    offset: float
    noise: float  # std (HU) of slightly correlated quantum noise

    def grid(self, fov_mm: float) -> Grid:
        return Grid(fov_mm, self.spacing)

    def as_json(self) -> dict:
        return {k: v for k, v in asdict(self).items() if k != "name"}


SITES = {
    s.name: s
    for s in (
        Site("siteA", (2.0, 2.0, 2.0), blur_mm=0.8, bias=0.0, scale=1.0, offset=0.0, noise=10.0),
        Site("siteB", (1.6, 1.6, 2.5), blur_mm=1.0, bias=0.02, scale=1.03, offset=-10.0, noise=16.0),
        Site("siteC", (1.8, 1.8, 2.6), blur_mm=0.5, bias=0.06, scale=1.15, offset=40.0, noise=40.0),
        Site("siteD", (1.8, 1.8, 3.2), blur_mm=1.4, bias=0.05, scale=1.15, offset=-40.0, noise=25.0),
    )
}
POOL_SITES = ("siteA", "siteB")
SHIFTED_SITE = "siteC"
UNSEEN_SITE = "siteD"


def acquire(hu: np.ndarray, grid: Grid, site: Site, rng: np.random.Generator) -> np.ndarray:
    """Blur, bias, recalibrate and add noise to an ideal HU volume; returns stored int16 values."""
    image = ndimage.gaussian_filter(hu, grid.sigma_voxels(site.blur_mm))
    if site.bias:
        # scale attenuation (HU + 1000), not HU, so that air stays at -1000
        field = (
            1 + RandomField(rng, components=1, modes=4, frequency=1.5, amplitude=site.bias)(grid.points())[0]
        )
        image = (image + 1000) * field - 1000
    noise = ndimage.gaussian_filter(rng.standard_normal(grid.shape, dtype=np.float32), 0.7)
    image = site.scale * image + site.offset + site.noise * noise / max(float(noise.std()), 1e-6)
    return np.clip(np.rint(image), *HU_RANGE).astype(np.int16)
