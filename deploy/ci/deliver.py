"""Delivers one event end to end through running Hookline processes, the way an operator
would with the CLI: creates a tenant and a subscription (registry), publishes an event
(ingest) and waits until a local webhook receiver got it, signed (via the dispatcher).

Shared by the CI scripts that run Hookline in other shapes (chart_run.py: what the Helm
chart and the compose file render; image.sh: the container image). As a command:

    python3 deploy/ci/deliver.py --bin BIN --registry http://H:P --ingest http://H:P --token hl_...
"""

import argparse
import http.server
import json
import subprocess
import sys
import threading
import time


class Receiver:
    """A webhook receiver on 127.0.0.1 that records every POST and answers 200."""

    def __init__(self, host="127.0.0.1"):
        received = self.received = []

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("content-length", "0")))
                received.append((self.path, dict(self.headers), body))
                self.send_response(200)
                self.send_header("content-length", "0")
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer((host, 0), Handler)
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def url(self, path="/webhooks", host="127.0.0.1"):
        return f"http://{host}:{self.port}{path}"

    def close(self):
        self.server.shutdown()


def cli(binary, server, token, *args, env=None):
    """Runs a hookline client command with --json and returns its parsed output."""
    cmd = [binary, "--json", "--server", server, "--token", token, *args]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=60, env=env)
    if out.returncode != 0:
        raise SystemExit(f"`{' '.join(cmd[:1] + list(args))}` failed ({out.returncode}): {out.stderr.strip()}")
    return json.loads(out.stdout)


def deliver_one(binary, registry, ingest, token, receiver_host="127.0.0.1", timeout=60, receiver=None):
    """Creates a tenant and a subscription, publishes one event and waits for the webhook.
    Returns a one-line summary; raises SystemExit on failure."""
    own = receiver is None
    receiver = receiver or Receiver()
    try:
        tenant = cli(binary, registry, token, "tenants", "create", "--name", "ci")
        tenant = tenant[0] if isinstance(tenant, list) else tenant
        sub = cli(binary, registry, token, "subscriptions", "create", "--tenant", tenant["id"],
                  "--url", receiver.url(host=receiver_host), "--event-type", "invoice.*")
        payload = json.dumps({"invoice": "in_ci", "amount": 4200}, separators=(",", ":"))
        published = cli(binary, ingest, token, "publish", "--tenant", tenant["id"],
                        "--type", "invoice.paid", "--data", payload)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for path, headers, body in receiver.received:
                lower = {k.lower(): v for k, v in headers.items()}
                if body.decode() == payload and "webhook-signature" in lower:
                    return (f"event {published['event_id']} delivered to {path} "
                            f"(webhook-id {lower.get('webhook-id')}) for tenant {tenant['id']}")
            time.sleep(0.2)
        raise SystemExit(f"event {published['event_id']} (subscription {sub}) was not delivered "
                         f"within {timeout}s; the receiver got {len(receiver.received)} requests")
    finally:
        if own:
            receiver.close()


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--bin", required=True, help="the hookline binary (the CLI)")
    p.add_argument("--registry", required=True, help="gRPC URL of a process running registry")
    p.add_argument("--ingest", required=True, help="gRPC URL of a process running ingest")
    p.add_argument("--token", required=True, help="an admin API key")
    p.add_argument("--timeout", type=float, default=60)
    a = p.parse_args()
    print(deliver_one(a.bin, a.registry, a.ingest, a.token, timeout=a.timeout))


if __name__ == "__main__":
    sys.exit(main())
