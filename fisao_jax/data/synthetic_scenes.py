"""Scenes of the synthetic grounded world: the world's config, layout on a grid and rendering.

A scene is a square RGB image split into a 3x3 grid of cells; each object sits inside its
own cell, so objects never overlap and every object's position has an exact name ("on the
left", "in the top right corner", ...). Objects (classes and shapes from `synthetic_shapes`)
are painted with a dark outline over a textured background.

All randomness comes from an explicit `numpy.random.Generator`; nothing global.
"""
from __future__ import annotations

import dataclasses

import numpy as np

from fisao_jax.data.synthetic_shapes import CLASS_NAMES, CLASS_SPECS, COLOURS_F, DARK

DEFAULT_COOCCURRENCE: tuple[tuple[str, str], ...] = (
    ("plate", "fork"),
    ("cup", "spoon"),
    ("pizza", "knife"),
    ("banana", "apple"),
)
"""(anchor, partner) pairs: the partner usually accompanies the anchor in scenes."""

GRID = 3
# Position phrase of each grid cell, row-major (row 0 = top).
POSITION_PHRASES: tuple[str, ...] = (
    "in the top left corner", "at the top", "in the top right corner",
    "on the left", "in the center", "on the right",
    "in the bottom left corner", "at the bottom", "in the bottom right corner",
)


@dataclasses.dataclass(frozen=True)
class WorldConfig:
    """Everything that defines the synthetic world.

    image_size: side in pixels (tested range 64-112; 48-224 accepted).
    classes: class names in use (subset of CLASS_NAMES, order = class index).
    min_objects / max_objects: objects per scene, inclusive (at most 9 = grid cells).
    cooccurrence: (anchor, partner) pairs of the language prior.
    cooccurrence_rate: probability that an anchor drawn into a scene with room left brings
      its partner along.
    hallucination_rate: probability that a biased (SFT) caption mentions an absent partner
      of a present anchor.
    repeat_rate: probability that an object is followed by another of its class (counts).
    scale_jitter: object size is scaled by U(1 - scale_jitter, 1).
    colour_jitter: std of per-channel colour noise (0-255 units); 0 also turns off the
      per-object brightness jitter, so named colours are drawn exactly.
    noise_std: std of per-pixel camera noise (uniform distribution; 0-255 units).
    max_rotation_deg: objects are rotated by U(-max, max) degrees.
    outline: draw a dark 1-px outline around each object.
    """

    image_size: int = 64
    classes: tuple[str, ...] = CLASS_NAMES
    min_objects: int = 1
    max_objects: int = 4
    cooccurrence: tuple[tuple[str, str], ...] = DEFAULT_COOCCURRENCE
    cooccurrence_rate: float = 0.7
    hallucination_rate: float = 0.5
    repeat_rate: float = 0.15
    scale_jitter: float = 0.15
    colour_jitter: float = 12.0
    noise_std: float = 5.0
    max_rotation_deg: float = 15.0
    outline: bool = True

    def __post_init__(self):
        def bad(field, why):
            raise ValueError(f"WorldConfig.{field}={getattr(self, field)!r}: {why}")

        if not 48 <= self.image_size <= 224:
            bad("image_size", "must be in [48, 224] pixels")
        unknown = [c for c in self.classes if c not in CLASS_SPECS]
        if unknown:
            bad("classes", f"unknown class(es) {unknown}; known: {list(CLASS_NAMES)}")
        if len(set(self.classes)) != len(self.classes) or not self.classes:
            bad("classes", "must be non-empty and without duplicates")
        if not 1 <= self.min_objects <= self.max_objects <= GRID * GRID:
            bad("max_objects", f"need 1 <= min_objects <= max_objects <= {GRID * GRID}")
        anchors = [a for a, _ in self.cooccurrence]
        if len(set(anchors)) != len(anchors):
            bad("cooccurrence", "each anchor may have only one partner")
        for pair in self.cooccurrence:
            if len(pair) != 2 or pair[0] == pair[1]:
                bad("cooccurrence", f"pair {pair!r} must be two different classes")
            missing = [c for c in pair if c not in self.classes]
            if missing:
                bad("cooccurrence", f"pair {pair!r} names {missing} not in classes")
        for field in ("cooccurrence_rate", "hallucination_rate", "repeat_rate"):
            if not 0.0 <= getattr(self, field) <= 1.0:
                bad(field, "must be a probability in [0, 1]")
        if not 0.0 <= self.scale_jitter < 0.7:
            bad("scale_jitter", "must be in [0, 0.7)")
        for field in ("colour_jitter", "noise_std", "max_rotation_deg"):
            if getattr(self, field) < 0:
                bad(field, "must be >= 0")

    @property
    def partner_of(self) -> dict[str, str]:
        """anchor -> partner."""
        return dict(self.cooccurrence)


