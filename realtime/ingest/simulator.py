"""The built-in fleet: N vehicles driving plausible routes around Moscow.

Vehicles drive between waypoints on a few radial and ring roads (the MKAD and
the Garden Ring approximated as circles, plus radial avenues), stop at
waypoints for a while, sometimes idle with the engine on, rarely go offline,
and raise an overspeed alert above their type's limit. Movement is vectorised
with numpy; each step builds one columnar UpdateBatch for the vehicles due to
report (every vehicle reports about once per `report_s`).
"""
from __future__ import annotations

import asyncio
import math
import time

import numpy as np

from .._core._schema import KEEP, STATUS_CODE, UpdateBatch
from .decode import validate

CENTER = (55.7558, 37.6173)
KM_PER_DEG_LAT = 111.32
TYPES = ("truck", "van", "car", "bus")
STATIC_EVERY_S = 30.0
TYPE_LIMIT_KMH = {"truck": 70, "van": 90, "car": 110, "bus": 60}
GROUPS = ("north_fleet", "south_fleet", "east_fleet", "west_fleet")
SURNAMES = ("Иванов", "Петров", "Сидоров", "Смирнов", "Кузнецов", "Попов", "Волков", "Соколов")
INITIALS = ("А.А.", "И.И.", "С.В.", "Д.М.", "П.Н.", "О.К.")
CLIENTS = ("ООО Ромашка", "АО Север", "ИП Орлов", "ООО Вектор", "ГК Логистик")


def _km_to_deg(lat_deg):
    return 1.0 / KM_PER_DEG_LAT, 1.0 / (KM_PER_DEG_LAT * math.cos(math.radians(lat_deg)))


