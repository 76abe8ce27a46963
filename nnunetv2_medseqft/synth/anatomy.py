"""A random CT-like abdomen: one continuous phantom per case, rendered in HU with a tissue map.

Every case contains the full anatomy (torso with fat and muscle layers, bowel, spine, ribs, vessels,
liver, gallbladder, spleen, stomach, pancreas, kidneys, optional lesions); datasets only differ in
which tissues they label. Shapes live in body units (see ``shapes.Grid``) and are perturbed per case
by a smooth random warp plus per-organ size/position/orientation jitter.
"""

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from nnunetv2_medseqft.synth.shapes import (
    Grid,
    RandomField,
    capsule_chain,
    ellipse_xy,
    ellipsoid,
    rotation,
    smooth_union,
    soft,
)

TISSUES = (
    "air", "table", "fat", "muscle", "bowel", "vessel", "bone", "liver", "liver_lesion",
    "gallbladder", "spleen", "stomach", "pancreas", "kidney", "kidney_lesion",
)  # fmt: skip
TISSUE_ID = {name: i for i, name in enumerate(TISSUES)}
BODY_TISSUES = TISSUES[2:]  # everything except air and the scanner couch

# Typical portal-venous-phase HU; jittered per case.
BASE_HU = {
    "air": -1000.0, "table": 120.0, "fat": -100.0, "muscle": 50.0, "bowel": 25.0, "gas": -850.0,
    "vessel": 165.0, "ivc": 125.0, "bone": 650.0, "cancellous": 220.0, "disc": 85.0, "csf": 15.0,
    "liver": 105.0, "liver_lesion": 45.0, "gallbladder": 12.0, "spleen": 118.0, "stomach": 80.0,
    "stomach_fluid": 12.0, "pancreas": 95.0, "kidney": 180.0, "medulla": 125.0, "kidney_lesion": 20.0,
}  # fmt: skip

# Organ frames in body units: (centre, radii, rotation angles about x, y, z).
ORGANS = {
    "liver_right": ((-0.36, -0.02, 0.30), (0.36, 0.40, 0.50), (0.0, 0.0, 0.25)),
    "liver_left": ((0.02, -0.26, 0.46), (0.32, 0.14, 0.25), (0.0, 0.0, -0.15)),
    "gallbladder": ((-0.30, -0.27, 0.00), (0.06, 0.08, 0.12), (0.4, 0.0, 0.3)),
    "spleen": ((0.56, 0.22, 0.36), (0.11, 0.23, 0.22), (0.0, 0.0, -0.6)),
    "stomach": ((0.27, -0.26, 0.42), (0.19, 0.14, 0.24), (0.0, 0.3, 0.4)),
    "kidney_left": ((0.31, 0.31, -0.10), (0.085, 0.12, 0.22), (0.0, -0.2, -0.5)),
    "kidney_right": ((-0.31, 0.33, -0.25), (0.085, 0.12, 0.22), (0.0, 0.2, 0.5)),
}
# Pancreas centre line from head (by the duodenum) to tail (at the splenic hilum), with radii.
PANCREAS = (
    ((-0.14, 0.02, -0.05), (0.0, -0.03, 0.05), (0.2, 0.04, 0.12), (0.40, 0.14, 0.20)),
    (0.075, 0.055, 0.05, 0.04),
)
SPINE_Y = 0.30  # vertebral body centre; canal, back muscles, psoas and great vessels are placed from it
VERTEBRA_PERIOD = 0.30  # body units between intervertebral discs


@dataclass
class Anatomy:
    """Parameters of one case; ``render`` turns them into voxels on any grid."""

    scale: float  # overall body size: organs are defined relative to it
    # torso cross-section: centre y, half-width, half-depth, superellipse exponent
    body: tuple[float, float, float, float]
    fat: float  # subcutaneous fat thickness
    muscle: float  # abdominal wall thickness
    organs: dict[str, tuple]
    pancreas: tuple
    liver_lesions: list[tuple[np.ndarray, float]]
    kidney_lesion: tuple[np.ndarray, float] | None
    fluid_level: float  # stomach air-fluid level (y, body units): gas rises anteriorly in a supine patient
    disc_phase: float
    hu: dict[str, float]
    warp: RandomField


