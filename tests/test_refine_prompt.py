"""Refinement with a prompt (ldm.refine.conditioning, Refiner(prompt=...), refine_files(prompts=...), scripts/refine.py).

Tiny text-conditioned late-steps experts: a cross-attention UNet over a FrozenCLIPEmbedder whose random CLIP text model
and tokenizer are saved in a folder by the test; the experts are saved as main.py saves them (the encoder's weights in
the checkpoint) and loaded through ``Refiner.from_checkpoints``.  Nothing is downloaded.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import logging
import os
import shutil
import string
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from warm_python import run_python

transformers = pytest.importorskip("transformers")

import ldm.refine.refiner as refiner_module  # noqa: E402
from ldm.checkpoint import save_checkpoint  # noqa: E402
from ldm.imageio import image_to_tensor, load_image, read_png_metadata, tensor_to_image  # noqa: E402
from ldm.imageio.prompt import Prompt, read_image_prompt  # noqa: E402
from ldm.refine import Refiner  # noqa: E402
from ldm.refine.batch import refine_files  # noqa: E402
from ldm.refine.request import RefineRequest  # noqa: E402
from ldm.util import instantiate_from_config  # noqa: E402

from conftest import (  # noqa: E402
    LATESTEPS_TARGET,
    TINY_UNET_PARAMS,
    build_tiny_expert,
    save_expert_checkpoint,
    tiny_ldm_params,
)

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "refine.py"
D = 16  # CLIP width = the UNet's context_dim
MAX_TOKENS = 16  # the tokenizer's length (start and end tokens included)
STEPS = dict(start_t=400, ddim_steps=10)


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")


def write_clip_folder(folder: Path) -> None:
    """A tiny CLIP tokenizer (single letters) and a random one-layer CLIPTextModel, saved as save_pretrained does."""
    src = folder / "src"
    src.mkdir(parents=True)
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for suffix in ("", "</w>"):
        vocab.update({c + suffix: len(vocab) + i for i, c in enumerate(string.ascii_lowercase)})
    (src / "vocab.json").write_text(json.dumps(vocab))
    (src / "merges.txt").write_text("#version: 0.2\n")
    transformers.CLIPTokenizer.from_pretrained(str(src), local_files_only=True).save_pretrained(str(folder))
    shutil.rmtree(src)
    config = transformers.CLIPTextConfig(vocab_size=len(vocab), hidden_size=D, intermediate_size=2 * D,
                                         num_hidden_layers=1, num_attention_heads=2, max_position_embeddings=MAX_TOKENS,
                                         bos_token_id=0, eos_token_id=1, pad_token_id=1)  # fmt: skip
    torch.manual_seed(0)
    transformers.CLIPTextModel(config).save_pretrained(str(folder))


def text_expert_config(t_min: int, t_max: int, clip_dir: Path) -> dict:
    """Project config of a tiny text-conditioned late-steps expert (SD v1's layout, in miniature)."""
    unet = dict(TINY_UNET_PARAMS, use_spatial_transformer=True, context_dim=D, transformer_depth=1)
    encoder = {"target": "ldm.modules.encoders.modules.FrozenCLIPEmbedder",
               "params": {"version": str(clip_dir), "max_length": MAX_TOKENS}}  # fmt: skip
    params = tiny_ldm_params(t_min=t_min, t_max=t_max, cond_stage_config=encoder, conditioning_key="crossattn",
                             cond_stage_key="caption")  # fmt: skip
    params["unet_config"] = {"target": "ldm.modules.diffusionmodules.openaimodel.UNetModel", "params": unet}
    return {"model": {"target": LATESTEPS_TARGET, "params": params}}


def save_text_expert(t_min: int, t_max: int, clip_dir: Path, path: Path, seed: int, first_stage: dict | None = None):
    """Build, re-draw the zero-initialised layers (so the prompt changes the output), save as main.py does."""
    cfg = text_expert_config(t_min, t_max, clip_dir)
    torch.manual_seed(seed)
    model = instantiate_from_config(cfg["model"])
    with torch.no_grad():
        for p in model.model.parameters():
            if p.ndim > 1 and not p.any():
                p.normal_(0.0, 0.05)
    model.model_ema = type(model.model_ema)(model.model)
    if first_stage is not None:
        model.first_stage_model.load_state_dict(first_stage)
    save_checkpoint({"state_dict": model.state_dict(), "config": cfg, "window": [t_min, t_max], "global_step": 0}, path)
    return model


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory) -> dict[str, Path]:
    """Text experts on [250, 500) and [0, 250), and an unconditional one on [0, 250), all sharing one first stage."""
    root = tmp_path_factory.mktemp("text_experts")
    clip_dir = root / "clip"
    write_clip_folder(clip_dir)
    paths = {"hi": root / "text_250_500.ckpt", "lo": root / "text_0_250.ckpt", "uncond_lo": root / "uncond_0_250.ckpt"}
    hi = save_text_expert(250, 500, clip_dir, paths["hi"], seed=0)
    first_stage = hi.first_stage_model.state_dict()
    save_text_expert(0, 250, clip_dir, paths["lo"], seed=1, first_stage=first_stage)
    save_expert_checkpoint(build_tiny_expert(0, 250, seed=2, first_stage_state=first_stage), paths["uncond_lo"])
    return paths


