"""Request dependencies, as `Annotated` aliases so handlers read like prose."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from zimage_server.accounts import Principal, authenticate
from zimage_server.api.state import ServiceState
from zimage_server.errors import Unauthorized

_bearer = HTTPBearer(auto_error=False, description="An API key created with `zimage keys create`.")


def get_state(request: Request) -> ServiceState:
    state: ServiceState = request.app.state.service
    return state


State = Annotated[ServiceState, Depends(get_state)]


def current_principal(
    state: State, credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]
) -> Principal:
    if credentials is None or not credentials.credentials.strip():
        raise Unauthorized(
            "missing API key: send it as 'Authorization: Bearer <key>'",
            code="missing_api_key",
            headers={"WWW-Authenticate": "Bearer"},
        )
    with state.db.session() as session:
        principal = authenticate(session, credentials.credentials.strip())
    if principal is None:
        raise Unauthorized(
            "the API key is not valid or has been revoked", headers={"WWW-Authenticate": "Bearer"}
        )
    return principal


CurrentPrincipal = Annotated[Principal, Depends(current_principal)]


def base_url(request: Request) -> str:
    return str(request.base_url)


BaseUrl = Annotated[str, Depends(base_url)]
