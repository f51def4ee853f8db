"""Converters between this project's checkpoints and Hugging Face diffusers folders (:mod:`ldm.convert.diffusers`:
unconditional LDMs and Stable Diffusion v1).  None of them imports diffusers: a folder is read from its JSON and weight
files only.
"""
