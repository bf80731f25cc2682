"""A thinner query-string parser for the hot path, behind flask-smorest's Blueprint (the OpenAPI doc is unchanged)."""

from __future__ import annotations

import json
import time

import flask_smorest
import marshmallow as ma
import orjson
from flask import request
from webargs.core import missing
from webargs.flaskparser import FlaskParser, abort, is_json_request
from werkzeug.datastructures import MultiDict
from werkzeug.exceptions import RequestEntityTooLarge, RequestTimeout

from recsvc.read_deadline import DeadlineSocket

LIST_FIELDS = frozenset({"exclude"})  # query fields that are comma lists
# Seconds a body read may wait for the client's next bytes under gunicorn. Its sockets block without a timeout, so
# a body that stops short of its Content-Length or of a chunk's size (say FFFFFFFF) held a worker thread until the
# client hung up; an honest client sends RECSVC_MAX_BODY_BYTES in far less.
BODY_READ_TIMEOUT_SECONDS = 5.0  # as gunicorn waits for a request to start and for an unread body to drain
# Seconds the whole body read may take under gunicorn: a client trickling a byte every few seconds never waits
# BODY_READ_TIMEOUT_SECONDS at once, and held the thread as long as it liked. 64 KiB (RECSVC_MAX_BODY_BYTES' default)
# in this time is 6.5 KB/s; a recommendations or feedback body is under 1 KiB.
BODY_READ_DEADLINE_SECONDS = 10.0


class ThinQueryParser(FlaskParser):
    """Query strings go straight to the schema instance's load; every other location is webargs' as usual,
    except that JSON bodies are parsed by orjson.

    webargs spends ~70 us per request around a 16 us marshmallow load (measured with
    RecommendationArgsSchema): a fifth of a cached answer's time. Every query field of
    our schemas takes one value (lists are comma-separated, or repeated); unknown names
    are ignored, as webargs does.
    """

    def _raw_load_json(self, req):
        """orjson refuses what Python's json lets through and recsvc cannot use: a lone UTF-16 surrogate
        ("\\ud800" is no UTF-8 string, so no cache key, Redis key or log line can hold it), an integer of
        thousands of digits, NaN and Infinity: each is a 400 that says what is wrong."""
        if not is_json_request(req):
            return missing
        body = _read_body(req)
        if not body:
            return missing
        try:
            document = orjson.loads(body)
        except orjson.JSONDecodeError as error:  # here: webargs would take one without a document for no body
            self._handle_invalid_json_error(error, req, body=body)
        if _may_repeat_a_key(body, document):
            _refuse_repeated_keys(body)  # perhaps a key given twice, which orjson takes silently (the last wins)
        return document

    def _handle_invalid_json_error(self, error, req, *args, body: bytes = b"", **kwargs):
        try:
            body.decode("utf-8")
            problem = str(error)
        except UnicodeDecodeError as bad:  # orjson says "surrogates not allowed" at char 0 for any such byte
            problem = f"it is not valid UTF-8 (byte {body[bad.start]:#04x} at {bad.start})"
        abort(400, exc=error, message=f"the body is not valid JSON: {problem}",
              messages={"json": ["Invalid JSON body."]})

    def parse(self, argmap, req=None, *, location=None, unknown=None, validate=None, error_status_code=None,
              error_headers=None):
        if location != "query" or not isinstance(argmap, ma.Schema):
            return super().parse(argmap, req, location=location, unknown=unknown, validate=validate,
                                 error_status_code=error_status_code, error_headers=error_headers)
        try:
            return argmap.load(_single_values(request.args), unknown=ma.EXCLUDE)
        except ma.ValidationError as error:
            abort(error_status_code or self.DEFAULT_VALIDATION_STATUS, exc=error,
                  messages={"query": error.messages}, schema=argmap, headers=error_headers)


def _may_repeat_a_key(body: bytes, document) -> bool:
    """False when no object of the body gives a key twice, True when one may (then _refuse_repeated_keys decides).

    A body's ':' bytes are one per key it writes plus those inside its strings, each of which reads
    as one ':' unless escaped (\\u003a). orjson writes the parsed document back with each kept key
    once and no ':' escaped: a body without "\\u" that has as many ':' as that repeats no key.
    Writing it back costs about what parsing did (1 us for a recommendations body)."""
    if b"\\u" in body:
        return True
    try:
        return body.count(b":") != orjson.dumps(document).count(b":")
    except orjson.JSONEncodeError:  # nested over 254 deep, which orjson reads but does not write
        return True


