"""Converters between this project's checkpoints and other formats.

:mod:`ldm.convert.diffusers` reads and writes Hugging Face diffusers LDM folders (``UNet2DModel`` + ``VQModel`` +
a DDIM/DDPM scheduler config); its parts are :mod:`~ldm.convert.from_diffusers` (folder -> checkpoint and expert),
:mod:`~ldm.convert.folder` (reading an untrusted folder), :mod:`~ldm.convert.unet_map` and :mod:`~ldm.convert.vq_map`
(the config and key maps of the two networks), :mod:`~ldm.convert.schedule` (the noise schedule) and
:mod:`~ldm.convert.common` (shared checks and tensor maps).
None of them imports diffusers: reading a folder needs only its JSON and weight files.
"""
