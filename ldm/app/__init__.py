"""A local web page for refining one image at a time (``python scripts/app.py --ckpt demo``): upload, paint the region,
pick the start, compare before/after.  ``static/`` holds the page (plain HTML, CSS and JavaScript; nothing is fetched
from anywhere else).  Needs the ``app`` extra (Starlette and uvicorn); the rest of ``ldm`` does not import it.
"""
