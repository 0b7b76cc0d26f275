"""The listening page's API and label store: access, malformed input, order randomisation and its record, resume,
two raters at once, a server killed mid-work, and `label export` with agreement statistics."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import threading
import time

import httpx
import pandas as pd
import pytest
from fastapi.testclient import TestClient

from lightning_grpo.cli import main
from lightning_grpo.label_app import build_app
from lightning_grpo.label_store import LabelStore, agreement
from lightning_grpo.preference_data import load_pairs

from label_fixtures import label_server, make_pairs_dir, manifest


@pytest.fixture
def pairs(tmp_path):
    return make_pairs_dir(tmp_path / "pairs", n=40)


def client_for(pairs, db, *raters):
    app = build_app(pairs, db)
    tokens = {name: app.state.store.add_rater(name) for name in raters}
    return TestClient(app), tokens


def auth(token):
    return {"Authorization": f"Bearer {token}"}


def test_wrong_or_missing_token_is_401_everywhere(pairs, tmp_path):
    client, tokens = client_for(pairs, tmp_path / "l.sqlite", "alice")
    for headers in ({}, auth("nope")):
        assert client.get("/api/next", headers=headers).status_code == 401
        assert client.get("/api/audio/00000-0/first", headers=headers).status_code == 401
        r = client.post("/api/judgements", headers=headers, json={"pair_id": "00000-0", "choice": "tie"})
        assert r.status_code == 401
    assert client.get("/api/next", headers=auth(tokens["alice"])).status_code == 200
    assert client.get("/api/next", params={"token": tokens["alice"]}).status_code == 200  # the audio elements' way


def test_malformed_bodies_unknown_and_unserved_pairs(pairs, tmp_path):
    client, tokens = client_for(pairs, tmp_path / "l.sqlite", "alice")
    h = auth(tokens["alice"])
    first = client.get("/api/next", headers=h).json()["pair_id"]
    for body in ({"pair_id": first}, {"choice": "tie"}, {"pair_id": first, "choice": "A"},
                 {"pair_id": first, "choice": "tie", "extra": 1}, {"pair_id": 3, "choice": "tie"}, [1, 2]):
        assert client.post("/api/judgements", headers=h, json=body).status_code == 422, body
    r = client.post("/api/judgements", headers={**h, "Content-Type": "application/json"}, content=b"{not json")
    assert r.status_code == 422
    r = client.post("/api/judgements", headers=h, json={"pair_id": "99999-0", "choice": "tie"})
    assert r.status_code == 404 and "unknown pair" in r.json()["detail"]
    assert client.get("/api/audio/99999-0/first", headers=h).status_code == 404
    assert client.get(f"/api/audio/{first}/third", headers=h).status_code == 422
    # a real pair the rater was never shown: its order was never drawn, so a choice cannot be resolved
    r = client.post("/api/judgements", headers=h, json={"pair_id": "00005-0", "choice": "first"})
    assert r.status_code == 409 and "not been served" in r.json()["detail"]
    assert sqlite3.connect(tmp_path / "l.sqlite").execute("SELECT COUNT(*) FROM judgements").fetchone()[0] == 0


def test_order_is_random_per_judgement_recorded_and_resolved(pairs, tmp_path):
    db = tmp_path / "l.sqlite"
    client, tokens = client_for(pairs, db, "alice")
    h = auth(tokens["alice"])
    pair_by_id = {p["pair_id"]: p for p in manifest(pairs)}
    for _ in range(40):
        item = client.get("/api/next", headers=h).json()
        assert client.get("/api/next", headers=h).json()["pair_id"] == item["pair_id"]  # a reload: same pair
        shown = LabelStore(db, "round-test", list(pair_by_id)).shown_order("alice", item["pair_id"])
        audio = client.get(item["first"], headers=h)
        expected = (pairs / pair_by_id[item["pair_id"]][shown[0]]["wav"]).read_bytes()
        assert audio.status_code == 200 and audio.content == expected  # "first" plays the sample shown first
        r = client.post("/api/judgements", headers=h, json={"pair_id": item["pair_id"], "choice": "first"})
        assert r.json()["choice"] == shown[0]
    rows = sqlite3.connect(db).execute("SELECT choice, pressed, shown FROM judgements").fetchall()
    assert all(pressed == "first" and choice == shown[0] for choice, pressed, shown in rows)
    orders = {shown for _, _, shown in rows}
    assert orders == {"ab", "ba"}  # 40 fair draws all alike: probability 2^-39
    assert client.get("/api/next", headers=h).json() == {"done": True, "rater": "alice",
                                                        "progress": {"done": 40, "total": 40}}


def test_repeat_is_accepted_a_changed_judgement_is_409(pairs, tmp_path):
    client, tokens = client_for(pairs, tmp_path / "l.sqlite", "alice")
    h = auth(tokens["alice"])
    pid = client.get("/api/next", headers=h).json()["pair_id"]
    assert client.post("/api/judgements", headers=h, json={"pair_id": pid, "choice": "tie"}).status_code == 200
    assert client.post("/api/judgements", headers=h, json={"pair_id": pid, "choice": "tie"}).status_code == 200
    r = client.post("/api/judgements", headers=h, json={"pair_id": pid, "choice": "both_bad"})
    assert r.status_code == 409 and "already judged" in r.json()["detail"]


def test_a_rater_resumes_where_they_stopped_and_raters_are_independent(pairs, tmp_path):
    db = tmp_path / "l.sqlite"
    client, tokens = client_for(pairs, db, "alice", "bob")
    for _ in range(3):
        pid = client.get("/api/next", headers=auth(tokens["alice"])).json()["pair_id"]
        client.post("/api/judgements", headers=auth(tokens["alice"]), json={"pair_id": pid, "choice": "tie"})
    again = TestClient(build_app(pairs, db))  # a new server on the same store
    item = again.get("/api/next", headers=auth(tokens["alice"])).json()
    assert item["pair_id"] == "00003-0" and item["progress"] == {"done": 3, "total": 40}
    assert again.get("/api/next", headers=auth(tokens["bob"])).json()["pair_id"] == "00000-0"


def test_a_store_of_another_round_is_refused(pairs, tmp_path):
    db = tmp_path / "l.sqlite"
    build_app(pairs, db)
    other = make_pairs_dir(tmp_path / "other", n=2, round_id="another-round")
    with pytest.raises(ValueError, match="one --db per pairs directory"):
        build_app(other, db)


def judge_all(url: str, token: str, choice: str, acknowledged: list | None = None) -> None:
    with httpx.Client(base_url=url, headers=auth(token), timeout=30) as c:
        while not (item := c.get("/api/next").json())["done"]:
            r = c.post("/api/judgements", json={"pair_id": item["pair_id"], "choice": choice})
            r.raise_for_status()
            if acknowledged is not None:
                acknowledged.append(item["pair_id"])


def test_two_raters_at_once_through_the_cli_server(pairs, tmp_path):
    db = tmp_path / "l.sqlite"
    with label_server(pairs, db, "--rater", "alice", "--rater", "bob") as (url, tokens, _):
        threads = [threading.Thread(target=judge_all, args=(url, tokens[n], c)) for n, c in (("alice", "first"),
                                                                                              ("bob", "tie"))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
    rows = sqlite3.connect(db).execute("SELECT rater, COUNT(*), COUNT(DISTINCT pair_id) FROM judgements GROUP BY rater")
    assert sorted(rows.fetchall()) == [("alice", 40, 40), ("bob", 40, 40)]


def test_server_killed_mid_work_loses_no_acknowledged_judgement(pairs, tmp_path):
    db = tmp_path / "l.sqlite"
    acknowledged: list[str] = []
    with label_server(pairs, db, "--rater", "alice") as (url, tokens, proc):
        token = tokens["alice"]
        worker = threading.Thread(target=lambda: pytest.raises(httpx.HTTPError, judge_all, url, token, "second",
                                                               acknowledged))
        worker.start()
        while len(acknowledged) < 5:
            time.sleep(0.01)
        os.kill(proc.pid, signal.SIGKILL)  # no shutdown of any kind
        worker.join(timeout=60)
    stored = {r[0] for r in sqlite3.connect(db).execute("SELECT pair_id FROM judgements WHERE rater = 'alice'")}
    assert set(acknowledged) <= stored and len(stored) <= len(acknowledged) + 1  # at most the one in flight
    with label_server(pairs, db) as (url, _, _):  # restarted: the rater's token still works, work resumes
        item = httpx.get(url + "/api/next", headers=auth(token)).json()
        assert item["progress"]["done"] == len(stored)
        assert item["pair_id"] == f"{len(stored):05d}-0"


def test_agreement_statistics_by_hand():
    votes = {"p1": {"x": "a", "y": "a"}, "p2": {"x": "a", "y": "b"}, "p3": {"x": "b", "y": "b"}, "p4": {"x": "a"}}
    stats = agreement(votes)
    # P_i: 1, 0, 1 -> 2/3; category shares over 6 ratings: a 3/6, b 3/6 -> P_e 1/2; kappa (2/3 - 1/2) / (1/2) = 1/3
    assert stats["pairs_multi"] == 3
    assert stats["percent_agreement"] == pytest.approx(2 / 3)
    assert stats["fleiss_kappa"] == pytest.approx(1 / 3)
    assert agreement({"p": {"x": "a"}}) == {"pairs_multi": 0, "percent_agreement": None, "fleiss_kappa": None}


def test_label_export_through_the_cli_feeds_the_dpo_data(pairs, tmp_path):
    db = tmp_path / "l.sqlite"
    client, tokens = client_for(pairs, db, "alice", "bob")
    store = LabelStore(db, "round-test", [p["pair_id"] for p in manifest(pairs)])
    plan = {"alice": ["a", "a", "b", "tie"], "bob": ["a", "b", "b", "both_bad"]}  # pairs 0..3
    for name, choices in plan.items():
        for choice in choices:
            pid, shown = store.next_pair(name)
            pressed = {"a": "first" if shown == "ab" else "second",
                       "b": "second" if shown == "ab" else "first"}.get(choice, choice)
            store.judge(name, pid, pressed)
    out = tmp_path / "prefs.parquet"
    main(["label", "export", "--pairs", str(pairs), "--db", str(db), "--out", str(out)])
    df = pd.read_parquet(out)
    # pair 0: a (2 votes); pair 1: split a/b (left out); pair 2: b (2 votes); pair 3: tie vs both bad (left out)
    assert list(df.pair_id) == ["00000-0", "00002-0"]
    m = {p["pair_id"]: p for p in manifest(pairs)}
    assert list(df.chosen[0]) == m["00000-0"]["a"]["codes"] and list(df.rejected[0]) == m["00000-0"]["b"]["codes"]
    assert list(df.chosen[1]) == m["00002-0"]["b"]["codes"] and df.chosen_stopped[1] == False  # noqa: E712
    stats = json.loads((tmp_path / "prefs.parquet.stats.json").read_text())
    assert stats["exported"] == 2 and stats["split"] == 2 and stats["pairs_multi"] == 4
    assert stats["percent_agreement"] == pytest.approx(0.5)
    rows = load_pairs(str(out))
    assert rows[1]["chosen_stopped"] is False and rows[1]["chosen_cer"] == pytest.approx(0.1)
