"""Guest images: a bootable kernel + initramfs with Python and the ``guest`` agent.

``build_image`` (or ``ensure_image`` from trio) returns a cached ``Image`` for an ``ImageSpec``,
building it when an input changed; ``build_uefi_disk`` derives the raw UEFI disk bhyve boots;
``main`` is ``cube image build``. docs/vm.md describes the layout and the steps.
"""

from cube.images.build import (
    DEFAULT_STATE_DIR,
    Image,
    ImageSpec,
    Progress,
    build_image,
    ensure_image,
    image_key,
    load_image,
    main,
    prune_images,
)
from cube.images.errors import ImageError
from cube.images.uefi_disk import build_uefi_disk

__all__ = [
    "DEFAULT_STATE_DIR",
    "Image",
    "ImageError",
    "ImageSpec",
    "Progress",
    "build_image",
    "build_uefi_disk",
    "ensure_image",
    "image_key",
    "load_image",
    "main",
    "prune_images",
]
