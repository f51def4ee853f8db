"""Retake docs/app_screenshot.png: the web app (scripts/app.py --ckpt demo, the shipped demo experts) in headless
Chromium, driven over the DevTools protocol as the browser tests drive it (tests/app_support.py).

The state shown: a 128 px crop of scikit-image's ``chelsea`` with a disc of paint on the cat's forehead (the artifact)
uploaded, the disc brushed over, the start slider at ``--start-t``, one refined sample, and the before/after divider
dragged across the disc.  Nothing is downloaded (the server refuses every non-loopback connection).  Needs Chromium
(Debian: ``apt-get install chromium``) and the app extra (``pip install -e '.[app]'``)::

    .venv/bin/python docs/make_screenshot.py                    # writes docs/app_screenshot.png
"""

from __future__ import annotations

import argparse
import base64
import io
import logging
import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))  # tests/app_support.py: the server and browser helpers of the app's tests

from app_support import CHROMIUM, RECT, UPLOAD_MSG, DevTools, start_server  # noqa: E402

LOG = logging.getLogger("make_screenshot")
WIDTH = 1280  # px, the viewport; its height follows the page


# the artifact to fix: a saturated disc of paint (as ldm.eval's local_paint), centre and radius in units of the side
DISC = (0.52, 0.30, 0.09)
PAINT = np.array([225.0, 40.0, 200.0])  # RGB


def photo(size: int) -> bytes:
    """A ``size`` x ``size`` PNG of the cat's face in scikit-image's ``chelsea`` (a 300 px square, resized) with a
    disc of paint on its forehead (:data:`DISC`, soft-edged over 1.5 px)."""
    from skimage import data

    crop = data.chelsea()[:, 60:360]  # [300, 300, 3] uint8
    pixels = np.asarray(Image.fromarray(crop).resize((size, size), Image.LANCZOS), dtype=np.float64)
    cx, cy, radius = (v * size for v in DISC)
    yy, xx = np.mgrid[:size, :size] + 0.5
    cover = np.clip((radius - np.hypot(xx - cx, yy - cy)) / 1.5 + 0.5, 0.0, 1.0)[..., None]
    image = Image.fromarray(np.round(pixels * (1 - cover) + PAINT * cover).astype(np.uint8))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def set_value(browser: DevTools, element: str, value: object) -> None:
    """Set an input's value as a user would (an ``input`` event follows)."""
    browser.js(f"(e => {{ e.value = {value!r}; e.dispatchEvent(new Event('input')); e.dispatchEvent(new Event('change')); }})"
               f"(document.getElementById('{element}'))")  # fmt: skip


def take(out: Path, start_t: int, size: int, split: float, brush: int) -> None:
    if CHROMIUM is None:
        raise SystemExit("make_screenshot.py: no chromium on PATH (Debian: apt-get install chromium)")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        (root / "chelsea.png").write_bytes(photo(size))
        (root / "app").mkdir()
        with start_server(["demo"], root / "app", outdir="outputs/app") as server:
            LOG.info("serving the demo experts on %s", server.url)
            browser = DevTools(root / "profile", WIDTH, 900)
            try:
                browser.send("Page.navigate", {"url": server.url + "/"})
                browser.wait_for("document.body && document.body.dataset.ready === '1'")
                document = browser.send("DOM.getDocument")["root"]["nodeId"]
                file_input = browser.send("DOM.querySelector", {"nodeId": document, "selector": "#file"})["nodeId"]
                browser.send("DOM.setFileInputFiles", {"files": [str(root / "chelsea.png")], "nodeId": file_input})
                browser.wait_for(f"{UPLOAD_MSG}.textContent.includes('×')")

                # brush strokes over the disc and a little around it (viewport pixels of the canvas)
                set_value(browser, "brush-size", brush)
                x, y, w, h = browser.js(RECT.format("view"))
                cx, cy, radius = DISC
                for ring in (0.35, 0.9):
                    turn = [2 * np.pi * k / 16 for k in range(17)]
                    browser.drag([(x + (cx + ring * radius * np.cos(a)) * w, y + (cy + ring * radius * np.sin(a)) * h)
                                  for a in turn])  # fmt: skip
                set_value(browser, "start", start_t)
                browser.wait_for(f"document.getElementById('plan-label').textContent.includes('{start_t}') || "
                                 "document.getElementById('plan-label').textContent.includes('t=')")  # fmt: skip
                browser.wait_for("!document.getElementById('refine').disabled")
                browser.js("document.getElementById('refine').click()")
                browser.wait_for("document.body.dataset.results === '1' && "
                                 "document.querySelector('.compare img.after').complete", timeout=300)  # fmt: skip

                # the whole page in the viewport, then the divider dragged part-way, as a person compares
                height = 0
                for _ in range(10):  # the viewport as tall as the page (which reflows once the results are laid out)
                    browser.js("new Promise(r => requestAnimationFrame(() => requestAnimationFrame(r)))")
                    page = int(browser.js("Math.ceil(document.documentElement.scrollHeight)"))
                    LOG.info("page height %d px", page)
                    if page == height:
                        break
                    height = page
                    browser.send("Emulation.setDeviceMetricsOverride", {"width": WIDTH, "height": height,
                                                                        "deviceScaleFactor": 1, "mobile": False})  # fmt: skip
                cx, cy, cw, ch = browser.js("(r => [r.left, r.top, r.width, r.height])"
                                            "(document.querySelector('.compare').getBoundingClientRect())")  # fmt: skip
                browser.drag([(cx + cw * (0.5 + (split - 0.5) * k / 8), cy + ch / 2) for k in range(9)])
                browser.js("document.activeElement && document.activeElement.blur()")  # no focus ring in the picture
                browser.js("new Promise(r => requestAnimationFrame(() => requestAnimationFrame(r)))")
                shot = base64.b64decode(browser.send("Page.captureScreenshot", {"format": "png"})["data"])
            finally:
                browser.close()
    image = Image.open(io.BytesIO(shot)).convert("RGB")
    # a palette of 256 colours: the page is flat colours and two small photos, so it loses nothing visible
    image = image.quantize(colors=256, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE)
    out.parent.mkdir(parents=True, exist_ok=True)
    image.save(out, optimize=True)
    LOG.info("wrote %s: %dx%d, %d KB", out, image.width, image.height, out.stat().st_size // 1024)
    if np.asarray(image).std() < 5:
        raise SystemExit(f"make_screenshot.py: {out} looks blank")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "app_screenshot.png", help="PNG to write")
    parser.add_argument("--start-t", type=int, default=300, help="the start slider's position (default: 300)")
    parser.add_argument("--size", type=int, default=128, help="side of the uploaded photo in pixels (default: 128)")
    parser.add_argument("--brush", type=int, default=14, help="brush size in image pixels (default: 14)")
    parser.add_argument("--split", type=float, default=0.5, help="where the divider is dragged, 0-1 (default: 0.5)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    take(args.out, args.start_t, args.size, args.split, args.brush)
    return 0


if __name__ == "__main__":
    sys.exit(main())
