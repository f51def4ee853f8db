"""Prompts (ldm.imageio.prompt): the validated Prompt, A1111 ``parameters`` chunks and this project's own metadata read
back without decoding pixels, and prompt files matched by stem, with their bad cases."""

from __future__ import annotations

import io
import json
import os
import struct
import zlib

import numpy as np
import pytest
from PIL import Image, PngImagePlugin

from ldm.imageio import save_image_atomic
from ldm.imageio.prompt import (
    DEFAULT_GUIDANCE_SCALE,
    MAX_PROMPT_CHARS,
    MAX_PROMPT_FILE_BYTES,
    MAX_TEXT_CHUNK_BYTES,
    Prompt,
    PromptError,
    load_prompt_file,
    parse_a1111_parameters,
    read_image_prompt,
    read_png_text,
)

SETTINGS = "Steps: 20, Sampler: DPM++ 2M Karras, CFG scale: 6.5, Seed: 965400086, Size: 512x768, Model hash: 45dee52b"


def png_bytes(text: dict[str, str] | None = None, itxt: dict[str, str] | None = None, zip_text: bool = False) -> bytes:
    """A 4x3 RGB PNG written by Pillow with the given text chunks (``itxt``: iTXt, compressed when ``zip_text``)."""
    info = PngImagePlugin.PngInfo()
    for key, value in (text or {}).items():
        info.add_text(key, value, zip=zip_text)
    for key, value in (itxt or {}).items():
        info.add_itxt(key, value, zip=zip_text)
    out = io.BytesIO()
    Image.fromarray(np.arange(36, dtype=np.uint8).reshape(3, 4, 3)).save(out, format="PNG", pnginfo=info)
    return out.getvalue()


def chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def insert_before_iend(png: bytes, extra: bytes) -> bytes:
    assert png[-12:-8] == b"\x00\x00\x00\x00" and png[-8:-4] == b"IEND"
    return png[:-12] + extra + png[-12:]


# ---------------------------------------------------------------------------------------------------------- Prompt
def test_prompt_validation_says_what_is_allowed():
    p = Prompt("a cat", "blurry", 7)
    assert p.guidance_scale == 7.0 and isinstance(p.guidance_scale, float) and p.guided
    assert Prompt("a cat").negative_prompt == "" and Prompt("a cat").guidance_scale == DEFAULT_GUIDANCE_SCALE
    assert not Prompt("x", guidance_scale=1.0).guided and Prompt("", guidance_scale=0).guidance_scale == 0.0
    with pytest.raises(AttributeError):
        p.prompt = "a dog"  # frozen
    for bad in (-1.0, float("nan"), float("inf"), True, "7.5", None):
        with pytest.raises(PromptError, match=r"guidance_scale=.* must be a finite number >= 0"):
            Prompt("a cat", guidance_scale=bad)
    with pytest.raises(PromptError, match="prompt must be a str, got bytes"):
        Prompt(b"a cat")
    with pytest.raises(PromptError, match="negative_prompt must be a str, got NoneType"):
        Prompt("a cat", None)
    with pytest.raises(PromptError, match=f"at most {MAX_PROMPT_CHARS:,}"):
        Prompt("x" * (MAX_PROMPT_CHARS + 1))
    assert Prompt("x" * MAX_PROMPT_CHARS).prompt
    with pytest.raises(PromptError, match="NUL"):
        Prompt("a\x00cat")
    with pytest.raises(PromptError, match="not valid Unicode"):
        Prompt("a cat\udcff")
    for err in (PromptError("x\ny"),):
        assert "\n" not in str(err) and isinstance(err, ValueError)


# --------------------------------------------------------------------------------------------------- A1111 format
def test_a1111_png_gives_prompt_negative_prompt_and_scale(tmp_path):
    params = f"a castle on a hill, golden hour, (detailed:1.2)\nNegative prompt: blurry, lowres\n{SETTINGS}"
    path = tmp_path / "a1111.png"
    path.write_bytes(png_bytes({"parameters": params}))
    found = read_image_prompt(path)
    assert found.prompt == "a castle on a hill, golden hour, (detailed:1.2)"
    assert found.negative_prompt == "blurry, lowres" and found.guidance_scale == 6.5
    assert "A1111" in found.source and "a1111.png" in found.source
    assert found.resolve() == Prompt("a castle on a hill, golden hour, (detailed:1.2)", "blurry, lowres", 6.5)


