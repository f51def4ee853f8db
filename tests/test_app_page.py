"""ldm/app/page.py and the page itself (ldm/app/static): the start slider's range and default from the experts'
windows, messages in the page's words, a label on every control; and the page in headless Chromium against the shared
server (tests/conftest.py's ``app_server``): upload, paint, box tool, refine, and the before/after divider dragged by
mouse, pen, touch and keys.  The browser tests skip, saying why, where Chromium is not installed."""

from __future__ import annotations

import base64
import io
from html.parser import HTMLParser
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

from app_support import (
    CHROMIUM,
    CLI_WORDS,
    NO_CHROMIUM,
    RECT,
    STATIC,
    UPLOAD_MSG,
    DevTools,
    dotted_mask,
    png_bytes,
    small_image,
)

pytest.importorskip("starlette", reason="the web app needs the app extra: pip install -e .[app]")
pytest.importorskip("uvicorn", reason="the web app needs the app extra: pip install -e .[app]")

from ldm.app.handlers import RefineSettings, RequestError, describe_plan, load_painted_mask, load_upload, prepare  # noqa: E402
from ldm.app.page import FIELD_LABELS, page_words, start_range, window_message  # noqa: E402


# ------------------------------------------------------------------------------------- the page's limits and words
def fake_refiner(*windows: tuple[int, int], allow: bool = False, total: int = 1000) -> SimpleNamespace:
    experts = [SimpleNamespace(window=(lo, hi), name=f"e{lo}_{hi}.ckpt") for lo, hi in windows]
    return SimpleNamespace(num_timesteps=total, experts=experts, router=SimpleNamespace(allow_outside_window=allow))


@pytest.mark.parametrize(
    "windows, allow, expected",
    [
        (((250, 500), (0, 250)), False, (1, 499, 125, True)),  # the quick start's experts: t < 500, details' middle
        (((0, 1000),), False, (1, 999, 250, True)),  # one full-range model: at most a quarter of the noise redone
        (((0, 250), (300, 500)), False, (1, 249, 125, True)),  # a gap: above it, the steps at 250-299 are nobody's
        (((0, 40),), False, (1, 39, 20, True)),
        (((250, 500),), False, (1, 499, 250, False)),  # the last steps are nobody's: no start runs (the label says so)
        (((250, 500), (0, 250)), True, (1, 999, 125, True)),  # --allow-outside-window: the nearest expert runs
    ],
)  # fmt: skip
def test_start_slider_range_and_default_come_from_the_windows(windows, allow, expected):
    rng = start_range(fake_refiner(*windows, allow=allow))
    assert (rng.low, rng.high, rng.default, rng.covered) == expected
    assert rng.low <= rng.default <= rng.high


