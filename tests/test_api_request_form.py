"""Requests a client can get wrong in form rather than content: encodings, repeated or oddly written values,
chunked and compressed bodies, and requests gunicorn itself refuses. Each gets the one JSON error shape."""

from __future__ import annotations

import gzip
import socket
import time

import pytest

from tests.conftest import API_KEY
from tests.server_process import running_server
from tests.test_experiments import experiment_settings, exposures, start_app, stop_app  # noqa: F401 (a fixture)

RECS = "/v1/customers/C000003/recommendations"


def error_of(response, status: int) -> dict:
    assert response.status_code == status, response.get_data(as_text=True)
    assert response.mimetype == "application/json"
    assert response.headers["X-Request-ID"]
    return response.get_json()["error"]


@pytest.mark.parametrize("path", ["/v1/customers/a%00b/recommendations", "/v1/customers/a%0Ab/recommendations",
                                  "/v1/items/%7F/similar"])
def test_ids_that_hold_control_characters_are_refused(client, auth, path):
    error = error_of(client.get(path, headers=auth), 400)
    assert error["code"] == "invalid_request" and "control character" in error["message"]


@pytest.mark.parametrize("path, body, field", [
    ("/v1/recommendations/batch", {"requests": [{"customer_id": "a\u0000b"}]}, "requests"),
    (RECS, {"exclude": ["a\nb"]}, "exclude"),
    (RECS, {"context_items": ["\u0007"]}, "context_items"),
    ("/v1/events", {"events": [{"customer_id": "a\nb", "item_id": "i1", "event_type": "view"}]}, "events"),
    ("/v1/feedback", {"request_id": "abcdefgh", "customer_id": "c1", "item_id": "i\u007f", "action": "shown"},
     "item_id"),
    ("/v1/feedback", {"request_id": "abcdefgh", "customer_id": "c1", "item_id": "i1", "action": "shown",
                      "agent_id": "a\u001bb"}, "agent_id"),
])
def test_ids_in_a_body_that_hold_control_characters_are_refused(client, auth, path, body, field):
    """As in the path: no agent could ask for such a customer or item, and the trainer drops such rows."""
    error = error_of(client.post(path, headers=auth, json=body), 400)
    assert error["code"] == "invalid_request" and field in error["details"]["fields"]


@pytest.mark.parametrize("path, body, where", [
    (RECS, [{"limit": 3}], ()),
    ("/v1/feedback", "accepted", ()),
    ("/v1/events", 42, ()),
    ("/v1/events", ["C000003"], ("events", "0")),
    ("/v1/recommendations/batch", {"requests": ["C000003"]}, ("requests", "0")),
])
def test_a_body_or_entry_that_is_not_an_object_says_so(client, auth, path, body, where):
    fields = error_of(client.post(path, headers=auth, json=body), 400)["details"]["fields"]
    for name in where:
        fields = fields[name]
    assert fields == {"_schema": ["expected a JSON object"]}


@pytest.mark.parametrize("query", ["exclude=%FF", "category=a%0Ab", "strategy=%ED%A0%80", "exclude=a%00"])
def test_query_values_that_are_not_utf8_or_hold_control_characters_are_refused(client, auth, query):
    error = error_of(client.get(f"{RECS}?{query}", headers=auth), 400)
    assert "the query string" in error["message"]


def test_an_id_in_plain_non_ascii_utf8_is_served(client, auth):
    assert client.get("/v1/customers/J%C3%BCrgen/recommendations", headers=auth).status_code == 200


@pytest.mark.parametrize("limit", ["1_0", "+5", "%205", "%EF%BC%95", "%D9%A5", "5.0"])
def test_limit_must_be_written_in_ascii_digits(client, auth, limit):
    error = error_of(client.get(f"{RECS}?limit={limit}", headers=auth), 400)
    assert "limit" in error["details"]["fields"]
    error_of(client.get(f"/v1/items/SKU-00001/similar?limit={limit}", headers=auth), 400)


