"""A team's FastAPI app with errands inside it: one process, the team's own users and auth.

Its users are errands owners: `POST /reports` submits a task as the caller, `GET /token` mints an
owner token so the browser can watch its own tasks at `/errands/v1/...`, where errands' API is
mounted. Run it with `uvicorn app:app` (see README.md).
"""

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import Depends, FastAPI, Header, HTTPException

from errands import Errands, TaskContext

# The team's login, in small: a real app checks its session cookie or JWT here.
API_KEYS = {"key-alice": "alice", "key-bob": "bob"}


def current_user(x_api_key: str = Header()) -> str:
    if x_api_key not in API_KEYS:
        raise HTTPException(401, "Unknown API key.")
    return API_KEYS[x_api_key]


errands = Errands()


@errands.task("report", timeout_s=600)
async def report(ctx: TaskContext, input: dict[str, Any]) -> dict[str, Any]:
    await ctx.progress(10, f"collecting {input.get('month', 'this month')}")
    await asyncio.sleep(float(input.get("seconds", 2)))  # stands in for the real work
    return {"url": f"/files/{ctx.task_id}.pdf", "for": ctx.owner}


@asynccontextmanager
async def lifespan(api: FastAPI) -> AsyncIterator[None]:
    async with errands.running():  # store, workers, sweeper: started and drained with the app
        yield


app = FastAPI(lifespan=lifespan)
app.mount("/errands", errands.asgi())  # errands' API, for the browser's owner tokens


@app.post("/reports", status_code=202)
async def submit_report(body: dict[str, Any], user: str = Depends(current_user)) -> dict[str, Any]:
    task = await errands.submit("report", body, owner=user)  # the team's user is the owner
    return {"id": task.id, "status": task.status}


@app.get("/token")
def token(user: str = Depends(current_user)) -> dict[str, str]:
    # Read-only and short-lived: the browser watches its own tasks and nobody else's.
    return {"token": errands.mint_token(user, scopes=["read"], ttl_s=900), "api": "/errands"}