def test_every_message_the_page_can_get_speaks_its_words(app_refiner):
    upload = load_upload(small_image(), "photo.png")
    mask = load_painted_mask(dotted_mask(every=4), upload)
    many = load_painted_mask(dotted_mask(every=2), upload)  # 480 separate regions: more than crop mode refines
    empty = load_painted_mask(png_bytes(np.zeros((40, 48), np.uint8)), upload)
    messages = {}
    for name, (lo, hi) in {"start_t": (1, 999), "steps": (1, 1000), "n_samples": (1, 8), "mask_blur": (0, 256),
                           "mask_dilate": (0, 256), "region_padding": (0, 4096), "seed": (0, 2**32 - 1)}.items():  # fmt: skip
        for bad in (lo - 1, hi + 1, "", 1.5):
            messages[f"{name}={bad!r}"] = error_of(RefineSettings.from_json, {name: bad})
    for name in ("sampler", "step_mode", "mode"):
        messages[name] = error_of(RefineSettings.from_json, {name: "nope"})
    messages["seeds"] = error_of(RefineSettings.from_json, {"seed": 2**32 - 1, "n_samples": 2})
    for box in ("1,2,3", "5,5,2,2", "0,0,4,4@0", "0,0,60,10"):
        messages[box] = error_of(prepare_json, app_refiner, upload, {"boxes": box, "start_t": 100}, None)
    cases = {
        "start above": ({"start_t": 700}, mask), "box above": ({"start_t": 100, "boxes": "0,0,4,4@600"}, None),
        "exact > start": ({"start_t": 40, "steps": 60, "step_mode": "exact"}, mask), "empty mask": ({}, empty),
        "nothing": ({}, None), "crop regions": ({"mode": "crop", "start_t": 100}, many),
        "work": ({"n_samples": 8, "start_t": 400, "steps": 400, "step_mode": "exact", "mode": "crop"}, mask),
    }  # fmt: skip
    for name, (page, painted) in cases.items():
        messages[name] = error_of(prepare_json, app_refiner, upload, page, painted)
        plan = describe_plan(app_refiner, RefineSettings.from_json(page))
        if not plan["ok"]:
            assert plan["error"] == messages[name]  # the live label says what Refine would say
    assert messages["start above"] == "start t=700 is above the experts' range (max 499); move the slider down"
    assert messages["box above"].startswith("box 0,0,4,4@600 starts at t=600, above the experts' range (max 499)")
    assert messages["exact > start"].startswith("Steps 60: counted exactly from start t=40, at most 40 steps fit")
    assert messages["n_samples=9"] == "Samples must be a whole number from 1 to 8, not 9"
    assert "Mask dilate, under 'more'" in messages["crop regions"] and "(Mode: in place)" in messages["crop regions"]
    assert messages["empty mask"].endswith("paint over the region to refine")
    assert "leave out @start_t to use the slider's start" in messages["0,0,4,4@0"]
    for name, message in messages.items():
        assert message and "\n" not in message and not CLI_WORDS.search(message), (name, message)


def prepare_json(refiner, upload, page: dict, mask):
    return prepare(refiner, upload, RefineSettings.from_json(page), mask)


def error_of(function, *args) -> str:
    with pytest.raises(RequestError) as info:
        function(*args)
    return str(info.value)


def test_page_words_rewrites_the_refiner_s_cli_hints():
    from ldm.windows import assign_windows

    with pytest.raises(ValueError) as info:
        assign_windows([(0, 250), (250, 500)], [700, 300, 100], 1000)
    assert "--allow-outside-window" in str(info.value)  # the CLI's message names flags the page does not have ...
    assert not CLI_WORDS.search(page_words(str(info.value)))  # ... and an aside that still names one is dropped
    rng = start_range(fake_refiner((0, 250), (250, 500)))
    assert window_message(rng, 700, [], str(info.value)) == ("start t=700 is above the experts' range (max 499); move "
                                                             "the slider down")  # fmt: skip
    overlap = window_message(rng, 300, [], "... covered by more than one expert window ...")
    assert "do not overlap" in overlap and not CLI_WORDS.search(overlap)
    uncovered = window_message(start_range(fake_refiner((250, 500))), 100, [], "outside every expert window")
    assert "t 0-249" in uncovered and "no start can run" in uncovered


class _Labels(HTMLParser):
    """The page's controls and its labels' ``for`` targets (labels may also wrap their control)."""

    CONTROLS = ("input", "select", "textarea", "progress", "canvas", "button")

    def __init__(self):
        super().__init__()
        self.controls, self.targets, self.texts, self._label = [], set(), {}, None

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "label":
            self._label = attrs.get("for")
            self.targets.add(self._label)
            self.texts[self._label] = ""
        elif tag in self.CONTROLS:
            self.controls.append((tag, attrs))

    def handle_endtag(self, tag):
        if tag == "label":
            self._label = None

    def handle_data(self, data):
        if self._label is not None:
            self.texts[self._label] += data