def test_a_name_given_twice_is_refused_and_a_repeated_exclude_is_a_list(client, auth):
    for query in ("limit=1&limit=200", "limit=200&limit=1", "strategy=als&strategy=popular"):
        error = error_of(client.get(f"{RECS}?{query}", headers=auth), 400)
        assert "give it once" in error["message"]
    top = [item["item_id"] for item in client.get(f"{RECS}?limit=3", headers=auth).get_json()["items"]]
    repeated = client.get(f"{RECS}?limit=5&exclude={top[0]}&exclude={top[1]}", headers=auth).get_json()
    listed = client.get(f"{RECS}?limit=5&exclude={top[0]},{top[1]}", headers=auth).get_json()
    assert [item["item_id"] for item in repeated["items"]] == [item["item_id"] for item in listed["items"]]
    assert not {top[0], top[1]} & {item["item_id"] for item in repeated["items"]}


@pytest.mark.parametrize("headers", [{"Content-Type": "text/plain"}, {},
                                     {"Content-Type": "application/json; charset=latin-1"},
                                     {"Content-Type": "application/json", "Content-Encoding": "gzip"}])
@pytest.mark.parametrize("path", [RECS, "/v1/recommendations/batch", "/v1/events", "/v1/feedback"])
def test_a_body_that_is_not_plain_utf8_json_is_415_however_it_is_sent(client, auth, headers, path):
    body = b'{"limit": 2}'
    if headers.get("Content-Encoding") == "gzip":
        body = gzip.compress(body)
    response = client.post(path, headers={**auth, **headers}, data=body)
    assert error_of(response, 415)["code"] == "unsupported_media_type"


def test_a_405_says_which_methods_are_allowed(client, auth):
    response = client.delete("/v1/events", headers=auth)
    assert error_of(response, 405)["code"] == "method_not_allowed"
    assert "POST" in response.headers["Allow"]


def test_options_answers_204_with_allow_and_no_body(client, auth):
    response = client.options(RECS, headers=auth)
    assert response.status_code == 204 and "GET" in response.headers["Allow"] and response.data == b""
    assert "Content-Type" not in response.headers


def test_double_slashes_are_a_json_404_not_a_redirect(client, auth):
    assert error_of(client.get("/v1//customers/C000003/recommendations", headers=auth), 404)["code"] == "not_found"


def test_a_feedback_request_id_with_a_trailing_newline_is_refused(client, auth):
    response = client.post("/v1/feedback", headers=auth, json={
        "request_id": "abcdef12\n", "customer_id": "C000003", "item_id": "SKU-00001", "action": "accepted"})
    assert "request_id" in error_of(response, 400)["details"]["fields"]


@pytest.mark.parametrize("timestamp", ["1_764_500_000", "\u0661\u0667\u0666\u0664\u0665\u0660\u0660\u0660\u0660\u0660",
                                       " 1764500000", "nan"])
def test_event_timestamps_written_oddly_are_refused(client, auth, timestamp):
    response = client.post("/v1/events", headers=auth, json={"events": [
        {"customer_id": "C000003", "item_id": "SKU-00001", "event_type": "view", "timestamp": timestamp}]})
    fields = error_of(response, 400)["details"]["fields"]
    assert fields == {"events": {"0": {"timestamp": ["use ISO-8601 or Unix seconds"]}}}


def test_a_refused_batch_records_no_exposure_and_names_the_entry(experiment_settings, auth):  # noqa: F811
    app = start_app(experiment_settings)
    try:
        response = app.test_client().post("/v1/recommendations/batch", headers=auth, json={"requests": [
            {"customer_id": "c-1"}, {"customer_id": "c-2"}, {"customer_id": "c-3", "strategy": "bogus"}]})
        error = error_of(response, 400)
        assert error["message"].startswith("requests[2]: unknown strategy") and error["details"]["index"] == 2
        assert exposures(app) == []
        app.test_client().head("/v1/customers/c-1/recommendations", headers=auth)
        assert exposures(app) == []  # no one saw that answer
        assert app.test_client().get("/v1/customers/c-1/recommendations", headers=auth).status_code == 200
        assert len(exposures(app)) == 1
    finally:
        stop_app(app)