@pytest.fixture(scope="module")
def refiner(ckpts) -> Refiner:
    return Refiner.from_checkpoints([ckpts["hi"], ckpts["lo"]], device="cpu")


def image(seed: int = 0, h: int = 32, w: int = 32) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(1, 3, h, w, generator=g) * 2 - 1


# ----------------------------------------------------------------------------------------------------------- the API
def test_scale_one_equals_the_unguided_conditional_refinement(refiner, monkeypatch):
    x = image()
    guided = refiner.refine_tensors(x, seeds=3, prompt=Prompt("a cat", "blurry", 1.0), **STEPS)
    # the reference: the same refinement whose every step calls its expert with the prompt's embedding as cond (no
    # guidance wrapper); the refusal of a text-conditioned expert without a prompt is switched off for it
    plan = refiner.plan(**STEPS)
    with torch.inference_mode():
        context = [e.model.get_learned_conditioning(["a cat"]) for e in refiner.experts]

    def with_context(denoiser, c):
        return lambda x, t, cond=None: denoiser(x, t, c.expand(x.shape[0], -1, -1))

    fixed = dataclasses.replace(plan, denoisers=tuple(with_context(d, context[e])
                                                      for e, d in zip(plan.experts, plan.denoisers)))  # fmt: skip
    monkeypatch.setattr(refiner, "plan", lambda *a, **k: fixed)
    monkeypatch.setattr(refiner_module, "check_chain", lambda *a, **k: None)
    reference = refiner.refine_tensors(x, seeds=3, **STEPS)
    assert set(plan.experts) == {0, 1}  # both text experts ran
    assert torch.equal(guided, reference)


def test_prompts_change_the_output_and_are_reproducible(refiner):
    x = image()
    cat = refiner.refine_tensors(x, seeds=0, prompt="a cat", **STEPS)
    again = refiner.refine_tensors(x, seeds=0, prompt=Prompt("a cat", "", 7.5), **STEPS)
    dog = refiner.refine_tensors(x, seeds=0, prompt="a dog", **STEPS)
    negative = refiner.refine_tensors(x, seeds=0, prompt=Prompt("a cat", "blurry", 7.5), **STEPS)
    scale = refiner.refine_tensors(x, seeds=0, prompt=Prompt("a cat", "", 3.0), **STEPS)
    assert torch.equal(cat, again)  # same prompt and seed: same bytes
    for other in (dog, negative, scale):
        assert (other - cat).abs().max() > 1e-3
    # per-sample prompts in one batch: each sample as if refined alone (batch-invariant CPU mode)
    both = refiner.refine_tensors(torch.cat([x, x]), seeds=[0, 0], prompt=["a cat", "a dog"], **STEPS)
    assert torch.equal(both[0:1], cat) and torch.equal(both[1:2], dog)


