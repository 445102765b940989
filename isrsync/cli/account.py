"""Account commands: login and logout."""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from ..errors import UsageError
from ..keys import KdfLimits
from ..site import account
from .render import emit_json, err, out
from .state import JsonOpt


def _terminal() -> bool:
    """Whether a hidden prompt can reach a person.

    True when stdin is a terminal, or the process has a controlling terminal
    (the passphrase prompt asks on /dev/tty even when stdin is redirected).
    """
    try:
        if sys.stdin is not None and sys.stdin.isatty():
            return True
    except (AttributeError, ValueError):  # a closed or replaced stdin
        pass
    try:
        fd = os.open("/dev/tty", os.O_RDWR | os.O_NOCTTY)
    except OSError:
        return False
    os.close(fd)
    return True


def _require_credentials(needs_token: bool) -> None:
    """Fail at once, saying what is missing, when nothing can be asked for.

    Without a terminal a prompt would only meet the end of its input and abort
    without saying why.
    """
    missing, how = [], []
    if needs_token:
        missing.append("a token")
        how.append("pass --token (from `isrsync server add-user`) or set ISRSYNC_TOKEN")
    if os.environ.get("ISRSYNC_PASSPHRASE") is None:
        missing.append("your passphrase")
        how.append("set ISRSYNC_PASSPHRASE")
    if missing and not _terminal():
        them = "them" if len(missing) > 1 else "it"
        raise UsageError(f"login needs {' and '.join(missing)} but there is no terminal to ask for {them}",
                         hint=", and ".join(how))


def ask_passphrase(confirm: bool = False) -> str:
    env = os.environ.get("ISRSYNC_PASSPHRASE")
    if env is not None:
        return env
    return typer.prompt("passphrase", hide_input=True, confirmation_prompt=confirm, err=True)


def login(
    server: Annotated[str, typer.Argument(help="Home server URL (https://..., or file:///path for a directory).")],
    user: Annotated[str, typer.Option("--user", "-u", help="Your user name on the server.")],
    token: Annotated[Optional[str], typer.Option("--token", envvar="ISRSYNC_TOKEN", help="Bearer token from `isrsync server add-user`.", show_envvar=True)] = None,
    cacert: Annotated[Optional[Path], typer.Option("--cacert", help="CA certificate that signs the server's TLS certificate.")] = None,
    kdf_min: Annotated[bool, typer.Option("--kdf-min", hidden=True)] = False,
    insecure: Annotated[bool, typer.Option("--insecure", help="Allow plain http to a server that is not on this "
                                           "machine: the token and all metadata cross the network unencrypted.")] = False,
    json_out: JsonOpt = False,
) -> None:
    """Log in to a home server and unlock your keys with your passphrase.

    The first login creates your key bundle (sealed under the passphrase). The
    passphrase is read from ISRSYNC_PASSPHRASE if set, else asked for; the
    token of an http(s) server likewise from --token or ISRSYNC_TOKEN. Without
    a terminal to ask on, both must be given that way.
    """
    if account.in_the_clear(server):
        if not insecure:
            raise UsageError(f"{server} is plain http: your token would cross the network in the clear",
                             hint="use https:// (see `isrsync serve --tls-cert`), or pass --insecure to accept that")
        err.print("isrsync: warning: plain http: your token crosses the network unencrypted", markup=False)
    needs_token = server.startswith(("http://", "https://")) and not token
    _require_credentials(needs_token)
    if needs_token:
        token = typer.prompt("token", hide_input=True, err=True)
    acct = account.Account(server.rstrip("/"), user, token or "", str(cacert) if cacert else None)
    bundle, created = asyncio.run(account.login(acct, ask_passphrase(), limits=KdfLimits.MIN if kdf_min else None))
    if json_out:
        emit_json({"server": acct.server, "user": user, "created_keys": created, "parcels": len(bundle.parcels)})
    else:
        out.print(f"logged in to {acct.server} as {user}" + ("; a new key bundle was created" if created else ""))


def logout() -> None:
    """Forget the unlocked keys and the token of this session."""
    out.print("logged out" if account.logout() else "not logged in")


def register(app: typer.Typer) -> None:
    app.command("login")(login)
    app.command("logout")(logout)
