"""What routes receive: the runtime of this process and the authenticated caller."""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated

from fastapi import Depends, Request

from errands.api.middleware import PRINCIPAL
from errands.auth import Principal
from errands.errors import Unauthorized

if TYPE_CHECKING:
    from errands.runtime import Runtime


async def get_runtime(request: Request) -> Runtime:
    runtime: Runtime = request.app.state.runtime
    return runtime


def principal_of(request: Request) -> Principal:
    """The caller, authenticated by the middleware before the route ran."""
    principal = request.scope.get(PRINCIPAL)
    if not isinstance(principal, Principal):
        raise Unauthorized()
    return principal


async def get_principal(request: Request) -> Principal:
    return principal_of(request)


RuntimeDep = Annotated["Runtime", Depends(get_runtime)]
PrincipalDep = Annotated[Principal, Depends(get_principal)]
