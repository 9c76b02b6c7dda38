"""Secrets out of URLs before they reach a log line, an error, a file or a record.

    redact_url("https://user:pw@host/data.tgz?X-Amz-Signature=abc")  # -> "https://host/data.tgz"

A URL keeps its scheme, host, port and path; its userinfo (`user:pass@`), query string and fragment
are dropped, since presigned URLs carry their signature (`X-Amz-Signature`, `sig`, `token`) in the
query. The full URL is still what the request itself uses: only what is written down is redacted.
"""

from __future__ import annotations

import re
from typing import Any
from urllib.parse import urlsplit, urlunsplit

# a URL inside free text: scheme://, then everything up to whitespace or a quote/bracket that ends it
_URL_IN_TEXT = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://[^\s'\"<>()\[\]{}]+")


def redact_url(url: str) -> str:
    """`url` without userinfo, query or fragment; a string that is not a URL comes back as it is."""
    if not isinstance(url, str) or "://" not in url:
        return url
    try:
        parts = urlsplit(url)
        host = parts.hostname or ""
        port = parts.port
    except ValueError:  # not parseable (a bad port, brackets): keep only what precedes any secret
        scheme, _, rest = url.partition("://")
        return f"{scheme}://{rest.split('@')[-1].split('?')[0].split('#')[0]}"
    if ":" in host:  # IPv6 literal
        host = f"[{host}]"
    netloc = host + (f":{port}" if port is not None else "")
    return urlunsplit((parts.scheme, netloc, parts.path, "", ""))


def redact_text(text: str) -> str:
    """Every URL inside `text` redacted (for messages that quote a URL, such as a library's error)."""
    if not isinstance(text, str) or "://" not in text:
        return text
    return _URL_IN_TEXT.sub(lambda m: redact_url(m.group(0)), text)


def redact_values(obj: Any) -> Any:
    """A copy of a params-like structure (dicts, lists, strings) with every URL in it redacted."""
    if isinstance(obj, str):
        return redact_text(obj)
    if isinstance(obj, dict):
        return {k: redact_values(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(redact_values(v) for v in obj)
    return obj
