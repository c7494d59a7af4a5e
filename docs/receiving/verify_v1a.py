# Verifies Standard Webhooks `v1a` (ed25519) signatures with Python `cryptography`
# (pip install cryptography), from the specification's signing string
# `{webhook-id}.{webhook-timestamp}.{body}`. CI runs this file on real deliveries
# (tests/e2e_signing_tls.rs): it reads {"headers", "body_b64", "public_keys"} as JSON on
# stdin and prints which public keys verified.
import base64
import json
import sys

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey


def verified_keys(public_keys: list[str], headers: dict, body: bytes) -> list[str]:
    """The `whpk_` keys (two during a rotation) with a valid `v1a` entry for this request.
    Accept the request when this is not empty; then check the timestamp and deduplicate."""
    signed = f"{headers['webhook-id']}.{headers['webhook-timestamp']}.".encode() + body
    sigs = [base64.b64decode(entry[len("v1a,"):])
            for entry in headers["webhook-signature"].split(" ") if entry.startswith("v1a,")]
    found = []
    for whpk in public_keys:
        key = Ed25519PublicKey.from_public_bytes(base64.b64decode(whpk.removeprefix("whpk_")))
        for sig in sigs:
            try:
                key.verify(sig, signed)
                found.append(whpk)
                break
            except InvalidSignature:
                pass
    return found


if __name__ == "__main__":
    req = json.load(sys.stdin)
    body = base64.b64decode(req["body_b64"])
    found = verified_keys(req["public_keys"], req["headers"], body)
    entries = req["headers"]["webhook-signature"].count("v1a,")
    print(json.dumps({"verified": [k in found for k in req["public_keys"]], "entries": entries}))
