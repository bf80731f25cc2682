"""What a request must look like before any view reads it (the fast path only takes requests that already do).

- Path and query: percent-decoded, they must be UTF-8 without control characters. WSGI hands the
  path over decoded as Latin-1, and werkzeug then replaces bytes that are not UTF-8 with U+FFFD,
  so /customers/%FF and /customers/%FE would be one customer, sharing cached lists, recent items
  and an experiment's variant; control characters in an id are no one's id.
- A POST body only as JSON: UTF-8 (RFC 8259), not compressed, whether sized by Content-Length or
  chunked. webargs would read anything else as "no body" and answer with defaults or
  missing-field errors.
"""

from __future__ import annotations

import re
from urllib.parse import unquote_to_bytes

from flask import request

from recsvc.api.errors import error_response
from recsvc.api.schemas import CONTROL_CHARACTERS

_CONTROL = re.compile(f"[{CONTROL_CHARACTERS}]")


def check_request_form():
    """before_request hook: None to go on, or the 400/415 error response."""
    environ = request.environ
    if not environ.get("PATH_INFO", "").startswith("/v1/"):  # health, metrics and the document read no ids
        return None
    # WSGI strings carry bytes as Latin-1; a server that decoded the path itself left nothing to check.
    problem = _text_problem(environ.get("PATH_INFO", "").encode("latin-1", "replace"), "the path") \
        or _text_problem(unquote_to_bytes(environ.get("QUERY_STRING", "").replace("+", " ")), "the query string")
    if problem:
        return error_response(400, "invalid_request", problem)
    if request.method == "POST" and _has_body(environ):
        problem = _body_problem()
        if problem:
            return error_response(415, "unsupported_media_type", problem)
    return None


def _text_problem(raw: bytes, where: str) -> str | None:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as error:
        return f"{where} is not valid UTF-8 once percent-decoded (byte {raw[error.start]:#04x} at {error.start})"
    if _CONTROL.search(text):
        return f"{where} holds a control character (such as %00 or %0A), which no id or value may hold"
    return None


def _has_body(environ) -> bool:
    return environ.get("CONTENT_LENGTH") not in (None, "", "0") or "HTTP_TRANSFER_ENCODING" in environ


def _body_problem() -> str | None:
    if not request.is_json:
        return "send the body as JSON with 'Content-Type: application/json'"
    charset = request.mimetype_params.get("charset")
    if charset is not None and charset.lower().replace("-", "") != "utf8":
        return f"JSON bodies are UTF-8, not {charset}"
    encoding = request.headers.get("Content-Encoding", "identity").strip().lower()
    if encoding not in ("", "identity"):
        return f"send the body uncompressed: Content-Encoding {encoding} is not accepted"
    transfer = request.headers.get("Transfer-Encoding", "chunked").strip().lower()
    if transfer != "chunked":  # gunicorn takes "gzip, chunked" and hands over the compressed bytes
        return f"send the body uncompressed: Transfer-Encoding {transfer} is not accepted"
    return None