@pytest.fixture(scope="module")
def server_log(tmp_path_factory):
    return tmp_path_factory.mktemp("form") / "server.log"


@pytest.fixture(scope="module")
def server(trained_registry, server_log):
    env = {"RECSVC_REGISTRY": str(trained_registry), "RECSVC_API_KEYS": API_KEY, "RECSVC_MAX_BODY_BYTES": "4096"}
    with running_server(env, server_log, workers=1) as base:
        yield base.removeprefix("http://").split(":")


def raw(server, request: bytes, timeout: float = 10) -> tuple[int, dict[str, str], bytes]:
    """Send bytes as they are (no client library tidies them) and read the whole answer."""
    host, port = server
    with socket.create_connection((host, int(port)), timeout=timeout) as sock:
        sock.sendall(request)
        sock.shutdown(socket.SHUT_WR)
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    headers = {name.lower(): value.strip() for name, _, value in (line.partition(":") for line in header_lines)}
    return int(status_line.split()[1]), headers, body


def post_chunked(server, chunks: bytes) -> bytes:
    return (f"POST {RECS} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {API_KEY}\r\n"
            "Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n").encode() + chunks


@pytest.mark.parametrize("chunks", [b"zz\r\nabc\r\n0\r\n\r\n", b"2;x=\"\r\n{}\r\n0\r\n\r\n", b"2\r\n{}XX0\r\n\r\n"])
def test_broken_chunked_bodies_are_400_not_500(server, chunks):
    status, headers, body = raw(server, post_chunked(server, chunks))
    assert status == 400, body
    assert headers["content-type"] == "application/json" and headers["x-request-id"]
    assert b'"code":"invalid_request"' in body and b"could not be read" in body


def test_a_chunked_body_cut_short_is_400(server):
    status, headers, body = raw(server, post_chunked(server, b"20\r\n{\"limit\": 2"))
    assert status == 400 and headers["content-type"] == "application/json" and b'"invalid_request"' in body
    assert headers["connection"] == "close"  # gunicorn closes it: where a next request would start is unknown


@pytest.mark.parametrize("old, new", [(b"application/json", b"text/plain"), (b"chunked", b"gzip, chunked")])
def test_a_chunked_body_that_is_not_plain_json_is_415(server, old, new):
    request = post_chunked(server, b"0c\r\n{\"limit\": 2}\r\n0\r\n\r\n").replace(old, new)
    status, _headers, body = raw(server, request)
    assert status == 415 and b'"unsupported_media_type"' in body


@pytest.mark.parametrize("path", ["/v1/customers/%20C000003%20/recommendations",
                                  "/v1/customers/C000003/recommendations"])
def test_ids_are_read_like_the_trainer_reads_them_without_surrounding_spaces(client, auth, path):
    body = client.get(path, headers=auth).get_json()
    assert body["customer_id"] == "C000003" and body["source"] == "personal"
    error = error_of(client.get("/v1/customers/%20/recommendations", headers=auth), 400)
    assert "customer_id must have 1 to 128 characters" in error["message"]
    batch = client.post("/v1/recommendations/batch", headers=auth, json={"requests": [{"customer_id": " C000003 "}]})
    assert batch.get_json()["results"][0]["customer_id"] == "C000003"


@pytest.mark.parametrize("path", ["/v1/customers/%FF/recommendations", "/v1/customers/%ED%A0%80/recommendations",
                                  "/v1/customers/%C0%AF/recommendations", "/v1/items/%FE/similar",
                                  "/v1/customers/C000003/recommendations?exclude=%FF"])