def test_regions_crop_mode_dpmpp_and_exact_tails_with_a_prompt(refiner):
    x = torch.cat([image(0, 40, 48), image(1, 40, 48)])
    starts = torch.zeros(2, 1, 40, 48, dtype=torch.long)
    starts[..., 8:24, 10:30] = 400
    for options in ({"ddim_steps": 10}, {"sampler": "dpmpp_2m", "ddim_steps": 10}, {"tail_steps": 4}):
        for crop in (False, True):
            kwargs = dict(crop_regions=crop, **({"region_size": 32} if crop else {}), **options)
            out = refiner.refine_tensors(x, 400, [5, 6], prompt=["a cat", "a dog"], start_map=starts, **kwargs)
            outside = torch.ones(2, 3, 40, 48, dtype=torch.bool)
            outside[..., 4:28, 6:34] = False  # well away from the region and its feather
            assert torch.equal(out[outside], x.clamp(-1, 1)[outside]), (options, crop)
            assert (out - x).abs().amax() > 1e-3
            # each image with its own prompt, as if refined alone (crop mode slices its rows of the conditioning)
            alone = refiner.refine_tensors(x[1:], 400, [6], prompt="a dog", start_map=starts[1:], **kwargs)
            assert torch.equal(out[1:], alone), (options, crop)


def test_pil_call_with_a_mask_keeps_outside_pixels(refiner):
    rgb = (np.random.default_rng(0).random((32, 40, 3)) * 255).astype(np.uint8)
    mask = np.zeros((32, 40), np.uint8)
    mask[8:20, 10:26] = 255
    out = np.asarray(refiner(Image.fromarray(rgb), 300, 1, 10, mask=Image.fromarray(mask), mask_blur=0, prompt="a cat"))
    assert np.array_equal(out[mask == 0], rgb[mask == 0])
    assert not np.array_equal(out[mask > 0], rgb[mask > 0])


def test_a_text_expert_without_a_prompt_and_bad_prompts_are_refused(refiner):
    x = image()
    with pytest.raises(ValueError, match=r"text-conditioned and need a prompt: pass prompt="):
        refiner.refine_tensors(x, **STEPS)
    with pytest.raises(ValueError, match="different guidance scales"):
        refiner.refine_tensors(torch.cat([x, x]), prompt=[Prompt("a", "", 2.0), Prompt("b", "", 3.0)], **STEPS)
    with pytest.raises(ValueError, match="3 prompts for a batch of 1"):
        refiner.refine_tensors(x, prompt=["a", "b", "c"], **STEPS)
    with pytest.raises(ValueError, match="guidance_scale=-1"):
        refiner.refine_tensors(x, prompt=Prompt("a", "", -1), **STEPS)


def test_a_prompt_over_the_tokenizer_length_is_truncated_with_a_warning(refiner, caplog):
    x = image()
    words = list(string.ascii_lowercase)  # one token per one-letter word
    with caplog.at_level(logging.WARNING):
        out = refiner.refine_tensors(x, prompt=" ".join(words), **STEPS)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    # one warning: the two experts' identical text encoders were merged into one when loaded
    assert len(warnings) == 1 and "truncated" in warnings[0] and f"{MAX_TOKENS}-token" in warnings[0]
    # what is kept: the start token, the first MAX_TOKENS - 2 words and the end token
    kept = " ".join(words[: MAX_TOKENS - 2])
    assert torch.equal(out, refiner.refine_tensors(x, prompt=kept, **STEPS))


