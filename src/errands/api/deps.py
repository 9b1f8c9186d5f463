"""What routes receive: the runtime of this process and the authenticated caller."""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated

from fastapi import Depends, Request

from errands.api.middleware import PRINCIPAL
from errands.auth import Principal
from errands.errors import Unauthorized

if TYPE_CHECKING:
    from errands.runtime import Runtime


def get_runtime(request: Request) -> Runtime:
    runtime: Runtime = request.app.state.runtime
    return runtime


def get_principal(request: Request) -> Principal:
    principal = request.scope.get(PRINCIPAL)
    if not isinstance(principal, Principal):
        raise Unauthorized()
    return principal


RuntimeDep = Annotated["Runtime", Depends(get_runtime)]
PrincipalDep = Annotated[Principal, Depends(get_principal)]
