"""Blend the overlay sprite into I420 frames, touching only the sprite's bounding box.

Runs in the encoder thread. Frames from a decoder may share buffers with the decoder's reference
frames, so a frame is copied before it is written to (unless the caller owns it already).
"""

from __future__ import annotations

import threading

import av
import numpy as np

from relay.frames import copy_frame, plane_view, to_i420

from .render import Sprite, render_layers
from .scene import OverlayScene, PkScene

Scene = OverlayScene | PkScene


def _blend(plane: np.ndarray, pre: np.ndarray, inv: np.ndarray, scratch: np.ndarray) -> None:
    np.multiply(plane, inv, out=scratch)
    scratch += pre
    scratch >>= 8
    plane[...] = scratch


def blend_sprite(frame: av.VideoFrame, sprite: Sprite) -> None:
    """Blend in place; ``frame`` must be yuv420p and writable by us."""
    x, y, w, h = sprite.x, sprite.y, sprite.width, sprite.height
    luma = plane_view(frame, 0)[y : y + h, x : x + w]
    _blend(luma, sprite.y_pre, sprite.y_inv, np.empty((h, w), np.uint16))
    scratch = np.empty((h // 2, w // 2), np.uint16)
    cx, cy = x // 2, y // 2
    _blend(plane_view(frame, 1)[cy : cy + h // 2, cx : cx + w // 2], sprite.u_pre, sprite.uv_inv, scratch)
    _blend(plane_view(frame, 2)[cy : cy + h // 2, cx : cx + w // 2], sprite.v_pre, sprite.uv_inv, scratch)


class Compositor:
    """Holds the scene to show; renders a sprite per output size only when the scene changes."""

    def __init__(self) -> None:
        self._scene: Scene | None = None
        self._sprites: dict[tuple[int, int], tuple[Scene, list[Sprite]]] = {}
        self._lock = threading.Lock()
        self.renders = 0
        self.scene_version = 0

    def set_scene(self, scene: Scene | None) -> bool:
        """Called from the event loop; returns whether the picture will change."""
        with self._lock:
            if scene == self._scene:
                return False
            self._scene = scene
            self.scene_version += 1
            return True

    @property
    def scene(self) -> Scene | None:
        return self._scene

    def sprites_for(self, width: int, height: int) -> list[Sprite]:
        scene = self._scene
        if scene is None:
            return []
        cached = self._sprites.get((width, height))
        if cached is not None and cached[0] == scene:
            return cached[1]
        sprites = render_layers(scene, width, height)
        self._sprites[(width, height)] = (scene, sprites)
        self.renders += 1
        return sprites

    def apply(self, frame: av.VideoFrame, owned: bool = False) -> av.VideoFrame:
        """The frame with the overlay on it (a copy unless ``owned``), or the frame itself if none."""
        sprites = self.sprites_for(frame.width, frame.height)
        if not sprites:
            return frame
        if frame.format.name != "yuv420p":
            frame, owned = to_i420(frame), True
        if not owned:
            frame = copy_frame(frame)
        for sprite in sprites:
            blend_sprite(frame, sprite)
        return frame
