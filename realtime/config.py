"""Settings: every option of `realtime serve`, its help, environment name,
default and allowed range, and the checks between options. No I/O here beyond
checking that the files named exist.

PROTOCOL §7: each option is also read from REALTIME_<OPTION> (upper case,
`-` -> `_`); a command-line flag wins over the environment. Every value is
parsed and range-checked here, at start, so that a bad one is refused with a
message naming the flag or variable it came from, the value and what is
allowed, instead of failing later inside a worker.
"""
from __future__ import annotations

import argparse
import dataclasses
import ipaddress
import os
import re
from urllib.parse import urlsplit
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

# --help shows the options in these groups, in this order.
GROUPS = {
    "network": "where and how clients connect",
    "auth": "tokens (PROTOCOL §2); with no key of any kind the server runs in development mode",
    "inputs": "where vehicle updates and shared state come from (PROTOCOL §1)",
    "limits": "what one client, connection or message may cost (PROTOCOL §3.3)",
    "liveness": "heartbeats and vehicles that fall silent (PROTOCOL §3.3)",
    "clusters": "the aggregated map view (PROTOCOL §3.1 `clusters`)",
    "operations": "logs, records, health and shutdown (PROTOCOL §5, §6)",
}

JWT_ALGORITHMS = ("HS256", "HS384", "HS512", "RS256", "RS384", "RS512",
                  "ES256", "ES384", "ES512", "PS256", "PS384", "PS512", "EdDSA")
LOG_LEVELS = ("debug", "info", "warning", "error", "critical")
_TOPIC = re.compile(r"[A-Za-z0-9._-]{1,249}")
_HOSTPORT = re.compile(r"(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9._-]+):(\d{1,5})")
_ORIGIN = re.compile(r"[a-z][a-z0-9+.-]*://[^/\s,]+")


class ConfigError(ValueError):
    """A value or a combination of values that `realtime serve` refuses."""


@dataclass(frozen=True)
class Spec:
    """How one option is offered and checked."""
    group: str
    help: str
    kind: type = str
    lo: float | None = None
    hi: float | None = None
    choices: tuple | None = None
    check: Callable[[Any], str | None] | None = None   # returns what is wrong, or None
    unit: str = ""
    default_text: str | None = None  # when the default is None and means something
    metavar: str | None = None
    lo_open: bool = False   # lo itself is not allowed: "above lo"
    strip: bool = True      # surrounding blanks are dropped (never from a secret)
    secret: bool = False    # a key: an empty REALTIME_* variable is refused, not "unset"


def opt(default, group: str, help: str, **kw):
    return field(default=default, metadata={"spec": Spec(group, help, **kw)})


# ---------------------------------------------------------------- value checks
def _kafka_servers(v: str) -> str | None:
    for part in v.split(","):
        m = _HOSTPORT.fullmatch(part.strip())
        if not m or not 1 <= int(m.group(2)) <= 65535:
            return "must be host:port[,host:port...]"
    return None


def _networks(v: str) -> str | None:
    from .address import parse_networks
    try:
        if not parse_networks(v):
            return "must name at least one address or CIDR"
    except ValueError:
        return "must be addresses or CIDRs, comma-separated (10.0.0.0/8,192.168.1.5)"
    return None


def _tile_url(v: str) -> str | None:
    if v != "none" and not (v.startswith(("https://", "http://", "/")) and not v.startswith("//")
                            and "{z}" in v and "{x}" in v and "{y}" in v):
        return "must be `none` or an http(s) or /path URL template with {z}, {x} and {y}"
    return None


def _topic(v: str) -> str | None:
    if not _TOPIC.fullmatch(v) or v in (".", ".."):
        return "must be a Kafka topic name: 1 to 249 of A-Z a-z 0-9 . _ -"
    return None


def _port_of(u) -> str | None:
    try:
        port = u.port
    except ValueError:
        return "has a port that is not from 1 to 65535"
    if port is not None and not 1 <= port <= 65535:
        return "has a port that is not from 1 to 65535"
    return None


