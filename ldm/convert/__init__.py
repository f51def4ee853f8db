"""Converters between this project's checkpoints and other formats.

:mod:`ldm.convert.diffusers` reads and writes Hugging Face diffusers LDM folders (``UNet2DModel`` + ``VQModel`` +
a DDIM/DDPM scheduler config); its parts are :mod:`~ldm.convert.from_diffusers` (folder -> checkpoint and expert),
:mod:`~ldm.convert.folder` (reading an untrusted folder), :mod:`~ldm.convert.unet_map` and :mod:`~ldm.convert.vq_map`
(the config and key maps of the two networks), :mod:`~ldm.convert.schedule` (the noise schedule) and
:mod:`~ldm.convert.common` (shared checks and tensor maps).  Stable Diffusion v1 folders (``UNet2DConditionModel`` +
``AutoencoderKL`` + ``CLIPTextModel``/``CLIPTokenizer``) are read by :mod:`~ldm.convert.from_sd` (their maps:
:mod:`~ldm.convert.sd_map`) and written by :func:`ldm.convert.diffusers.export_sd_diffusers`;
:mod:`~ldm.convert.importing` holds the import steps both kinds share.
None of them imports diffusers: reading a folder needs only its JSON and weight files.
"""
