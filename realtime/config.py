"""Settings: every option of `realtime serve`, its environment name and default.

PROTOCOL §7: each option is also read from REALTIME_<OPTION> (upper case,
`-` -> `_`); a command-line flag wins over the environment. No I/O here.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
from dataclasses import dataclass, field


@dataclass
class Settings:
    host: str = "127.0.0.1"
    port: int = 8080
    workers: int = 1
    kafka: str | None = None
    topic: str = "vehicle.updates.enriched"
    redis: str | None = None
    postgres: str | None = None
    jwt_secret: str | None = None
    jwt_public_key: str | None = None
    tls_cert: str | None = None
    tls_key: str | None = None
    simulate: int | None = None  # None: 2,000 when neither Kafka nor Redis is given
    tick_ms: int = 50
    grpc_port: int | None = None
    jwt_algorithms: str = "HS256"
    jwt_jwks: str | None = None
    jwt_issuer: str | None = None
    jwt_audience: str | None = None
    jwt_leeway_s: float = 0.0
    allowed_origins: str | None = None
    max_connections_per_ip: int = 1000
    max_connections_per_user: int = 50
    max_subscription_size: int = 10000
    heartbeat_s: float = 30.0
    shutdown_grace: float = 10.0
    dead_letter_topic: str | None = None
    offline_after_s: float = 300.0
    stale_after_s: float = 7200.0
    cluster_below_zoom: float = 11.0
    max_visible: int = 2000
    log_level: str = "info"
    # not in PROTOCOL §7: operational knobs with safe defaults
    kafka_from: str | None = None  # earliest | latest | time; default: latest with --redis, else time
    max_message_bytes: int = 64 * 1024
    max_messages_per_s: int = 100
    auth_timeout_s: float = 10.0
    token_expiry_warning_s: float = 60.0
    write_buffer_close_bytes: int = 16 * 1024 * 1024
    pong_timeout_s: float = 60.0  # no pong (or any frame) for this long: close 1011
    idle_jitter_s: float = 30.0   # a non-moving vehicle's jitter is sent at most this often
    idle_jitter_m: float = 50.0   # position changes under this many metres are jitter
    slow_client_buffer_bytes: int = 256 * 1024  # write buffer above this: conflate
    slow_client_max_events: int = 1000  # events held while conflating; more: close 1013
    ready_max_loop_lag_ms: float = 500.0
    ready_max_cpu: float = 0.95         # share of one core over 10 s
    ready_max_memory: float = 0.9       # share of the memory limit (cgroup, else RAM)
    ws_deflate: str = "on"       # on: accept a permessage-deflate offer; off: never
    deflate_min_bytes: int = 512  # smaller messages go out uncompressed
    demo_token: bool = field(default=False, metadata={"cli": False})

    @property
    def simulate_count(self) -> int:
        if self.simulate is not None:
            return self.simulate
        return 2000 if not self.kafka and not self.redis else 0

    def validate(self) -> None:
        if self.workers > 1 and not self.redis:
            raise ValueError("--workers > 1 needs --redis: workers share sessions and state through Redis")
        if self.tick_ms <= 0:
            raise ValueError("--tick-ms must be positive")
        if self.ws_deflate not in ("on", "off"):
            raise ValueError("--ws-deflate is on or off")
        if self.kafka_from not in (None, "earliest", "latest", "time"):
            raise ValueError("--kafka-from is earliest, latest or time")
        if bool(self.tls_cert) != bool(self.tls_key):
            raise ValueError("--tls-cert and --tls-key go together")
        if self.jwt_secret is None and self.jwt_public_key is None and self.jwt_jwks is None:
            # development mode: an ephemeral secret; the map page gets a viewer token
            self.demo_token = True


def _opt_name(f: dataclasses.Field) -> str:
    return "--" + f.name.replace("_", "-")


def _env_name(f: dataclasses.Field) -> str:
    return "REALTIME_" + f.name.upper()


def _caster(f: dataclasses.Field):
    t = str(f.type)
    if "int" in t and "str" not in t:
        return int
    if "float" in t:
        return float
    return str


def add_arguments(p: argparse.ArgumentParser) -> None:
    for f in dataclasses.fields(Settings):
        if f.metadata.get("cli") is False:
            continue
        default = f.default if f.default is not dataclasses.MISSING else None
        p.add_argument(_opt_name(f), dest=f.name, type=_caster(f), default=None,
                       help=f"env {_env_name(f)} (default: {default})")


def from_args(ns: argparse.Namespace, env=None) -> Settings:
    env = os.environ if env is None else env
    values = {}
    for f in dataclasses.fields(Settings):
        if f.metadata.get("cli") is False:
            continue
        v = getattr(ns, f.name, None)
        if v is None and _env_name(f) in env:
            v = _caster(f)(env[_env_name(f)])
        if v is not None:
            values[f.name] = v
    s = Settings(**values)
    s.validate()
    return s
