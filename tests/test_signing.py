"""Signing and verification: the Standard Webhooks test vector, rotation, GitHub's scheme.

Expected values come from an independent implementation written out here with
hashlib/hmac/base64, not from the module under test.
"""

from __future__ import annotations

import base64
import hashlib
import hmac

import pytest

from edgehook.signing import (
    SigningError,
    secret_key,
    sign_github,
    sign_standard,
    standard_headers,
    verify_github,
    verify_standard,
)

# The published vector (standard-webhooks repo, libraries/*/tests: test_sign_function).
VEC_SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
VEC_ID = "msg_p5jXN8AQM9LWM0D4loKWxJek"
VEC_TS = 1614265330
VEC_BODY = b'{"test": 2432232314}'
VEC_SIG = "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="


def independent_standard(secret: str, msg_id: str, ts: int, body: bytes) -> str:
    key = (base64.b64decode(secret.removeprefix("whsec_")) if secret.startswith("whsec_")
           else secret.encode())
    mac = hmac.new(key, f"{msg_id}.{ts}.".encode() + body, hashlib.sha256).digest()
    return "v1," + base64.b64encode(mac).decode()


def test_standard_webhooks_published_test_vector() -> None:
    assert sign_standard(VEC_SECRET, VEC_ID, VEC_TS, VEC_BODY) == VEC_SIG
    assert verify_standard([VEC_SECRET], VEC_ID, str(VEC_TS), VEC_SIG, VEC_BODY, now=VEC_TS)


def test_independent_implementation_agrees() -> None:
    random_whsec = "whsec_" + base64.b64encode(b"k" * 32).decode()
    for secret in (VEC_SECRET, "plain text secret", random_whsec):
        body = b'{"a": "\xc3\xa9"}'
        assert sign_standard(secret, "msg_1", 1700000000, body) == \
            independent_standard(secret, "msg_1", 1700000000, body)


def test_plain_secret_is_utf8_bytes() -> None:
    assert secret_key("s3cret") == b"s3cret"
    assert secret_key(VEC_SECRET) == base64.b64decode("MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw")


def test_bad_whsec_secret_is_refused_without_echoing_it() -> None:
    with pytest.raises(SigningError) as info:
        secret_key("whsec_!!!not-base64!!!")
    assert "not-base64" not in str(info.value)


def test_rotation_sends_one_signature_per_secret() -> None:
    old, new = "whsec_" + base64.b64encode(b"o" * 24).decode(), VEC_SECRET
    h = standard_headers([new, old], VEC_ID, VEC_TS, VEC_BODY)
    assert h["webhook-id"] == VEC_ID
    assert h["webhook-timestamp"] == str(VEC_TS)
    sigs = h["webhook-signature"].split(" ")
    assert sigs == [independent_standard(new, VEC_ID, VEC_TS, VEC_BODY),
                    independent_standard(old, VEC_ID, VEC_TS, VEC_BODY)]
    # A receiver that knows only one of the two secrets accepts the delivery.
    for secret in (old, new):
        assert verify_standard([secret], VEC_ID, h["webhook-timestamp"], h["webhook-signature"],
                               VEC_BODY, now=VEC_TS)


@pytest.mark.parametrize("change", ["body", "id", "timestamp", "secret", "version", "garbage"])
def test_verify_standard_rejects(change: str) -> None:
    args = {"secrets": [VEC_SECRET], "msg_id": VEC_ID, "timestamp_str": str(VEC_TS),
            "signature_header": VEC_SIG, "body": VEC_BODY, "now": VEC_TS}
    if change == "body":
        args["body"] = VEC_BODY + b" "
    elif change == "id":
        args["msg_id"] = VEC_ID + "x"
    elif change == "timestamp":
        args["timestamp_str"] = str(VEC_TS + 1)
    elif change == "secret":
        args["secrets"] = ["whsec_" + base64.b64encode(b"x" * 24).decode()]
    elif change == "version":
        args["signature_header"] = VEC_SIG.replace("v1,", "v2,")
    else:
        args["signature_header"] = "v1,@@@ v1, nonsense"
    assert verify_standard(**args) is False


def test_verify_standard_tolerance_and_missing_parts() -> None:
    sig = sign_standard(VEC_SECRET, VEC_ID, VEC_TS, VEC_BODY)
    ok = {"msg_id": VEC_ID, "timestamp_str": str(VEC_TS), "signature_header": sig,
          "body": VEC_BODY}
    assert verify_standard([VEC_SECRET], **ok, now=VEC_TS + 300)
    assert not verify_standard([VEC_SECRET], **ok, now=VEC_TS + 301)
    assert not verify_standard([VEC_SECRET], **ok, now=VEC_TS - 301)
    assert verify_standard([VEC_SECRET], **ok, now=VEC_TS + 50, tolerance=60)
    assert not verify_standard([], **ok, now=VEC_TS)
    for missing in ("msg_id", "timestamp_str", "signature_header"):
        assert not verify_standard([VEC_SECRET], **{**ok, missing: None}, now=VEC_TS)
    assert not verify_standard([VEC_SECRET], **{**ok, "timestamp_str": "16e8"}, now=VEC_TS)
    # Several signatures, one of them good (the spec's multi-signature case).
    header = f"v1,Ceo5qEr07ixe2NLpvHk3FH9bwy/WavXrAFQ/9tdO6mc= {sig} v2,abc"
    assert verify_standard([VEC_SECRET], **{**ok, "signature_header": header}, now=VEC_TS)


def test_github_scheme() -> None:
    body = b'{"zen": "Keep it logically awesome."}'
    expected = "sha256=" + hmac.new(b"It's a Secret to Everybody", body, hashlib.sha256).hexdigest()
    assert sign_github("It's a Secret to Everybody", body) == expected
    assert verify_github(["old", "It's a Secret to Everybody"], expected, body)
    assert not verify_github(["old"], expected, body)
    assert not verify_github(["It's a Secret to Everybody"], expected, body + b"!")
    assert not verify_github(["It's a Secret to Everybody"], None, body)
    assert not verify_github(["It's a Secret to Everybody"], "sha1=" + expected[7:], body)


def test_github_known_value() -> None:
    # GitHub's documented example: secret "It's a Secret to Everybody", payload "Hello, World!"
    assert sign_github("It's a Secret to Everybody", b"Hello, World!") == (
        "sha256=757107ea0eb2509fc211221cce984b8a37570b6d7586c22c46f4379c8b043e17")