def test_a1111_without_negative_prompt_or_settings():
    found = parse_a1111_parameters(f"a red fox in snow\n{SETTINGS}")
    assert (found.prompt, found.negative_prompt, found.guidance_scale) == ("a red fox in snow", None, 6.5)
    assert found.resolve(negative_prompt="watermark", guidance_scale=3.0) == Prompt("a red fox in snow", "watermark", 6.5)
    bare = parse_a1111_parameters("just a prompt, no settings\n")  # fewer than 3 settings: all prompt
    assert (bare.prompt, bare.negative_prompt, bare.guidance_scale) == ("just a prompt, no settings", None, None)
    assert bare.resolve() == Prompt("just a prompt, no settings", "", DEFAULT_GUIDANCE_SCALE)
    empty_negative = parse_a1111_parameters(f"a fox\nNegative prompt: \n{SETTINGS}")
    assert empty_negative.negative_prompt == ""


def test_a1111_multiline_prompts_quoted_settings_and_a_bad_scale(caplog):
    text = (
        "line one,\nline two: with a colon\n\nline four\r\nNegative prompt: bad hands,\nextra fingers\n"
        'Steps: 30, Lora hashes: "a: 12ab, b: 34cd", CFG scale: 9, Size: 512x512'
    )
    found = parse_a1111_parameters(text)
    assert found.prompt == "line one,\nline two: with a colon\n\nline four"
    assert found.negative_prompt == "bad hands,\nextra fingers" and found.guidance_scale == 9.0
    caplog.set_level("WARNING")
    odd = parse_a1111_parameters("a fox\nSteps: 20, Sampler: Euler a, CFG scale: -3, Seed: 1")
    assert odd.prompt == "a fox" and odd.guidance_scale is None and "ignoring CFG scale" in caplog.text
    with pytest.raises(PromptError, match="A1111 parameters of x.png: prompt has"):
        parse_a1111_parameters("y" * (MAX_PROMPT_CHARS + 1) + "\n" + SETTINGS, "A1111 parameters of x.png")


@pytest.mark.parametrize("zip_text", [False, True])
def test_text_chunk_kinds_read_as_pillow_reads_them(zip_text):
    """tEXt / zTXt (Latin-1) and iTXt (UTF-8, compressed or not) give the same text as Pillow's own reader."""
    params = f"ein Schloß, 城堡\nNegative prompt: unscharf\n{SETTINGS}"
    data = png_bytes({"Software": "other", "latin": "café " * 300}, {"parameters": params}, zip_text=zip_text)
    got = read_png_text(data, ("parameters", "latin", "Software"))
    assert got == {k: str(v) for k, v in Image.open(io.BytesIO(data)).text.items()}
    assert read_image_prompt(data).prompt == "ein Schloß, 城堡"


def test_chunks_after_the_pixels_are_found_and_pixels_never_decoded(tmp_path):
    png = png_bytes()
    late = chunk(b"tEXt", b"parameters\0a lighthouse\n" + SETTINGS.encode())
    data = insert_before_iend(png, late)
    i = data.index(b"IDAT") + 4
    garbage = data[:i] + b"\xff" * 8 + data[i + 8 :]  # pixel data no decoder could read
    path = tmp_path / "late.png"
    path.write_bytes(garbage)
    with pytest.raises(OSError, match="broken data stream"):
        Image.open(path).load()  # Pillow cannot decode these pixels
    found = read_image_prompt(path)
    assert found.prompt == "a lighthouse" and found.guidance_scale == 6.5


def test_no_prompt_chunk_gives_none(tmp_path):
    assert read_image_prompt(png_bytes()) is None
    assert read_image_prompt(png_bytes({"Description": "holiday"})) is None
    comfy = png_bytes({"prompt": json.dumps({"3": {"class_type": "KSampler"}}), "workflow": "{}"})
    assert read_image_prompt(comfy) is None  # ComfyUI's "prompt" chunk is its graph, not a prompt
    jpeg = io.BytesIO()
    Image.new("RGB", (4, 4)).save(jpeg, format="JPEG")
    assert read_image_prompt(jpeg.getvalue()) is None  # not a PNG
    assert read_image_prompt(png_bytes()[:40]) is None  # cut short before any text: what was read (nothing)
    with pytest.raises(PromptError, match="cannot read prompt from .*missing.png"):
        read_image_prompt(tmp_path / "missing.png")


def test_own_metadata_round_trip(tmp_path):
    prompt = Prompt("a watercolour harbour,\nboats", "people", 0.1 + 0.2)
    rgb = np.zeros((4, 4, 3), np.uint8)
    args = {"prompt": "ignored: the explicit keys win", "start_t": 500}
    path = save_image_atomic(tmp_path / "out.png", rgb, metadata={
        "Software": "latesteps refine", **prompt.as_metadata(), "parameters": json.dumps(args)})  # fmt: skip
    found = read_image_prompt(path)
    assert found.resolve() == prompt and found.guidance_scale == 0.1 + 0.2  # exact float round trip
    assert "latesteps metadata" in found.source
    plain = save_image_atomic(tmp_path / "plain.png", rgb, metadata={
        "Software": "latesteps refine", "parameters": json.dumps({"start_t": 500, "prompt": None})})  # fmt: skip
    assert read_image_prompt(plain) is None  # our JSON record is never read as A1111 text
    fooocus = png_bytes({"parameters": json.dumps({"prompt": "a fox", "negative_prompt": "", "guidance_scale": 4})})
    found = read_image_prompt(fooocus)
    assert (found.prompt, found.negative_prompt, found.guidance_scale) == ("a fox", "", 4.0)
    bad = png_bytes({"Software": "latesteps refine", "prompt": "x", "guidance_scale": "lots"})
    with pytest.raises(PromptError, match="guidance_scale='lots' is not a number"):
        read_image_prompt(bad)


