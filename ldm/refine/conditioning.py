"""Prompts in refinement: which experts take one, the rules for chains, encoding to each expert's guidance, and each
input file's prompt for the CLI."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterable, Sequence
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

import torch

from ldm.imageio import format_path
from ldm.imageio.prompt import DEFAULT_GUIDANCE_SCALE, Prompt, PromptError, PromptFile, read_image_prompt
from ldm.models.diffusion.experts import Expert
from ldm.models.diffusion.latent import TEXT_COND_KEYS
from ldm.sampling.guidance import Guidance
from ldm.sampling.plan import RefinePlan

logger = logging.getLogger(__name__)

#: what ``refine_tensors(prompt=...)`` takes: one prompt for every sample (a str is ``Prompt(text)``: negative prompt
#: "", scale :data:`~ldm.imageio.prompt.DEFAULT_GUIDANCE_SCALE`), one per sample, or None (no prompt)
PromptArg = Prompt | str | Sequence[Prompt | str] | None


def conditioning_key(model: Any) -> str | None:
    """``crossattn``, ``concat``, ``adm``, ..., or None for an unconditional model."""
    return getattr(getattr(model, "model", None), "conditioning_key", None)


def is_text_conditioned(model: Any) -> bool:
    """Whether ``model`` has a conditioning key and a condition encoder fed with text (``cond_stage_key`` in
    :data:`~ldm.models.diffusion.latent.TEXT_COND_KEYS`)."""
    return (conditioning_key(model) is not None and getattr(model, "cond_stage_model", None) is not None
            and getattr(model, "cond_stage_key", None) in TEXT_COND_KEYS)  # fmt: skip


def used_experts(plan: RefinePlan) -> list[int]:
    return sorted(set(plan.experts))


def text_experts(experts: Sequence[Expert], plan: RefinePlan) -> list[int]:
    """Indices of the text-conditioned experts the plan runs."""
    return [i for i in used_experts(plan) if is_text_conditioned(experts[i].model)]


def _names(experts: Sequence[Expert], indices: Iterable[int]) -> str:
    return ", ".join(experts[i].name for i in indices)


def check_chain(experts: Sequence[Expert], plan: RefinePlan, prompted: bool, allow_unconditional: bool) -> None:
    """One-line ValueError (which rule, what to change) unless the experts the plan runs allow ``prompted``: a
    text-conditioned expert needs a prompt; a prompt needs one (refused rather than ignored) and no expert conditioned on
    something else; a mixed chain with unconditional experts takes it only with ``allow_unconditional`` (run unguided)."""
    used = used_experts(plan)
    text = text_experts(experts, plan)
    if not prompted:
        if text:
            raise ValueError(
                f"expert(s) {_names(experts, text)} are text-conditioned and need a prompt: pass prompt=... (CLI: "
                "--prompt, --prompt-file, or an image that records its prompt); Prompt('', guidance_scale=1) runs "
                "them on the empty prompt"
            )
        return
    other = [i for i in used if i not in text]
    foreign = [i for i in other if conditioning_key(experts[i].model) is not None]
    if foreign:
        keys = sorted({str(getattr(experts[i].model, "cond_stage_key", "?")) for i in foreign})
        raise ValueError(
            f"expert(s) {_names(experts, foreign)} are conditioned on {', '.join(keys)}, not on text, and cannot take a "
            "prompt; refine with text-conditioned experts (cond_stage_key caption or txt) only"
        )
    if not text:
        raise ValueError(
            f"a prompt was given but no expert that runs ({_names(experts, used)}) is text-conditioned, so it would "
            "change nothing: drop the prompt (--prompt, --prompt-file, --negative-prompt, --guidance-scale)"
        )
    if other and not allow_unconditional:
        raise ValueError(
            f"this refinement chains text-conditioned expert(s) ({_names(experts, text)}) with unconditional ones "
            f"({_names(experts, other)}): pass allow_unconditional_experts=True (CLI --allow-unconditional-experts) "
            "to run the unconditional experts' steps without the prompt, or chain text-conditioned experts only"
        )


def prompts_for_batch(prompt: PromptArg, batch: int) -> list[Prompt] | None:
    """``prompt`` as one validated :class:`Prompt` per sample (None stays None).  PromptError (a ValueError) for a bad
    prompt; ValueError for neither 1 nor ``batch`` prompts, or different guidance scales in one batch."""
    if prompt is None:
        return None
    items = [prompt] if isinstance(prompt, (str, Prompt)) else list(prompt)
    if len(items) not in (1, batch):
        raise ValueError(f"got {len(items)} prompts for a batch of {batch}; pass one prompt per sample or one for all")
    prompts = []
    for item in items:
        if isinstance(item, str):
            item = Prompt(item)
        elif not isinstance(item, Prompt):
            raise PromptError(
                f"prompt must be a str, an ldm.imageio.prompt.Prompt or a list of them, got {type(item).__name__}"
            )
        prompts.append(item)
    scales = sorted({p.guidance_scale for p in prompts})
    if len(scales) > 1:
        raise ValueError(
            f"the prompts of one batch have different guidance scales {scales}: refine samples with different scales "
            "in separate calls"
        )
    return prompts * batch if len(prompts) == 1 else prompts


def encode_prompts(
    experts: Sequence[Expert],
    plan: RefinePlan,
    prompts: Sequence[Prompt],
    batch_invariant: bool,
    autocast: Callable[[], AbstractContextManager],
) -> list[Guidance | None]:
    """Encode ``prompts`` (one per sample) for every text-conditioned expert the plan runs: per expert of ``experts``,
    its :class:`Guidance` (``cond [B, L, D]``, ``uncond [B, L, D]`` or None at scale 1, on the device), or None for an
    expert that runs unguided.

    Each distinct text (and negative text when the scale is not 1) is encoded once per condition encoder module; with
    ``batch_invariant`` one text per call (CPU kernels block by batch size).  ValueError when an encoder returns
    something other than one tensor ``[n, ...]`` per ``n`` texts (its conditioning could not be guided here).
    """
    scale = prompts[0].guidance_scale
    negatives = [p.negative_prompt for p in prompts] if scale != 1.0 else []
    texts = list(dict.fromkeys([p.prompt for p in prompts] + negatives))
    row = {text: i for i, text in enumerate(texts)}
    cond_rows = [row[p.prompt] for p in prompts]
    uncond_rows = [row[text] for text in negatives] if scale != 1.0 else None
    guidance: list[Guidance | None] = [None] * len(experts)
    encoded: dict[int, torch.Tensor] = {}  # id of the encoder -> [len(texts), L, D]
    with torch.no_grad(), autocast():
        for i in text_experts(experts, plan):
            model = experts[i].model
            key = id(model.cond_stage_model)
            if key not in encoded:
                chunks = [[t] for t in texts] if batch_invariant else [texts]
                parts = [_encode(model, chunk, experts[i].name) for chunk in chunks]
                encoded[key] = parts[0] if len(parts) == 1 else torch.cat(parts)
            table = encoded[key]
            guidance[i] = Guidance(table[cond_rows], None if uncond_rows is None else table[uncond_rows], scale)
    return guidance


def share_condition_encoders(experts: Sequence[Expert]) -> None:
    """Let experts whose text encoders are identical (class, ``cond_stage_forward``, plain public attributes,
    tokenizer vocabulary and merges, weights) hold one module, the first one's, so a chain of SD experts encodes each
    prompt once.  Only for models this process built (changed in place)."""
    kept: list[Any] = []
    for model in (e.model for e in experts if is_text_conditioned(e.model)):
        same = next((m for m in kept if _same_encoder(m, model)), None)
        if same is None:
            kept.append(model)
        else:
            model.cond_stage_model = same.cond_stage_model


def _settings(module: Any) -> dict[str, Any]:
    plain = (bool, int, float, str, type(None))
    values = {k: v for k, v in vars(module).items() if not k.startswith("_") and isinstance(v, plain)}
    tokenizer = getattr(module, "tokenizer", None)
    if tokenizer is not None:
        values["vocab"] = tokenizer.get_vocab() if callable(getattr(tokenizer, "get_vocab", None)) else id(tokenizer)
        values["merges"] = getattr(tokenizer, "bpe_ranks", None)
    return values


def _same_encoder(a: Any, b: Any) -> bool:
    ea, eb = a.cond_stage_model, b.cond_stage_model
    if ea is eb:
        return True
    if type(ea) is not type(eb) or a.cond_stage_forward != b.cond_stage_forward or _settings(ea) != _settings(eb):
        return False
    sa, sb = ea.state_dict(), eb.state_dict()
    return sa.keys() == sb.keys() and all(
        sa[k].shape == sb[k].shape and sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]) for k in sa
    )


def _encode(model: Any, texts: list[str], name: str) -> torch.Tensor:
    out = model.get_learned_conditioning(texts)
    if not isinstance(out, torch.Tensor) or out.ndim < 2 or out.shape[0] != len(texts):
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ValueError(
            f"expert {name}: its condition encoder returned {shape} for {len(texts)} prompt(s); guidance here needs "
            "one tensor [n, L, D] per n prompts (a cross-attention context)"
        )
    return out


def unguided_experts(experts: Sequence[Expert], plan: RefinePlan) -> list[str]:
    """Names of the experts the plan runs without the prompt (in an allowed mixed chain)."""
    text = set(text_experts(experts, plan))
    return [experts[i].name for i in used_experts(plan) if i not in text]


# prompts for files (the CLI)


def resolve_input_prompts(
    paths: Sequence[Path],
    prompt: Prompt | None = None,
    prompt_file: PromptFile | None = None,
    negative_prompt: str | None = None,
    guidance_scale: float | None = None,
) -> list[Prompt | str]:
    """Each input's :class:`Prompt`, or one line saying why it has none (none anywhere, or a corrupt one in the image):
    ``prompt`` for every input, else the input's ``prompt_file`` entry (by stem), else the prompt the image records;
    ``negative_prompt`` and ``guidance_scale`` fill what the entry or image did not record (None: ``""`` and
    :data:`~ldm.imageio.prompt.DEFAULT_GUIDANCE_SCALE`)."""
    if prompt is not None:
        return [prompt] * len(paths)
    negative = "" if negative_prompt is None else negative_prompt
    scale = DEFAULT_GUIDANCE_SCALE if guidance_scale is None else guidance_scale
    if prompt_file is not None:
        missing = prompt_file.missing(Path(os.fsdecode(p)).stem for p in paths)
        if missing:
            shown = ", ".join(missing[:8]) + (", ..." if len(missing) > 8 else "")
            logger.info(
                "prompt file %s has no entry for %d input(s) (%s): their prompt is read from the image if it records one",
                prompt_file.path,
                len(missing),
                shown,
            )
    out: list[Prompt | str] = []
    for path in paths:
        found = prompt_file.for_path(path) if prompt_file is not None else None
        try:
            if found is None:
                found = read_image_prompt(path)
            out.append(found.resolve(negative, scale) if found is not None else _no_prompt(path, prompt_file))
        except PromptError as exc:
            out.append(f"{format_path(path)}: {exc}")
    return out


def _no_prompt(path: Path, prompt_file: PromptFile | None) -> str:
    stem = Path(os.fsdecode(path)).stem
    where = f"no entry for stem {stem!r} in --prompt-file {prompt_file.path}, " if prompt_file is not None else ""
    return (
        f"{format_path(path)}: no prompt for the text-conditioned expert(s): {where}no prompt recorded in the "
        "image; pass --prompt, a --prompt-file with a line for its stem, or an image that records its prompt "
        "(A1111 'parameters' or this project's metadata)"
    )
