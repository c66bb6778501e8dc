"""API keys: each names a tenant; only their SHA-256 is configured, compared in constant time.

With no keys configured, authentication is off and every caller is the tenant ``public``
(the single-machine setup).
"""

from __future__ import annotations

import hmac
from dataclasses import dataclass

from flask import g, request

from common.api_keys import hash_key
from common.errors import Unauthorized
from common.jobs import DEFAULT_TENANT


@dataclass(frozen=True)
class Tenant:
    name: str
    key_sha256: str = ""
    s3_prefixes: tuple[str, ...] = ()

    def may_read_s3(self, url: str) -> bool:
        return any(url.startswith(prefix) for prefix in self.s3_prefixes)


PUBLIC = Tenant(DEFAULT_TENANT)


def parse_api_keys(spec: str) -> list[Tenant]:
    tenants = []
    for entry in filter(None, (e.strip() for e in spec.split(","))):
        name, digest, *rest = entry.split(":", 2)
        prefixes = tuple(p for p in rest[0].split("|") if p) if rest else ()
        tenants.append(Tenant(name, digest.lower(), prefixes))
    return tenants


class Authenticator:
    def __init__(self, tenants: list[Tenant]) -> None:
        self._tenants = tenants

    @property
    def enabled(self) -> bool:
        return bool(self._tenants)

    def tenant_for(self, authorization: str | None) -> Tenant:
        if not self.enabled:
            return PUBLIC
        scheme, _, key = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not key.strip():
            raise Unauthorized("send an API key as 'Authorization: Bearer <key>'")
        digest = hash_key(key.strip())
        found = None
        for tenant in self._tenants:
            # Every entry is compared, so the time taken says nothing about which one matched.
            if hmac.compare_digest(digest, tenant.key_sha256):
                found = tenant
        if found is None:
            raise Unauthorized("unknown API key")
        return found

    def authenticate_request(self) -> None:
        """A ``before_request`` hook: the v1 routes need a tenant; probes and docs do not."""
        if request.path.startswith("/v1/"):
            g.tenant = self.tenant_for(request.headers.get("Authorization"))


def current_tenant() -> Tenant:
    return getattr(g, "tenant", PUBLIC)