def _redis_url(v: str) -> str | None:
    from .stores.redis_conn import cluster_url, is_cluster
    if is_cluster(v):
        try:
            cluster_url(v)
        except ValueError as e:
            return str(e)
        return None
    u = urlsplit(v)
    if u.scheme.lower() == "unix":
        return None if u.path else "must name the socket: unix:///path/to/redis.sock"
    if u.scheme.lower() not in ("redis", "rediss") or not u.hostname:
        return ("must be a redis://host[:port][/db], rediss:// or unix:// URL, "
                "or redis+cluster://host:port[,host:port…] for a Redis Cluster")
    problem = _port_of(u)
    if problem:
        return problem
    db = u.path.strip("/")
    if db and not (db.isascii() and db.isdigit() and int(db) < 100_000):
        return "has a database that is not a number (redis://host:port/0)"
    return None


def _postgres_dsn(v: str) -> str | None:
    u = urlsplit(v)
    if u.scheme.lower() not in ("postgresql", "postgres"):
        return "must be a postgresql:// URL"
    return _port_of(u)


def _algorithms(v: str) -> str | None:
    names = [a.strip() for a in v.split(",") if a.strip()]
    bad = [a for a in names if a not in JWT_ALGORITHMS]
    if not names or bad:
        return "must be a comma-separated list of " + ", ".join(JWT_ALGORITHMS)
    return None


def _origins(v: str) -> str | None:
    if v.strip() == "*":
        return None
    for o in v.split(","):
        if not _ORIGIN.fullmatch(o.strip().rstrip("/")):
            return "must be * or a comma-separated list of origins such as https://dispatch.example.com"
    return None


def _host(v: str) -> str | None:
    if v.startswith("[") or v.endswith("]"):
        return "write an IPv6 address without brackets, e.g. ::1"
    if not v or any(c.isspace() for c in v) or "/" in v:
        return "must be an IP address or a host name"
    return None


def _readable_file(v: str) -> str | None:
    if not os.path.isfile(v):
        return "no such file"
    if not os.access(v, os.R_OK):
        return "the file is not readable"
    return None


