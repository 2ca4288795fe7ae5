"""Object classes of the synthetic grounded world: named colours, cartoon shapes, the class table.

Each class is a cartoon shape in a few layers of flat colour, drawn with numpy masks over the
object's pixel patch (no per-pixel Python loops); `synthetic_scenes` places and paints it and
adds the outline. Shapes are defined in an isotropic frame `[-1, 1]^2` (x to the right, y down)
that is rotated, flipped and scaled per object.
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

# Secondary part colours (never named in captions); DARK also outlines every object.
DARK = np.array((32.0, 32.0, 36.0))
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
    return [(_disk(x, y, 0, 0, 0.98), c), (face, COLOURS_F["white"]), (face & hands, DARK)]


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
    return [(diamond, c), (spars, c * 0.5), (tail, DARK)]


def _draw_umbrella(x, y, c) -> Layers:
    canopy = _disk(x, y, 0, -0.02, 0.95) & (y < -0.02)
    scallops = _disk(x, y, -0.63, -0.02, 0.32) | _disk(x, y, 0.0, -0.02, 0.32) | _disk(x, y, 0.63, -0.02, 0.32)
    canopy = canopy & ~(scallops & (y > -0.2))
    shaft = _box(x, y, -0.06, 0.06, -0.2, 0.78)
    hook = _disk(x, y, -0.17, 0.78, 0.23) & ~_disk(x, y, -0.17, 0.78, 0.11) & (y > 0.78)
    tip = _box(x, y, -0.045, 0.045, -1.0, -0.9)
    return [(shaft | hook | tip, DARK), (canopy, c)]


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
    return [(body | neck, c), (label, _PAPER), (cap, DARK)]


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
    return [(blade, c), (handle, DARK)]


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
