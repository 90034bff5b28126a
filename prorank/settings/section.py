"""The base of every config section (`prorank/settings/config.py`, `prorank/settings/service_config.py`)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)