@dataclass
class Settings:
    # network
    host: str = opt("127.0.0.1", "network", "Address to listen on.", check=_host, metavar="ADDR")
    port: int = opt(8080, "network", "TCP port for HTTP, WebSocket, SSE and long polling.",
                    kind=int, lo=1, hi=65535)
    grpc_port: int | None = opt(None, "network", "TCP port for gRPC streaming (PROTOCOL §4), TLS with --tls-cert.",
                                kind=int, lo=1, hi=65535, default_text="none: no gRPC")
    workers: int = opt(1, "network", "Worker processes sharing the port (SO_REUSEPORT); more than one needs --redis.",
                       kind=int, lo=1, hi=256)
    tls_cert: str | None = opt(None, "network", "PEM certificate chain: serve https and wss, TLS 1.3 only; needs --tls-key.",
                               check=_readable_file, default_text="none: plain http and ws", metavar="FILE")
    tls_key: str | None = opt(None, "network", "PEM private key of --tls-cert.", check=_readable_file, metavar="FILE")
    allowed_origins: str | None = opt(None, "network", "Browser origins allowed to open a WebSocket, comma-separated, or *.",
                                      check=_origins, default_text="any", metavar="ORIGINS")
    trusted_proxies: str | None = opt(None, "network",
                                      "Proxies whose X-Forwarded-For is believed (CIDRs, comma-separated); "
                                      "the client is the right-most address that is not one of them.",
                                      check=_networks, default_text="none: X-Forwarded-For is ignored",
                                      metavar="CIDRS")
    ws_deflate: str = opt("on", "network", "Accept a client's permessage-deflate offer.", choices=("on", "off"))
    deflate_min_bytes: int = opt(512, "network", "Messages smaller than this go out uncompressed.",
                                 kind=int, lo=0, hi=16 * 1024 * 1024, unit="bytes")
    # auth
    jwt_secret: str | None = opt(None, "auth", "Shared secret of HS256 tokens.",
                                 default_text="none: development mode when no other key is given",
                                 strip=False, secret=True, metavar="SECRET")
    jwt_public_key: str | None = opt(None, "auth", "PEM public key file of RS256/ES256 tokens.", check=_readable_file,
                                     secret=True, metavar="FILE")
    jwt_jwks: str | None = opt(None, "auth", "JWKS file: the token's kid picks the key.", check=_readable_file,
                               secret=True, metavar="FILE")
    jwt_algorithms: str = opt("HS256", "auth",
                              "Accepted signature algorithms, comma-separated (RS256,ES256 when the key is public).",
                              check=_algorithms, metavar="ALGS")
    jwt_issuer: str | None = opt(None, "auth", "Required `iss` claim.", default_text="not checked", metavar="ISS")
    jwt_audience: str | None = opt(None, "auth", "Required `aud` claim.", default_text="not checked", metavar="AUD")
    jwt_leeway_s: float = opt(0.0, "auth", "Clock skew allowed when checking exp, nbf and iat.",
                              kind=float, lo=0, hi=600, unit="s")
    auth_timeout_s: float = opt(10.0, "auth", "Time a WebSocket client has to send its auth message.",
                                kind=float, lo=0.1, hi=300, unit="s")
    token_expiry_warning_s: float = opt(60.0, "auth", "Send token_expiring this long before a token's exp.",
                                        kind=float, lo=0, hi=86400, unit="s")
    # inputs
    kafka: str | None = opt(None, "inputs", "Kafka bootstrap servers, host:port[,host:port...].",
                            check=_kafka_servers, default_text="none: no Kafka", metavar="HOST:PORT")
    topic: str = opt("vehicle.updates.enriched", "inputs", "Kafka topic of vehicle updates.", check=_topic, metavar="TOPIC")
    kafka_from: str | None = opt(None, "inputs", "Where a new consumer starts reading.",
                                 choices=("earliest", "latest", "time"),
                                 default_text="with --redis, where the Redis snapshot's writer had read to "
                                 "(latest if it never saved that), else the last stale-after-s of the topic")
    dead_letter_topic: str | None = opt(None, "inputs", "Kafka topic that receives a copy of every rejected record.",
                                        check=_topic, default_text="none", metavar="TOPIC")
    redis: str | None = opt(None, "inputs", "Redis URL for shared state, events and sessions; "
                            "redis+cluster://host:port[,host:port…] (any nodes as seeds) for a Redis Cluster.",
                            check=_redis_url, default_text="none: state kept in this process", metavar="URL")
    redis_pool_size: int = opt(32, "inputs", "Connections to Redis at most per worker (on a cluster: requests in "
                               "flight, each holding at most one connection per node); more requests wait.",
                               kind=int, lo=4, hi=1024)
    redis_pool_timeout_s: float = opt(2.0, "inputs", "Longest wait for a free Redis connection before the request fails.",
                                      kind=float, lo=0.05, hi=60, unit="s")
    reconcile_scan_per_s: int = opt(200, "inputs", "Keys a second the reconcile's safety scan of Redis reads: "
                                    "a whole pass takes fleet/this seconds, at least 5 (more keys a second "
                                    "when the fleet needs it to stay within 600).",
                                    kind=int, lo=10, hi=1_000_000, unit="keys/s")
    simulate: int | None = opt(None, "inputs", "Built-in fleet of N moving vehicles; 0 for none.",
                               kind=int, lo=0, hi=1_000_000,
                               default_text="2000 in development mode, else 0")
    # limits
    tick_ms: int = opt(50, "limits", "At most one batch per connection every this many milliseconds.",
                       kind=int, lo=1, hi=10_000, unit="ms")
    max_connections_per_ip: int = opt(1000, "limits", "Open connections allowed from one client address.",
                                      kind=int, lo=1, hi=10_000_000)
    max_connections_per_user: int = opt(50, "limits", "Open connections allowed for one user.",
                                        kind=int, lo=1, hi=10_000_000)
    max_subscription_size: int = opt(10000, "limits", "Vehicles plus groups allowed in one subscription.",
                                     kind=int, lo=1, hi=10_000_000)
    max_message_bytes: int = opt(64 * 1024, "limits", "Largest inbound message; a larger one closes with 1009.",
                                 kind=int, lo=1024, hi=64 * 1024 * 1024, unit="bytes")
    max_messages_per_s: int = opt(100, "limits", "Inbound messages per second per connection.",
                                  kind=int, lo=1, hi=100_000)
    slow_client_buffer_bytes: int = opt(256 * 1024, "limits",
                                        "Unsent bytes above which a connection gets only the latest state per vehicle.",
                                        kind=int, lo=4096, hi=1 << 30, unit="bytes")
    slow_client_max_events: int = opt(1000, "limits", "Events held for a conflated connection before it is closed with 1013.",
                                      kind=int, lo=1, hi=1_000_000)
    session_buffer_bytes: int = opt(128 << 20, "limits",
                                    "Bytes all long-polling and SSE sessions of a worker keep after their "
                                    "readers had them (each keeps 5 minutes or 10,000 messages while this "
                                    "allows; past it an older cursor gets a reset).",
                                    kind=int, lo=1 << 20, hi=1 << 40, unit="bytes")
    write_buffer_close_bytes: int = opt(16 * 1024 * 1024, "limits",
                                        "Unsent bytes at which a connection is closed with 1013.",
                                        kind=int, lo=8192, hi=1 << 32, unit="bytes")
    # liveness
    heartbeat_s: float = opt(30.0, "liveness", "Ping every connection this often.",
                             kind=float, lo=0.1, hi=3600, unit="s")
    pong_timeout_s: float = opt(60.0, "liveness", "Close with 1011 after this long without any frame from the client.",
                                kind=float, lo=0.5, hi=7200, unit="s")
    session_idle_s: float = opt(120.0, "liveness", "A long-polling or SSE session that nobody reads this long "
                                "is ended and releases everything (PROTOCOL §4: 2 minutes).",
                                kind=float, lo=1, hi=86400, unit="s")
    instance_timeout_s: float = opt(30.0, "liveness", "An instance silent in Redis this long is gone: the others "
                                    "remove its connections from the shared sets.",
                                    kind=float, lo=3, hi=3600, unit="s")
    offline_after_s: float = opt(300.0, "liveness", "A vehicle silent this long turns offline.",
                                 kind=float, lo=0.1, hi=30 * 86400, unit="s")
    stale_after_s: float = opt(7200.0, "liveness", "A vehicle silent this long leaves with r: stale and is forgotten.",
                               kind=float, lo=0.2, hi=30 * 86400, unit="s")
    idle_jitter_s: float = opt(30.0, "liveness", "A non-moving vehicle's small moves are sent at most this often.",
                               kind=float, lo=0, hi=86400, unit="s")
    idle_jitter_m: float = opt(50.0, "liveness", "Moves shorter than this are jitter for a non-moving vehicle.",
                               kind=float, lo=0, hi=100_000, unit="m")
    # clusters
    cluster_below_zoom: float = opt(11.0, "clusters", "Viewports zoomed out below this level get clusters.",
                                    kind=float, lo=0, hi=30)
    max_visible: int = opt(2000, "clusters", "A viewport with more vehicles than this gets clusters.",
                           kind=int, lo=1, hi=10_000_000)
    tile_url: str = opt("https://tile.openstreetmap.org/{z}/{x}/{y}.png", "operations",
                        "Map tiles of the page at / ({z}/{x}/{y} template); `none` for none "
                        "(a plain background with a scale and a graticule).",
                        check=_tile_url, metavar="URL")
    tile_attribution: str = opt("&copy; OpenStreetMap contributors", "operations",
                                "Attribution shown with the tiles (HTML).", metavar="HTML")
    # operations
    postgres: str | None = opt(None, "operations", "PostgreSQL DSN for long-term records (PROTOCOL §6).",
                               check=_postgres_dsn, default_text="none: no records", metavar="DSN")
    log_level: str = opt("info", "operations", "Least severe log level written.", choices=LOG_LEVELS)
    shutdown_grace: float = opt(10.0, "operations", "Time SIGTERM gives clients to drain before the exit.",
                                kind=float, lo=0.1, hi=3600, unit="s")
    ready_max_loop_lag_ms: float = opt(500.0, "operations", "Readiness (/health/ready) fails above this event-loop lag.",
                                       kind=float, lo=1, hi=600_000, unit="ms")
    ready_max_cpu: float = opt(0.95, "operations", "Readiness (/health/ready) fails above this share of a core over 10 s.",
                               kind=float, lo=0, lo_open=True, hi=1)
    ready_max_memory: float = opt(0.9, "operations", "Readiness (/health/ready) fails above this share of the memory limit.",
                                  kind=float, lo=0, lo_open=True, hi=1)

    # not options: set by validate() (no JWT key of any kind, PROTOCOL §7) and
    # by the supervisor for each worker it starts
    development: bool = False
    worker_index: int = 0
    instance_id: str | None = None
    kafka_since_ms: int | None = None   # a restarted owner worker reads Kafka from here (cli.py)
    mirror_dir: str | None = None   # the supervisor's private directory for the owner worker's socket (mirror.py)

    @property
    def simulate_count(self) -> int:
        if self.simulate is not None:
            return self.simulate
        return 2000 if self.development else 0

    def validate(self, names: Mapping[str, str] | None = None) -> None:
        """The checks between options. `names` maps a field to the flag or
        variable its value came from, for the message."""
        n = {f.name: _opt_name(f) for f in dataclasses.fields(self)} | dict(names or {})
        self.development = self.jwt_secret is None and self.jwt_public_key is None and self.jwt_jwks is None
        if self.workers > 1 and not self.redis:
            raise ConfigError(f"{n['workers']} {self.workers} needs --redis: "
                              "workers share sessions and vehicle state through Redis")
        if bool(self.tls_cert) != bool(self.tls_key):
            raise ConfigError("--tls-cert and --tls-key go together: give both or neither")
        if self.offline_after_s >= self.stale_after_s:
            raise ConfigError(f"{n['offline_after_s']} ({self.offline_after_s:g}) must be below "
                              f"{n['stale_after_s']} ({self.stale_after_s:g}): "
                              "a vehicle turns offline before it is forgotten")
        if self.pong_timeout_s <= self.heartbeat_s:
            raise ConfigError(f"{n['pong_timeout_s']} ({self.pong_timeout_s:g}) must be above "
                              f"{n['heartbeat_s']} ({self.heartbeat_s:g}): a client gets a ping before it is timed out")
        if self.slow_client_buffer_bytes >= self.write_buffer_close_bytes:
            raise ConfigError(f"{n['slow_client_buffer_bytes']} ({self.slow_client_buffer_bytes}) must be below "
                              f"{n['write_buffer_close_bytes']} ({self.write_buffer_close_bytes}): "
                              "a slow client is conflated before it is closed")
        if self.deflate_min_bytes > self.write_buffer_close_bytes:
            raise ConfigError(f"{n['deflate_min_bytes']} ({self.deflate_min_bytes}) must not be above "
                              f"{n['write_buffer_close_bytes']} ({self.write_buffer_close_bytes})")
        if self.dead_letter_topic is not None and self.dead_letter_topic == self.topic:
            raise ConfigError(f"{n['dead_letter_topic']} must differ from {n['topic']} ({self.topic}): "
                              "rejected records would be read again")
        if (self.dead_letter_topic or self.kafka_from) and not self.kafka:
            which = n["dead_letter_topic"] if self.dead_letter_topic else n["kafka_from"]
            raise ConfigError(f"{which} needs --kafka")
        algs = {a.strip() for a in self.jwt_algorithms.split(",") if a.strip()}
        hmac = {a for a in algs if a.startswith("HS")}
        public = self.jwt_public_key or self.jwt_jwks
        if self.jwt_public_key and self.jwt_jwks:
            raise ConfigError("--jwt-public-key and --jwt-jwks exclude each other: give one")
        if public and self.jwt_secret:
            raise ConfigError("--jwt-secret excludes --jwt-public-key and --jwt-jwks: "
                              "an HMAC secret and a public key together invite algorithm confusion")
        if public and hmac and algs != {"HS256"}:  # HS256 alone is the default: it means RS256,ES256 here
            raise ConfigError(f"{n['jwt_algorithms']} {self.jwt_algorithms}: {', '.join(sorted(hmac))} "
                              "needs --jwt-secret, not a public key")
        if self.development and "HS256" not in algs:
            raise ConfigError(f"{n['jwt_algorithms']} {self.jwt_algorithms}: development mode signs its "
                              "map token with HS256, so the list must include HS256 (or give a key)")
        if self.jwt_secret is not None:
            if not hmac:
                raise ConfigError(f"{n['jwt_algorithms']} {self.jwt_algorithms}: --jwt-secret signs only "
                                  "HS256, HS384 or HS512 tokens")
        if self.development and not is_loopback(self.host):
            raise ConfigError(
                f"{n['host']} {self.host} is not a loopback address, and no JWT key is configured: "
                "development mode hands every visitor of / a viewer token and signs with a secret "
                "that dies with the process. Give --jwt-secret (or REALTIME_JWT_SECRET), "
                "--jwt-public-key or --jwt-jwks to serve other hosts, or listen on 127.0.0.1")


