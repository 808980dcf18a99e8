"""A local HTTP file server for download tests (127.0.0.1, a random port, never the internet).

It serves `server.files` (path -> bytes), honours Range requests unless `server.support_range` is
off, answers the statuses queued in `server.statuses` first, and for each length queued in
`server.cuts` announces the full length but hangs up after that many bytes, like a dropped
connection. With `server.send_length` off it sends no Content-Length and ends the body by closing
the connection; `server.stall` seconds pass between the headers and the body, like a server that
hangs. Every request is recorded in `server.requests`. `server.before_chunk(path)` runs
before each 1 MiB chunk goes out, so a test can look at the client's files mid-transfer.
"""

import contextlib
import http.server
import threading
import time

CHUNK = 1 << 20


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):  # keep pytest output clean
        pass

    def do_GET(self):
        srv = self.server
        srv.requests.append({"path": self.path, "range": self.headers.get("Range")})
        if srv.statuses:
            self.send_error(srv.statuses.pop(0))
            return
        data = srv.files.get(self.path)
        if data is None:
            self.send_error(404)
            return
        start = 0
        range_header = self.headers.get("Range")
        if range_header and srv.support_range:
            start = int(range_header.removeprefix("bytes=").split("-")[0])
            if start >= len(data):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(data)}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        else:
            self.send_response(200)
        body = data[start:]
        if srv.send_length:
            self.send_header("Content-Length", str(len(body)))
        else:
            self.close_connection = True
        self.end_headers()
        self.wfile.flush()
        if srv.stall:
            time.sleep(srv.stall)
        limit = srv.cuts.pop(0) if srv.cuts else len(body)
        for offset in range(0, limit, CHUNK):
            srv.before_chunk(self.path)
            self.wfile.write(body[offset:min(offset + CHUNK, limit)])
            self.wfile.flush()
        if limit < len(body):
            self.close_connection = True


@contextlib.contextmanager
def serving(files: dict[str, bytes]):
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    srv.files, srv.requests, srv.statuses, srv.cuts = dict(files), [], [], []
    srv.support_range, srv.send_length, srv.stall = True, True, 0.0
    srv.before_chunk = lambda path: None
    srv.base_url = f"http://127.0.0.1:{srv.server_address[1]}"
    thread = threading.Thread(target=srv.serve_forever, args=(0.02,), daemon=True)
    thread.start()
    try:
        yield srv
    finally:
        srv.shutdown()
        srv.server_close()