class Fleet:
    def __init__(self, n: int, seed: int = 1, report_s: float = 1.0, prefix: str = "veh"):
        self.n = n
        self.rng = np.random.default_rng(seed)
        self.report_s = report_s
        r = self.rng
        self.ids = [f"{prefix}_{i:05d}" for i in range(n)]
        self.vtype = r.choice(len(TYPES), n, p=[0.35, 0.35, 0.2, 0.1])
        self.limit = np.array([TYPE_LIMIT_KMH[TYPES[t]] for t in self.vtype], float)
        self.cruise = self.limit * r.uniform(0.6, 0.98, n)
        self.lat = np.empty(n)
        self.lon = np.empty(n)
        for i in range(n):
            self.lat[i], self.lon[i] = self._waypoint()
        self.target = np.array([self._waypoint() for _ in range(n)])
        self.speed = np.zeros(n)
        self.course = np.zeros(n)
        # seconds left in a stop (stopped) or idle (engine on) spell
        self.pause = r.uniform(0, 20, n) * (r.random(n) < 0.2)
        self.idle = np.zeros(n, bool)
        self.offline = np.zeros(n, bool)
        self.alerting = np.zeros(n, bool)
        self.next_report = r.uniform(0, report_s, n)
        self.clock = 0.0
        self.drivers = [{"name": f"{r.choice(SURNAMES)} {r.choice(INITIALS)}",
                         "phone": f"+7916{r.integers(1000000, 9999999)}"} for _ in range(n)]
        self.assignments = [{"client": str(r.choice(CLIENTS)),
                             "eta": f"{r.integers(8, 20):02d}:{r.integers(0, 60):02d}"} for _ in range(n)]
        # tuples, as the core stores them: a list is never equal to what is
        # stored, and each resend would set the groups again
        self.groups = [tuple(self._group_of(self.lat[i], self.lon[i])) for i in range(n)]
        self.sent_static = np.zeros(n, bool)
        # driver, assignment and groups go with the first report, and again
        # every STATIC_EVERY_S (spread): a worker or instance that missed the
        # first (it started later, its Pub/Sub link was down) has them within that
        self.static_due = r.uniform(0, STATIC_EVERY_S, n)

    def _waypoint(self):
        r = self.rng
        kind = r.random()
        if kind < 0.45:  # on a ring road: MKAD (~17.5 km) or Garden Ring (~2.3 km) or TTK (~6 km)
            radius = r.choice([17.5, 6.0, 2.3], p=[0.5, 0.3, 0.2]) + r.normal(0, 0.15)
            ang = r.uniform(0, 2 * math.pi)
        else:  # along one of 12 radial avenues
            radius = r.uniform(0.5, 24)
            ang = r.integers(0, 12) * math.pi / 6 + r.normal(0, 0.03)
        dlat, dlon = _km_to_deg(CENTER[0])
        return CENTER[0] + radius * math.sin(ang) * dlat, CENTER[1] + radius * math.cos(ang) * dlon

    @staticmethod
    def _group_of(lat, lon):
        dy, dx = lat - CENTER[0], (lon - CENTER[1]) * 0.56
        if abs(dy) > abs(dx):
            return [GROUPS[0] if dy > 0 else GROUPS[1]]
        return [GROUPS[2] if dx > 0 else GROUPS[3]]

    def step(self, dt: float, now_ms: int) -> UpdateBatch | None:
        """Advance dt seconds; return the batch of vehicles due to report."""
        r = self.rng
        n = self.n
        self.clock += dt
        moving = (self.pause <= 0) & ~self.offline
        # drive towards the target
        dlat_km = (self.target[:, 0] - self.lat) * KM_PER_DEG_LAT
        dlon_km = (self.target[:, 1] - self.lon) * KM_PER_DEG_LAT * np.cos(np.radians(self.lat))
        dist = np.hypot(dlat_km, dlon_km)
        want = np.clip(self.cruise + r.normal(0, 4, n), 5, None)
        self.speed = np.where(moving, np.clip(0.8 * self.speed + 0.2 * want, 0, 160), 0.0)
        step_km = self.speed * dt / 3600.0
        frac = np.where(dist > 1e-9, np.minimum(1.0, step_km / np.maximum(dist, 1e-9)), 1.0)
        self.lat = np.where(moving, self.lat + frac * (self.target[:, 0] - self.lat), self.lat)
        self.lon = np.where(moving, self.lon + frac * (self.target[:, 1] - self.lon), self.lon)
        heading = (np.degrees(np.arctan2(dlon_km, dlat_km)) + 360.0) % 360.0
        self.course = np.where(moving & (dist > 0.01), np.round(heading), self.course)
        # arrivals: stop (or idle) for a while, then pick a new target
        arrived = moving & (dist <= step_km + 0.02)
        for i in np.flatnonzero(arrived):
            self.target[i] = self._waypoint()
            self.pause[i] = r.uniform(5, 60) if r.random() < 0.5 else 0.0
            self.idle[i] = r.random() < 0.4
        self.pause = np.maximum(0.0, self.pause - dt)
        # an idle vehicle's GPS jitters a little
        jitter = (self.pause > 0) & self.idle & ~self.offline
        self.lat = np.where(jitter, self.lat + r.normal(0, 2e-6, n), self.lat)
        self.lon = np.where(jitter, self.lon + r.normal(0, 2e-6, n), self.lon)
        # rarely a tracker drops off, and comes back later; not before its
        # first report, so that the whole fleet is known at start (a map or
        # a test counting it found one short now and then)
        flip = (r.random(n) < dt / 3000.0) & self.sent_static
        self.offline = np.where(flip, ~self.offline, self.offline)
        due = self.next_report <= self.clock
        if not due.any():
            return None
        self.next_report[due] += self.report_s
        idx = np.flatnonzero(due & ~self.offline)
        if len(idx) == 0:
            return None
        status = np.where(self.pause[idx] > 0,
                          np.where(self.idle[idx], STATUS_CODE["idle"], STATUS_CODE["stopped"]),
                          STATUS_CODE["moving"]).astype(np.uint8)
        over = self.speed[idx] > self.limit[idx] * 1.02
        again = self.static_due[idx] <= self.clock
        self.static_due[idx[again]] = self.clock + STATIC_EVERY_S   # once, after a long silence too
        alerts = [None] * len(idx)
        for j, i in enumerate(idx):
            # not again with the others: to a worker that missed them they
            # would be new, and it would log an alert event late; alert
            # state heals at the next change (overspeed comes and goes)
            if over[j] != self.alerting[i] or not self.sent_static[i]:
                self.alerting[i] = over[j]
                alerts[j] = (f"overspeed:{self.speed[i]:.0f}/{self.limit[i]:.0f} км/ч",) if over[j] else ()
        first = ~self.sent_static[idx] | again
        self.sent_static[idx] = True
        return UpdateBatch(
            ids=[self.ids[i] for i in idx],
            lat=self.lat[idx], lon=self.lon[idx],
            speed=np.round(self.speed[idx], 1), course=self.course[idx],
            status=status,
            vtype=[KEEP] * len(idx),
            ts=np.full(len(idx), now_ms, np.int64),
            alerts=alerts,
            driver=[self.drivers[i] if f else None for i, f in zip(idx, first)],
            assignment=[self.assignments[i] if f else None for i, f in zip(idx, first)],
            groups=[self.groups[i] if f else None for i, f in zip(idx, first)],
        ), [TYPES[t] for t in self.vtype[idx]], first

    def as_updates(self, batch_and_types) -> list[dict]:
        """The same batch as §1.1 JSON objects, for `realtime simulate --url`."""
        b, types, _ = batch_and_types
        out = []
        st = {v: k for k, v in STATUS_CODE.items()}
        for j in range(len(b)):
            u = {"vehicle_id": b.ids[j], "timestamp": int(b.ts[j]),
                 "position": {"lat": float(b.lat[j]), "lon": float(b.lon[j])},
                 "speed": float(b.speed[j]), "course": float(b.course[j]),
                 "status": st[int(b.status[j])], "vehicle_type": types[j]}
            for k, col in (("alerts", b.alerts), ("driver", b.driver), ("assignment", b.assignment),
                           ("groups", b.groups)):
                if col[j] is not None:
                    u[k] = list(col[j]) if isinstance(col[j], tuple) else col[j]
            out.append(u)
        return out


async def run_in_hub(hub, n: int, step_s: float = 0.1, seed: int = 1, sink=None, relay: bool = False) -> None:
    """Feed the hub in process until cancelled.

    With a `sink` (Kafka configured: every instance reads the topic) the
    fleet goes the way HTTP ingest goes, as updates; otherwise the columnar
    batch goes straight to the core, and with `relay` (several workers or
    instances, sharing Redis) on to the others as HTTP-ingested updates go.
    Making and validating a dict per update, then columns again, was 40% of
    its worker at 20k vehicles."""
    fleet = Fleet(n, seed=seed)
    core = hub.core
    loop = asyncio.get_running_loop()
    next_t = loop.time()
    while True:
        next_t += step_s
        await asyncio.sleep(max(0.0, next_t - loop.time()))
        res = fleet.step(step_s, int(time.time() * 1000))
        if res is None:
            continue
        if sink is not None:
            # the sink takes what HTTP ingest hands on: validated updates
            await sink([validate(u) for u in fleet.as_updates(res)])
            continue
        batch, types, _ = res
        # every report names its type, as an HTTP-ingested update does (a
        # worker that missed the first learns it; an equal one changes nothing)
        codes = {t: core.vtype_code(t) for t in set(types)}
        batch.vtype = np.array([codes[t] for t in types], np.uint8)
        hub.apply(batch)
        if relay:
            await hub.stores.relay_updates(batch)
