"""ldm/app/handlers.py: what the page's requests run, in-process (no server): pixels and metadata equal to
scripts/refine.py's, uploads checked from their header and decoded only when a request runs, settings and work bounds
refused in one line, the plan label."""

from __future__ import annotations

import importlib.util
import json
import os
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ldm.imageio import read_png_metadata
from ldm.refine.batch import output_name, output_stems
from ldm.util import LONGEST_ATOMIC_NAME

from app_support import REPO, big_png, dotted_mask, png_bytes, small_image

pytest.importorskip("starlette", reason="the web app needs the app extra: pip install -e .[app]")
pytest.importorskip("uvicorn", reason="the web app needs the app extra: pip install -e .[app]")

import ldm.app.handlers as handlers  # noqa: E402  (after the skips: without the extra there is nothing to import)
from ldm.app.handlers import (  # noqa: E402
    MAX_BOXES,
    MAX_PARALLEL_DECODES,
    MAX_REQUEST_STEPS,
    RefineSettings,
    RequestError,
    describe_plan,
    load_painted_mask,
    load_upload,
    prepare,
    refine,
)


@pytest.fixture(scope="module")
def cli():
    spec = importlib.util.spec_from_file_location("refine_script_for_app", REPO / "scripts" / "refine.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# ------------------------------------------------------------------------------------------- handlers, no server
CASES = {
    # image, settings of the page, the same as refine.py flags
    "in place, grey mask, 2 samples": (
        "rgb", {"start_t": 400, "steps": 10, "seed": 3, "n_samples": 2, "mask_blur": 2, "mode": "mask"},
        ["--start-t", "400", "--ddim-steps", "10", "--seed", "3", "--n-samples", "2", "--mask-blur", "2"],
    ),
    "crop, box with its own start, exact steps, dpmpp, RGBA": (
        "rgba", {"start_t": 300, "steps": 4, "step_mode": "exact", "sampler": "dpmpp_2m", "mode": "crop",
                 "boxes": "2,2,20,16@200", "region_padding": 4, "mask_dilate": 1},
        ["--start-t", "300", "--tail-steps", "4", "--sampler", "dpmpp_2m", "--crop-regions", "--box", "2,2,20,16@200",
         "--region-padding", "4", "--mask-dilate", "1"],
    ),
}  # fmt: skip


@pytest.mark.parametrize("case", list(CASES))
def test_handlers_give_the_cli_s_pixels_and_metadata(case, cli, app_refiner, app_images, expert_checkpoints, tmp_path):
    kind, page_settings, flags = CASES[case]
    image_png, mask_png = app_images[kind]
    source = tmp_path / f"my {kind} é漢字 (1).png"  # output names as refine.py's: the app renamed it my_rgb_1_...
    source.write_bytes(image_png)
    (tmp_path / "mask.png").write_bytes(mask_png)
    argv = [
        "--input",
        str(source),
        "--mask",
        str(tmp_path / "mask.png"),
        "--outdir",
        str(tmp_path / "cli"),
        "--ckpt",
        str(expert_checkpoints[0]),
        "--ckpt",
        str(expert_checkpoints[1]),
        "--device",
        "cpu",
        *flags,
    ]
    assert cli.main(argv) == 0

    upload = load_upload(image_png, source.name)
    settings = RefineSettings.from_json(page_settings)
    prepared = prepare(app_refiner, upload, settings, load_painted_mask(mask_png, upload))
    steps = []
    result = refine(app_refiner, prepared, tmp_path / "app", on_step=lambda: steps.append(1))
    assert len(steps) == prepared.total_steps > 0  # the progress bar reaches its end exactly

    names = sorted(p.name for p in (tmp_path / "cli").iterdir())
    assert [s.path.name for s in result.samples] == names
    for sample in result.samples:
        ours, theirs = sample.path, tmp_path / "cli" / sample.path.name
        with Image.open(ours) as a, Image.open(theirs) as b:
            assert a.mode == b.mode and np.array_equal(np.asarray(a), np.asarray(b))
        meta, cli_meta = read_png_metadata(ours), read_png_metadata(theirs)
        assert set(cli_meta) <= set(meta)  # every key the CLI writes (parameters, checkpoints' sha256, regions, ...)
        for key in (
            "start_t",
            "effective_start_t",
            "tail_timesteps",
            "routing",
            "seed",
            "sample_index",
            "checkpoints",
            "sampler",
            "regions",
            "mask_sha256",
            "mask_blur",
            "mask_dilate",
            "crop_regions",
            "boxes",
        ):
            assert meta.get(key) == cli_meta.get(key), key
        assert meta["input"] == source.name and meta["Software"] == "latesteps app"
        assert json.loads(meta["parameters"])["mode"] == page_settings["mode"]


def test_handler_messages_for_what_a_user_can_get_wrong(app_refiner, app_images):
    image_png, mask_png = app_images["rgb"]
    for data, expected in [(b"", "empty"), (b"hello, not an image", "not an image"), (image_png[:200], "truncated")]:
        with pytest.raises(RequestError, match="cannot load image") as info:
            load_upload(data, "photo.png")
        assert "photo.png" in str(info.value) and expected in str(info.value) and "\n" not in str(info.value)
    upload = load_upload(image_png, "../../etc/we ird\nname.png")
    assert upload.name == "we ird?name.png" and upload.stem == "we ird_name"  # no path, no newline in names
    with pytest.raises(RequestError, match="the painted mask is 10x10 but the image is 48x40"):
        load_painted_mask(png_bytes(np.zeros((10, 10), np.uint8)), upload)
    empty = load_painted_mask(png_bytes(np.zeros((40, 48), np.uint8)), upload)
    with pytest.raises(RequestError, match="selects nothing"):
        prepare(app_refiner, upload, RefineSettings(start_t=300), empty)
    with pytest.raises(RequestError, match="nothing selected: paint"):
        prepare(app_refiner, upload, RefineSettings(start_t=300), None)
    with pytest.raises(RequestError, match="outside the 48x40 image"):
        prepare(app_refiner, upload, RefineSettings.from_json({"start_t": 300, "boxes": "0,0,60,10"}), None)
    with pytest.raises(RequestError, match=r"^start t=700 is above the experts' range \(max 499\); move the slider down$"):
        prepare(app_refiner, upload, RefineSettings(start_t=700), load_painted_mask(mask_png, upload))
    assert prepare(app_refiner, upload, RefineSettings(start_t=300, mode="whole"), empty).start_map is None
    with pytest.raises(RequestError, match="these experts are not text-conditioned"):  # the prompt was dropped silently
        prepare(app_refiner, upload, RefineSettings.from_json({"start_t": 300, "mode": "whole", "prompt": "a cat"}), None)
    for bad, expected in [({"start_t": 0}, "Start t must be a whole number from 1 to 999, not 0"),
                          ({"steps": "ten"}, "Steps must be a whole number from 1 to 1000, not 'ten'"),
                          ({"seed": 1.5}, "Seed must be"), ({"n_samples": 9}, "Samples must be a whole number from 1 to 8"),
                          ({"start_t": True}, "Start t must be"), ({"mode": "all"}, "Mode 'all' is not one of"),
                          ({"colour": 1}, "unknown setting(s) 'colour'"),
                          ({"boxes": "1,2,3"}, "is not x0,y0,x1,y1"), ([], "must be a JSON object, got an array"),
                          (None, "must be a JSON object, got null"), ({"boxes": 3}, "Boxes must be text (one x0,y0,x1,y1"),
                          ({"negative_prompt": None}, "Negative prompt must be text, got null")]:  # fmt: skip
        with pytest.raises(RequestError) as info:
            RefineSettings.from_json(bad)
        assert expected in str(info.value)
    assert RefineSettings.from_json({"steps": 20.0}).steps == 20  # JSON numbers may arrive as floats


NAMES = {  # an upload's name -> its outputs' stem: refine.py's (Path.stem) where that is a safe file name
    "é漢字.png": "é漢字", "my photo (1).png": "my photo (1)", "photo.tar.gz": "photo.tar", "-rf.png": "-rf",
    "photo_t125_s0.png": "photo_t125_s0", "C:\\Users\\me\\cat.jpg": "cat", "../../etc/passwd": "passwd",
    ".hidden.png": "hidden", ". .x.png": "x",  # a leading dot would hide the output
    "a\x00b.png": "a_b", "\u202egnp.exe": "_gnp", "a\nb.png": "a_b",  # unprintable: NUL, a direction override
    "..": "upload", ".": "upload", "": "upload", " ": "upload", "a/b/c/": "upload",  # nothing left of the name
}  # fmt: skip


@pytest.mark.parametrize("name", list(NAMES))
def test_output_names_are_refine_s_where_that_is_a_safe_file_name(name):
    stem = handlers.output_stem(name)
    assert stem == NAMES[name]
    if not name.startswith(".") and name.isprintable() and name.strip() and not name.endswith("/"):
        assert stem == output_stems([Path(name.replace("\\", "/"))])[0]  # scripts/refine.py's naming


def test_a_long_upload_name_is_shortened_to_one_the_file_system_takes(app_refiner, tmp_path):
    for name in ["漢" * 300 + ".png", "x" * 5000 + ".png", "é" * 150 + "漢" * 100 + ".png"]:
        stem = handlers.output_stem(name)
        assert len(os.fsencode(stem)) <= handlers.MAX_STEM_BYTES and name.startswith(stem) and stem
        longest = output_name(stem, 999, 2**32 - 1, 7)
        assert len(os.fsencode(longest)) <= LONGEST_ATOMIC_NAME
    upload = load_upload(small_image(), "漢" * 300 + ".png")  # refine.py refuses this input (output name too long)
    prepared = prepare(app_refiner, upload, RefineSettings(start_t=200, steps=1, step_mode="exact", mode="whole"), None)
    result = refine(app_refiner, prepared, tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == [result.samples[0].path.name]
    assert result.samples[0].path.name == upload.stem + "_t200_s0.png" and upload.stem == "漢" * 72


def test_plan_label_names_the_windows_the_steps_cross(app_refiner):
    cached = len(app_refiner._plans)
    both = describe_plan(app_refiner, RefineSettings(start_t=400, steps=10))
    assert both["ok"] and both["windows"] == "steps 500-750 then 750-1000" and both["t_windows"] == "t 250-499 then t 0-249"
    assert both["routing_t"] == "t 301: latesteps_500_750.ckpt; t 201-1: latesteps_750_1000.ckpt"  # t only
    assert both["effective_start_t"] == 301 and both["n_steps"] == 4 and "latesteps_500_750.ckpt" in both["routing"]
    details = describe_plan(app_refiner, RefineSettings(start_t=200, steps=4, step_mode="exact"))
    assert details["ok"] and details["windows"] == "steps 750-1000" and details["effective_start_t"] == 200
    boxed = describe_plan(app_refiner, RefineSettings.from_json({"start_t": 100, "boxes": "0,0,4,4@450"}))
    assert boxed["start_t"] == 450 and boxed["windows"] == "steps 500-750 then 750-1000"
    assert describe_plan(app_refiner, RefineSettings.from_json({"mode": "whole", "start_t": 100, "boxes": "0,0,4,4@450"}))[
        "start_t"] == 100  # fmt: skip
    above = describe_plan(app_refiner, RefineSettings(start_t=800))
    assert not above["ok"] and above["error"] == "start t=800 is above the experts' range (max 499); move the slider down"
    boxed = describe_plan(app_refiner, RefineSettings.from_json({"start_t": 100, "boxes": "0,0,4,4@600"}))
    assert boxed["error"] == (
        "box 0,0,4,4@600 starts at t=600, above the experts' range (max 499); lower its @start_t or leave it out"
    )
    assert len(app_refiner._plans) == cached  # moving the slider builds no plan on the device


def test_an_81_mp_upload_is_refused_from_its_header_and_uploads_keep_no_decoded_pixels(monkeypatch):
    bomb = big_png(9000, 9000)
    assert len(bomb) < 400_000  # a small file of 81 MP: 1.3 GB as float32 pixels

    def no_decode(*_args, **_kwargs):
        raise AssertionError("decoded an image its header already refuses")

    with monkeypatch.context() as patched:
        patched.setattr(handlers, "decode_image", no_decode)
        patched.setattr(handlers, "decode_mask", no_decode)
        started = time.perf_counter()
        with pytest.raises(RequestError) as info:
            load_upload(bomb, "huge.png")
        assert time.perf_counter() - started < 2.0
        message = str(info.value)
        assert "huge.png is 9000x9000 (81.0 MP)" in message and "up to 33,554,432 pixels" in message
        assert "downscale" in message and "\n" not in message
    upload = load_upload(small_image(), "photo.png")
    kept = [name for name, value in vars(upload).items() if isinstance(value, np.ndarray)]
    assert kept == [] and (upload.width, upload.height, upload.has_alpha) == (48, 40, False)
    assert upload.data == small_image() and upload.png.startswith(b"\x89PNG")
    assert upload.decode().rgb.shape == (40, 48, 3)  # decoded again only when a request runs
    with monkeypatch.context() as patched:  # a 9000x9000 painted mask for a 48x40 image: refused from its header
        patched.setattr(handlers, "decode_mask", no_decode)
        with pytest.raises(RequestError, match="the painted mask is 9000x9000 but the image is 48x40"):
            load_painted_mask(bomb, upload)
    # over twice Pillow's bomb limit (179 MP) the header was not read and Pillow's Python advice came back instead
    huge = big_png(20000, 10000)
    with monkeypatch.context() as patched:
        patched.setattr(handlers, "decode_image", no_decode)
        patched.setattr(handlers, "decode_mask", no_decode)
        with pytest.raises(RequestError, match=r"^huge.png is 20000x10000 \(200.0 MP\); the app accepts images up to"):
            load_upload(huge, "huge.png")
        with pytest.raises(RequestError, match="the painted mask is 20000x10000 but the image is 48x40"):
            load_painted_mask(huge, upload)


def test_at_most_max_parallel_decodes_run_at_once(monkeypatch):
    real, running, peak, lock = handlers.decode_image, [0], [0], threading.Lock()

    def slow_decode(data, source="<bytes>"):
        with lock:
            running[0] += 1
            peak[0] = max(peak[0], running[0])
        time.sleep(0.05)
        try:
            return real(data, source=source)
        finally:
            with lock:
                running[0] -= 1

    monkeypatch.setattr(handlers, "decode_image", slow_decode)
    image = small_image()
    threads = [threading.Thread(target=load_upload, args=(image, f"{k}.png")) for k in range(3 * MAX_PARALLEL_DECODES)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert peak[0] == MAX_PARALLEL_DECODES


def test_settings_that_used_to_fail_late_are_one_line_400s():
    from ldm.refine.refiner import MAX_SEED

    with pytest.raises(RequestError, match=r"the last seed \(Seed \+ Samples - 1\) must be at most 4294967295"):
        RefineSettings.from_json({"seed": MAX_SEED, "n_samples": 3})  # wrote sample 0, then failed
    assert RefineSettings.from_json({"seed": MAX_SEED - 2, "n_samples": 3}).seed == MAX_SEED - 2
    with pytest.raises(RequestError) as info:
        RefineSettings.from_json({"seed": 10**4000})
    assert len(str(info.value)) < 120 and "an integer of about 4001 digits" in str(info.value)
    boxes = "\n".join(["0,0,4,4"] * (MAX_BOXES + 1))
    with pytest.raises(RequestError, match=f"{MAX_BOXES + 1} boxes given; at most {MAX_BOXES} are accepted"):
        RefineSettings.from_json({"boxes": boxes})
    assert len(RefineSettings.from_json({"boxes": "\n".join(["0,0,4,4"] * MAX_BOXES)}).boxes) == MAX_BOXES


def test_a_request_above_the_work_bound_is_refused_before_it_is_queued(app_refiner):
    upload = load_upload(small_image(), "photo.png")
    mask = load_painted_mask(dotted_mask(), upload)  # 16 x 14 dots: 224 regions
    crop = RefineSettings.from_json({"mode": "crop", "n_samples": 8, "start_t": 400, "steps": 20, "step_mode": "exact"})
    started = time.perf_counter()
    with pytest.raises(RequestError) as info:
        prepare(app_refiner, upload, crop, mask)
    message = str(info.value)
    assert "would run 35,840 sampling steps (224 regions x 20 steps x 8 sample(s))" in message, message
    assert f"at most {MAX_REQUEST_STEPS:,} are allowed" in message and "fewer regions" in message
    assert time.perf_counter() - started < 5.0
    whole = RefineSettings.from_json({"mode": "whole", "n_samples": 8, "start_t": 400, "steps": 400, "step_mode": "exact"})
    assert prepare(app_refiner, upload, whole, None).total_steps == 3200  # what fits is queued as before
    in_place = prepare(app_refiner, upload, RefineSettings.from_json({"start_t": 400, "steps": 20, "step_mode": "exact"}), mask)
    assert in_place.total_steps == 20  # in place, the regions run together
