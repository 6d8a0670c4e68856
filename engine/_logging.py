"""Structured logging on the standard library: component names, context, no secrets.

The engine logs through ``logging.getLogger("engine.<component>")`` and
passes context as ``extra`` (``supervisor``, ``child``, ``restarts``,
``stalls``, ``task``). :func:`configure_logging` installs one handler that
prints that context, as ``key=value`` text or as one JSON object per line,
and masks what looks like a secret on the way out.
"""

from __future__ import annotations

import json
import logging
import re
import sys
from typing import TextIO

from ._validation import check_choice

# Attributes every LogRecord has; anything else on a record came from ``extra``.
_STANDARD = frozenset(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {
    "message",
    "asctime",
    "taskName",
}
_SECRET_KEY = re.compile(r"token|passw|secret|authori[sz]ation|api_?key|cookie|credential", re.I)
# ``scheme://user:password@host``: keep the user, mask the password.
_URL_CREDENTIALS = re.compile(r"(?P<head>[a-z][a-z0-9+.-]*://[^/\s:@]*):[^/\s@]*@", re.I)
_MASK = "***"
_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


def redact(text: str) -> str:
    """``text`` with the passwords of URLs masked (``redis://u:***@host``)."""
    return _URL_CREDENTIALS.sub(rf"\g<head>:{_MASK}@", text)


def redact_url(url: str) -> str:
    """``url`` with all of its user information masked: a password, or a bare token.

    ``nats://token@host`` and ``redis://user:password@host`` both become
    ``scheme://***@host``. The last ``@`` ends the user information, since a
    password may hold ``/`` or ``@`` that a parser would misread.
    """
    scheme, sep, rest = url.partition("://")
    if not sep:
        return _MASK if "@" in url else url
    if "@" not in rest:
        return url
    return f"{scheme}://{_MASK}@{rest.rpartition('@')[2]}"


def context_of(record: logging.LogRecord) -> dict[str, object]:
    """The ``extra`` fields of ``record``, with secrets masked."""
    found: dict[str, object] = {}
    for key, value in vars(record).items():
        if key in _STANDARD or key.startswith("_"):
            continue
        if _SECRET_KEY.search(key):
            found[key] = _MASK
        elif isinstance(value, str):
            found[key] = redact(value)
        elif value is None or isinstance(value, bool | int | float):
            found[key] = value
        else:
            found[key] = redact(repr(value))
    return found


class TextFormatter(logging.Formatter):
    """``time LEVEL component [key=value ...]: message``, secrets masked."""

    def format(self, record: logging.LogRecord) -> str:
        """The record on one line (plus its traceback, if any), context first."""
        context = context_of(record)
        pairs = " ".join(f"{key}={value}" for key, value in context.items())
        head = f"{self.formatTime(record)} {record.levelname} {record.name}"
        text = f"{head} [{pairs}]" if pairs else head
        text = f"{text}: {record.getMessage()}"
        if record.exc_info:
            text = f"{text}\n{self.formatException(record.exc_info)}"
        if record.stack_info:
            text = f"{text}\n{self.formatStack(record.stack_info)}"
        return redact(text)


class JsonFormatter(logging.Formatter):
    """One JSON object per record: time, level, logger, message, context, exception."""

    def format(self, record: logging.LogRecord) -> str:
        """The record as a single line of JSON, secrets masked."""
        entry: dict[str, object] = {
            "time": self.formatTime(record),
            "level": record.levelname,
            "logger": record.name,
            "message": redact(record.getMessage()),
        }
        entry.update(context_of(record))
        if record.exc_info:
            entry["exception"] = redact(self.formatException(record.exc_info))
        if record.stack_info:
            entry["stack"] = redact(self.formatStack(record.stack_info))
        return json.dumps(entry, default=repr)


def configure_logging(
    level: str = "INFO", *, json: bool = False, stream: TextIO | None = None
) -> logging.Handler:
    """Send log records to ``stream`` with their component and context, secrets masked.

    Installs one handler on the root logger, replacing the one an earlier
    call installed (other handlers are left alone), and sets the root level.
    Records keep their logger name as the component (``engine.supervisor``,
    ``engine.loop``, ``engine.ops``) and their ``extra`` fields as context
    (``child=feed restarts=2``). Values of context keys that name a secret
    (token, password, secret, authorization, api key, cookie, credential)
    become ``***``, and so do passwords in URLs anywhere in the line.

    Args:
        level: ``"DEBUG"``, ``"INFO"``, ``"WARNING"``, ``"ERROR"`` or ``"CRITICAL"``.
        json: one JSON object per line instead of text.
        stream: where to write; ``sys.stderr`` when omitted.

    Returns:
        The installed handler (remove it from the root logger to undo).

    Raises:
        ValueError: for an unknown level.
    """
    chosen = check_choice("level", level.upper() if isinstance(level, str) else level, _LEVELS)
    handler = logging.StreamHandler(stream if stream is not None else sys.stderr)
    handler.setFormatter(JsonFormatter() if json else TextFormatter())
    handler.set_name("engine")
    root = logging.getLogger()
    for old in [h for h in root.handlers if h.get_name() == "engine"]:
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(chosen)
    return handler
