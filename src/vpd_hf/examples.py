"""Example data shipped with the package."""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path

from PIL import Image


def example_image_path() -> Path:
    """Path of the bundled CC0 photo (a coffee cup on a table, 600x400); see `assets/README.md`."""
    return Path(str(files("vpd_hf") / "assets" / "coffee.jpg"))


def load_example_image() -> Image.Image:
    """The bundled photo as an RGB PIL image."""
    with Image.open(example_image_path()) as image:
        return image.convert("RGB")


__all__ = ["example_image_path", "load_example_image"]
