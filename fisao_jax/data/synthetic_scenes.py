"""Procedural scenes of the synthetic grounded world: object classes, layout and rendering.

A scene is a square RGB image split into a 3x3 grid of cells; each object sits inside its
own cell, so objects never overlap and every object's position has an exact name ("on the
left", "in the top right corner", ...). Each class is a cartoon shape in a few layers of
flat colour with a dark outline, drawn with numpy masks over the object's pixel patch
(no per-pixel Python loops). Shapes are defined in an isotropic frame `[-1, 1]^2` (x to the
right, y down) that is rotated, flipped and scaled per object.

All randomness comes from an explicit `numpy.random.Generator`; nothing global.
"""
from __future__ import annotations

import dataclasses
from typing import Callable

import numpy as np

# Named colours an object can have (RGB, 0-255). The caption calls them by these names.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (205, 35, 35),
    "green": (50, 165, 60),
    "blue": (45, 85, 210),
    "yellow": (240, 205, 35),
    "purple": (135, 60, 180),
    "pink": (245, 130, 185),
    "white": (242, 242, 242),
    "black": (28, 28, 28),
    "brown": (125, 75, 35),
    "gray": (165, 165, 172),
}

COLOURS_F = {k: np.asarray(v, np.float64) for k, v in COLOURS.items()}

# Secondary part colours (never named in captions).
_DARK = np.array((32.0, 32.0, 36.0))
_TAN = np.array((215.0, 175.0, 115.0))
_CRUST = np.array((185.0, 115.0, 45.0))
_PEPPERONI = np.array((165.0, 25.0, 25.0))
_LEAF = np.array((35.0, 120.0, 40.0))
_STEM = np.array((95.0, 60.0, 25.0))
_PAPER = np.array((245.0, 245.0, 235.0))
_RIM = np.array((198.0, 198.0, 206.0))
_COFFEE = np.array((85.0, 50.0, 25.0))

Layers = list[tuple[np.ndarray, np.ndarray]]
"""Painting order of one object: (mask bool[h, w], rgb float[3]) pairs, later on top."""


def _disk(x, y, cx, cy, r):
    return (x - cx) ** 2 + (y - cy) ** 2 < r * r


def _ellipse(x, y, cx, cy, rx, ry):
    return ((x - cx) / rx) ** 2 + ((y - cy) / ry) ** 2 < 1.0


def _box(x, y, x0, x1, y0, y1):
    return (x > x0) & (x < x1) & (y > y0) & (y < y1)


def _segment(x, y, angle, length, half_width):
    """Bar from the origin towards `angle` (radians, 0 = up, clockwise)."""
    ux, uy = np.sin(angle), -np.cos(angle)
    along = x * ux + y * uy
    across = -x * uy + y * ux
    return (along > -half_width) & (along < length) & (np.abs(across) < half_width)


def _draw_ball(x, y, c) -> Layers:
    body = _disk(x, y, 0, 0, 0.95)
    return [(body, c), (body & (np.abs(y) < 0.14), COLOURS_F["white"])]


def _draw_plate(x, y, c) -> Layers:
    r2 = x * x + y * y
    return [(r2 < 0.98**2, c), ((r2 > 0.6**2) & (r2 < 0.7**2), _RIM)]


def _draw_clock(x, y, c) -> Layers:
    face = _disk(x, y, 0, 0, 0.74)
    hands = _segment(x, y, 0.0, 0.62, 0.07) | _segment(x, y, np.pi / 2, 0.45, 0.09)
    return [(_disk(x, y, 0, 0, 0.98), c), (face, COLOURS_F["white"]), (face & hands, _DARK)]


def _draw_donut(x, y, c) -> Layers:
    r2 = x * x + y * y
    return [((r2 > 0.3**2) & (r2 < 0.97**2), _TAN), ((r2 > 0.42**2) & (r2 < 0.84**2), c)]