def test_ids_and_values_that_are_not_utf8_are_refused(server, path):
    request = f"GET {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {API_KEY}\r\n\r\n".encode()
    status, headers, body = raw(server, request)
    assert status == 400 and headers["content-type"] == "application/json", body
    assert b"is not valid UTF-8 once percent-decoded" in body


def test_a_chunked_body_over_the_limit_is_413_not_cut_short(server):
    payload = b'{"limit": 2' + b" " * 5000 + b"}"
    chunks = b"".join(b"%x\r\n%s\r\n" % (len(part), part) for part in (payload[:3000], payload[3000:])) + b"0\r\n\r\n"
    status, _headers, body = raw(server, post_chunked(server, chunks))
    assert status == 413 and b'"code":"payload_too_large"' in body
    small = b'{"limit": 2}'
    status, _headers, body = raw(server, post_chunked(server, b"%x\r\n%s\r\n0\r\n\r\n" % (len(small), small)))
    assert status == 200 and body.count(b'"item_id"') == 2


@pytest.mark.parametrize("request_bytes, status", [
    (b"get / HTTP/1.1\r\nHost: x\r\n\r\n", 400),
    (b"GET /v1/customers/" + b"x" * 5000 + b"/recommendations HTTP/1.1\r\nHost: x\r\n\r\n", 414),
    (b"GET / HTTP/1.1\r\nHost: x\r\nX-Big: " + b"y" * 9000 + b"\r\n\r\n", 431),
    (b"POST /v1/events HTTP/1.1\r\nHost: x\r\nContent-Length: -1\r\n\r\n", 400),
])
def test_requests_gunicorn_refuses_get_the_json_error_shape(server, request_bytes, status):
    answered, headers, body = raw(server, request_bytes)
    assert answered == status, body
    assert headers["content-type"] == "application/json" and len(headers["x-request-id"]) == 32
    assert body.startswith(b'{"error":{"code":') and b"<html>" not in body


def test_a_body_that_stops_coming_is_408_within_the_read_timeout_and_frees_the_thread(server):
    """A chunk size of FFFFFFFF or a Content-Length the client never fills: the read waits for bytes that never come.
    Both requests are open at once, on the two threads of the one worker; a third request is still answered after."""
    from concurrent.futures import ThreadPoolExecutor

    from recsvc.api.parsing import BODY_READ_TIMEOUT_SECONDS

    def stalled(request: bytes) -> tuple[float, bytes]:
        host, port = server
        with socket.create_connection((host, int(port)), timeout=BODY_READ_TIMEOUT_SECONDS + 10) as sock:
            sock.sendall(request)  # and nothing more, the connection left open
            started = time.monotonic()
            data = b""
            while chunk := sock.recv(65536):  # the server closes it after the answer
                data += chunk
            return time.monotonic() - started, data

    huge_chunk = post_chunked(server, b"FFFFFFFF\r\n{\"limit\": 2")
    short_length = (f"POST {RECS} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {API_KEY}\r\n"
                    "Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{\"limit\": 2}").encode()
    with ThreadPoolExecutor(2) as pool:
        answers = list(pool.map(stalled, [huge_chunk, short_length]))
    for waited, data in answers:
        assert data.startswith(b"HTTP/1.1 408 "), data[:200]
        assert b'"code":"request_timeout"' in data and b"no byte of the body" in data
        assert b"\r\nConnection: close\r\n" in data.partition(b"\r\n\r\n")[0]  # as gunicorn then closes it
        assert BODY_READ_TIMEOUT_SECONDS - 0.5 < waited < BODY_READ_TIMEOUT_SECONDS + 3
    status, _headers, body = raw(server, post_chunked(server, b"0c\r\n{\"limit\": 2}\r\n0\r\n\r\n"))
    assert status == 200 and body.count(b'"item_id"') == 2


