"""The overlay: scene rules (tables), geometry, pixels in the composited frame, text in any script."""

from __future__ import annotations

from dataclasses import dataclass, field

import av
import numpy as np
import pytest
from PIL import Image, ImageDraw

from overlay.compositor import Compositor, blend_sprite, copy_frame, plane_view
from overlay.fonts import font, split_runs, visual_runs
from overlay.render import STATUS_RGB, Geometry, panel_geometry, render_sprite, tile_origin
from overlay.scene import Card, OverlayScene, OverlaySettings, Tile, build_scene, format_timer, headline


@dataclass(frozen=True)
class Flash:
    remaining: int
    ends_at: float
    price: str | None


@dataclass(frozen=True)
class View:
    sku: str
    status: str
    sellable: int | None
    name: str = "Hoodie"
    price: str = "29.99"
    currency: str = "USD"
    attributes: dict[str, str] = field(default_factory=dict)
    flash_sale: Flash | None = None


@pytest.mark.parametrize(
    "status, sellable, expected",
    [
        ("plenty", 240, "240 in stock"),
        ("low", 87, "Only 87 left"),
        ("critical", 3, "Only 3 left"),
        ("sold_out", 0, "Sold out"),
        ("plenty", 0, "Sold out"),
        ("syncing", None, "Syncing stock..."),
        ("syncing", 12, "Syncing stock..."),  # stale: never a possibly wrong number
    ],
)
def test_headline(status: str, sellable: int | None, expected: str) -> None:
    assert headline(status, sellable) == expected


@pytest.mark.parametrize("seconds, text", [(0, "00:00"), (0.2, "00:01"), (59.0, "00:59"), (61.5, "01:02"), (-3, "00:00")])
def test_timer(seconds: float, text: str) -> None:
    assert format_timer(seconds) == text


def test_scene_with_flash_sale_and_badge() -> None:
    views = [
        View("hoodie-m", "low", 87, attributes={"size": "M"}, flash_sale=Flash(40, 1000.0, "19.99")),
        View("hoodie-l", "plenty", 300, attributes={"size": "L"}),
        View("hoodie-xl", "syncing", None, attributes={"size": "XL"}),
    ]
    assert build_scene(views, OverlaySettings(), now=880.0) == OverlayScene(
        card=Card("Hoodie · M", "$19.99", "$29.99", "Only 40 left", "low", "02:00"),  # of which size
        tiles=(Tile("M", "low"), Tile("L", "plenty"), Tile("XL", "syncing")),
    )
    # Featured product and badge subset are settings; an ended flash sale shows the plain price.
    settings = OverlaySettings(featured_sku="hoodie-l", badge_skus=("hoodie-xl",), position="top-right")
    assert build_scene(views, settings, now=2000.0) == OverlayScene(
        card=Card("Hoodie · L", "$29.99", None, "300 in stock", "plenty", None),
        tiles=(Tile("XL", "syncing"),),
        position="top-right",
    )
    assert build_scene(views, OverlaySettings(enabled=False), now=0) is None
    assert build_scene([], OverlaySettings(), now=0) is None


def test_flash_sale_cap_reached_shows_sold_out() -> None:
    views = [View("a", "plenty", 50, flash_sale=Flash(0, 100.0, "9.99"))]
    scene = build_scene(views, OverlaySettings(), now=10.0)
    assert scene is not None and scene.card == Card("Hoodie", "$9.99", "$29.99", "Sold out", "sold_out", "01:30")


@pytest.mark.parametrize(
    "size, tiles, expected",
    [
        ((1280, 720), 6, Geometry(22, 492, 384, 206, 154, 6, 1, 52, 32, 10)),
        ((640, 360), 4, Geometry(10, 216, 230, 134, 92, 4, 1, 50, 30, 6)),
        ((320, 180), 8, Geometry(4, 82, 146, 94, 58, 6, 2, 19, 12, 4)),
    ],
)
def test_panel_geometry(size: tuple[int, int], tiles: int, expected: Geometry) -> None:
    geometry = panel_geometry(*size, True, tiles, "bottom-left", 1.0)
    assert geometry == expected
    w, h = size
    assert geometry.x + geometry.width <= w and geometry.y + geometry.height <= h
    assert geometry.x >= 0 and geometry.y >= 48  # the top-left corner stays free (benchmark timecode)


def grey_frame(width: int, height: int) -> av.VideoFrame:
    return av.VideoFrame.from_ndarray(np.full((height, width, 3), 128, np.uint8), format="rgb24").reformat(format="yuv420p")


TILE_STATUSES = ("plenty", "low", "critical", "sold_out", "syncing")
SCENE = OverlayScene(
    Card("Hoodie", "$19.99", "$29.99", "Only 87 left", "low", "02:15"),
    tuple(Tile(label, status) for label, status in zip(("S", "M", "L", "XL", "XXL"), TILE_STATUSES)),
)


