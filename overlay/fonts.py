"""Open fonts for on-air text in any script, and splitting text into runs per font.

Pillow has no per-glyph font fallback, so text is cut into runs by script and each run is drawn
with a Noto font that covers it; raqm (bundled with Pillow's wheels) shapes Arabic and Thai.
"""

from __future__ import annotations

import importlib
from functools import lru_cache
from pathlib import Path

from PIL import ImageFont

SCRIPTS = ("latin", "arabic", "thai", "cjk")


def _font_file(module: str, pattern: str) -> Path:
    root = Path(importlib.import_module(module).__file__).resolve().parent  # type: ignore[arg-type]
    matches = sorted(p for p in root.rglob(pattern) if "Italic" not in p.name)
    if not matches:
        raise FileNotFoundError(f"no font matching {pattern} in {module}")
    return matches[0]


@lru_cache(maxsize=None)
def font_path(script: str) -> Path:
    return {
        "latin": lambda: _font_file("fontpkg_noto_sans", "NotoSans*.ttf"),
        "arabic": lambda: _font_file("fontpkg_noto_sans_arabic", "NotoSansArabic*.ttf"),
        "thai": lambda: _font_file("fontpkg_noto_sans_thai", "NotoSansThai*.ttf"),
        "cjk": lambda: _font_file("cvttf_NotoSansCJK_Regular", "*.otf"),
    }[script]()


@lru_cache(maxsize=128)
def font(script: str, size: int, bold: bool = False) -> ImageFont.FreeTypeFont:
    face = ImageFont.truetype(str(font_path(script)), size)
    if script != "cjk":  # variable Noto fonts: axes (weight, width); set both, FreeType's default is thin
        face.set_variation_by_axes([700 if bold else 500, 100])
    return face


def script_of(char: str) -> str | None:
    """The script a character needs, or None for neutral characters (spaces, digits, punctuation)."""
    code = ord(char)
    if 0x0600 <= code <= 0x06FF or 0x0750 <= code <= 0x077F or 0xFB50 <= code <= 0xFDFF or 0xFE70 <= code <= 0xFEFF:
        return "arabic"
    if 0x0E00 <= code <= 0x0E7F:
        return "thai"
    if (
        0x2E80 <= code <= 0x9FFF
        or 0xAC00 <= code <= 0xD7AF
        or 0xF900 <= code <= 0xFAFF
        or 0xFF00 <= code <= 0xFFEF
        or 0x20000 <= code <= 0x2FFFF
    ):
        return "cjk"
    if char.isalpha():
        return "latin"
    return None


def split_runs(text: str) -> list[tuple[str, str]]:
    """[(script, text)] with neutral characters attached to the run they sit in."""
    runs: list[tuple[str, str]] = []
    current: str | None = None
    buffer = ""
    for char in text:
        script = script_of(char)
        if script is None or script == current or current is None:
            if current is None and script is not None:
                current = script
            buffer += char
            continue
        runs.append((current, buffer))
        current, buffer = script, char
    if buffer:
        runs.append((current or "latin", buffer))
    return runs


def visual_runs(text: str) -> list[tuple[str, str]]:
    """Runs in drawing order: a right-to-left paragraph (first strong character Arabic) reverses them."""
    runs = split_runs(text)
    first_strong = next((script_of(c) for c in text if script_of(c) is not None), None)
    return runs[::-1] if first_strong == "arabic" else runs