def check_files(s: Settings) -> None:
    """The key and certificate files parse, so that a bad one is refused at
    start and not found by the first client (or by a worker's bind)."""
    if s.jwt_jwks:
        import jwt
        try:
            with open(s.jwt_jwks) as f:
                jwt.PyJWKSet.from_json(f.read())
        except (OSError, ValueError, jwt.PyJWTError) as e:
            raise ConfigError(f"--jwt-jwks {s.jwt_jwks}: not a usable JWKS document ({e})") from None
    if s.jwt_public_key:
        from cryptography.hazmat.primitives.serialization import load_pem_public_key
        try:
            with open(s.jwt_public_key, "rb") as f:
                load_pem_public_key(f.read())
        except (OSError, ValueError, TypeError) as e:
            raise ConfigError(f"--jwt-public-key {s.jwt_public_key}: not a PEM public key ({e})") from None
    if s.tls_cert:
        import ssl

        from .keys import tls_context   # the context the server will serve with
        try:
            tls_context(s.tls_cert, s.tls_key)
        except (OSError, ssl.SSLError) as e:
            raise ConfigError(f"--tls-cert {s.tls_cert} / --tls-key {s.tls_key}: cannot be loaded ({e})") from None


def is_loopback(host: str) -> bool:
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a host name other than localhost: it may resolve anywhere