def test_a_body_trickled_a_byte_at_a_time_is_408_at_the_deadline_while_the_worker_serves_others(server):
    """A byte every 1.5 seconds never lets the read wait BODY_READ_TIMEOUT_SECONDS at once (slowloris on the body):
    the whole read is bounded by BODY_READ_DEADLINE_SECONDS. The one worker's other thread answers meanwhile."""
    import select

    from recsvc.api.parsing import BODY_READ_DEADLINE_SECONDS, BODY_READ_TIMEOUT_SECONDS

    host, port = server
    served = []  # seconds each request made while the body trickles took
    with socket.create_connection((host, int(port)), timeout=BODY_READ_DEADLINE_SECONDS + 10) as sock:
        sock.sendall((f"POST {RECS} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {API_KEY}\r\n"
                      "Content-Type: application/json\r\nContent-Length: 100\r\n\r\n").encode())
        started = time.monotonic()
        trickle = iter(b'{"limit": 2' + b" " * 89)
        while not select.select([sock], [], [], 1.5)[0]:  # no answer yet: one more byte, and a request beside it
            assert time.monotonic() - started < BODY_READ_DEADLINE_SECONDS + 2, "no answer: the trickle holds a thread"
            sock.sendall(bytes([next(trickle)]))
            asked = time.monotonic()
            status, _headers, body = raw(server, post_chunked(server, b"0c\r\n{\"limit\": 2}\r\n0\r\n\r\n"))
            assert status == 200 and body.count(b'"item_id"') == 2
            served.append(time.monotonic() - asked)
        waited = body_deadline_answer(sock, started)
    assert BODY_READ_DEADLINE_SECONDS - 0.5 < waited < BODY_READ_DEADLINE_SECONDS + 2
    assert waited > 1.5 * BODY_READ_TIMEOUT_SECONDS  # the client did keep the read going past the per-wait timeout
    assert len(served) >= 5 and max(served) < 1.0, served


def body_deadline_answer(sock, started: float) -> float:
    """Seconds from `started` until the server, having answered 408 for the body's deadline, closed the connection."""
    data = b""
    while chunk := sock.recv(65536):  # the server closes it after the answer
        data += chunk
    waited = time.monotonic() - started
    head, _, body = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 408 ") and b"\r\nConnection: close\r\n" in head, data[:300]
    assert b'"code":"request_timeout"' in body and b"did not send the whole body within" in body
    return waited


def test_a_chunked_body_trickled_a_chunk_at_a_time_is_408_at_the_deadline_too(server):
    """gunicorn's chunked reader holds its request rather than the unreader: the deadline must still bound it.
    Before, a one-byte chunk every 1.5 seconds held the thread as long as the client kept sending."""
    import select

    from recsvc.api.parsing import BODY_READ_DEADLINE_SECONDS

    host, port = server
    with socket.create_connection((host, int(port)), timeout=BODY_READ_DEADLINE_SECONDS + 10) as sock:
        sock.sendall(post_chunked(server, b"1\r\n{\r\n"))
        started = time.monotonic()
        while not select.select([sock], [], [], 1.5)[0]:
            assert time.monotonic() - started < BODY_READ_DEADLINE_SECONDS + 2, "no answer: the trickle holds a thread"
            sock.sendall(b"1\r\n \r\n")
        waited = body_deadline_answer(sock, started)
    assert BODY_READ_DEADLINE_SECONDS - 0.5 < waited < BODY_READ_DEADLINE_SECONDS + 2


