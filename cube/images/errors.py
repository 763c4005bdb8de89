"""Errors of the image builder."""

from __future__ import annotations

__all__ = ["ImageError"]


class ImageError(Exception):
    """An image could not be built; the message says which step failed and why."""