# ---------------------------------------------------------------- flags and environment
def _opt_name(f: dataclasses.Field) -> str:
    return "--" + f.name.replace("_", "-")


def _env_name(f: dataclasses.Field) -> str:
    return "REALTIME_" + f.name.upper()


def _options():
    return [f for f in dataclasses.fields(Settings) if "spec" in f.metadata]


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else f"{x:g}"


def _allowed(spec: Spec) -> str:
    if spec.choices:
        return "one of " + ", ".join(spec.choices)
    what = "an integer" if spec.kind is int else "a number"
    unit = f" {spec.unit}" if spec.unit else ""
    if spec.lo is not None and spec.hi is not None:
        if spec.lo_open:
            return f"{what} above {_num(spec.lo)} and at most {_num(spec.hi)}{unit}"
        return f"{what} from {_num(spec.lo)} to {_num(spec.hi)}{unit}"
    if spec.lo is not None:
        return f"{what} of at least {_num(spec.lo)}{unit}"
    return what


def _hide_password(raw: str) -> str:
    """A URL's password never reaches an error message (or the logs that keep it)."""
    return re.sub(r"(://[^:/@,]*:)[^@/]*@", r"\1***@", raw)


def parse_value(f: dataclasses.Field, raw: str, source: str):
    """One option's text -> its value, or ConfigError naming `source`."""
    spec: Spec = f.metadata["spec"]
    safe = _hide_password(raw)
    shown = f"{source}={safe!r}" if source.startswith("REALTIME_") else f"{source} {safe!r}"
    if spec.kind in (int, float):
        try:
            v = spec.kind(raw.strip())
        except ValueError:
            raise ConfigError(f"{shown}: must be {_allowed(spec)}") from None
        if v != v or v in (float("inf"), float("-inf")):
            raise ConfigError(f"{shown}: must be {_allowed(spec)}")
        if (spec.lo is not None and (v < spec.lo or (spec.lo_open and v == spec.lo))) or \
                (spec.hi is not None and v > spec.hi):
            raise ConfigError(f"{shown}: must be {_allowed(spec)}")
        return v
    v = raw.strip() if spec.strip else raw
    if not v.strip():
        raise ConfigError(f"{shown}: must not be empty")
    if spec.choices and v not in spec.choices:
        raise ConfigError(f"{shown}: must be {_allowed(spec)}")
    if spec.check:
        problem = spec.check(v)
        if problem:
            raise ConfigError(f"{shown}: {problem}")
    return v