def _draw_frisbee(x, y, c) -> Layers:
    outer = _ellipse(x, y, 0, 0, 0.97, 0.5)
    ring = outer & ~_ellipse(x, y, 0, 0, 0.72, 0.33) & _ellipse(x, y, 0, 0, 0.8, 0.4)
    return [(outer, c), (ring, c * 0.6)]


def _draw_kite(x, y, c) -> Layers:
    diamond = np.abs(x) / 0.62 + np.abs(y + 0.22) / 0.74 < 1.0
    spars = diamond & ((np.abs(x) < 0.05) | (np.abs(y + 0.22) < 0.05))
    tail = (np.abs(x - 0.13 * np.sin(y * 11.0)) < 0.06) & (y > 0.5) & (y < 0.98)
    return [(diamond, c), (spars, c * 0.5), (tail, _DARK)]


def _draw_umbrella(x, y, c) -> Layers:
    canopy = _disk(x, y, 0, -0.02, 0.95) & (y < -0.02)
    scallops = _disk(x, y, -0.63, -0.02, 0.32) | _disk(x, y, 0.0, -0.02, 0.32) | _disk(x, y, 0.63, -0.02, 0.32)
    canopy = canopy & ~(scallops & (y > -0.2))
    shaft = _box(x, y, -0.06, 0.06, -0.2, 0.78)
    hook = _disk(x, y, -0.17, 0.78, 0.23) & ~_disk(x, y, -0.17, 0.78, 0.11) & (y > 0.78)
    tip = _box(x, y, -0.045, 0.045, -1.0, -0.9)
    return [(shaft | hook | tip, _DARK), (canopy, c)]


def _draw_book(x, y, c) -> Layers:
    cover = _box(x, y, -0.85, 0.85, -0.62, 0.62)
    pages = _box(x, y, -0.6, 0.82, 0.4, 0.58)
    spine = _box(x, y, -0.85, -0.62, -0.62, 0.62)
    label = _box(x, y, -0.3, 0.55, -0.38, -0.1)
    return [(cover, c), (spine, c * 0.6), (pages | label, _PAPER)]


def _draw_bottle(x, y, c) -> Layers:
    body = _box(x, y, -0.38, 0.38, -0.12, 0.95) | (_disk(x, y, 0, -0.12, 0.38) & (y < -0.12))
    neck = _box(x, y, -0.14, 0.14, -0.8, -0.2)
    cap = _box(x, y, -0.17, 0.17, -0.98, -0.78)
    label = _box(x, y, -0.38, 0.38, 0.2, 0.58)
    return [(body | neck, c), (label, _PAPER), (cap, _DARK)]


def _draw_banana(x, y, c) -> Layers:
    y = y + 0.35
    band = _disk(x, y, 0, -1.0, 1.25) & ~_disk(x, y, 0, -1.45, 1.42) & (np.abs(x) < 0.97)
    tips = band & (np.abs(x) > 0.84)
    return [(band, c), (tips, _STEM)]


def _draw_apple(x, y, c) -> Layers:
    body = _disk(x, y, -0.27, 0.15, 0.7) | _disk(x, y, 0.27, 0.15, 0.7)
    stem = _box(x, y, -0.02, 0.1, -0.88, -0.4)
    leaf = _ellipse(x, y, 0.35, -0.68, 0.27, 0.13)
    return [(body, c), (stem, _STEM), (leaf, _LEAF)]


def _draw_pizza(x, y, c) -> Layers:
    slice_ = (np.abs(x) < 0.5 * (0.95 - y)) & (y > -0.85)
    crust = slice_ & (y < -0.6)
    pepperoni = _disk(x, y, -0.33, -0.33, 0.15) | _disk(x, y, 0.3, -0.28, 0.15) | _disk(x, y, 0.0, 0.22, 0.14)
    return [(slice_, c), (crust, _CRUST), (slice_ & ~crust & pepperoni, _PEPPERONI)]


