"""Photography with credits: a photo made in steps, for up to 10 minutes, for 10 credits."""

# Its owner's credits are reserved as it is submitted, charged when it completes, given back when
# it fails, times out or is cancelled: errands keeps the books, this file only makes the photo.
# Run from the repository's root (see README.md):
#   PYTHONPATH=examples/photography ERRANDS_DB=sqlite:///examples/photography/errands.db \\
#       ERRANDS_CORS_ORIGINS=http://127.0.0.1:8080 ./dev serve --app app:app

from __future__ import annotations

import asyncio
from html import escape
from typing import Any
from urllib.parse import quote

from errands import Errands, Fail, TaskContext

app = Errands()

#: What the stand-in model declines to draw (a real one has a safety checker of its own).
DECLINED = ("gore", "nsfw")
STAGES = ("composing", "lighting", "rendering", "retouching")


def number(input: dict[str, Any], name: str, default: float, low: float, high: float) -> float:
    value = input.get(name, default)
    if isinstance(value, bool) or not isinstance(value, int | float) or not low <= value <= high:
        raise Fail("bad_input", f"{name} must be a number from {low:g} to {high:g}.")
    return float(value)


# A model error or a worker that dies is tried once more (the credits stay reserved meanwhile).
@app.task("photography", cost=10, timeout_s=600, max_attempts=2, concurrency_per_owner=2)
async def photography(ctx: TaskContext, input: dict[str, Any]) -> dict[str, Any]:
    # A photo of prompt in `steps` steps of `step_s` seconds: by default 30 x 3 s, longer than
    # the 60 s a cloud function gets.
    prompt = input.get("prompt")
    if not isinstance(prompt, str) or not prompt.strip() or len(prompt) > 500:
        raise Fail("bad_input", "Describe the photo in prompt (up to 500 characters).")
    steps, step_s = int(number(input, "steps", 30, 1, 200)), number(input, "step_s", 3, 0, 30)
    for step in range(1, steps + 1):
        await asyncio.sleep(step_s)  # one step of the model
        if step > steps // 2 and any(word in prompt.lower() for word in DECLINED):
            raise Fail("content_rejected", "The model declined this prompt.")  # final: no retry
        stage = STAGES[(step - 1) * len(STAGES) // steps]
        await ctx.progress(step * 100 // steps, f"{stage}: step {step} of {steps}")
    # The model's photo would be uploaded to your storage and its URL returned; a picture stands in.
    hue = sum(map(ord, prompt)) % 360
    svg = (
        f"<svg xmlns='http://www.w3.org/2000/svg' width='480' height='320'><rect width='480' "
        f"height='320' fill='hsl({hue},55%,45%)'/><text x='20' y='296' font-family='sans-serif' "
        f"font-size='20' fill='white'>{escape(prompt[:40])}</text></svg>"
    )
    return {"image": "data:image/svg+xml," + quote(svg), "prompt": prompt, "steps": steps}