def test_every_control_of_the_page_has_a_label():
    parser = _Labels()
    parser.feed((STATIC / "index.html").read_text())
    unlabelled = [(tag, a.get("id")) for tag, a in parser.controls
                  if tag != "button" and not a.get("aria-label") and a.get("id") not in parser.targets]  # fmt: skip
    assert unlabelled == [] and any(a.get("id") == "step-mode" for _, a in parser.controls)
    assert all(parser.texts[t].strip() for t in parser.targets)
    ids = {"start": "start_t", "steps": "steps", "seed": "seed", "n-samples": "n_samples", "mode": "mode",
           "sampler": "sampler", "boxes": "boxes", "mask-blur": "mask_blur", "mask-dilate": "mask_dilate",
           "region-padding": "region_padding"}  # fmt: skip
    for control, field in ids.items():  # a message names a field as the page labels it
        assert parser.texts[control].strip().startswith(FIELD_LABELS[field]), (control, parser.texts[control])
    assert "step" not in parser.texts["start"] and "strength" not in parser.texts["start"]  # one numbering scheme


@pytest.mark.skipif(CHROMIUM is None, reason=NO_CHROMIUM)
def test_headless_chromium_uploads_paints_refines_and_compares(app_server, app_images, tmp_path):
    image_png, _ = app_images["rgb"]
    (tmp_path / "astro.png").write_bytes(image_png)
    (tmp_path / "broken.png").write_bytes(image_png[:300])
    browser = DevTools(tmp_path / "profile", 1280, 1000)
    try:
        browser.send("Page.navigate", {"url": app_server.url + "/"})
        browser.wait_for("document.body && document.body.dataset.ready === '1'")
        assert "t 0-249" in browser.js("document.getElementById('plan-label').textContent")  # t only; steps in the tooltip
        assert "steps 750-1000" in browser.js("document.getElementById('plan-label').title")
        file_input = browser.send("DOM.querySelector", {"nodeId": browser.send("DOM.getDocument")["root"]["nodeId"],
                                                        "selector": "#file"})["nodeId"]  # fmt: skip
        browser.send("DOM.setFileInputFiles", {"files": [str(tmp_path / "broken.png")], "nodeId": file_input})
        shown = browser.wait_for(f"(m => m.classList.contains('bad') && m.textContent)({UPLOAD_MSG})")
        assert "cannot load image broken.png" in shown and "truncated" in shown  # a bad upload says why
        browser.send("DOM.setFileInputFiles", {"files": [str(tmp_path / "astro.png")], "nodeId": file_input})
        assert "48×40" in browser.wait_for(f"(m => m.textContent.includes('×') && m.textContent)({UPLOAD_MSG})")

        # paint a stroke across the middle of the picture with the mouse, as a person would
        x, y, w, h = browser.js(RECT.format("view"))
        browser.mouse("mousePressed", x + 0.3 * w, y + 0.4 * h)
        for k in range(1, 11):
            browser.mouse("mouseMoved", x + (0.3 + 0.03 * k) * w, y + (0.4 + 0.01 * k) * h)
        browser.mouse("mouseReleased", x + 0.6 * w, y + 0.5 * h)
        browser.js("(s => { s.value = 400; s.dispatchEvent(new Event('input')); })(document.getElementById('start'))")
        browser.wait_for("document.getElementById('plan-label').textContent.includes('t=381')")
        bx, by, bw, bh = browser.js(RECT.format("refine"))
        browser.wait_for("!document.getElementById('refine').disabled")
        browser.mouse("mousePressed", bx + bw / 2, by + bh / 2)
        browser.mouse("mouseReleased", bx + bw / 2, by + bh / 2)
        assert browser.wait_for("document.body.dataset.results", timeout=120) == "1"
        assert browser.js("document.getElementById('progress').value") == 1
        summary = browser.js("document.getElementById('summary').textContent")
        assert (
            "first step t=381," in summary
            and "t 250-499 then t 0-249" in summary
            and "step" not in summary.replace("first step", "").replace("steps per sample", "")
        )  # one numbering scheme; the others in the tooltip
        assert "step 619" in browser.js("document.getElementById('summary').title")
        assert "latesteps_500_750.ckpt" in browser.js("document.getElementById('routing').textContent")
        shot = tmp_path / "page.png"
        shot.write_bytes(base64.b64decode(browser.send("Page.captureScreenshot", {"format": "png"})["data"]))
        job_id = browser.js("new URLSearchParams(location.search).get('job')")

        # the box tool: a drag becomes a line of the boxes field (image pixels), and the plan follows a box's start
        browser.js("document.querySelector('input[name=tool][value=box]').click()")
        browser.mouse("mousePressed", x + 0.25 * w, y + 0.25 * h)
        browser.mouse("mouseMoved", x + 0.5 * w, y + 0.6 * h)
        browser.mouse("mouseReleased", x + 0.75 * w, y + 0.75 * h)
        box = [int(v) for v in browser.js("document.getElementById('boxes').value").split(",")]
        assert all(abs(a - b) <= 1 for a, b in zip(box, [12, 10, 36, 30])), box
        browser.js("(b => { b.value += '@450'; b.dispatchEvent(new Event('input')); })(document.getElementById('boxes'))")
        browser.wait_for("document.getElementById('plan-label').textContent.includes('t=441')")
    finally:
        browser.close()

    # the request the page sent: the painted mask, and only the painted pixels changed
    _, job = app_server.json(f"/api/jobs/{job_id}")
    assert job["state"] == "done" and job["mask_url"] and job["settings"]["start_t"] == 400
    _, _, mask = app_server.request(job["mask_url"])
    _, _, out = app_server.request(job["result"]["samples"][0]["url"])
    painted = np.asarray(Image.open(io.BytesIO(mask)).convert("L"))
    refined, source = np.asarray(Image.open(io.BytesIO(out))), np.asarray(Image.open(io.BytesIO(image_png)))
    assert 0.05 < (painted > 0).mean() < 0.6
    assert np.array_equal(refined[painted == 0], source[painted == 0]) and not np.array_equal(refined, source)
    with Image.open(shot) as image:
        assert image.size == (1280, 1000) and np.asarray(image.convert("RGB")).std() > 10  # a rendered page
    asked = [e["params"]["request"]["url"] for e in browser.events if e["method"] == "Network.requestWillBeSent"]
    network = [u for u in asked if u.split(":", 1)[0] in ("http", "https", "ws", "wss")]  # not chrome://, data:
    assert {app_server.url + "/static/app.js", app_server.url + "/api/info", app_server.url + "/api/refine"} <= set(network)
    assert all(u.startswith(app_server.url + "/") for u in network), network  # nothing from anywhere else