def test_request_heads_trickled_a_byte_at_a_time_are_408_at_the_deadline_and_free_the_threads(server, server_log):
    """Slowloris: the request line, then a header byte every 1.5 seconds, never waiting long enough at once for
    gunicorn's first-byte wait to see it. Two such connections hold both threads of the one worker: each is answered
    408 at the head's deadline, one line logged for it, and a request sent meanwhile is served then."""
    import select
    from concurrent.futures import ThreadPoolExecutor

    from recsvc.worker import HEAD_READ_DEADLINE_SECONDS

    host, port = server
    get = f"GET {RECS}?limit=2 HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {API_KEY}\r\n"
    logged_before = server_log.read_text().count("Request head timed out")
    slow = [socket.create_connection((host, int(port)), timeout=5) for _ in range(2)]
    try:
        for sock in slow:
            sock.sendall(get.encode())
        started = time.monotonic()
        time.sleep(0.3)  # each taken by a thread, reading the head
        with ThreadPoolExecutor(1) as pool:
            other = pool.submit(lambda: (raw(server, (get + "\r\n").encode(), timeout=30), time.monotonic() - started))
            trickle = iter(b"X-Slow: " + b"a" * 100)
            answers = {}
            while len(answers) < len(slow):
                served = "served" if other.done() else "not served"
                assert time.monotonic() - started < HEAD_READ_DEADLINE_SECONDS + 3, (
                    f"the trickling heads hold the threads (the other request: {served})")
                waiting = [sock for sock in slow if sock not in answers]
                for sock in select.select(waiting, [], [], 1.5)[0]:
                    answers[sock] = (b"".join(iter(lambda s=sock: s.recv(65536), b"")), time.monotonic() - started)
                    sock.close()  # as the server did (gthread waits up to 2 s for the client to close, in its loop)
                byte = bytes([next(trickle)])
                for sock in waiting:
                    if sock not in answers:
                        sock.sendall(byte)
            (status, _headers, body), served_after = other.result()
    finally:
        for sock in slow:
            sock.close()
    for data, waited in answers.values():
        head, _, body_408 = data.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 408 ") and b"\r\nConnection: close\r\n" in head, data[:300]
        assert b"\r\nX-Request-ID: " in head and b'"code":"request_timeout"' in body_408
        assert b"did not send the request line and headers within" in body_408
        assert HEAD_READ_DEADLINE_SECONDS - 0.5 < waited < HEAD_READ_DEADLINE_SECONDS + 2
    assert status == 200 and body.count(b'"item_id"') == 2
    assert served_after < HEAD_READ_DEADLINE_SECONDS + 2
    log = server_log.read_text()
    assert log.count("Request head timed out") - logged_before == 2 and "Traceback" not in log


def test_a_kept_alive_connection_gets_a_new_head_deadline_per_request_and_its_idle_keepalive(server):
    """The head's deadline starts at each request's first byte, not the connection's: requests a few seconds apart,
    each head sent in two parts, are served past HEAD_READ_DEADLINE_SECONDS. Idle between requests, the connection
    is gunicorn's to close, after its keepalive (5 seconds, recsvc/gunicorn_conf.py), as before."""
    from recsvc.worker import HEAD_READ_DEADLINE_SECONDS

    host, port = server
    get = f"GET {RECS}?limit=2 HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {API_KEY}\r\n\r\n".encode()
    with socket.create_connection((host, int(port)), timeout=10) as sock, sock.makefile("rb") as answers:
        started = time.monotonic()
        while time.monotonic() - started < HEAD_READ_DEADLINE_SECONDS + 1:
            sock.sendall(get[:20])
            time.sleep(0.5)
            sock.sendall(get[20:])
            head = b"".join(iter(answers.readline, b"\r\n"))
            assert head.startswith(b"HTTP/1.1 200 ") and b"\r\nConnection: keep-alive\r\n" in head, head
            length = int(head.lower().partition(b"content-length:")[2].split(b"\r\n")[0])
            assert answers.read(length).count(b'"item_id"') == 2
            time.sleep(1.5)
        idle = time.monotonic()
        assert answers.read() == b""  # closed by the server
        assert 5 - 1.5 - 0.5 < time.monotonic() - idle < 5 - 1.5 + 1.5


