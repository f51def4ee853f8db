"""Image I/O: loading any common file, ``[-1, 1]`` model tensors, padding, atomic saving with metadata, input discovery.
Errors are one line naming the path and the cause, so a batch can report a bad file and go on."""

from ldm.imageio.convert import (
    PAD_MODES,
    crop_padding,
    from_uint8,
    image_to_tensor,
    pad_to_multiple,
    side_by_side,
    tensor_to_image,
    to_uint8,
)
from ldm.imageio.errors import ImageLoadError, ImageSaveError, format_path
from ldm.imageio.find import find_images, is_image_name
from ldm.imageio.load import LOADER_FORMATS, LoadedImage, decode_image, from_pil, header_size, load_image
from ldm.imageio.save import read_image_metadata, read_png_metadata, save_image_atomic

__all__ = [
    "LOADER_FORMATS",
    "PAD_MODES",
    "ImageLoadError",
    "ImageSaveError",
    "LoadedImage",
    "crop_padding",
    "decode_image",
    "find_images",
    "format_path",
    "from_pil",
    "header_size",
    "image_to_tensor",
    "is_image_name",
    "load_image",
    "pad_to_multiple",
    "read_image_metadata",
    "read_png_metadata",
    "save_image_atomic",
    "side_by_side",
    "tensor_to_image",
    "to_uint8",
    "from_uint8",
]
