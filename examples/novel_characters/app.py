"""Character recognition over a novel: errands runs it, reports progress per chapter and streams
each character as it is recognised. Serve it with ``errands serve --app app:app`` (see README.md).

The recogniser is a heuristic, offline and honest about it: in Chinese fiction a speaker is named
just before the verb that opens a quoted line (林小满说 / 陈伯笑道, then a colon and the line); a
name that opens two lines or more is a character (one line may be a passer-by or a misreading).
"""

import asyncio
import re
from collections import Counter
from typing import Any

from errands import Errands, Fail, TaskContext

app = Errands()

CHAPTER = re.compile(r"(?m)^(?=第[一二三四五六七八九十百千零\d]+[章回])")
SPEAKER = re.compile(
    r"(?:^|[。！？；，、”\s])([\u4e00-\u9fff]{2,3}?)"  # noqa: RUF001 - a name of 2 or 3 after a break
    r"(?:笑着|低声|小声|大声|连忙|叹气|冷冷地)?"  # how they say it
    r"(?:笑道|问道|说道|喊道|说|道|问|喊)[：，]“",  # noqa: RUF001 - the verb, then the line in quotes
    re.M,
)
NOT_NAMES = ("他", "她", "我", "你", "它", "大家", "众人", "有人")


@app.task("novel_characters", timeout_s=3600)
async def novel_characters(ctx: TaskContext, input: dict[str, Any]) -> dict[str, Any]:
    chapters = input.get("chapters") or CHAPTER.split(str(input.get("text", "")))
    pace_s = input.get("pace_s", 1)  # stands in for a real recogniser's time per chapter
    if not isinstance(chapters, list) or not isinstance(pace_s, int | float) or not 0 <= pace_s <= 60:
        raise Fail("bad_input", "Give the novel as text or as a list of chapters; pace_s from 0 to 60.")
    if not (chapters := [c for c in chapters if isinstance(c, str) and c.strip()]):
        raise Fail("bad_input", "The novel is empty.")
    lines: Counter[str] = Counter()
    found: dict[str, int] = {}  # name -> the chapter where it became a character
    for i, chapter in enumerate(chapters, start=1):
        await asyncio.sleep(pace_s)
        title = chapter.strip().splitlines()[0][:40]
        for name in SPEAKER.findall(chapter):
            lines[name] += 1
            if lines[name] == 2 and not name.startswith(NOT_NAMES):
                found[name] = i
                await ctx.stream("characters", {"name": name, "chapter": i, "title": title})
        await ctx.progress(100 * i // len(chapters), f"{title} ({i}/{len(chapters)}): {len(found)} found")
    characters = [{"name": n, "lines": lines[n], "chapter": c} for n, c in found.items()]
    return {"chapters": len(chapters), "characters": characters}
