"""What the parcel commands share: the site for one command, parcel names."""

from __future__ import annotations

import contextlib
import uuid
from typing import Annotated, AsyncIterator, Optional

import typer

from ..site import account
from ..site.cache import open_cache
from ..site.parcel import Site, open_site
from .state import state

ParcelArg = Annotated[str, typer.Argument(help="Parcel name or id.")]
OptParcel = Annotated[Optional[str], typer.Argument(help="Parcel name or id (default: the one running here).")]
YesOpt = Annotated[bool, typer.Option("--yes", "-y", help="Do not ask for confirmation.")]


@contextlib.asynccontextmanager
async def site_session() -> AsyncIterator[Site]:
    """This site, logged in, for the length of one command."""
    acct = account.load_account()
    site = await open_site(open_cache(state.cache_dir), acct)
    try:
        yield site
    finally:
        await site.close()


async def resolve_parcel(site: Site, ref: str) -> uuid.UUID:
    """A parcel named by name or id (:meth:`Site.resolve`)."""
    return await site.resolve(ref)
