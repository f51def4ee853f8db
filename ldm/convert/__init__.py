"""Hugging Face diffusers folders <-> this project's checkpoints (:mod:`ldm.convert.diffusers`); diffusers is never imported."""
