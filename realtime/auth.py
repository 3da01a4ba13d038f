"""JWT -> Claims, and the permission checks every message goes through.

PROTOCOL §2. No aiohttp imports: transports call `Authenticator.decode` and
map AuthError to their own status (WebSocket close 4001/4003, HTTP 401/403).
"""
from __future__ import annotations

import math
import secrets
import time
from collections import OrderedDict
from dataclasses import dataclass

import jwt

VIEW_ALL = "view_all_vehicles"
CONTACTS = "view_driver_contacts"
INGEST = "ingest"

CLOSE_UNAUTHORIZED = 4001
CLOSE_FORBIDDEN = 4003


class AuthError(Exception):
    """`forbidden` False: bad or expired token (401/4001); True: 403/4003.
    `expired` tells an expired token from a bad one, and `user` is the
    token's `sub` when its signature was good (security events)."""

    def __init__(self, message: str, forbidden: bool = False, expired: bool = False,
                 user: str | None = None, kind: str | None = None):
        super().__init__(message)
        self.forbidden = forbidden
        self.expired = expired
        self.user = user
        self._kind = kind

    @property
    def close_code(self) -> int:
        return CLOSE_FORBIDDEN if self.forbidden else CLOSE_UNAUTHORIZED

    @property
    def http_status(self) -> int:
        return 403 if self.forbidden else 401

    @property
    def kind(self) -> str:
        """The security event it makes (realtime/security.py)."""
        if self._kind:
            return self._kind
        if self.forbidden:
            return "forbidden"
        return "expired_token" if self.expired else "bad_token"


_SHARED: dict = {}


def _shared(value):
    """One object for every token with the same rights: thousands of
    connections carry a handful of distinct permission sets (~200 B each)."""
    if len(_SHARED) > 10000:   # bounded: past that, no sharing
        return value
    return _SHARED.setdefault(value, value)


def _names(value) -> tuple[str, ...]:
    """A claim that lists names: a JSON list, or a comma-separated string."""
    if value is None:
        return ()
    if isinstance(value, str):
        return tuple(v for v in (s.strip() for s in value.split(",")) if v)
    if isinstance(value, (list, tuple)):
        return tuple(str(v) for v in value)
    raise AuthError("claims vehicles/groups/permissions must be lists")


@dataclass(frozen=True, slots=True)
class Claims:
    sub: str
    name: str
    role: str
    permissions: frozenset
    vehicles: tuple
    groups: tuple
    exp: float

    @property
    def view_all(self) -> bool:
        return VIEW_ALL in self.permissions

    @property
    def contacts(self) -> bool:
        return CONTACTS in self.permissions

    def may_view_anything(self) -> bool:
        return self.view_all or bool(self.vehicles) or bool(self.groups)

    def takes_away(self, new: "Claims") -> bool:
        """Whether `new` hides something these rights show: a vehicle, a
        group, every vehicle, or the driver contacts."""
        if self.contacts and not new.contacts:
            return True
        if new.view_all:
            return False
        return self.view_all or not (set(self.vehicles) <= set(new.vehicles) and set(self.groups) <= set(new.groups))

    def may_enter(self, acl: dict | None) -> bool:
        """A connection or request is let in (else 4003/403): the token names
        vehicles, or its user's live ACL grants some (§2: ACLs apply to every
        way in). One whose ACL takes everything away is let in and sees
        nothing, as an open connection does when that ACL reaches it."""
        return self.may_view_anything() or self.with_acl(acl).may_view_anything()

    def with_acl(self, acl: dict | None) -> "Claims":
        """Live rights from Redis `acl:user:{id}` override the token's."""
        if not acl:
            return self
        return Claims(
            self.sub, self.name, self.role,
            frozenset(acl["permissions"]) if "permissions" in acl else self.permissions,
            tuple(acl["vehicles"]) if "vehicles" in acl else self.vehicles,
            tuple(acl["groups"]) if "groups" in acl else self.groups,
            self.exp,
        )