@dataclasses.dataclass(frozen=True)
class SceneObject:
    """One drawn object.

    cell: grid index 0-8, row-major from the top left; position: its caption phrase.
    box: tight pixel box of the object's paint (outline excluded), (y0, x0, y1, x1),
      end-exclusive.
    """

    name: str
    colour: str
    cell: int
    position: str
    box: tuple[int, int, int, int]


@dataclasses.dataclass(frozen=True, eq=False)  # eq on an array field would be ambiguous
class Scene:
    """A rendered scene: its objects and the image, uint8 [H, W, 3]."""

    objects: tuple[SceneObject, ...]
    image: np.ndarray

    @property
    def names(self) -> frozenset[str]:
        """Ground-truth object set (canonical class names)."""
        return frozenset(o.name for o in self.objects)


def cell_geometry(cfg: WorldConfig) -> tuple[int, int]:
    """(cell side, offset of the grid from the image edge), both in pixels."""
    cell = cfg.image_size // GRID
    return cell, (cfg.image_size - GRID * cell) // 2


def sample_object_names(rng: np.random.Generator, cfg: WorldConfig) -> list[str]:
    """Classes of one scene's objects, with the co-occurrence prior and repeats."""
    partner_of = cfg.partner_of
    n = int(rng.integers(cfg.min_objects, cfg.max_objects + 1))
    names: list[str] = []
    while len(names) < n:
        name = cfg.classes[int(rng.integers(len(cfg.classes)))]
        names.append(name)
        partner = partner_of.get(name)
        if len(names) < n and partner is not None and partner not in names and rng.random() < cfg.cooccurrence_rate:
            names.append(partner)
        elif len(names) < n and rng.random() < cfg.repeat_rate:
            names.append(name)
    return names


def render_background(rng: np.random.Generator, cfg: WorldConfig) -> np.ndarray:
    """Muted table-like texture, float32 [H, W, 3] in 0-255: tone + gradient + blotches + weave."""
    size = cfg.image_size
    # Mid-range, low-saturation tones keep white, black and coloured objects all visible.
    base = (rng.uniform(95, 165) + rng.uniform(-22, 22, size=3)).astype(np.float32)
    coords = ((np.arange(size) + 0.5) / size - 0.5).astype(np.float32)
    angle = rng.uniform(0, 2 * np.pi)
    amplitude = rng.uniform(10, 35)
    ramp = (amplitude * np.cos(angle)) * coords[None, :] + (amplitude * np.sin(angle)) * coords[:, None]
    # Smooth blotches: a coarse random grid upsampled with separable linear interpolation.
    coarse = 5
    knots = np.linspace(0, size - 1, coarse)
    interp = np.maximum(0.0, 1.0 - np.abs(np.arange(size)[:, None] - knots[None, :]) / (knots[1] - knots[0]))
    interp = interp.astype(np.float32)
    blotches = rng.normal(0, 9.0, size=(3, coarse, coarse)).astype(np.float32)
    bg = (interp @ blotches @ interp.T).transpose(1, 2, 0) + (ramp[..., None] + base)
    if rng.random() < 0.4:  # faint woven stripes, so texture is not just noise
        period = rng.uniform(5, 11)
        stripes = (rng.uniform(4, 9) * np.sin(2 * np.pi * np.arange(size) / period)).astype(np.float32)
        bg += stripes[None, :, None] if rng.random() < 0.5 else stripes[:, None, None]
    return bg