def _draw_fork(x, y, c) -> Layers:
    handle = _box(x, y, -0.09, 0.09, 0.0, 0.98)
    head = _box(x, y, -0.42, 0.42, -0.22, 0.05)
    tines = (np.abs(x + 0.32) < 0.1) | (np.abs(x) < 0.1) | (np.abs(x - 0.32) < 0.1)
    return [(handle | head | (tines & (y > -0.97) & (y < 0.0)), c)]


def _draw_spoon(x, y, c) -> Layers:
    return [(_ellipse(x, y, 0, -0.5, 0.36, 0.48) | _box(x, y, -0.09, 0.09, -0.1, 0.98), c)]


def _draw_knife(x, y, c) -> Layers:
    blade = _box(x, y, -0.14, 0.16, -0.97, 0.12) & (x + 0.14 < (y + 0.97) * 1.1)
    handle = _box(x, y, -0.12, 0.14, 0.08, 0.98)
    return [(blade, c), (handle, _DARK)]


def _draw_cup(x, y, c) -> Layers:
    body = (np.abs(x + 0.15) < 0.6 - 0.16 * (y + 0.62)) & (y > -0.62) & (y < 0.72)
    handle = _disk(x, y, 0.42, 0.02, 0.36) & ~_disk(x, y, 0.42, 0.02, 0.19) & (x > 0.3)
    coffee = _ellipse(x, y, -0.15, -0.6, 0.5, 0.09)
    return [(body | handle, c), (coffee, _COFFEE)]



@dataclasses.dataclass(frozen=True)
class ClassSpec:
    """One object class: its noun, plural, named colours, size and shape.

    size: side of the object's drawing square as a fraction of a grid cell (0-1].
    says_colour: whether captions name the colour (a "gray fork" reads oddly).
    """

    name: str
    plural: str
    palette: tuple[str, ...]
    size: float
    draw: Callable[[np.ndarray, np.ndarray, np.ndarray], Layers]
    says_colour: bool = True


CLASS_SPECS: dict[str, ClassSpec] = {
    s.name: s
    for s in (
        ClassSpec("ball", "balls", ("red", "blue", "purple"), 0.62, _draw_ball),
        ClassSpec("plate", "plates", ("white",), 0.98, _draw_plate),
        ClassSpec("fork", "forks", ("gray",), 0.98, _draw_fork, says_colour=False),
        ClassSpec("knife", "knives", ("gray",), 0.98, _draw_knife, says_colour=False),
        ClassSpec("spoon", "spoons", ("gray",), 0.9, _draw_spoon, says_colour=False),
        ClassSpec("cup", "cups", ("blue", "red", "white", "green"), 0.75, _draw_cup),
        ClassSpec("clock", "clocks", ("black", "red", "blue"), 0.8, _draw_clock),
        ClassSpec("kite", "kites", ("red", "blue", "yellow", "purple"), 0.95, _draw_kite),
        ClassSpec("umbrella", "umbrellas", ("purple", "blue", "red", "black"), 0.95, _draw_umbrella),
        ClassSpec("book", "books", ("red", "blue", "green", "brown"), 0.8, _draw_book),
        ClassSpec("banana", "bananas", ("yellow",), 0.9, _draw_banana),
        ClassSpec("apple", "apples", ("red", "green"), 0.62, _draw_apple),
        ClassSpec("pizza", "pizzas", ("yellow",), 0.88, _draw_pizza, says_colour=False),
        ClassSpec("donut", "donuts", ("pink", "brown", "white"), 0.72, _draw_donut),
        ClassSpec("frisbee", "frisbees", ("yellow", "red", "blue", "green"), 0.95, _draw_frisbee),
        ClassSpec("bottle", "bottles", ("green", "brown", "blue"), 0.95, _draw_bottle),
    )
}

CLASS_NAMES: tuple[str, ...] = tuple(CLASS_SPECS)
"""All classes of the world, each a single-word COCO or LVIS category noun."""

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
        patch[grown & ~union] = _DARK
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