def test_a_normal_post_keeps_its_connection_alive(server):
    """The close after a failed body read (recsvc.worker) leaves well-formed requests' connections open."""
    host, port = server
    request = post_chunked(server, b"0c\r\n{\"limit\": 2}\r\n0\r\n\r\n")
    with socket.create_connection((host, int(port)), timeout=10) as sock, sock.makefile("rb") as answers:
        for _ in range(2):
            sock.sendall(request)
            head = b"".join(iter(answers.readline, b"\r\n"))
            assert head.startswith(b"HTTP/1.1 200 ") and b"\r\nConnection: keep-alive\r\n" in head, head
            length = int(head.lower().partition(b"content-length:")[2].split(b"\r\n")[0])
            assert answers.read(length).count(b'"item_id"') == 2


FEEDBACK = '"request_id": "abcdefgh", "customer_id": "c1", "item_id": "i1", "action": "shown"'
EVENT = '"customer_id": "c1", "item_id": "i1", "timestamp": "2026-11-01T10:00:00Z"'


@pytest.mark.parametrize("path, body, key", [
    (RECS, '{"limit": 2, "limit": 3}', "limit"),
    (RECS, '{"exclude": ["a"], "context_items": ["b"], "exclude": ["c"]}', "exclude"),
    ("/v1/recommendations/batch", '{"requests": [{"customer_id": "a", "customer_id": "b"}]}', "customer_id"),
    ("/v1/recommendations/batch", '{"requests": [{"customer_id": "a"}], "requests": [{"customer_id": "b"}]}',
     "requests"),
    ("/v1/events", '[{' + EVENT + ', "item_id": "i2"}]', "item_id"),
    ("/v1/events", '{"events": [{' + EVENT + '}], "events": []}', "events"),
    # a repeated key whose values hold ':' (a time), which could make up for the key's own ':' in a count
    ("/v1/events", '[{"customer_id": "c1", "item_id": "i1", "timestamp": "10:00", "timestamp": "2026-11-01"}]',
     "timestamp"),
    ("/v1/feedback", '{' + FEEDBACK + ', "customer_id": "c2"}', "customer_id"),
    # escapes take the slow check: \u0061 is "a"
    ("/v1/feedback", '{' + FEEDBACK + ', "\\u0061gent_id": "x", "agent_id": "y"}', "agent_id"),
])
def test_a_key_given_twice_in_one_object_is_400_naming_it(client, auth, path, body, key):
    response = client.post(path, headers={**auth, "Content-Type": "application/json"}, data=body)
    error = error_of(response, 400)
    assert error["code"] == "invalid_request"
    assert error["message"] == f"the body gives the key {key!r} more than once in one object; give it once"
    assert error["details"] == {"fields": {key: ["given more than once"]}}


@pytest.mark.parametrize("path, body, status", [
    ("/v1/events", '[{' + EVENT + ', "event_type": "view:detail"}, {' + EVENT + '}]', 202),
    ("/v1/events", '[{"customer_id": "c\\u003a1", "item_id": "i:1", "timestamp": "2026-11-01T10:00:00\\u002b00:00"}]',
     202),
    ("/v1/feedback", '{' + FEEDBACK + ', "agent_id": "desk:7"}', 202),
    (RECS, '{"limit": 2, "exclude": ["SKU:1", "C:\\\\users"]}', 200),
])
def test_bodies_with_colons_and_escapes_in_their_strings_and_no_repeated_key_are_taken(client, auth, path, body,
                                                                                       status):
    response = client.post(path, headers={**auth, "Content-Type": "application/json"}, data=body)
    assert response.status_code == status, response.get_data(as_text=True)


@pytest.mark.parametrize("depth, details", [
    (300, {"fields": {"limit": ["given more than once"]}}),  # orjson reads it but cannot write it back: the slow check
    (1000, {"fields": {"exclude": {"0": ["Not a valid string."]}}}),  # too deep for Python's json too: the schema
])
def test_a_deeply_nested_body_is_a_400_not_a_500(client, auth, depth, details):
    body = '{"limit": 2, "exclude": ' + "[" * depth + "]" * depth + ', "limit": 3}'
    error = error_of(client.post(RECS, headers={**auth, "Content-Type": "application/json"}, data=body), 400)
    assert error["details"] == details