def _paint_object(image, rng, cfg, name, cell_index) -> SceneObject:
    """Draws one object into its cell of `image` (float [H, W, 3], edited in place)."""
    spec = CLASS_SPECS[name]
    cell, offset = cell_geometry(cfg)
    colour = spec.palette[int(rng.integers(len(spec.palette)))]
    main = COLOURS_F[colour]
    if cfg.colour_jitter > 0:
        # Half the hue noise on achromatic colours, so "white" and "gray" stay neutral.
        hue_std = cfg.colour_jitter * (0.5 if colour in ("white", "gray", "black") else 1.0)
        main = main * rng.uniform(0.9, 1.1) + rng.normal(0, hue_std, 3)
    room = cell - 2  # one pixel each side for the outline
    side = max(8, min(room, int(round(cell * spec.size * rng.uniform(1 - cfg.scale_jitter, 1)))))
    row, col = divmod(cell_index, GRID)
    y0 = offset + row * cell + 1 + int(rng.integers(0, room - side + 1))
    x0 = offset + col * cell + 1 + int(rng.integers(0, room - side + 1))

    theta = np.deg2rad(rng.uniform(-cfg.max_rotation_deg, cfg.max_rotation_deg))
    flip = -1.0 if rng.random() < 0.5 else 1.0
    # Shrink a little when rotated so the shape's tips stay inside its square.
    shrink = 1.0 + 0.35 * abs(np.sin(theta))
    t = ((np.arange(side) + 0.5) / side * 2 - 1) * shrink
    gx, gy = t[None, :], t[:, None]
    x = flip * (np.cos(theta) * gx + np.sin(theta) * gy)
    y = -np.sin(theta) * gx + np.cos(theta) * gy
    layers = [(np.broadcast_to(m, (side, side)), rgb) for m, rgb in spec.draw(x, y, main)]

    union = np.zeros((side + 2, side + 2), bool)
    for mask, _ in layers:
        union[1:-1, 1:-1] |= mask
    if not union.any():
        raise RuntimeError(f"class {name!r} drew nothing at side {side}px; its shape or size is broken")
    patch = image[y0 - 1:y0 + side + 1, x0 - 1:x0 + side + 1]
    if cfg.outline:
        grown = union.copy()
        grown[1:] |= union[:-1]
        grown[:-1] |= union[1:]
        grown[:, 1:] |= union[:, :-1]
        grown[:, :-1] |= union[:, 1:]
        patch[grown & ~union] = DARK
    inner = patch[1:-1, 1:-1]
    for mask, rgb in layers:
        inner[mask] = rgb
    ys, xs = np.nonzero(union[1:-1, 1:-1])
    box = (y0 + int(ys.min()), x0 + int(xs.min()), y0 + int(ys.max()) + 1, x0 + int(xs.max()) + 1)
    return SceneObject(name=name, colour=colour, cell=cell_index, position=POSITION_PHRASES[cell_index], box=box)


def sample_scene(rng: np.random.Generator, cfg: WorldConfig) -> Scene:
    """Samples object classes, cells, looks and background; renders the image.

    Returns Scene with objects in drawing order and image uint8 [S, S, 3].
    """
    names = sample_object_names(rng, cfg)
    cells = rng.permutation(GRID * GRID)[: len(names)]
    image = render_background(rng, cfg)
    objects = tuple(_paint_object(image, rng, cfg, n, int(c)) for n, c in zip(names, cells))
    if cfg.noise_std > 0:
        # Uniform noise of the same std: 4x cheaper to draw than Gaussian, looks the same.
        half_width = np.float32(cfg.noise_std * np.sqrt(3.0))
        image += half_width * (2 * rng.random(image.shape, dtype=np.float32) - 1)
    # +0.5 then truncation rounds to nearest for the non-negative values left after clipping.
    np.clip(image + 0.5, 0, 255, out=image)
    return Scene(objects=objects, image=image.astype(np.uint8))
