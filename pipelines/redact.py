"""Credentials out of values that get logged, stored as MLflow params or printed: a leaf module (standard
library only), so the tracking client, its spool and the CLI can all import it at module level."""

from __future__ import annotations

import re

REDACTED = "***"
# inside a value: a URL's user info (user:password@, or a token as the user) and signed or keyed query parameters
_USERINFO = re.compile(r"(?<=://)[^/?#\s]*@")
_SIGNED = re.compile(r"(?<=[?&;#])([\w.-]*(?:signature|sig|credential|token|key|secret|password|passwd|auth)=)"
                     r"[^&#;\s\"]+", re.I)


def scrub(text: str) -> str:
    """A value with the credentials a URL can carry replaced by ***: its user info (`user:password@`, or a
    token as the user, as in `git+https://TOKEN@host/...`) and query or fragment parameters whose key ends
    in signature, sig, credential, token, key, secret, password or auth (S3 and GCS presigned URLs, Azure
    SAS `sig=`, `?token=`, `#access_token=`)."""
    return _SIGNED.sub(rf"\1{REDACTED}", _USERINFO.sub(f"{REDACTED}@", text))