class HelpFormatter(argparse.HelpFormatter):
    def __init__(self, prog):
        super().__init__(prog, max_help_position=34, width=100)


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Every option as a flag, in its group, with one sentence, its default
    and its environment variable. Values stay text here: from_args parses
    and checks them, the same way for flags and for the environment."""
    groups = {g: p.add_argument_group(g, about) for g, about in GROUPS.items()}
    for f in _options():
        spec: Spec = f.metadata["spec"]
        if spec.default_text is not None:
            default = spec.default_text
        elif f.default is None:
            default = "none"
        else:
            default = f"{f.default:g}" if isinstance(f.default, float) else str(f.default)
            default += f" {spec.unit}" if spec.unit else ""
        meta = spec.metavar or ("{" + ",".join(spec.choices) + "}" if spec.choices else
                                ("N" if spec.kind in (int, float) else "TEXT"))
        groups[spec.group].add_argument(
            _opt_name(f), dest=f.name, default=None, metavar=meta,
            help=f"{spec.help} Default: {default}. Env: {_env_name(f)}.".replace("%", "%%"))


def from_args(ns: argparse.Namespace, env: Mapping[str, str] | None = None) -> Settings:
    """Flags win over REALTIME_* variables, which win over defaults. An empty
    variable counts as unset, except for the JWT keys."""
    env = os.environ if env is None else env
    values, names = {}, {}
    for f in _options():
        raw = getattr(ns, f.name, None)
        source = _opt_name(f)
        spec: Spec = f.metadata["spec"]
        if raw is None and (env.get(_env_name(f), "") != "" or (spec.secret and _env_name(f) in env)):
            # an empty variable is unset, except for a key: an empty one would
            # quietly mean development mode
            raw, source = env[_env_name(f)], _env_name(f)
        if raw is None:
            continue
        values[f.name] = parse_value(f, raw, source)
        names[f.name] = source
    s = Settings(**values)
    s.validate(names)
    return s


def help_epilog() -> str:
    return ("Development mode: with no --jwt-secret, --jwt-public-key or --jwt-jwks the server makes an "
            "ephemeral secret, simulates 2000 vehicles unless --simulate says otherwise, embeds a "
            "viewer token in the map at /, and listens on loopback addresses only.")
