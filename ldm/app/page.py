"""What the page shows that the CLI does not need: the start slider's range from the experts' windows, and errors in the
page's words (counted in timesteps ``t``; ``k = T - t`` only in tooltips)."""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from ldm.util import one_line

logger = logging.getLogger(__name__)

# The page's label of each setting (index.html's <label> texts): a message names a field as the page does.
FIELD_LABELS = {
    "start_t": "Start t",
    "sampler": "Sampler",
    "steps": "Steps",
    "step_mode": "Steps counted",
    "seed": "Seed",
    "n_samples": "Samples",
    "mode": "Mode",
    "boxes": "Boxes",
    "mask_blur": "Mask blur",
    "mask_dilate": "Mask dilate",
    "region_padding": "Region padding",
    "prompt": "Prompt",
    "negative_prompt": "Negative prompt",
    "guidance_scale": "Guidance scale",
}


@dataclass(frozen=True)
class StartRange:
    """The starts the loaded experts can run, for the page's slider: ``low``, ``high`` (the highest start whose every
    step some window covers; T-1 when the nearest expert runs outside the windows), ``default``; ``covered``: some
    window starts at t=0 (else no start can run); ``windows``: ``(t_min, t_max, name)`` per expert, lowest first."""

    low: int
    high: int
    default: int
    covered: bool
    windows: tuple[tuple[int, int, str], ...]
    num_timesteps: int

    def as_json(self) -> dict[str, Any]:
        return {"min": self.low, "max": self.high, "default": self.default, "covered": self.covered,
                "num_timesteps": self.num_timesteps}  # fmt: skip

    def windows_json(self) -> list[dict[str, Any]]:
        steps = self.num_timesteps
        return [{"name": name, "t_min": lo, "t_max": hi, "steps": [steps - hi, steps - lo], "text": t_window(lo, hi)}
                for lo, hi, name in self.windows]  # fmt: skip

    def describe(self) -> str:
        """``"t 0-249 (b.ckpt); t 250-499 (a.ckpt)"``."""
        return "; ".join(f"{t_window(lo, hi)} ({name})" for lo, hi, name in self.windows)


def t_window(t_min: int, t_max: int) -> str:
    """A window ``[t_min, t_max)`` as the page writes it: ``"t 250-499"``."""
    return f"t {t_min}-{t_max - 1}" if t_max - 1 > t_min else f"t {t_min}"


