"""DICOM UIDs as the labelling output carries them: validated, and optionally pseudonymised.

A UID column must never carry anything but a UID: a tag holding a sequence, bytes or free text
(a patient's name, in an archive that has seen bad exporters) gives None, not its ``str()``.
"""

from __future__ import annotations

import hashlib
import hmac
import re

# PS3.5 9.1: components of digits without leading zeros, separated by dots, at most 64 chars.
_UID = re.compile(r"(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*")
MAX_UID_LENGTH = 64


def valid_uid(value: object) -> str | None:
    """``value`` if it is a string in the DICOM UID grammar, else None."""
    if not isinstance(value, str) or len(value) > MAX_UID_LENGTH or not _UID.fullmatch(value):
        return None
    return str(value)  # a plain str, not pydicom's UID subclass


def pseudonymize_uid(uid: str, key: str) -> str:
    """A keyed hash of ``uid`` that is itself a valid UID, stable for one key.

    PS3.15's basic profile replaces UIDs; the ``2.25.`` root takes a 128-bit integer (the form
    of UUID-derived UIDs), here the first 16 bytes of HMAC-SHA256(key, uid). Without the key the
    original cannot be recovered or recomputed; with it, the same study maps to the same UID
    across runs, so outputs stay joinable within a deployment.
    """
    digest = hmac.new(key.encode(), uid.encode(), hashlib.sha256).digest()
    return "2.25." + str(int.from_bytes(digest[:16], "big"))


def output_uid(value: object, key: str | None) -> str | None:
    """The value a UID column holds: None unless ``value`` is a UID; pseudonymised if ``key``."""
    uid = valid_uid(value)
    if uid is None or key is None:
        return uid
    return pseudonymize_uid(uid, key)
