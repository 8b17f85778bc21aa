"""Rasterise an overlay scene into a sprite for one output size.

The sprite is drawn in RGBA with Pillow, once per (scene, size), and converted straight away into
what blending needs per frame: premultiplied I420 planes and inverse alpha, so a frame never goes
through RGB. Drawing happens at the output size itself (not scaled down), so text stays crisp on the
smallest rung.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

from relay.frames import even

from .fonts import font, visual_runs
from .scene import Card, OverlayScene, PkBar, PkScene, Tile

# Status colours (RGB): plenty green, low amber, critical red, sold out grey, syncing blue-grey.
STATUS_RGB = {
    "plenty": (46, 160, 67),
    "low": (240, 160, 20),
    "critical": (220, 40, 40),
    "sold_out": (110, 110, 110),
    "syncing": (70, 90, 120),
}
PANEL_RGBA = (16, 20, 28, 215)
TEXT_RGB = (255, 255, 255)


def _even(value: float) -> int:
    return even(value, minimum=0)


@dataclass(frozen=True)
class Geometry:
    """Where the overlay panel sits in a frame, and the sizes inside it (all even, in pixels)."""

    x: int
    y: int
    width: int
    height: int
    card_height: int
    columns: int
    rows: int
    tile_width: int
    tile_height: int
    gap: int


def panel_geometry(frame_w: int, frame_h: int, has_card: bool, tiles: int, position: str, scale: float) -> Geometry:
    # Small rungs get a relatively larger panel so the text stays readable after scaling on screen.
    fraction = 0.30 if frame_w >= 1280 else 0.36 if frame_w >= 640 else 0.46
    width = _even(min(frame_w * 0.9, max(140, frame_w * fraction * scale)))
    gap = max(2, _even(width * 0.025))
    card_height = _even(width * 0.40) if has_card else 0
    columns = min(tiles, 6) if tiles else 0
    rows = math.ceil(tiles / columns) if columns else 0
    slots = max(columns, 4)  # one or two variants get normal-sized tiles, not giant ones
    tile_width = (width - (slots + 1) * gap) // slots if columns else 0
    tile_height = _even(tile_width * 0.62) if columns else 0
    badge_height = rows * (tile_height + gap) + gap if rows else 0
    height = min(frame_h - 2, card_height + badge_height)
    margin = _even(max(4, frame_h * 0.03))
    x = margin if position == "bottom-left" else frame_w - margin - width
    y = margin if position == "top-right" else frame_h - margin - height
    return Geometry(max(0, x), max(0, _even(y)), width, _even(height), card_height, columns, rows, tile_width, tile_height, gap)


def tile_origin(g: Geometry, index: int) -> tuple[int, int]:
    """Top-left corner of badge tile ``index`` in frame coordinates."""
    row, col = divmod(index, g.columns)
    return g.x + g.gap + col * (g.tile_width + g.gap), g.y + g.card_height + g.gap + row * (g.tile_height + g.gap)


def _fit(text: str, size: int, max_width: int, bold: bool) -> tuple[str, int]:
    """Shrink the font (down to 70 %), then ellipsise, until the text fits."""
    for candidate in (size, int(size * 0.85), int(size * 0.7)):
        if text_width(text, candidate, bold) <= max_width:
            return text, candidate
    size = int(size * 0.7)
    while len(text) > 1 and text_width(text + "…", size, bold) > max_width:
        text = text[:-1]
    return text.rstrip() + "…", size


def text_width(text: str, size: int, bold: bool = False) -> float:
    return sum(font(script, size, bold).getlength(run) for script, run in visual_runs(text))


def draw_text(draw: ImageDraw.ImageDraw, xy: tuple[float, float], text: str, size: int, fill: tuple[int, ...], bold: bool = False) -> float:
    """Draw mixed-script text run by run; returns the x after the text."""
    x, y = xy
    for script, run in visual_runs(text):
        face = font(script, size, bold)
        direction = "rtl" if script == "arabic" else None
        draw.text((x, y), run, font=face, fill=fill, direction=direction)
        x += face.getlength(run, direction=direction)
    return x


def _draw_card(draw: ImageDraw.ImageDraw, card: Card, g: Geometry) -> None:
    w, h = g.width, g.card_height
    pad = max(3, int(w * 0.04))
    draw.rounded_rectangle((0, 0, w - 1, h - 1), radius=max(2, int(w * 0.03)), fill=PANEL_RGBA)
    line = (h - 2 * pad) / 3
    timer_w = 0
    if card.timer:
        timer_size = int(line * 0.8)
        timer_w = int(text_width(card.timer, timer_size, True) + pad)
        tx = w - pad - timer_w
        draw.rounded_rectangle((tx, pad, w - pad, pad + line), radius=3, fill=(200, 30, 30, 255))
        draw_text(draw, (tx + pad / 2, pad + line * 0.02), card.timer, timer_size, TEXT_RGB, True)
    name, size = _fit(card.name, int(line * 0.78), w - 2 * pad - timer_w - (pad if timer_w else 0), True)
    draw_text(draw, (pad, pad), name, size, TEXT_RGB, True)
    price_y = pad + line
    end = draw_text(draw, (pad, price_y), card.price, int(line * 0.78), (255, 214, 64), True)
    if card.was_price:
        was_size = int(line * 0.55)
        start = end + pad
        stop = draw_text(draw, (start, price_y + line * 0.2), card.was_price, was_size, (170, 170, 170))
        mid = price_y + line * 0.2 + was_size * 0.62
        draw.line((start, mid, stop, mid), fill=(170, 170, 170, 255), width=max(1, was_size // 10))
    colour = STATUS_RGB.get(card.status, STATUS_RGB["syncing"])
    head_y = pad + 2 * line
    draw.rounded_rectangle((pad, head_y, w - pad, h - pad), radius=3, fill=colour + (255,))
    text, size = _fit(card.headline, int(line * 0.72), w - 3 * pad, True)
    draw_text(draw, (pad * 1.5, head_y + line * 0.04), text, size, TEXT_RGB, True)


def _tile_image(tile: Tile, width: int, height: int) -> Image.Image:
    colour = STATUS_RGB.get(tile.status, STATUS_RGB["syncing"])
    image = Image.new("RGBA", (width, height), colour + (255,))
    draw = ImageDraw.Draw(image)
    if tile.status == "syncing":  # hatched: "we don't know right now", never a colour that could lie
        step = max(4, width // 5)
        for offset in range(-height, width, step):
            draw.line((offset, height, offset + height, 0), fill=(120, 135, 160, 255), width=max(1, step // 4))
    label, size = _fit(tile.label, int(height * 0.58), width - 4, True)
    tw = text_width(label, size, True)
    draw_text(draw, ((width - tw) / 2, (height - size * 1.36) / 2), label, size, TEXT_RGB, True)
    return image


def rasterise(scene: OverlayScene, g: Geometry) -> np.ndarray:
    """RGBA pixels (height, width, 4) of the panel."""
    image = Image.new("RGBA", (g.width, g.height), (0, 0, 0, 0))
    draw = ImageDraw.Draw(image)
    if scene.card is not None and g.card_height:
        card_image = Image.new("RGBA", (g.width, g.card_height), (0, 0, 0, 0))
        _draw_card(ImageDraw.Draw(card_image), scene.card, g)
        image.alpha_composite(card_image)
    if scene.tiles:
        top = g.card_height
        draw.rectangle((0, top, g.width - 1, g.height - 1), fill=PANEL_RGBA)
        for i, tile in enumerate(scene.tiles):
            x0, y0 = tile_origin(g, i)
            image.alpha_composite(_tile_image(tile, g.tile_width, g.tile_height), (x0 - g.x, y0 - g.y))
    return np.asarray(image)


@dataclass(frozen=True)
class Sprite:
    """A panel ready to blend into I420 frames of one size: out = (plane * inv + pre) >> 8."""

    x: int
    y: int
    width: int
    height: int
    y_pre: np.ndarray  # uint16 (h, w): luma * alpha
    y_inv: np.ndarray  # uint16 (h, w): 256 - alpha
    u_pre: np.ndarray  # uint16 (h/2, w/2)
    v_pre: np.ndarray
    uv_inv: np.ndarray


def rgba_to_sprite(rgba: np.ndarray, x: int, y: int) -> Sprite:
    """BT.601 limited range (what FFmpeg's swscale uses for yuv420p), premultiplied by alpha."""
    height, width = rgba.shape[:2]
    rgb = rgba[..., :3].astype(np.float32)
    alpha = rgba[..., 3].astype(np.float32)
    a256 = alpha * (256.0 / 255.0)
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    luma = 16 + (65.481 * r + 128.553 * g + 24.966 * b) / 255
    cb = 128 + (-37.797 * r - 74.203 * g + 112.0 * b) / 255
    cr = 128 + (112.0 * r - 93.786 * g - 18.214 * b) / 255

    def half(plane: np.ndarray) -> np.ndarray:
        return plane.reshape(height // 2, 2, width // 2, 2).mean(axis=(1, 3))

    a_half = half(a256)
    return Sprite(
        x,
        y,
        width,
        height,
        y_pre=np.rint(luma * a256).astype(np.uint16),
        y_inv=np.rint(256 - a256).astype(np.uint16),
        u_pre=np.rint(half(cb * a256)).astype(np.uint16),
        v_pre=np.rint(half(cr * a256)).astype(np.uint16),
        uv_inv=np.rint(256 - a_half).astype(np.uint16),
    )


def render_sprite(scene: OverlayScene, frame_w: int, frame_h: int) -> Sprite:
    g = panel_geometry(frame_w, frame_h, scene.card is not None, len(scene.tiles), scene.position, scene.scale)
    return rgba_to_sprite(rasterise(scene, g), g.x, g.y)


PK_LEFT_RGBA = (40, 110, 220, 235)
PK_RIGHT_RGBA = (215, 45, 60, 235)


def render_pk_bar(bar: PkBar, frame_w: int, frame_h: int) -> Sprite:
    """Both names and scores across the top, the round timer in the middle."""
    height = max(24, _even(frame_h * 0.09))
    image = Image.new("RGBA", (frame_w, height), (0, 0, 0, 0))
    draw = ImageDraw.Draw(image)
    half = frame_w // 2
    draw.rectangle((0, 0, half - 1, height - 1), fill=PK_LEFT_RGBA)
    draw.rectangle((half, 0, frame_w - 1, height - 1), fill=PK_RIGHT_RGBA)
    size = int(height * 0.55)
    pad = max(4, height // 4)
    left = f"{bar.left_label}  {bar.left_score}"
    right = f"{bar.right_score}  {bar.right_label}"
    text, fitted = _fit(left, size, half - 3 * pad - height, True)
    draw_text(draw, (pad, (height - fitted * 1.36) / 2), text, fitted, TEXT_RGB, True)
    text, fitted = _fit(right, size, half - 3 * pad - height, True)
    draw_text(draw, (frame_w - pad - text_width(text, fitted, True), (height - fitted * 1.36) / 2), text, fitted, TEXT_RGB, True)
    if bar.timer:
        tw = text_width(bar.timer, size, True) + 2 * pad
        draw.rounded_rectangle((half - tw / 2, 0, half + tw / 2, height - 1), radius=4, fill=(16, 20, 28, 255))
        draw_text(draw, (half - tw / 2 + pad, (height - size * 1.36) / 2), bar.timer, size, TEXT_RGB, True)
    return rgba_to_sprite(np.asarray(image), 0, 0)


def render_banner(text: str, frame_w: int, frame_h: int) -> Sprite:
    """The result of a round, large, in the middle of the picture."""
    size = max(14, int(frame_h * 0.09))
    width = min(frame_w - 4, _even(text_width(text, size, True) + size * 1.5))
    height = _even(size * 2)
    image = Image.new("RGBA", (width, height), (16, 20, 28, 225))
    draw = ImageDraw.Draw(image)
    text, fitted = _fit(text, size, width - size, True)
    draw_text(draw, ((width - text_width(text, fitted, True)) / 2, (height - fitted * 1.36) / 2), text, fitted, (255, 214, 64), True)
    return rgba_to_sprite(np.asarray(image), _even((frame_w - width) / 2), _even((frame_h - height) / 2))


def render_layers(scene: OverlayScene | PkScene, frame_w: int, frame_h: int) -> list[Sprite]:
    """Every sprite a scene puts on a frame of this size (rendered at this size, not scaled)."""
    if isinstance(scene, OverlayScene):
        return [render_sprite(scene, frame_w, frame_h)]
    sprites = [render_pk_bar(scene.bar, frame_w, frame_h)]
    for side in (scene.left, scene.right):
        if side is not None:
            sprites.append(render_sprite(side, frame_w, frame_h))
    if scene.bar.banner:
        sprites.append(render_banner(scene.bar.banner, frame_w, frame_h))
    return sprites
