"""Webhook signatures: Standard Webhooks (v1 HMAC-SHA256) and GitHub's sha256 scheme.

Pure functions, shared by the sender (signing outbound deliveries), the inbound hook
handler and `edgehook receive` (verifying), so both directions agree byte for byte.
Verification compares in constant time and answers only True or False: a caller
can never learn which part (timestamp, id, signature) was wrong, nor the expected MAC.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
from collections.abc import Sequence

from .errors import EdgehookError

WHSEC_PREFIX = "whsec_"
TOLERANCE = 300  # seconds either side of now (Standard Webhooks' recommendation)


class SigningError(EdgehookError, ValueError):
    """A secret cannot be used (a `whsec_` secret that is not base64)."""


def secret_key(secret: str) -> bytes:
    """The HMAC key of a secret: base64 after a `whsec_` prefix, else its UTF-8 bytes."""
    if secret.startswith(WHSEC_PREFIX):
        try:
            return base64.b64decode(secret[len(WHSEC_PREFIX):], validate=True)
        except (binascii.Error, ValueError):
            # Never put the secret in the message: it ends up in logs.
            raise SigningError("a whsec_ secret must be base64 after the prefix") from None
    return secret.encode("utf-8")


def _standard_mac(key: bytes, msg_id: str, timestamp: int | str, body: bytes) -> bytes:
    signed = b"%s.%s.%s" % (msg_id.encode("utf-8"), str(timestamp).encode("ascii"), body)
    return hmac.new(key, signed, hashlib.sha256).digest()


def sign_standard(secret: str, msg_id: str, timestamp: int, body: bytes) -> str:
    """One Standard Webhooks signature, `v1,<base64 HMAC-SHA256 of id.timestamp.body>`."""
    mac = _standard_mac(secret_key(secret), msg_id, int(timestamp), body)
    return "v1," + base64.b64encode(mac).decode("ascii")


def standard_headers(secrets: Sequence[str], msg_id: str, timestamp: int,
                     body: bytes) -> dict[str, str]:
    """The three Standard Webhooks headers; one signature per secret, for key rotation."""
    sigs = " ".join(sign_standard(s, msg_id, timestamp, body) for s in secrets)
    return {"webhook-id": msg_id, "webhook-timestamp": str(int(timestamp)),
            "webhook-signature": sigs}


def verify_standard(secrets: Sequence[str], msg_id: str | None, timestamp_str: str | None,
                    signature_header: str | None, body: bytes, now: float,
                    tolerance: float = TOLERANCE) -> bool:
    """True when any `v1` signature in the header matches any secret, within the tolerance.

    Every candidate pair is compared (no early exit on a match) so the time taken does
    not depend on which secret or which signature matched.
    """
    if not secrets or not msg_id or not timestamp_str or not signature_header:
        return False
    ts_text = timestamp_str.strip()
    if not (ts_text.isascii() and ts_text.isdigit()):
        return False
    ts = int(ts_text)
    if abs(now - ts) > tolerance:
        return False
    given: list[bytes] = []
    for part in signature_header.split():
        version, _, sig = part.partition(",")
        if version != "v1" or not sig:
            continue
        try:
            given.append(base64.b64decode(sig, validate=True))
        except (binascii.Error, ValueError):
            continue
    ok = False
    for secret in secrets:
        try:
            expected = _standard_mac(secret_key(secret), msg_id, ts_text, body)
        except SigningError:
            continue
        for candidate in given:
            ok |= hmac.compare_digest(expected, candidate)
    return ok


def sign_github(secret: str, body: bytes) -> str:
    """GitHub's `X-Hub-Signature-256` value: `sha256=<hex HMAC-SHA256 of the body>`.

    GitHub secrets are plain strings; the key is always the secret's UTF-8 bytes.
    """
    return "sha256=" + hmac.new(secret.encode("utf-8"), body, hashlib.sha256).hexdigest()


def verify_github(secrets: Sequence[str], header: str | None, body: bytes) -> bool:
    """True when the `X-Hub-Signature-256` header matches the body under any secret."""
    if not secrets or not header:
        return False
    given = header.strip().encode("utf-8", "replace")
    ok = False
    for secret in secrets:
        ok |= hmac.compare_digest(sign_github(secret, body).encode("ascii"), given)
    return ok