def test_chains_of_text_and_unconditional_experts(ckpts):
    mixed = [ckpts["hi"], ckpts["uncond_lo"]]
    strict = Refiner.from_checkpoints(mixed, device="cpu")
    x = image()
    with pytest.raises(ValueError, match="allow_unconditional_experts=True"):
        strict.refine_tensors(x, prompt="a cat", **STEPS)
    with pytest.raises(ValueError, match="need a prompt"):
        strict.refine_tensors(x, **STEPS)
    # below the text expert's window only the unconditional expert runs: as before without a prompt, refused with one
    plain = strict.refine_tensors(x, 200, 0, 10)
    with pytest.raises(ValueError, match="no expert that runs .* is text-conditioned"):
        strict.refine_tensors(x, 200, 0, 10, prompt="a cat")
    allowed = Refiner.from_checkpoints(mixed, device="cpu", allow_unconditional_experts=True)
    assert torch.equal(allowed.refine_tensors(x, 200, 0, 10), plain)
    cat = allowed.refine_tensors(x, seeds=0, prompt="a cat", **STEPS)
    assert (cat - allowed.refine_tensors(x, seeds=0, prompt="a dog", **STEPS)).abs().max() > 1e-3
    # the unconditional expert's steps ran unguided: one call per sample, no conditioning
    calls = []
    model = allowed.experts[1].model
    original = model.apply_model
    model.apply_model = lambda z, t, cond=None: calls.append((z.shape[0], cond)) or original(z, t, cond)
    try:
        allowed.refine_tensors(x, seeds=0, prompt="a cat", **STEPS)
    finally:
        del model.apply_model
    assert calls and all(n == 1 and cond is None for n, cond in calls)
    # unconditional experts alone take no prompt
    with pytest.raises(ValueError, match="is text-conditioned, so it would change nothing"):
        Refiner.from_checkpoints([ckpts["uncond_lo"]], device="cpu").refine_tensors(x, 200, 0, 10, prompt="a cat")


# ----------------------------------------------------------------------------------------------------------- files
def png(path: Path, seed: int, text: dict[str, str] | None = None, size=(40, 32)) -> Path:
    rgb = (np.random.default_rng(seed).random((size[1], size[0], 3)) * 255).astype(np.uint8)
    info = PngInfo()
    for key, value in (text or {}).items():
        info.add_text(key, value)
    Image.fromarray(rgb).save(path, pnginfo=info)
    return path


def test_refine_files_records_the_prompt_and_fails_inputs_without_one(refiner, tmp_path):
    paths = [png(tmp_path / "a.png", 0), png(tmp_path / "b.png", 1), png(tmp_path / "c.png", 2)]
    prompts = [Prompt("a cat", "blurry", 5.0), None, "c.png: no entry for it anywhere"]
    lines: list[str] = []
    report = refine_files(refiner, paths, tmp_path / "out", RefineRequest(**STEPS), prompts=prompts, on_error=lines.append,
                          progress=False)  # fmt: skip
    assert [p.name for p in report.written] == ["a_t400_s0.png"]
    assert len(lines) == 2 and "b.png: no prompt" in lines[0] and lines[1] == "c.png: no entry for it anywhere"
    meta = read_png_metadata(report.written[0])
    assert (meta["prompt"], meta["negative_prompt"], meta["guidance_scale"]) == ("a cat", "blurry", "5.0")
    assert "unguided_experts" not in meta
    found = read_image_prompt(report.written[0])  # an output's prompt is read back from its own metadata
    assert found.resolve() == prompts[0]


@pytest.fixture(scope="module")
def cli():
    spec = importlib.util.spec_from_file_location("refine_script_prompt", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_main(cli, argv: list[str]) -> int:
    try:
        return cli.main(argv)
    except SystemExit as exc:
        return int(exc.code)


def error_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.strip()]


