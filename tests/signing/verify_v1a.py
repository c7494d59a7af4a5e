"""Verifies Standard Webhooks `v1a` (ed25519) signatures with Python `cryptography`,
independently of Hookline's Rust code, following the specification's signing string
`{webhook-id}.{webhook-timestamp}.{body}`.

Reads one JSON object on stdin:
  {"id": ..., "timestamp": "...", "body_b64": ..., "signature": "v1a,... v1a,...",
   "public_keys": ["whpk_...", ...]}
and prints {"verified": [true|false per public key], "entries": <v1a entries seen>}.
"""

import base64
import json
import sys

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey


def public_key(whpk: str) -> Ed25519PublicKey:
    if not whpk.startswith("whpk_"):
        raise ValueError(f"not a whpk_ key: {whpk!r}")
    return Ed25519PublicKey.from_public_bytes(base64.b64decode(whpk[len("whpk_"):]))


def main() -> None:
    req = json.load(sys.stdin)
    signed = f"{req['id']}.{req['timestamp']}.".encode() + base64.b64decode(req["body_b64"])
    entries = [
        base64.b64decode(e[len("v1a,"):])
        for e in req["signature"].split(" ")
        if e.startswith("v1a,")
    ]
    verified = []
    for whpk in req["public_keys"]:
        key = public_key(whpk)
        ok = False
        for sig in entries:
            try:
                key.verify(sig, signed)
                ok = True
                break
            except InvalidSignature:
                pass
        verified.append(ok)
    print(json.dumps({"verified": verified, "entries": len(entries)}))


main()
