"""A client for the local Bexar agent's HTTP API on its Unix socket.

Only the standard library: ``http.client`` over an ``AF_UNIX`` socket. Under nova-compute,
eventlet has monkey-patched ``socket``, so a request blocks only its own greenthread.

Every request has a deadline (connect, send and the whole answer), so an agent that hangs
becomes an :class:`AgentUnavailable` after ``timeout`` seconds instead of a stuck greenthread.
An agent that refused a request is an :class:`AgentError` carrying the agent's stable error
``code`` and the ``field`` it named (docs/openapi.json, ``Error``).
"""

import http.client
import json
import socket
import time
import urllib.parse


class AgentUnavailable(Exception):
    """The agent could not be reached or did not answer in time."""

    def __init__(self, socket_path, reason):
        super().__init__("Bexar agent at %s unavailable: %s" % (socket_path, reason))
        self.socket_path = socket_path
        self.reason = reason


class AgentError(Exception):
    """The agent answered with an error status."""

    def __init__(self, method, path, status, code, message, field=None):
        text = "%s %s: %d %s: %s" % (method, path, status, code, message)
        if field:
            text += " (field %s)" % field
        super().__init__(text)
        self.method = method
        self.path = path
        self.status = status
        self.code = code
        self.message = message
        self.field = field


class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, path, timeout):
        super().__init__("localhost", timeout=timeout)
        self._path = path

    def connect(self):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(self.timeout)
        try:
            s.connect(self._path)
        except BaseException:
            s.close()
            raise
        self.sock = s


class Client:
    """One agent. Thread- and greenthread-safe: each request uses its own connection."""

    def __init__(self, socket_path, timeout=60.0):
        self.socket_path = socket_path
        self.timeout = float(timeout)

    def request(self, method, path, body=None, query=None, timeout=None):
        """Sends one request; returns ``(status, headers, body_bytes)`` for a 2xx answer.

        Raises :class:`AgentError` for a 4xx/5xx answer and :class:`AgentUnavailable` when the
        socket is missing, refuses, breaks or the answer takes longer than ``timeout``.
        """
        deadline = self.timeout if timeout is None else float(timeout)
        target = path
        if query:
            target += "?" + urllib.parse.urlencode(
                {k: _query_value(v) for k, v in query.items() if v is not None})
        payload = None
        headers = {}
        if body is not None:
            payload = json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
        conn = _UnixConnection(self.socket_path, deadline)
        start = time.monotonic()
        try:
            conn.request(method, target, body=payload, headers=headers)
            resp = conn.getresponse()
            # The socket timeout bounds each read; this bounds the whole answer.
            chunks = []
            while True:
                if time.monotonic() - start > deadline:
                    raise socket.timeout("answer took longer than %.0f s" % deadline)
                chunk = resp.read1(65536) if hasattr(resp, "read1") else resp.read(65536)
                if not chunk:
                    break
                chunks.append(chunk)
            data = b"".join(chunks)
            status = resp.status
            resp_headers = {k.lower(): v for k, v in resp.getheaders()}
        except (OSError, http.client.HTTPException) as e:
            raise AgentUnavailable(self.socket_path, "%s %s: %s" % (method, path, e)) from e
        finally:
            conn.close()
        if status >= 400:
            code, message, field = "unknown", data.decode("utf-8", "replace")[:500], None
            try:
                err = json.loads(data)["error"]
                code = err.get("code", code)
                message = err.get("message", message)
                field = err.get("field")
            except (ValueError, KeyError, TypeError):
                pass
            raise AgentError(method, path, status, code, message, field)
        return status, resp_headers, data

    def json(self, method, path, body=None, query=None, timeout=None):
        """Like :meth:`request`, decoding a JSON answer (``None`` for an empty one)."""
        _, _, data = self.request(method, path, body=body, query=query, timeout=timeout)
        if not data.strip():
            return None
        try:
            return json.loads(data)
        except ValueError as e:
            raise AgentUnavailable(self.socket_path,
                                   "%s %s: answer is not JSON: %s" % (method, path, e)) from e

    # The verbs the driver uses, named after the API's routes.

    def host(self):
        return self.json("GET", "/v1/host")

    def list_vms(self, selector=None):
        vms, after = [], None
        while True:
            page = self.json("GET", "/v1/vms",
                             query={"selector": selector, "limit": 1000, "after": after})
            items = page.get("items", [])
            vms.extend(items)
            after = page.get("next")
            if not after or not items:
                return vms

    def get_vm(self, vm_id):
        return self.json("GET", "/v1/vms/%s" % _seg(vm_id))

    def create_vm(self, spec, start):
        return self.json("POST", "/v1/vms", body=spec, query={"start": start})

    def delete_vm(self, vm_id):
        self.request("DELETE", "/v1/vms/%s" % _seg(vm_id))

    def action(self, vm_id, verb, query=None, timeout=None):
        return self.json("POST", "/v1/vms/%s/%s" % (_seg(vm_id), verb), query=query,
                         timeout=timeout)

    def console(self, vm_id):
        _, headers, data = self.request("GET", "/v1/vms/%s/console" % _seg(vm_id))
        return headers, data

    def put_metadata(self, vm_id, metadata):
        return self.json("PUT", "/v1/vms/%s/metadata" % _seg(vm_id), body=metadata)

    def segments(self):
        return self.json("GET", "/v1/segments").get("items", [])

    def create_segment(self, segment):
        return self.json("POST", "/v1/segments", body=segment)

    def delete_segment(self, segment_id):
        self.request("DELETE", "/v1/segments/%s" % _seg(segment_id))

    def get_image(self, image_id):
        return self.json("GET", "/v1/images/%s" % _seg(image_id))

    def events(self, since, timeout):
        """Opens the event stream (``follow``) after ``since``; returns the live response.

        The caller reads NDJSON lines from it and closes it; the socket timeout (``timeout``)
        bounds the silence between two lines, so a hung agent is noticed.
        """
        conn = _UnixConnection(self.socket_path, timeout)
        try:
            conn.request("GET", "/v1/events?" + urllib.parse.urlencode(
                {"since": since, "follow": "true"}))
            resp = conn.getresponse()
        except (OSError, http.client.HTTPException) as e:
            conn.close()
            raise AgentUnavailable(self.socket_path, "GET /v1/events: %s" % e) from e
        if resp.status != 200:
            data = resp.read()
            conn.close()
            raise AgentError("GET", "/v1/events", resp.status, "unknown",
                             data.decode("utf-8", "replace")[:500])
        return conn, resp


def _seg(part):
    return urllib.parse.quote(str(part), safe="")


def _query_value(v):
    if isinstance(v, bool):
        return "true" if v else "false"
    return str(v)