def test_oversized_corrupt_and_bomb_chunks_are_refused():
    big = insert_before_iend(png_bytes(), chunk(b"tEXt", b"parameters\0" + b"x" * MAX_TEXT_CHUNK_BYTES))
    with pytest.raises(PromptError, match="chunk 'parameters' holds .* at most 1,048,576"):
        read_image_prompt(big)
    assert read_png_text(big, ("other",)) == {}  # a chunk no one asked for is skipped unread
    bomb = zlib.compress(b"a" * (MAX_TEXT_CHUNK_BYTES + 1), 9)
    with pytest.raises(PromptError, match="decompresses to more than"):
        read_image_prompt(insert_before_iend(png_bytes(), chunk(b"zTXt", b"parameters\0\0" + bomb)))
    good = bytearray(png_bytes({"parameters": "a fox\n" + SETTINGS}))
    i = good.index(b"a fox")
    good[i] = ord("b")
    with pytest.raises(PromptError, match="corrupt \\(CRC mismatch\\)"):
        read_image_prompt(bytes(good))
    bad_utf8 = chunk(b"iTXt", b"parameters\0\0\0\0\0\xff\xfe")
    with pytest.raises(PromptError, match="not UTF-8"):
        read_image_prompt(insert_before_iend(png_bytes(), bad_utf8))