class Authenticator:
    def __init__(self, secret: str | None = None, public_key: str | None = None,
                 algorithms: str = "HS256", issuer: str | None = None,
                 audience: str | None = None, leeway_s: float = 0.0, jwks: str | None = None):
        self._configured = [a.strip() for a in algorithms.split(",") if a.strip()]
        self.secret = secret
        self._use(public_key, jwks)
        self.issuer = issuer
        self.audience = audience
        self.leeway = leeway_s
        self._verified: OrderedDict[str, Claims] = OrderedDict()   # see decode

    def _use(self, public_key: str | None, jwks: str | None) -> None:
        """Builds the checking keys, then swaps them in at once (a reload
        that raises leaves the old ones)."""
        algorithms = self._configured
        if (public_key or jwks) and algorithms == ["HS256"]:
            algorithms = ["RS256", "ES256"]
        # a JWKS document: the token's `kid` picks the key
        key_set = jwt.PyJWKSet.from_json(jwks) if jwks else None
        key = public_key if public_key else self.secret
        if public_key:
            # refused here, not per token: a reload must not swap in a key
            # that checks nothing (config.check_files does the same at start)
            from cryptography.hazmat.primitives.serialization import load_pem_public_key
            load_pem_public_key(public_key.encode())
        self.key, self.jwks, self.algorithms = key, key_set, algorithms
        self._jwks_text = jwks

    @staticmethod
    def _files(s) -> tuple[str | None, str | None]:
        public_key = jwks = None
        if s.jwt_public_key:
            with open(s.jwt_public_key) as f:
                public_key = f.read()
        if s.jwt_jwks:
            with open(s.jwt_jwks) as f:
                jwks = f.read()
        return public_key, jwks

    @classmethod
    def from_settings(cls, s) -> "Authenticator":
        public_key, jwks = cls._files(s)
        return cls(s.jwt_secret, public_key, s.jwt_algorithms, s.jwt_issuer,
                   s.jwt_audience, s.jwt_leeway_s, jwks)

    def reload_keys(self, s) -> bool:
        """--jwt-public-key / --jwt-jwks read again (SIGHUP, or the file
        changed). True when the keys changed: then tokens verified with the
        old ones are verified again, so a key taken out of the JWKS stops
        working at once for new connections and HTTP requests."""
        before = (self.key, self._jwks_text)
        public_key, jwks = self._files(s)
        if (public_key if public_key else self.secret, jwks) == before:
            return False
        self._use(public_key, jwks)
        self._verified.clear()
        return True

    def key_count(self) -> int:
        return len(self.jwks.keys) if self.jwks is not None else int(self.key is not None)

    def _key_for(self, token: str):
        if self.jwks is None:
            return self.key
        try:
            kid = jwt.get_unverified_header(token).get("kid")
        except jwt.InvalidTokenError as e:
            raise AuthError(f"invalid token: {e}") from None
        for k in self.jwks.keys:
            if kid is None or k.key_id == kid:
                return k.key
        raise AuthError("no key in the JWKS for this token's kid")

    # Tokens verified lately -> their claims. The HTTP transports send the
    # token with every request: verifying it each time was a third of a long
    # poll's server time (py-spy, benchmarks/bench_transports.py). A token is
    # the same bytes until it expires, so its verified claims are too; only
    # `exp` is checked again. Bounded (least recently used go first); a key
    # reload must clear it.
    CACHE_SIZE = 4096

    def decode(self, token: str | None) -> Claims:
        if not token:
            raise AuthError("missing token")
        cache = self._verified
        claims = cache.get(token)
        if claims is not None:
            if claims.exp <= time.time() - self.leeway:
                del cache[token]
                raise AuthError("token expired", expired=True, user=claims.sub)
            cache.move_to_end(token)
            return claims
        claims = self._verify(token)
        cache[token] = claims
        if len(cache) > self.CACHE_SIZE:
            cache.popitem(last=False)
        return claims

    def _verify(self, token: str) -> Claims:
        key = self._key_for(token)
        if key is None:
            raise AuthError("server has no key to check tokens")
        try:
            # `exp` is checked below, after the signature: an expired token's
            # user is then known (for its security event) at one signature check
            payload = jwt.decode(
                token, key, algorithms=self.algorithms, issuer=self.issuer,
                audience=self.audience, leeway=self.leeway,
                options={"require": ["exp", "sub"], "verify_aud": self.audience is not None,
                         "verify_exp": False},
            )
        except jwt.PyJWTError as e:  # InvalidKeyError too: a token made for another key type
            raise AuthError(f"invalid token: {e}") from None
        # as PyJWT checks it: whole seconds, expired at exp - leeway <= now
        exp = payload["exp"]
        if isinstance(exp, bool) or not isinstance(exp, (int, float)) or \
                (isinstance(exp, float) and not math.isfinite(exp)):
            raise AuthError("invalid token: exp must be a number of seconds")
        exp = min(int(exp), 1 << 53)   # far future stays far future, and a float
        if exp <= time.time() - self.leeway:
            raise AuthError("token expired", expired=True, user=str(payload["sub"]))
        return Claims(
            sub=str(payload["sub"]),
            name=str(payload.get("name", payload["sub"])),
            role=str(payload.get("role", "")),
            permissions=_shared(frozenset(_names(payload.get("permissions")))),
            vehicles=_shared(_names(payload.get("vehicles"))),
            groups=_shared(_names(payload.get("groups"))),
            exp=float(exp),
        )

    def mint(self, sub: str, role: str = "", permissions=(), groups=(), vehicles=(),
             ttl_s: float = 3600, name: str | None = None) -> str:
        if not self.secret:
            raise ValueError("minting needs --jwt-secret (REALTIME_JWT_SECRET)")
        now = int(time.time())
        payload = {"sub": sub, "name": name or sub, "role": role,
                   "permissions": list(permissions), "iat": now, "exp": now + int(ttl_s)}
        if groups:
            payload["groups"] = list(groups)
        if vehicles:
            payload["vehicles"] = list(vehicles)
        if self.issuer:
            payload["iss"] = self.issuer
        if self.audience:
            payload["aud"] = self.audience
        # signed as the server verifies: the first HMAC algorithm configured
        hmac = [a for a in self._configured if a in ("HS256", "HS384", "HS512")]
        return jwt.encode(payload, self.secret, algorithm=hmac[0] if hmac else "HS256")


def ephemeral_secret() -> str:
    return secrets.token_urlsafe(32)