def start_range(refiner: Any) -> StartRange:
    """The slider's range and default for ``refiner``'s experts (``num_timesteps``, ``experts[i].window`` and
    ``.name``, ``router.allow_outside_window``)."""
    total = int(refiner.num_timesteps)
    windows = tuple(sorted((int(e.window[0]), int(e.window[1]), str(e.name)) for e in refiner.experts))
    top = 0  # the union of the windows, counted up from t=0 (a start must have every step below it covered)
    for lo, hi, _ in windows:
        if lo > top:
            break
        top = max(top, hi)
    covered = top > 0
    if refiner.router.allow_outside_window:  # the nearest expert runs steps outside the windows: every start runs
        high = total - 1
    else:  # without a window at t=0 no start runs (the label says why); the slider spans the windows all the same
        high = max(1, min(top if covered else max(hi for _, hi, _ in windows), total) - 1)
    # Default: the middle of the lowest window (t 0-249 -> 125), at most a quarter of the noise levels (a full-range
    # model: 250): a low start changes little, runs one expert and is inside the windows; the user slides up for more.
    lo, hi, _ = windows[0]
    default = min((lo + hi) // 2, total // 4)
    return StartRange(1, high, max(1, min(default, high)), covered, windows, total)


def window_message(rng: StartRange, start_t: int, box_starts: Sequence[tuple[str, int]], detail: str) -> str:
    """The page's message for a plan the experts cannot run (``detail``: the refiner's message, for what it names;
    ``box_starts``: ``(box as written, its own start)`` for boxes with a start of their own)."""
    if "more than one expert window" in detail:
        return (f"two of the loaded experts cover the same steps ({rng.describe()}); start the app with experts whose "
                "windows do not overlap")  # fmt: skip
    if not rng.covered:
        lowest = rng.windows[0][0]
        return (f"the loaded experts leave the last steps (t 0-{lowest - 1}) uncovered ({rng.describe()}), so no start "
                f"can run; start the app with an expert for t 0-{lowest - 1} too")  # fmt: skip
    for box, start in box_starts:
        if start > rng.high:
            return (f"box {box} starts at t={start}, above the experts' range (max {rng.high}); lower its @start_t or "
                    "leave it out")  # fmt: skip
    if start_t > rng.high:
        return f"start t={start_t} is above the experts' range (max {rng.high}); move the slider down"
    return (f"start t={start_t} runs steps no loaded expert covers ({rng.describe()}); move the slider down to at most "
            f"{rng.high}")  # fmt: skip


# (pattern, replacement): the CLI's and Python's words in the refiner's messages, and the page's words for them
_REWRITES: tuple[tuple[re.Pattern[str], str], ...] = tuple(
    (re.compile(pattern), replacement)
    for pattern, replacement in (
        (
            r"start_t=(\d+) holds no step of the (\d+)-step DDIM grid \(its lowest entry is t=(\d+)\): raise start_t, use "
            r"more ddim_steps, or use tail_steps for an exact step count",
            r"start t=\1 is below every step of the \2-step DDIM grid (its lowest is t=\3): raise the start, use more "
            r"Steps, or count them 'exactly, from start t'",
        ),
        (
            r"tail_steps=(\S+) must be an integer in \[1, (\d+)\]",
            r"Steps \1: counted exactly from start t=\2, at most \2 steps fit (one per timestep); lower Steps or raise "
            r"the start",
        ),
        (r"ddim_steps=(\S+) must be an integer in \[1, (\d+)\]", r"Steps \1: a DDIM grid has 1 to \2 steps"),
        (r"\(--mask-dilate PX\)", "(Mask dilate, under 'more')"),
        (r"\(without --crop-regions\)", "(Mode: in place)"),
        (r"paint the region to refine white", "paint over the region to refine"),
        (
            r"a box's own start_t must be in \[1, T-1\] \(T = \d+ timesteps by default\); leave out @start_t to use the "
            r"batch's start",
            "a box's own start must be at least t=1; leave out @start_t to use the slider's start",
        ),
    )  # fmt: skip
)
_CLI_WORDS = re.compile(r"--[a-z][a-z-]+|\b[a-z]+(?:_[a-z]+)+=|=True\b|=False\b")
_CLI_ASIDE = re.compile(r"\s*\([^()]*(?:--[a-z]|=True|=False)[^()]*\)")


def json_kind(value: Any) -> str:
    """What a parsed JSON ``value`` is, in JSON's words (``null``, ``true``, a number, text, an array, an object):
    the page's messages name no Python type."""
    if value is None or isinstance(value, bool):
        return json.dumps(value)
    kinds = ((str, "text"), ((int, float), "a number"), (list, "an array"), (dict, "an object"))
    return next((kind for types, kind in kinds if isinstance(value, types)), type(value).__name__)


def page_words(message: str) -> str:
    """``message`` on one line in the page's words; an aside or a sentence that still names a flag or a keyword
    argument is dropped (logged at debug level, so a new message can be given words)."""
    text = one_line(message)
    for pattern, replacement in _REWRITES:
        text = pattern.sub(replacement, text)
    if _CLI_WORDS.search(text):
        logger.debug("message with command-line words shown on the page: %s", text)
        text = _CLI_ASIDE.sub("", text)
        sentences = [part for part in re.split(r"(?<=[.;])\s+", text) if not _CLI_WORDS.search(part)]
        text = " ".join(sentences) if sentences else _CLI_WORDS.sub("", text)
    return text