# ---------------------------------------------------------------------------------------------------- prompt files
def test_prompt_file_matched_by_stem(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_bytes(
        "\ufeff# stem<TAB>prompt[<TAB>negative]\n"
        "cat\ta tabby cat, studio light\r\n"
        "\n"
        "my photo.v2\t  a harbour at dusk \tpeople, text\n"
        "straße\tein Hund\n".encode()
    )
    prompts = load_prompt_file(path)
    assert len(prompts) == 3
    cat = prompts.lookup("cat")
    assert (cat.prompt, cat.negative_prompt, cat.guidance_scale) == ("a tabby cat, studio light", None, None)
    assert "prompts.txt line 2" in cat.source
    assert prompts.for_path(tmp_path / "in" / "my photo.v2.png").resolve(guidance_scale=5) == Prompt(
        "a harbour at dusk", "people, text", 5.0
    )
    assert prompts.for_path("straße.jpg").prompt == "ein Hund"
    assert prompts.lookup("dog") is None and prompts.missing(["cat", "dog", "straße", "cow"]) == ["dog", "cow"]


def test_json_prompt_file(tmp_path):
    path = tmp_path / "prompts.json"
    path.write_text(json.dumps({
        "cat": "a tabby cat",
        "harbour": {"prompt": "a harbour,\nat dusk", "negative_prompt": "people", "guidance_scale": 4.5},
    }), encoding="utf-8")  # fmt: skip
    prompts = load_prompt_file(path)
    assert prompts.lookup("cat").resolve() == Prompt("a tabby cat")
    assert prompts.lookup("harbour").resolve() == Prompt("a harbour,\nat dusk", "people", 4.5)
    path.write_text('{"cat": "a", "dog": "b",\n "cat": "c"}', encoding="utf-8")
    with pytest.raises(PromptError, match="key 'cat' appears twice"):
        load_prompt_file(path)
    path.write_text('{"cat": {"prompt": "a", "scale": 3}}', encoding="utf-8")
    with pytest.raises(PromptError, match="no other keys"):
        load_prompt_file(path)
    path.write_text('{"cat": {"prompt": "a", "guidance_scale": -2}}', encoding="utf-8")
    with pytest.raises(PromptError, match="stem 'cat': guidance_scale=-2 must be a finite number"):
        load_prompt_file(path)
    path.write_text('{"cat": "a",\n "dog": }', encoding="utf-8")
    with pytest.raises(PromptError, match="not valid JSON: line 2"):
        load_prompt_file(path)
    path.write_text('["a"]', encoding="utf-8")
    with pytest.raises(PromptError, match="one JSON object"):
        load_prompt_file(path)


def test_prompt_file_bad_cases_name_the_file_and_line(tmp_path):
    path = tmp_path / "p.txt"
    path.write_bytes(b"cat\ta cat\ndog\ta caf\xe9 dog\n")  # Latin-1, not UTF-8
    with pytest.raises(PromptError) as err:
        load_prompt_file(path)
    assert str(err.value) == "prompt file " + str(path) + " is not UTF-8: line 2, byte 10 (0xe9); save it as UTF-8"
    path.write_text("cat\ta cat\ndog\ta dog\ncat\tanother cat\n", encoding="utf-8")
    with pytest.raises(PromptError, match="line 3: stem 'cat' was already given on line 1"):
        load_prompt_file(path)
    path.write_text("cat a cat\n", encoding="utf-8")
    with pytest.raises(PromptError, match="line 1: 0 TAB"):
        load_prompt_file(path)
    path.write_text("cat\ta\tb\tc\n", encoding="utf-8")
    with pytest.raises(PromptError, match="line 1: 3 TAB"):
        load_prompt_file(path)
    path.write_text("dir/cat\ta cat\n", encoding="utf-8")
    with pytest.raises(PromptError, match="path separator"):
        load_prompt_file(path)
    path.write_text(" \ta cat\n", encoding="utf-8")
    with pytest.raises(PromptError, match="empty stem"):
        load_prompt_file(path)
    path.write_text("cat\t" + "x" * (MAX_PROMPT_CHARS + 1) + "\n", encoding="utf-8")
    with pytest.raises(PromptError, match="p.txt line 1: prompt has"):
        load_prompt_file(path)
    with pytest.raises(PromptError, match="cannot read prompt file .*nope.txt"):
        load_prompt_file(tmp_path / "nope.txt")
    with pytest.raises(PromptError, match="not a regular file"):
        load_prompt_file(tmp_path)


def test_oversized_prompt_file_is_refused_before_reading(tmp_path, monkeypatch):
    path = tmp_path / "huge.txt"
    with open(path, "wb") as fh:
        fh.truncate(MAX_PROMPT_FILE_BYTES + 1)  # sparse: no disk space used
    opened = []
    real_open = open
    monkeypatch.setattr("builtins.open", lambda *a, **k: opened.append(a[0]) or real_open(*a, **k))
    with pytest.raises(PromptError, match=f"is {MAX_PROMPT_FILE_BYTES + 1:,} bytes; at most {MAX_PROMPT_FILE_BYTES:,}"):
        load_prompt_file(path)
    assert os.fspath(path) not in [os.fspath(p) for p in opened]  # refused from its size alone


def test_a_long_settings_line_parses_in_linear_time_and_oversized_text_is_refused():
    import time

    started = time.perf_counter()
    for text in ("a" * 9000, "a cat\n" + "b" * 9000, "a cat\n" + "x: " + "y" * 9000):  # A1111's regex: seconds each
        parse_a1111_parameters(text)
    assert time.perf_counter() - started < 2.0
    with pytest.raises(PromptError, match="characters; at most"):
        parse_a1111_parameters("a" * 1_000_000)  # a 1 MiB chunk took hours with the backtracking regex
    found = parse_a1111_parameters(f'a cat\n{SETTINGS}, Lora hashes: "a: 1, b: 2"')
    assert found.prompt == "a cat" and found.guidance_scale == 6.5


def test_guidance_scales_beyond_float_range_and_other_digits_are_refused_in_one_line(caplog):
    with pytest.raises(PromptError, match="an integer of about 401 digits"):
        Prompt("a cat", guidance_scale=10**400)
    found = parse_a1111_parameters("a cat\nSteps: 20, Sampler: Euler, CFG scale: \u0667")  # Arabic-Indic 7
    assert found.guidance_scale is None and "ignoring CFG scale" in caplog.text


def test_deep_or_huge_json_is_one_line_and_an_empty_chunk_is_no_prompt(tmp_path):
    deep = "[" * 100_000 + "]" * 100_000
    path = tmp_path / "deep.json"
    path.write_text('{"a": ' + deep + "}")
    with pytest.raises(PromptError, match="deep.json is not readable JSON"):
        load_prompt_file(path)
    huge = tmp_path / "huge.json"
    huge.write_text('{"a": {"prompt": "x", "guidance_scale": ' + "9" * 400 + "}}")
    with pytest.raises(PromptError, match="guidance_scale"):
        load_prompt_file(huge)
    with pytest.raises(PromptError, match="not readable"):
        read_image_prompt(png_bytes({"parameters": '{"a": ' + deep + "}"}))
    assert read_image_prompt(png_bytes({"parameters": "  \n "})) is None


def test_a_prompt_file_with_old_mac_line_endings_has_one_entry_per_line(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_bytes(b"a\tcat\rb\tdog\r")
    prompts = load_prompt_file(path)
    assert prompts.lookup("a").prompt == "cat" and prompts.lookup("b").prompt == "dog"