def _refuse_repeated_keys(body: bytes) -> None:
    """400 naming the first key some object of the body gives twice; None when none does.
    {"customer_id": "a", "customer_id": "b"} is a client's bug: taking the last would be a guess."""

    def check(pairs: list) -> dict:
        seen = set()
        for key, _value in pairs:
            if key in seen:
                abort(422, message=f"the body gives the key {key!r} more than once in one object; give it once",
                      messages={"json": {key: ["given more than once"]}})
            seen.add(key)
        return {}

    try:
        json.loads(body, object_pairs_hook=check)  # orjson has no hook; this runs only for bodies that may repeat one
    except RecursionError:
        pass  # nested some hundreds deep: no schema of the API takes it, and says so


def _read_body(req) -> bytes:
    """The whole body, at most the body limit (413 beyond it, also chunked); 408 when the client stops sending
    for BODY_READ_TIMEOUT_SECONDS or has not sent it all in BODY_READ_DEADLINE_SECONDS. gunicorn then closes the
    connection (and says so, recsvc.worker): a body read that failed leaves it unusable."""
    sock = req.environ.get("gunicorn.socket")  # absent under the test client
    # gunicorn's body (wsgi.input) reads through a reader holding the unreader that holds the socket; its chunked
    # reader holds the request instead, whose unreader its parser reads.
    reader = getattr(req.environ.get("wsgi.input"), "reader", None)
    unreader = getattr(reader, "unreader", None) or getattr(getattr(reader, "req", None), "unreader", None)
    watched = None
    if getattr(unreader, "sock", None) is sock is not None:
        watched = unreader.sock = DeadlineSocket(sock, time.monotonic() + BODY_READ_DEADLINE_SECONDS,
                                                 BODY_READ_TIMEOUT_SECONDS)
    elif sock is not None:  # read some other way: each wait bounded at least
        sock.settimeout(BODY_READ_TIMEOUT_SECONDS)
    try:
        body = req.get_data(cache=True)
        limit = req.max_content_length
        if (req.content_length is None and limit is not None and len(body) >= limit
                and req.environ["wsgi.input"].read(1)):
            # A chunked body: werkzeug stops reading at the limit without a word; Content-Length bodies get 413 there.
            raise RequestEntityTooLarge()
        return body
    except Exception as error:
        # werkzeug turns the socket's TimeoutError into ClientDisconnected, raised while handling it.
        if isinstance(error, TimeoutError) or isinstance(error.__context__, TimeoutError):
            if watched is not None and watched.expired:
                raise RequestTimeout(f"the client did not send the whole body within {BODY_READ_DEADLINE_SECONDS:g} "
                                     f"seconds; send it at once, as announced (Content-Length or chunk size)") from None
            raise RequestTimeout(f"the client sent no byte of the body for {BODY_READ_TIMEOUT_SECONDS:g} seconds; "
                                 f"send the whole body as announced (Content-Length or chunk size)") from None
        raise
    finally:
        if watched is not None:
            unreader.sock = sock
        if sock is not None:
            sock.settimeout(None)  # as gunicorn's blocking sockets were


def _single_values(args: MultiDict) -> dict:
    """One value per name. A list may be sent either way, exclude=a,b or exclude=a&exclude=b; any other name
    given twice is refused (taking one of the two would be a guess: limit=1&limit=200)."""
    values = {}
    for name, given in args.lists():
        if len(given) > 1 and name not in LIST_FIELDS:
            abort(422, message=f"the query gives {name!r} {len(given)} times; give it once",
                  messages={"query": {name: ["given more than once"]}})
        values[name] = ",".join(given)
    return values


class Blueprint(flask_smorest.Blueprint):
    """flask-smorest's Blueprint with the thin query parser. Pass schema instances, not classes:
    webargs builds a new schema per request from a class (~200 us)."""

    ARGUMENTS_PARSER = ThinQueryParser()