def test_cli_prompts_from_a1111_png_prompt_file_and_flags_in_a_subprocess(ckpts, tmp_path):
    inputs = tmp_path / "in"
    inputs.mkdir()
    a1111 = "a red cat\nsitting\nNegative prompt: blurry, ugly\nSteps: 20, Sampler: Euler a, CFG scale: 5, Seed: 1"
    png(inputs / "sd.png", 0, {"parameters": a1111})
    png(inputs / "filed.png", 1)
    png(inputs / "bare.png", 2)
    prompt_file = tmp_path / "prompts.txt"
    prompt_file.write_text("# stem<TAB>prompt\nfiled\ta dog\nother\tunused\n", encoding="utf-8")
    out = tmp_path / "out"
    cmd = [sys.executable, str(SCRIPT), "--input", str(inputs), "--ckpt", str(ckpts["hi"]), "--ckpt", str(ckpts["lo"]),
           "--outdir", str(out), "--start-t", "400", "--ddim-steps", "10", "--device", "cpu", "--prompt-file",
           str(prompt_file), "--negative-prompt", "noise", "--guidance-scale", "3"]  # fmt: skip
    # the same intra-op thread count as this process: CPU kernels split reductions by thread, which moves the last bits
    # (earlier tests in this process may have changed it), and the pixels are compared with the API's below
    threads = str(torch.get_num_threads())
    env = {**os.environ, "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads}
    proc = run_python(cmd[1:], cwd=REPO, timeout=300, env=env)
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    failed = [line for line in error_lines(proc.stderr) if "bare.png" in line and "no prompt" in line]
    assert len(failed) == 1 and "--prompt-file" in failed[0]
    assert sorted(p.name for p in out.iterdir()) == ["filed_t400_s0.png", "sd_t400_s0.png"]
    sd = read_png_metadata(out / "sd_t400_s0.png")  # the image's own prompt, negative prompt and CFG scale
    assert (sd["prompt"], sd["negative_prompt"], sd["guidance_scale"]) == ("a red cat\nsitting", "blurry, ugly", "5.0")
    filed = read_png_metadata(out / "filed_t400_s0.png")  # the file's prompt; the flags fill what it did not record
    assert (filed["prompt"], filed["negative_prompt"], filed["guidance_scale"]) == ("a dog", "noise", "3.0")
    assert json.loads(filed["parameters"])["prompt_file"] == str(prompt_file)
    # the CLI's pixels are the API's for the same prompt and seed
    api = Refiner.from_checkpoints([ckpts["hi"], ckpts["lo"]], device="cpu")
    src = image_to_tensor(load_image(inputs / "filed.png").rgb)
    expected = tensor_to_image(api.refine_tensors(src, seeds=0, prompt=Prompt("a dog", "noise", 3.0), **STEPS))
    cli_pixels = np.asarray(Image.open(out / "filed_t400_s0.png")).astype(np.int16)
    # equal in a fresh process; after other tests changed this process's global torch settings, the last float bit
    # may round a pixel the other way
    assert np.abs(cli_pixels - expected.astype(np.int16)).max() <= 1


def test_cli_bad_guidance_scale_exits_2_at_parsing_in_a_subprocess(tmp_path):
    argv = [SCRIPT, "--input", "x.png", "--ckpt", "a.ckpt", "--guidance-scale", "-2", "--outdir", tmp_path / "out"]
    proc = run_python(argv, cwd=tmp_path, timeout=120)
    lines = error_lines(proc.stderr)
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr
    assert lines[0].startswith("refine.py: error: argument --guidance-scale: -2 must be a finite number >= 0")


def test_cli_refusals_are_one_line_before_any_work(cli, ckpts, expert_checkpoints, tmp_path, capsys):
    src = png(tmp_path / "bare.png", 0)
    text = ["--ckpt", str(ckpts["hi"]), "--ckpt", str(ckpts["lo"])]
    mixed = ["--ckpt", str(ckpts["hi"]), "--ckpt", str(ckpts["uncond_lo"])]
    uncond = ["--ckpt", str(expert_checkpoints[0]), "--ckpt", str(expert_checkpoints[1])]
    bad_file = tmp_path / "latin1.txt"
    bad_file.write_bytes("bare\tcaf\xe9\n".encode("latin-1"))
    cases = [
        (text, [], "no input has a prompt for the text-conditioned expert(s) (first: "),
        (mixed, ["--prompt", "a cat"], "--allow-unconditional-experts"),
        (uncond, ["--prompt", "a cat"], "--prompt given, but no expert that runs is text-conditioned"),
        (text, ["--prompt", "a", "--prompt-file", str(bad_file)], "--prompt and --prompt-file were both given"),
        (text, ["--prompt-file", str(bad_file)], "is not UTF-8: line 1"),
        (text, ["--prompt", "bad\x00"], "argument --prompt: the prompt contains a NUL character"),
    ]
    for ckpt_args, extra, message in cases:
        out = tmp_path / "out"
        code = run_main(cli, ["--input", str(src), *ckpt_args, "--outdir", str(out), "--start-t", "400",
                              "--ddim-steps", "10", "--device", "cpu", *extra])  # fmt: skip
        err = capsys.readouterr().err
        lines = [line for line in error_lines(err) if line.startswith("refine.py: error")]
        assert code == 2 and len(lines) == 1 and message in lines[0], (extra, err)
        assert not out.exists() or not any(out.iterdir())
    # the documented way to run a mixed chain
    out = tmp_path / "mixed"
    code = run_main(cli, ["--input", str(src), *mixed, "--outdir", str(out), "--start-t", "400", "--ddim-steps", "10",
                          "--device", "cpu", "--prompt", "a cat", "--allow-unconditional-experts"])  # fmt: skip
    assert code == 0, capsys.readouterr().err
    meta = read_png_metadata(out / "bare_t400_s0.png")
    assert meta["prompt"] == "a cat" and meta["unguided_experts"] == "uncond_0_250.ckpt"


def test_the_web_app_refines_with_its_prompt_fields_as_the_api_does(refiner, tmp_path):
    """The app's settings carry prompt, negative prompt and guidance scale to text-conditioned experts; its output
    equals refine_tensors' with the same Prompt and seed, and records them; bad values are one-line 400s."""
    pytest.importorskip("starlette", reason="the web app needs the app extra")
    from ldm.app.handlers import RefineSettings, RequestError, load_upload, prepare
    from ldm.app.handlers import refine as app_refine
    from ldm.imageio import image_to_tensor, load_image, read_png_metadata

    path = png(tmp_path / "cat.png", 3)
    upload = load_upload(path.read_bytes(), "cat.png")
    settings = RefineSettings.from_json({"mode": "whole", "start_t": 400, "steps": 10, "prompt": "a cat",
                                         "negative_prompt": "blurry", "guidance_scale": 5})  # fmt: skip
    prepared = prepare(refiner, upload, settings, None)
    assert prepared.request.prompt == Prompt("a cat", "blurry", 5.0)
    result = app_refine(refiner, prepared, tmp_path / "out")
    x = image_to_tensor(load_image(path).rgb)
    expected = refiner.refine_tensors(x, 400, [0], 10, prompt=Prompt("a cat", "blurry", 5.0))
    assert np.array_equal(load_image(result.samples[0].path).rgb, load_image_array(expected))
    meta = read_png_metadata(result.samples[0].path)
    assert (meta["prompt"], meta["negative_prompt"], meta["guidance_scale"]) == ("a cat", "blurry", "5.0")
    for bad, words in (({"guidance_scale": 100}, "Guidance scale must be a number from 0 to 30"),
                       ({"guidance_scale": "high"}, "Guidance scale must be a number"),
                       ({"prompt": 5}, "Prompt must be text, got a number")):  # fmt: skip
        with pytest.raises(RequestError, match=words):
            RefineSettings.from_json(bad)


def load_image_array(x: torch.Tensor) -> np.ndarray:
    from ldm.imageio import tensor_to_image

    return tensor_to_image(x[0]).astype(np.float32) / 255.0


def test_the_app_times_text_conditioned_experts_and_refuses_huge_guidance_in_one_line(refiner):
    """scripts/app.py measures one step of each expert at start-up: a text-conditioned expert needs its context (it
    crashed the app before serving); a guidance scale beyond float range is a 400, not a 500."""
    pytest.importorskip("starlette", reason="the web app needs the app extra")
    from ldm.app.handlers import RefineSettings, RequestError, measure_step_cost

    cost = measure_step_cost(refiner, repeats=1)
    assert cost.step_seconds(64 * 64) > 0 and cost.fixed_seconds >= 0 and cost.first_stage.step_seconds(64 * 64) > 0
    with pytest.raises(RequestError, match="Guidance scale must be a number from 0 to 30"):
        RefineSettings.from_json({"guidance_scale": 10**400})
