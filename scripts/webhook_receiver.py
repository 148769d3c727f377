"""A minimal threadline webhook receiver (standard library only), for trying webhooks out.

    THREADLINE_WEBHOOK_SECRET=change-me python3 scripts/webhook_receiver.py 9000

It checks each delivery's signature and age, answers 2xx, and handles each delivery id once
(threadline delivers at least once: a retry after a lost response, or after the sending
process died, repeats a delivery with the same id). A real receiver keeps the ids it handled
in its database, in the transaction that acts on the delivery, not in memory.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import sys
import time
from http.server import BaseHTTPRequestHandler, HTTPServer

SECRET = os.environ["THREADLINE_WEBHOOK_SECRET"].encode()
TOLERANCE_S = 300
seen: set[str] = set()


def verified(timestamp: str, signatures: str, body: bytes) -> bool:
    if not timestamp.isdigit() or abs(time.time() - int(timestamp)) > TOLERANCE_S:
        return False  # a replay of an old request, or a clock far off
    mac = hmac.new(SECRET, timestamp.encode() + b"." + body, hashlib.sha256)
    expected = "v1=" + mac.hexdigest()
    return any(hmac.compare_digest(expected, s) for s in signatures.split())


class Receiver(BaseHTTPRequestHandler):
    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        delivery_id = self.headers.get("Threadline-Webhook-Id", "")
        timestamp = self.headers.get("Threadline-Webhook-Timestamp", "")
        signatures = self.headers.get("Threadline-Webhook-Signature", "")
        if not verified(timestamp, signatures, body):
            self.send_response(401)
            self.end_headers()
            return
        if delivery_id not in seen:  # a repeat is acknowledged, not handled twice
            seen.add(delivery_id)
            event = json.loads(body)
            print(
                event["event"], event["message_ids"], json.dumps(event["reply"] or event["error"])
            )
        self.send_response(204)
        self.end_headers()


if __name__ == "__main__":
    port = int(sys.argv[1]) if len(sys.argv) > 1 else 9000
    HTTPServer(("127.0.0.1", port), Receiver).serve_forever()
