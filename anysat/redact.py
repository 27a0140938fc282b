"""Secrets stay out of messages: URL query strings (where SAS tokens and signatures live) are
cut from every error the project raises and every log record it emits or passes on."""

from __future__ import annotations

import logging
import re

_QUERY = re.compile(r"\?[^\s'\"<>)\]]+")


def without_secrets(text: str) -> str:
    """A message with URL query strings cut out."""
    return _QUERY.sub("?<query removed>", text)


class RedactSecrets(logging.Filter):
    """Formats the record's message and removes query strings from it (and from exception
    text), so no handler downstream sees a token."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if "?" in message or (record.exc_text and "?" in record.exc_text):
            record.msg, record.args = without_secrets(message), ()
            if record.exc_text:
                record.exc_text = without_secrets(record.exc_text)
        return True


def redact_logs(*loggers: logging.Logger) -> None:
    """Redact records at these loggers and at every handler of the root logger (where the
    records of other libraries, GDAL's included, end up)."""
    redactor = RedactSecrets()
    for target in (*loggers, *logging.getLogger().handlers):
        if not any(isinstance(f, RedactSecrets) for f in target.filters):
            target.addFilter(redactor)
