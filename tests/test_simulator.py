"""The built-in fleet (ingest/simulator.py), on its own."""
from realtime.ingest.simulator import STATIC_EVERY_S, Fleet


def test_the_rarely_changing_fields_come_again_but_alerts_do_not():
    """Driver, assignment and groups go with a vehicle's first report and then
    about every STATIC_EVERY_S, so that a worker that missed the first gets
    them; an alert only when it comes or goes (sent again, it would be new to
    a worker that missed it, which would log a late alert event)."""
    fleet = Fleet(50, seed=3)
    sent = {vid: 0 for vid in fleet.ids}
    index = {vid: i for i, vid in enumerate(fleet.ids)}
    again = 0
    t, step = 0.0, 0.5
    while t < 2.5 * STATIC_EVERY_S:
        alerting, had_first = fleet.alerting.copy(), fleet.sent_static.copy()
        res = fleet.step(step, int(1_700_000_000_000 + t * 1000))
        t += step
        if res is None:
            continue
        batch, _, first = res
        for vid, drv, asg, grp, al, f in zip(batch.ids, batch.driver, batch.assignment, batch.groups,
                                            batch.alerts, first):
            assert (drv is not None) == (asg is not None) == (grp is not None) == bool(f)
            sent[vid] += drv is not None
            i = index[vid]
            assert (al is not None) == (not had_first[i] or alerting[i] != fleet.alerting[i])
            again += bool(f) and had_first[i] and al is None
    assert again > 40   # static fields sent again, alerts not
    reporting = [v for v, n in sent.items() if n]
    assert len(reporting) > 40   # a few trackers may be off
    assert all(sent[v] >= 2 for v in reporting), sent
    assert all(sent[v] <= 4 for v in reporting), sent