def _floats(values) -> tuple[float, ...]:
    """Plain Python floats: numpy float64 scalars would silently upcast float32 volumes."""
    return tuple(float(v) for v in values)


def _inside(rng: np.random.Generator, frame, depth: float) -> np.ndarray:
    """A random point within the inner ``depth`` fraction of an organ's ellipsoid."""
    center, radii, angles = frame
    u = rng.normal(size=3)
    u *= depth * rng.uniform() ** (1 / 3) / np.linalg.norm(u)
    return np.asarray(center) + rotation(angles) @ (np.asarray(radii) * u)


def sample_anatomy(rng: np.random.Generator, min_liver_lesions: int = 0) -> Anatomy:
    """Draw one case: body habitus, organ sizes/positions, lesions, enhancement and a smooth warp."""
    organs = {}
    for name, (center, radii, angles) in ORGANS.items():
        size = rng.uniform(0.85, 1.15) * rng.uniform(0.93, 1.07, 3)
        organs[name] = (
            _floats(np.add(center, rng.normal(0, 0.025, 3))),
            _floats(np.multiply(radii, size)),
            _floats(np.add(angles, rng.normal(0, 0.08, 3))),
        )
    points, radii = PANCREAS
    pancreas = (
        tuple(_floats(np.add(pt, rng.normal(0, 0.02, 3))) for pt in points),
        _floats(np.multiply(radii, rng.uniform(0.85, 1.15))),
    )

    liver_lesions = [
        (_inside(rng, organs["liver_right"], 0.5), rng.uniform(0.05, 0.10))
        for _ in range(rng.integers(min_liver_lesions, min_liver_lesions + 3))
    ]
    kidney_lesion = None
    if rng.uniform() < 0.4:
        side = organs["kidney_left" if rng.uniform() < 0.5 else "kidney_right"]
        kidney_lesion = (_inside(rng, side, 0.5), rng.uniform(0.05, 0.08))

    stomach_center, stomach_radii, _ = organs["stomach"]
    hu = {k: v + rng.normal(0, 5) for k, v in BASE_HU.items()}
    enhancement = rng.uniform(0.85, 1.15)  # contrast timing varies between patients
    for organ in ("vessel", "ivc", "liver", "spleen", "pancreas", "kidney", "medulla"):
        hu[organ] *= enhancement
    return Anatomy(
        scale=rng.uniform(0.88, 1.02),
        body=(0.02, rng.uniform(0.80, 0.90), rng.uniform(0.58, 0.68), rng.uniform(2.2, 2.8)),
        fat=rng.uniform(0.04, 0.12),
        muscle=rng.uniform(0.03, 0.05),
        organs=organs,
        pancreas=pancreas,
        liver_lesions=liver_lesions,
        kidney_lesion=kidney_lesion,
        fluid_level=stomach_center[1] + rng.uniform(-0.6, 0.2) * stomach_radii[1],
        disc_phase=rng.uniform(0, VERTEBRA_PERIOD),
        hu=hu,
        warp=RandomField(rng, components=3, modes=6, frequency=2.0, amplitude=0.03),
    )


class _Canvas:
    """HU image plus tissue map, painted back to front with partial-volume blending."""

    def __init__(self, shape, width: float):
        self.hu = np.full(shape, BASE_HU["air"], dtype=np.float32)
        self.tissue = np.zeros(shape, dtype=np.uint8)
        self.width = width

    def paint(self, d: np.ndarray, value, tissue: str | None = None, within: str | None = None) -> None:
        """Blend ``value`` where ``d`` < 0; ``within`` confines it to voxels already of that tissue."""
        occupancy, inside = soft(d, self.width), d < 0
        if within is not None:
            mask = self.tissue == TISSUE_ID[within]
            occupancy, inside = occupancy * mask, inside & mask
        self.hu += occupancy * (value - self.hu)
        if tissue is not None:
            self.tissue[inside] = TISSUE_ID[tissue]


