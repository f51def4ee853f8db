"""Converters between this project's checkpoints and Hugging Face diffusers folders (:mod:`ldm.convert.diffusers`:
unconditional LDMs and Stable Diffusion v1), reading a folder's JSON and weight files only (diffusers is not imported).
"""
