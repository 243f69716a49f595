"""Dependencies for routes, as Annotated aliases: SessionDep, SettingsDep."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Annotated

from fastapi import Depends, Request
from sqlalchemy.orm import Session

from app.config import Settings
from app.db import require_migrated, session_scope


def get_settings(request: Request) -> Settings:
    return request.app.state.settings


def get_session(request: Request) -> Iterator[Session]:
    """A session for one request. The first request checks the schema is current, so a
    database that was never migrated gets a clear 503 naming the command to run."""
    state = request.app.state
    if not state.schema_checked:
        require_migrated(state.engine)
        state.schema_checked = True
    with session_scope(state.engine) as session:
        yield session


SettingsDep = Annotated[Settings, Depends(get_settings)]
SessionDep = Annotated[Session, Depends(get_session)]