def _texture(rng: np.random.Generator, grid: Grid, sigma: float) -> np.ndarray:
    """Unit-variance Gaussian-smoothed noise with correlation length ``sigma`` (body units)."""
    field = ndimage.gaussian_filter(
        rng.standard_normal(grid.shape, dtype=np.float32), grid.sigma_voxels(sigma * grid.fov_mm / 2)
    )
    return field / max(float(field.std()), 1e-6)


def render(anatomy: Anatomy, grid: Grid, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Ideal (noise-free, unblurred) HU volume and tissue ids (``TISSUES``) of one case on ``grid``."""
    a = anatomy
    scanner = grid.points()
    p = (scanner + a.warp(scanner)) / a.scale  # body coordinates: warped, relative to body size
    canvas = _Canvas(grid.shape, grid.voxel_size / a.scale)
    fine, coarse, bowel, gas = (_texture(rng, grid, s) for s in (0.02, 0.08, 0.07, 0.04))

    def tissue(name, fine_amp, coarse_amp=0.0):
        return a.hu[name] + fine_amp * fine + coarse_amp * coarse

    def organ(name):
        return ellipsoid(p, *a.organs[name])

    # scanner couch: a thin curved shell just behind the patient, in unwarped scanner space
    cy, half_w, half_d, n = a.body
    couch_y = (cy + half_d) * a.scale + 0.04 - 0.1 * scanner[0] ** 2
    canvas.paint(np.abs(scanner[1] - couch_y) - 0.025, a.hu["table"], "table")

    # torso: subcutaneous fat, abdominal wall muscle, then the cavity filled with visceral fat and bowel
    skin = ellipse_xy(p, 0.0, cy, half_w * (1 + 0.04 * p[2]), half_d, n)  # rib cage widens cranially
    canvas.paint(skin, tissue("fat", 8), "fat")
    canvas.paint(skin + a.fat, tissue("muscle", 6), "muscle")
    cavity = skin + a.fat + a.muscle
    canvas.paint(cavity, tissue("fat", 8), "fat")
    loops = np.maximum((0.35 - bowel) * 0.07, cavity)
    canvas.paint(loops, tissue("bowel", 10, 10), "bowel")
    canvas.paint(np.maximum((1.3 - gas) * 0.04, loops), a.hu["gas"], within="bowel")

    # back muscles and psoas (which widens and moves laterally towards the pelvis)
    for side in (-1, 1):
        back = np.maximum(ellipse_xy(p, side * 0.14, SPINE_Y + 0.19, 0.12, 0.10), skin + a.fat)
        canvas.paint(back, tissue("muscle", 6), "muscle")
        psoas = ellipse_xy(
            p, side * (0.12 - 0.05 * p[2]), SPINE_Y - 0.04, 0.05 - 0.035 * p[2], 0.045 - 0.03 * p[2]
        )
        canvas.paint(psoas, tissue("muscle", 6), "muscle")

    # solid organs, clipped to the cavity; later organs indent earlier ones
    liver = np.maximum(smooth_union(organ("liver_right"), organ("liver_left"), 0.1), cavity)
    canvas.paint(liver, tissue("liver", 6, 8), "liver")
    canvas.paint(np.maximum(organ("gallbladder"), cavity), tissue("gallbladder", 3), "gallbladder")

    center, radii, angles = a.organs["spleen"]
    hilum = np.asarray(center) + rotation(angles) @ np.array([-0.9 * radii[0], -0.3 * radii[1], 0.0])
    spleen = np.maximum(organ("spleen"), -ellipsoid(p, hilum, np.multiply(radii, (0.6, 0.5, 0.7)), angles))
    canvas.paint(np.maximum(spleen, cavity), tissue("spleen", 5, 6), "spleen")

    center, radii, angles = a.organs["stomach"]
    canvas.paint(np.maximum(organ("stomach"), cavity), tissue("stomach", 8), "stomach")
    lumen = ellipsoid(p, center, np.subtract(radii, 0.03), angles)
    canvas.paint(lumen, tissue("stomach_fluid", 4), within="stomach")
    canvas.paint(np.maximum(lumen, p[1] - a.fluid_level), a.hu["gas"], within="stomach")

    # lobulated outline: the pancreas is interleaved with fat
    canvas.paint(capsule_chain(p, *a.pancreas) + 0.012 * fine, tissue("pancreas", 15, 8), "pancreas")

    for side, name in ((1, "kidney_left"), (-1, "kidney_right")):
        center, radii, angles = a.organs[name]
        # medial notch (renal sinus) makes the bean shape; the darker medulla sits inside the cortex
        hilum = np.asarray(center) + rotation(angles) @ np.array([-side * 0.9 * radii[0], -0.3 * radii[1], 0])
        kidney = np.maximum(organ(name), -ellipsoid(p, hilum, np.multiply(radii, (0.5, 0.4, 0.45)), angles))
        canvas.paint(kidney, tissue("kidney", 8), "kidney")
        medulla = ellipsoid(p, center, np.multiply(radii, 0.6), angles)
        canvas.paint(medulla, tissue("medulla", 8), within="kidney")

    canvas.paint(ellipse_xy(p, 0.06, SPINE_Y - 0.16, 0.045, 0.045), tissue("vessel", 4), "vessel")  # aorta
    canvas.paint(ellipse_xy(p, -0.10, SPINE_Y - 0.17, 0.055, 0.04), tissue("ivc", 4), "vessel")

    for center, radius in a.liver_lesions:
        lesion = ellipsoid(p, center, (radius,) * 3) + 0.01 * fine  # slightly irregular margin
        canvas.paint(lesion, tissue("liver_lesion", 6), "liver_lesion", within="liver")
    if a.kidney_lesion is not None:
        center, radius = a.kidney_lesion
        lesion = ellipsoid(p, center, (radius,) * 3)
        canvas.paint(lesion, tissue("kidney_lesion", 4), "kidney_lesion", within="kidney")

    _paint_bones(canvas, p, a, skin)
    return canvas.hu, canvas.tissue


def _paint_bones(canvas: _Canvas, p: np.ndarray, a: Anatomy, skin: np.ndarray) -> None:
    """Vertebrae with discs, posterior elements and a spinal canal; ribs in the upper abdominal wall."""
    phase = (p[2] - a.disc_phase) / VERTEBRA_PERIOD
    to_disc = VERTEBRA_PERIOD * np.abs(phase - np.round(phase))  # distance to the nearest disc plane
    body = ellipse_xy(p, 0.0, SPINE_Y, 0.10, 0.085)
    canvas.paint(np.maximum(body, 0.025 - to_disc), a.hu["bone"], "bone")
    canvas.paint(np.maximum(body + 0.02, 0.045 - to_disc), a.hu["cancellous"], "bone")  # inside the cortex
    canvas.paint(np.maximum(body, to_disc - 0.025), a.hu["disc"], "bone")

    canal_y = SPINE_Y + 0.14
    arch = ellipse_xy(p, 0.0, canal_y, 0.075, 0.065)
    arch = np.minimum(arch, ellipse_xy(p, 0.0, canal_y + 0.11, 0.022, 0.07))  # spinous process
    arch = np.minimum(arch, ellipse_xy(p, 0.0, canal_y - 0.01, 0.17, 0.022))  # transverse processes
    canvas.paint(np.maximum(arch, 0.05 - to_disc), a.hu["bone"], "bone")
    canvas.paint(ellipse_xy(p, 0.0, canal_y, 0.045, 0.04), a.hu["csf"], "bone")

    # ribs run obliquely (lower anteriorly), so they cut the wall as short bands in upper axial slices
    wall = np.abs(skin + a.fat + 0.5 * a.muscle)
    rib_phase = (p[2] - 0.5 * p[1]) / 0.16
    ribs = np.maximum(wall - 0.016, 0.16 * np.abs(rib_phase - np.round(rib_phase)) - 0.02)
    ribs = np.maximum(ribs, np.maximum(0.05 - p[2] + 0.5 * p[1], 0.3 - np.abs(p[0])))  # upper, lateral only
    canvas.paint(ribs, a.hu["bone"], "bone")
