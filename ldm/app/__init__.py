"""A local web page for refining one image at a time: upload, paint the region, pick the start, compare before/after.

    python scripts/app.py --ckpt demo     # the shipped demo experts; then open http://127.0.0.1:7860

Modules: :mod:`ldm.app.handlers` (what a request does, as plain functions: the same :class:`~ldm.refine.Refiner` calls,
loader and metadata as ``scripts/refine.py``), :mod:`ldm.app.jobs` (one worker thread per device: requests run one at
a time), :mod:`ldm.app.server` (the Starlette application: the page and its JSON API), :mod:`ldm.app.page` (the start
slider's range from the experts' windows; errors in the page's words), ``static/`` (the page: plain HTML, CSS and
JavaScript served from the installed package; nothing is fetched from anywhere else).

Needs the ``app`` extra (``pip install -e .[app]``: Starlette and uvicorn); the rest of ``ldm`` does not import it.
"""