SPLIT = "Number(document.querySelector('.compare .divider').getAttribute('aria-valuenow'))"
LABELLED = """[...document.querySelectorAll('input, select, textarea, button, progress, canvas, [role=slider]')]
  .filter(el => !(el.getAttribute('aria-label') || [...(el.labels || [])].some(l => l.textContent.trim())
                  || (el.tagName === 'BUTTON' && el.textContent.trim())))
  .map(el => el.id || el.outerHTML.slice(0, 60))"""


@pytest.mark.skipif(CHROMIUM is None, reason=NO_CHROMIUM)
def test_headless_chromium_drags_the_divider_by_mouse_pen_touch_and_keys(app_server, app_images, tmp_path):
    image_png, _ = app_images["rgb"]
    (tmp_path / "broken.png").write_bytes(image_png[:300])
    _, up = app_server.upload(image_png, "astro.png")
    _, job = app_server.refine(up["id"], {"mode": "whole", "start_t": 200, "steps": 2, "step_mode": "exact"}, None)
    assert job["state"] == "done", job
    browser = DevTools(tmp_path / "profile", 1280, 1000)
    try:
        # a fresh page: the start slider spans the two experts' windows (t < 500) and starts gently, in place
        browser.send("Page.navigate", {"url": app_server.url + "/"})
        browser.wait_for("document.body && document.body.dataset.ready === '1'")
        slider = browser.js("(s => [s.min, s.max, s.value])(document.getElementById('start'))")
        assert slider == ["1", "499", "125"] and browser.js("document.getElementById('mode').value") == "mask"
        label = browser.js("document.getElementById('start-label').textContent")
        assert "Start t" in label and "125" in label and "step" not in label and "strength" not in label, label
        assert "step 875 of 1000" in browser.js("document.getElementById('start-label').title")
        assert browser.js(LABELLED) == []  # every control has a label (the step-mode dropdown included)

        # a request's page (?job=): its results, each with a before/after comparison
        browser.send("Page.navigate", {"url": f"{app_server.url}/?job={job['id']}"})
        browser.wait_for(
            "document.body && document.body.dataset.results === '1' && document.querySelector('.compare img.before').complete"
        )
        browser.js("document.querySelector('.compare').scrollIntoView({block: 'center'})")
        x, y, w, h = browser.js("(r => [r.left, r.top, r.width, r.height])"
                                "(document.querySelector('.compare').getBoundingClientRect())")  # fmt: skip
        assert w > 50 and h > 40 and browser.js(SPLIT) == 50
        assert browser.js("[...document.querySelectorAll('.compare img')].every(i => i.draggable === false)")
        along = lambda a, b, n=8: [(x + w * (a + (b - a) * k / n), y + h / 2) for k in range(n + 1)]  # noqa: E731
        browser.drag(along(0.5, 0.15))  # press, several moves, release: the divider follows to the end
        assert abs(browser.js(SPLIT) - 15) < 1.5, browser.js(SPLIT)
        clip = browser.js("document.querySelector('.compare img.after').style.clipPath")
        assert clip == f"inset(0px 0px 0px {browser.js(SPLIT)}%)" or clip == f"inset(0 0 0 {browser.js(SPLIT)}%)", clip
        browser.mouse("mouseMoved", x + 0.9 * w, y + h / 2)  # the button is up: moving does nothing
        assert abs(browser.js(SPLIT) - 15) < 1.5
        browser.drag([*along(0.15, 0.8), (x + w + 200, y + h / 2)], pointer="pen")  # captured beyond the edge: 100 %
        assert browser.js(SPLIT) == 100
        browser.drag(along(0.9, 0.3), pointer="touch")
        assert abs(browser.js(SPLIT) - 30) < 1.5, browser.js(SPLIT)

        # the keyboard: the divider is a focusable slider; the arrows, Home and End move it
        assert browser.js("(d => [d.tabIndex, d.getAttribute('role'), d.getAttribute('aria-label') !== null])"
                          "(document.querySelector('.compare .divider'))") == [0, "slider", True]  # fmt: skip
        browser.js("document.querySelector('.compare .divider').focus()")
        start = browser.js(SPLIT)
        for _ in range(3):
            browser.key("ArrowLeft", 37)
        assert browser.js(SPLIT) == pytest.approx(start - 6, abs=0.11)
        browser.key("ArrowRight", 39)
        assert browser.js(SPLIT) == pytest.approx(start - 4, abs=0.11)
        browser.key("End", 35)
        assert browser.js(SPLIT) == 100
        browser.key("Home", 36)
        assert browser.js(SPLIT) == 0

        # a failed upload clears the canvas and forgets the previous image (Refine is off until a good upload)
        assert browser.js("!document.getElementById('canvas-wrap').classList.contains('empty')")
        root = browser.send("DOM.getDocument")["root"]["nodeId"]
        file_input = browser.send("DOM.querySelector", {"nodeId": root, "selector": "#file"})["nodeId"]
        browser.send("DOM.setFileInputFiles", {"files": [str(tmp_path / "broken.png")], "nodeId": file_input})
        shown = browser.wait_for(f"(m => m.classList.contains('bad') && m.textContent)({UPLOAD_MSG})")
        assert "cannot load image broken.png" in shown
        assert browser.js("document.getElementById('canvas-wrap').classList.contains('empty')")
        assert not browser.js("(v => v.getContext('2d').getImageData(0, 0, v.width, v.height).data.some(b => b))"
                              "(document.getElementById('view'))")  # fmt: skip
        assert browser.js("document.getElementById('refine').disabled")
    finally:
        browser.close()
