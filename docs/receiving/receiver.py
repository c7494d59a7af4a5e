# A Hookline receiver in Python: verifies each request with the `standardwebhooks`
# library (pip install standardwebhooks), skips ids it has already handled, answers 204.
# Run: WEBHOOK_SECRET=whsec_... PORT=8000 python3 receiver.py
import json
import os
from http.server import BaseHTTPRequestHandler, HTTPServer

from standardwebhooks.webhooks import Webhook, WebhookVerificationError

webhook = Webhook(os.environ["WEBHOOK_SECRET"])  # the subscription's whsec_... secret
seen = set()  # webhook-id values already handled; keep these in your database


class Handler(BaseHTTPRequestHandler):
    def do_POST(self):
        body = self.rfile.read(int(self.headers.get("content-length", 0)))
        try:
            # Checks the signature over the exact bytes and the timestamp (5 minutes).
            payload = webhook.verify(body, dict(self.headers))
        except WebhookVerificationError as e:
            print(json.dumps({"rejected": str(e)}), flush=True)
            self.send_response(400)
            self.end_headers()
            return
        msg_id = self.headers["webhook-id"]
        if msg_id not in seen:  # a retry of a handled message: answer 2xx, do nothing
            seen.add(msg_id)
            event_type = self.headers["webhook-event-type"]
            print(json.dumps({"verified": msg_id, "type": event_type, "body": payload}), flush=True)
        self.send_response(204)
        self.end_headers()

    def log_message(self, *args):
        pass


HTTPServer(("127.0.0.1", int(os.environ.get("PORT", "8000"))), Handler).serve_forever()
