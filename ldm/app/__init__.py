"""A local web page for refining one image at a time (``python scripts/app.py --ckpt demo``); ``static/`` holds the page.
Needs the ``app`` extra (Starlette and uvicorn); the rest of ``ldm`` does not import it."""