@pytest.mark.parametrize("size", [(1280, 720), (640, 360), (320, 180)])
def test_composite_pixels_at_every_size(size: tuple[int, int]) -> None:
    width, height = size
    frame = grey_frame(width, height)
    before = [plane_view(frame, i).copy() for i in range(3)]
    sprite = render_sprite(SCENE, width, height)
    blend_sprite(frame, sprite)
    g = panel_geometry(width, height, True, len(SCENE.tiles), "bottom-left", 1.0)
    rgb = frame.to_ndarray(format="rgb24").astype(int)

    # Each tile shows its status colour (sampled in a corner, away from the label).
    for i, status in enumerate(TILE_STATUSES[:-1]):
        x0, y0 = tile_origin(g, i)
        patch = rgb[y0 + 1 : y0 + 3, x0 + 1 : x0 + 3].reshape(-1, 3).mean(axis=0)
        assert np.abs(patch - STATUS_RGB[status]).max() < 24, (size, status, patch)
    # The card's dark panel replaced the grey.
    card_patch = rgb[g.y + 2 : g.y + 4, g.x + g.width // 2 - 2 : g.x + g.width // 2]
    assert card_patch.mean() < 60

    # Outside the sprite's box nothing changed, bit for bit.
    for i, original in enumerate(before):
        after = plane_view(frame, i)
        scale = 1 if i == 0 else 2
        mask = np.ones(original.shape, bool)
        y, x = sprite.y // scale, sprite.x // scale
        mask[y : y + sprite.height // scale, x : x + sprite.width // scale] = False
        assert np.array_equal(after[mask], original[mask])


def test_compositor_renders_once_per_change_and_size() -> None:
    compositor = Compositor()
    assert compositor.apply(grey_frame(320, 180)) is not None and compositor.renders == 0  # no scene
    assert compositor.set_scene(SCENE)
    assert not compositor.set_scene(OverlayScene(SCENE.card, SCENE.tiles))  # equal scene: no change
    source = grey_frame(640, 360)
    source_luma = plane_view(source, 0).copy()
    for _ in range(5):
        out = compositor.apply(source)
        compositor.apply(grey_frame(320, 180))
    assert compositor.renders == 2  # one per output size, not per frame
    assert out is not source and np.array_equal(plane_view(source, 0), source_luma)  # source untouched
    compositor.set_scene(OverlayScene(Card("Hoodie", "$19.99", None, "Only 86 left", "low", None), SCENE.tiles))
    compositor.apply(source)
    assert compositor.renders == 3
    owned = copy_frame(source)
    assert compositor.apply(owned, owned=True) is owned


def ink(text: str, script: str, size: int = 32) -> np.ndarray:
    image = Image.new("L", (size * len(text) + 20, size * 2), 0)
    ImageDraw.Draw(image).text((4, 4), text, font=font(script, size), fill=255)
    return np.asarray(image) > 0


@pytest.mark.parametrize(
    "text, script",
    [("连帽衫", "cjk"), ("パーカー", "cjk"), ("후드티", "cjk"), ("حقيبة يد", "arabic"), ("เสื้อยืด", "thai"), ("Größe", "latin")],
)
def test_non_latin_text_renders_glyphs_not_tofu(text: str, script: str) -> None:
    glyphs = ink(text, script)
    assert glyphs.sum() > 50  # not blank
    tofu = ink("\ue000" * len(text), script)  # a private-use code point: the font's missing-glyph box
    assert not np.array_equal(glyphs, tofu)
    # The glyphs differ from one another (tofu boxes would all be the same shape).
    if script != "arabic":  # Arabic letters join, so they cannot be cut apart this simply
        first, second = ink(text[0], script), ink(text[1], script)
        assert not np.array_equal(first, second)


def test_script_runs() -> None:
    assert split_runs("Hoodie 连帽衫 XL") == [("latin", "Hoodie "), ("cjk", "连帽衫 "), ("latin", "XL")]
    assert split_runs("เสื้อ Tee") == [("thai", "เสื้อ "), ("latin", "Tee")]
    assert visual_runs("حقيبة Bag") == [("latin", "Bag"), ("arabic", "حقيبة ")]
    assert split_runs("42") == [("latin", "42")]


def test_few_variants_get_normal_sized_tiles() -> None:
    one = panel_geometry(640, 360, True, 1, "bottom-left", 1.0)
    four = panel_geometry(640, 360, True, 4, "bottom-left", 1.0)
    assert (one.tile_width, one.tile_height, one.height) == (four.tile_width, four.tile_height, four.height)
