#!/usr/bin/env python3
"""A minimal `http` reward server (stdlib only) for examples/http-reward.toml: reward 1 when the
completion's last number equals the answer, else 0; reports the completion length as a metric.

    python3 examples/http_verifier.py --port 8001
"""
import argparse
import json
import re
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class Handler(BaseHTTPRequestHandler):
    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        numbers = re.findall(r"-?\d+", body["completion"])
        ok = bool(numbers) and numbers[-1] == body["answer"].strip()
        out = json.dumps({"reward": 1.0 if ok else 0.0, "metrics": {"completion_chars": len(body["completion"])}}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(out)))
        self.end_headers()
        self.wfile.write(out)

    def log_message(self, *args):
        pass


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--port", type=int, default=8001)
    a = ap.parse_args()
    ThreadingHTTPServer(("127.0.0.1", a.port), Handler).serve_forever()
