"""API keys are random tokens; only their SHA-256 is ever configured or stored."""

from __future__ import annotations

import hashlib
import secrets


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def new_key() -> str:
    return "vqa_" + secrets.token_urlsafe(32)
