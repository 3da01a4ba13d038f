"""The numpy-only reference core: the test oracle for the compiled one.

It implements the same kernel methods as _core.pyx the obvious way -- every
client checked against every changed vehicle, messages built as dicts and
encoded with json/msgpack -- so that what it says is easy to believe. The
tests require both cores to produce identical message streams.
"""
from __future__ import annotations

import json

import msgpack
import numpy as np

from . import _schema as S
from ._base import CoreBase

_U1 = np.uint64(1)


def _bit(words2d, rows, col):
    """bit `col` of each row in `rows` of a [row, word] bitset."""
    return ((words2d[rows, col >> 6] >> np.uint64(col & 63)) & _U1).astype(bool)


class ReferenceCore(CoreBase):
    # ------------------------------------------------------------------ apply
    def _k_apply(self, rows, b):
        n = len(rows)
        accepted = np.zeros(n, bool)
        masks = np.zeros(n, np.int64)
        cur = self.cur
        for i in range(n):
            r = rows[i]
            rec = cur[r]
            if b.ts[i] < rec["ts"]:
                continue
            accepted[i] = True
            m = 0
            lat, lon = b.lat[i], b.lon[i]  # rounded to 6 decimals by UpdateBatch
            if rec["version"] == 0 or lat != rec["lat"] or lon != rec["lon"]:
                m |= S.F_P
            rec["lat"], rec["lon"] = lat, lon
            if not np.isnan(b.speed[i]) and b.speed[i] != rec["speed"]:
                rec["speed"] = b.speed[i]
                m |= S.F_S
            if not np.isnan(b.course[i]) and b.course[i] != rec["course"]:
                rec["course"] = b.course[i]
                m |= S.F_C
            if b.status[i] != S.KEEP and b.status[i] != rec["status"]:
                rec["status"] = b.status[i]
                m |= S.F_ST
            if b.vtype[i] != S.KEEP and b.vtype[i] != rec["vtype"]:
                rec["vtype"] = b.vtype[i]
                m |= S.F_VT
            if b.ts[i] != rec["ts"]:
                m |= S.F_TS
            rec["ts"] = b.ts[i]
            rec["version"] += 1
            self.dirty[r] = 1
            masks[i] = m
        return accepted, masks

    # ------------------------------------------------------------------ visibility
    def _predicate(self, cs, r):
        """(visible, leave kind if not visible) for clients `cs` and vehicle row r."""
        cl = self.clients[cs]
        v = self.cur[r]
        active = (cl["used"] == 1) & (cl["active"] == 1) & (v["version"] > 0)
        rs = cl["rights_sel"]
        allowed = rs == -1
        if (~allowed).any():
            allowed[~allowed] = _bit(self.sel_bits, rs[~allowed], r)
        ss = cl["sub_sel"]
        insub = ss == -1
        if (~insub).any():
            insub[~insub] = _bit(self.sel_bits, ss[~insub], r)
        st_ok = ((cl["status_mask"] >> v["status"]) & 1).astype(bool)
        vt_ok = ((cl["type_mask"] >> np.uint64(v["vtype"])) & _U1).astype(bool)
        lat, lon = v["lat"], v["lon"]
        in_lat = (cl["south"] <= lat) & (lat <= cl["north"])
        wrap = cl["west"] > cl["east"]
        in_lon = np.where(wrap, (lon >= cl["west"]) | (lon <= cl["east"]),
                          (cl["west"] <= lon) & (lon <= cl["east"]))
        inbox = (cl["has_bbox"] == 0) | (in_lat & in_lon)
        visible = active & allowed & insub & st_ok & vt_ok & inbox
        reason = np.full(len(cs), S.K_LEAVE_VIEWPORT, np.int64)
        reason[~(st_ok & vt_ok)] = S.K_LEAVE_FILTER
        reason[~insub] = S.K_LEAVE_SUBSCRIPTION
        reason[~allowed] = S.K_LEAVE_PERMISSION
        reason[~active] = S.K_LEAVE_SUBSCRIPTION
        return visible, reason

    def _row_bits(self, r):
        return np.unpackbits(self.vis[r].view(np.uint8), bitorder="little").astype(bool)

    def _set_vis(self, r, cs, values):
        bits = self._row_bits(r)
        bits[np.asarray(cs, np.int64)] = values
        self.vis[r] = np.packbits(bits, bitorder="little").view(np.uint64)

    def _old_vis(self, r, cs):
        return self._row_bits(r)[np.asarray(cs, np.int64)]

    # ------------------------------------------------------------------ messages
    def _lane(self, r, kind):
        if kind in (S.K_FULL, S.K_POS, S.K_DELTA) and self.cur[r]["status"] == S.ST_MOVING:
            return S.LANE_MOVING
        return S.LANE_OTHER

    def _client_mask(self, r, c):
        """Fields of row r that changed since the last tick, as client c may see them."""
        a, b = self.cur[r], self.sent[r]
        cl = self.clients[c]
        m = 0
        if a["lat"] != b["lat"] or a["lon"] != b["lon"]:
            m |= S.F_P
        if a["speed"] != b["speed"]:
            m |= S.F_S
        if a["course"] != b["course"]:
            m |= S.F_C
        if a["status"] != b["status"]:
            m |= S.F_ST
        if a["vtype"] != b["vtype"]:
            m |= S.F_VT
        if cl["show_alerts"] and a["al_ver"] != b["al_ver"]:
            m |= S.F_AL
        if cl["contacts"]:
            if a["dr_ver"] != b["dr_ver"]:
                m |= S.F_DR
        elif a["drr_ver"] != b["drr_ver"]:
            m |= S.F_DRR
        if a["as_ver"] != b["as_ver"]:
            m |= S.F_AS
        return m

    def _msg(self, r, kind, m, c):
        rec = self.cur[r]
        cl = self.clients[c]
        vid = self.ids[r]
        if kind >= S.K_LEAVE_VIEWPORT:
            return {"t": "leave", "v": vid, "r": S.LEAVE_REASONS[kind]}
        p = [float(S.fmt_num(rec["lat"], 6)), float(S.fmt_num(rec["lon"], 6))]
        spd = float(S.fmt_num(rec["speed"], S.SPEED_DECIMALS))
        crs = float(S.fmt_num(rec["course"], S.COURSE_DECIMALS))
        ts = int(rec["ts"])
        driver = self.driver[r] if cl["contacts"] else S.redact_driver(self.driver[r])
        if kind == S.K_POS:
            return {"t": "pos", "v": vid, "p": p, "s": spd, "c": crs, "ts": ts}
        if kind == S.K_FULL:
            d = {"t": "full", "v": vid, "p": p, "s": spd, "c": crs,
                 "st": S.STATUSES[rec["status"]], "vt": self.types[rec["vtype"]], "ts": ts}
            if cl["show_alerts"]:
                d["al"] = list(self.alerts[r])
            if driver is not None:
                d["dr"] = driver
            if self.assignment[r] is not None:
                d["as"] = self.assignment[r]
            return d
        ch = {}
        if m & S.F_P:
            ch["p"] = p
        if m & S.F_S:
            ch["s"] = spd
        if m & S.F_C:
            ch["c"] = crs
        if m & S.F_ST:
            ch["st"] = S.STATUSES[rec["status"]]
        if m & S.F_VT:
            ch["vt"] = self.types[rec["vtype"]]
        if m & S.F_AL:
            ch["al"] = list(self.alerts[r])
        if m & (S.F_DR | S.F_DRR):
            ch["dr"] = driver
        if m & S.F_AS:
            ch["as"] = self.assignment[r]
        return {"t": "delta", "v": vid, "ch": ch, "ts": ts}

    def _encode(self, fmt, msgs):
        if fmt == S.FMT_JSON:
            return json.dumps(msgs, ensure_ascii=False, separators=(",", ":")).encode()
        return msgpack.packb(msgs, use_bin_type=True)

    def _encode_raw(self, fmt, items):
        """items: decoded dicts or pre-encoded event pieces (json, msgpack)."""
        if fmt == S.FMT_JSON:
            parts = [it[0] if isinstance(it, tuple) else S.enc_json(it) for it in items]
            return b"[" + b",".join(parts) + b"]"
        parts = [it[1] if isinstance(it, tuple) else S.enc_msgpack(it) for it in items]
        return S.msgpack_array_head(len(parts)) + b"".join(parts)

    # ------------------------------------------------------------------ commands
    def _k_client_diff(self, c, full_all):
        out = []
        for r in range(self.n):
            vis, reason = self._predicate(np.array([c]), r)
            new, old = bool(vis[0]), bool(self._old_vis(r, [c])[0])
            if self.clients[c]["clustered"]:
                pass
            elif new and (full_all or not old):
                out.append((self._lane(r, S.K_FULL), r, self._msg(r, S.K_FULL, 0, c)))
            elif old and not new:
                k = int(reason[0])
                out.append((self._lane(r, k), r, self._msg(r, k, 0, c)))
            self._set_vis(r, [c], [new])
        out.sort(key=lambda t: (t[0], t[1]))
        return self._encode_raw(int(self.clients[c]["fmt"]), [m for _, _, m in out])

    # ------------------------------------------------------------------ tick
    def _k_tick(self, rebuild, _rows):  # brute force, and its own dirty rows
        per_client: dict[int, list] = {}
        cs = np.arange(self.n_clients)
        # events go to whoever sees the vehicle after this tick's changes, so
        # route vehicles first and prepend events afterwards.
        rows = np.flatnonzero(self.dirty[: self.n])
        for r in rows:
            if len(cs) == 0:
                break
            vis, reason = self._predicate(cs, r)
            old = self._old_vis(r, cs)
            for i in np.flatnonzero(vis | old):
                c = int(cs[i])
                if self.clients[c]["clustered"]:
                    continue
                if vis[i] and not old[i]:
                    per_client.setdefault(c, []).append(
                        (self._lane(r, S.K_FULL), r, self._msg(r, S.K_FULL, 0, c)))
                elif old[i] and not vis[i]:
                    k = int(reason[i])
                    per_client.setdefault(c, []).append((self._lane(r, k), r, self._msg(r, k, 0, c)))
                elif old[i] and vis[i]:
                    m = self._client_mask(r, c)
                    if m:
                        k = S.K_POS if not (m & ~S.POS_FIELDS) else S.K_DELTA
                        per_client.setdefault(c, []).append((self._lane(r, k), r, self._msg(r, k, m, c)))
            self._set_vis(r, cs, vis)
        self.sent[rows] = self.cur[rows]
        self.dirty[rows] = 0
        for order, (r, jp, mp, is_alert) in enumerate(self.events):
            for c in cs:
                cl = self.clients[c]
                if self._old_vis(r, [c])[0] and (cl["show_alerts"] or not is_alert):
                    per_client.setdefault(c, []).append((S.LANE_EVENT, order, (jp, mp)))
        self.events = []
        groups: dict[bytes, list] = {}
        for c in sorted(per_client):
            items = sorted(per_client[c], key=lambda t: (t[0], t[1]))
            body = self._encode_raw(int(self.clients[c]["fmt"]), [m for _, _, m in items])
            groups.setdefault(body, []).append(c)
        return [(body, [int(c) for c in cl]) for body, cl in groups.items()]
