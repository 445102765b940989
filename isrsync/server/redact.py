"""Keep credentials out of the server's log, whatever a client sends.

aiohttp logs a request it cannot parse with a traceback whose message quotes
the offending raw header line, so a malformed ``Authorization`` header (a
trailing NUL, say) would write the bearer token into the log. Two defences:

* a parse error of aiohttp's (:class:`aiohttp.http_exceptions.HttpProcessingError`)
  becomes one line with the error's first line only, never the echoed bytes
  and never a traceback: it is the client's mistake, not the server's;
* every record (message, arguments, traceback) has ``Authorization`` values
  and ``Bearer`` credentials replaced by ``[redacted]``.

The filter is installed on the handlers and on the loggers that see request
data (:func:`install`).
"""

from __future__ import annotations

import logging
import re
import traceback

from aiohttp.http_exceptions import HttpProcessingError

REDACTED = "[redacted]"
# A header value runs to the end of its line or to the quote that ends the
# bytes repr aiohttp prints; a bare credential runs to whitespace, a quote or
# an escape.
_SECRETS = re.compile(
    r"(?i)(?P<h>authori[sz]ation\W{0,8}?\s*[:=]\s*)[^\r\n'\"]*"
    r"|(?P<b>(?:bearer|basic|token)(?:\s|\\x[0-9a-f]{2}|\\t)+)[^\s'\"\\,;]+"
    r"|(?P<p>(?:passphrase|password|secret|token)\W{0,3}\s*[:=]\s*)[^\s'\",;]+"
)
# What `isrsync server add-user` hands out (secrets.token_urlsafe(32)), wherever a
# client put it: 43 URL-safe characters, not all hex (pack ids and tags are hex).
_TOKEN_SHAPE = re.compile(r"(?<![A-Za-z0-9_-])[A-Za-z0-9_-]{43}(?![A-Za-z0-9_-])")
_NOT_HEX = re.compile(r"[g-zG-Z_-]")


def scrub(text: str) -> str:
    text = _SECRETS.sub(lambda m: (m.group("h") or m.group("b") or m.group("p")) + REDACTED, text)
    return _TOKEN_SHAPE.sub(lambda m: REDACTED if _NOT_HEX.search(m.group()) else m.group(), text)


class RedactSecrets(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, HttpProcessingError):
            first = str(exc.message or "").strip().splitlines()[0:1]
            what = first[0] if first else type(exc).__name__
            record.msg = "refused a malformed request (%s): %s"
            record.args = (type(exc).__name__, scrub(what)[:200])
            record.exc_info = None
            record.exc_text = None
            record.levelno, record.levelname = logging.INFO, "INFO"
            return True
        try:
            msg = record.getMessage()
        except Exception:  # noqa: BLE001 - a bad format string is no reason to lose a line
            msg = f"{record.msg!r} {record.args!r}"
        record.msg, record.args = scrub(msg), ()
        if record.exc_info:
            record.exc_text = scrub("".join(traceback.format_exception(*record.exc_info)).rstrip("\n"))
            record.exc_info = None
        elif record.exc_text:
            record.exc_text = scrub(record.exc_text)
        if record.stack_info:
            record.stack_info = scrub(record.stack_info)
        return True


_FILTER = RedactSecrets()
_LOGGERS = ("", "aiohttp", "aiohttp.server", "aiohttp.access", "aiohttp.web", "aiohttp.internal",
            "asyncio", "isrsync", "isrsync.server", "isrsync.access")


def install() -> None:
    """Put the filter on every configured handler and on the loggers of request data."""
    for name in _LOGGERS:
        lg = logging.getLogger(name)
        if _FILTER not in lg.filters:
            lg.addFilter(_FILTER)
        for h in lg.handlers:
            if _FILTER not in h.filters:
                h.addFilter(_FILTER)
    if logging.lastResort is not None and _FILTER not in logging.lastResort.filters:
        logging.lastResort.addFilter(_FILTER)
