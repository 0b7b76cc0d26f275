"""The label store of a listening round: SQLite, one transaction per judgement, and the export to DPO pairs.

Tables: `meta` (the pairs round the store belongs to), `raters` (name, SHA-256 of the access token),
`assignments` (the order a pair was shown to a rater: "ab" = sample a played first, drawn at random the first time
the pair is served and kept, so a reload shows the same order) and `judgements` (rater, pair, the choice resolved
to the samples: a / b / tie / both_bad, the key pressed: first / second / tie / both_bad, the order shown, time).
Each judgement is one INSERT in its own transaction, committed before the HTTP answer, in WAL mode with
synchronous=FULL: a judgement the page saw acknowledged survives the server being killed. A rater's next pair is
the first in manifest order that rater has not judged, so a rater resumes where they stopped.

`export` writes the pairs (`label export`): per pair the votes of every rater, the majority (ties between a and b,
and tie / both_bad majorities, are left out of the preference data), and agreement where 2+ raters judged a pair.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
import secrets
import sqlite3
import time
from collections import Counter
from contextlib import closing
from pathlib import Path
from typing import Any

CHOICES = ("a", "b", "tie", "both_bad")
KEYS = ("first", "second", "tie", "both_bad")

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS raters (name TEXT PRIMARY KEY, token_sha256 TEXT NOT NULL UNIQUE, created REAL NOT NULL);
CREATE TABLE IF NOT EXISTS assignments (
    rater TEXT NOT NULL, pair_id TEXT NOT NULL, shown TEXT NOT NULL CHECK (shown IN ('ab', 'ba')), served REAL NOT NULL,
    PRIMARY KEY (rater, pair_id));
CREATE TABLE IF NOT EXISTS judgements (
    rater TEXT NOT NULL, pair_id TEXT NOT NULL, choice TEXT NOT NULL CHECK (choice IN ('a', 'b', 'tie', 'both_bad')),
    pressed TEXT NOT NULL, shown TEXT NOT NULL, created REAL NOT NULL, PRIMARY KEY (rater, pair_id));
"""


def read_manifest(pairs_dir: str | Path) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """(pairs.json, the manifest's pairs in order) of a `pairs` output directory; errors name the missing file."""
    root = Path(pairs_dir)
    meta_path, manifest = root / "pairs.json", root / "manifest.jsonl"
    for path in (meta_path, manifest):
        if not path.is_file():
            raise FileNotFoundError(f"--pairs={pairs_dir} has no {path.name}; `python -m lightning_grpo pairs` writes it")
    pairs = [json.loads(line) for line in manifest.read_text().splitlines() if line.strip()]
    if not pairs:
        raise ValueError(f"--pairs={pairs_dir}: manifest.jsonl has no pairs (did every sample fail the gate?)")
    return json.loads(meta_path.read_text()), pairs


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


class LabelStore:
    """One SQLite file of one pairs round. Every method opens its own connection: safe from any thread or process."""

    def __init__(self, db: str | Path, round_id: str, pair_ids: list[str]) -> None:
        self.db, self.pair_ids = str(db), pair_ids
        self.known = set(pair_ids)
        with closing(self._connect()) as conn, conn:
            conn.executescript(SCHEMA)
            row = conn.execute("SELECT value FROM meta WHERE key = 'round_id'").fetchone()
            if row is None:
                conn.execute("INSERT INTO meta VALUES ('round_id', ?)", (round_id,))
            elif row[0] != round_id:
                raise ValueError(f"--db={db} holds the labels of pairs round {row[0]}, not of this --pairs directory "
                                 f"(round {round_id}); use one --db per pairs directory")

    def _connect(self) -> sqlite3.Connection:
        conn = sqlite3.connect(self.db, timeout=30)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=FULL")
        return conn

    # -- raters ------------------------------------------------------------------------------------
    def add_rater(self, name: str, replace: bool = False) -> str | None:
        """A new access token for `name` (returned once; only its hash is stored), or None when the rater exists
        and `replace` is off."""
        if not name or not name.replace("_", "").replace("-", "").isalnum():
            raise ValueError(f"--rater {name!r}: use letters, digits, '-' and '_'")
        token = secrets.token_urlsafe(18)
        with closing(self._connect()) as conn, conn:
            if conn.execute("SELECT 1 FROM raters WHERE name = ?", (name,)).fetchone():
                if not replace:
                    return None
                conn.execute("UPDATE raters SET token_sha256 = ? WHERE name = ?", (token_hash(token), name))
            else:
                conn.execute("INSERT INTO raters VALUES (?, ?, ?)", (name, token_hash(token), time.time()))
        return token

    def rater_of(self, token: str | None) -> str | None:
        if not token:
            return None
        with closing(self._connect()) as conn:
            row = conn.execute("SELECT name FROM raters WHERE token_sha256 = ?", (token_hash(token),)).fetchone()
        return row[0] if row else None

    # -- serving and judging ------------------------------------------------------------------------
    def progress(self, rater: str) -> dict[str, int]:
        with closing(self._connect()) as conn:
            done = conn.execute("SELECT COUNT(*) FROM judgements WHERE rater = ?", (rater,)).fetchone()[0]
        return {"done": done, "total": len(self.pair_ids)}

    def next_pair(self, rater: str) -> tuple[str, str] | None:
        """(pair_id, shown order) of the rater's first unjudged pair, its order drawn once and kept; None when done."""
        with closing(self._connect()) as conn, conn:
            judged = {r[0] for r in conn.execute("SELECT pair_id FROM judgements WHERE rater = ?", (rater,))}
            pair_id = next((p for p in self.pair_ids if p not in judged), None)
            if pair_id is None:
                return None
            conn.execute("INSERT OR IGNORE INTO assignments VALUES (?, ?, ?, ?)",
                         (rater, pair_id, random.SystemRandom().choice(("ab", "ba")), time.time()))
            shown = conn.execute("SELECT shown FROM assignments WHERE rater = ? AND pair_id = ?",
                                 (rater, pair_id)).fetchone()[0]
        return pair_id, shown

    def shown_order(self, rater: str, pair_id: str) -> str | None:
        with closing(self._connect()) as conn:
            row = conn.execute("SELECT shown FROM assignments WHERE rater = ? AND pair_id = ?", (rater, pair_id)).fetchone()
        return row[0] if row else None

    def judge(self, rater: str, pair_id: str, pressed: str) -> str:
        """Store one judgement in one transaction; returns the choice resolved to the samples (a, b, tie, both_bad).
        Raises KeyError for an unknown pair, LookupError for a pair never shown to the rater, ValueError for a bad
        key, and FileExistsError when the rater already judged the pair otherwise (a repeated identical judgement,
        e.g. a retried request, is accepted)."""
        if pair_id not in self.known:
            raise KeyError(pair_id)
        if pressed not in KEYS:
            raise ValueError(f"choice {pressed!r} is not one of {', '.join(KEYS)}")
        with closing(self._connect()) as conn, conn:
            row = conn.execute("SELECT shown FROM assignments WHERE rater = ? AND pair_id = ?", (rater, pair_id)).fetchone()
            if row is None:
                raise LookupError(pair_id)
            shown = row[0]
            choice = {"first": shown[0], "second": shown[1]}.get(pressed, pressed)
            before = conn.execute("SELECT choice FROM judgements WHERE rater = ? AND pair_id = ?",
                                  (rater, pair_id)).fetchone()
            if before is not None:
                if before[0] != choice:
                    raise FileExistsError(pair_id)
                return choice
            conn.execute("INSERT INTO judgements VALUES (?, ?, ?, ?, ?, ?)",
                         (rater, pair_id, choice, pressed, shown, time.time()))
        return choice

    def judgements(self) -> list[dict[str, Any]]:
        with closing(self._connect()) as conn:
            rows = conn.execute("SELECT rater, pair_id, choice, pressed, shown, created FROM judgements ORDER BY created")
            return [dict(zip(("rater", "pair_id", "choice", "pressed", "shown", "created"), r)) for r in rows]


def agreement(votes: dict[str, dict[str, str]]) -> dict[str, Any]:
    """Agreement over pairs judged by 2+ raters. votes: pair_id -> {rater: choice}.
    pairs_multi: such pairs; percent_agreement: the share of rater pairs on a pair that chose alike (mean over
    pairs); fleiss_kappa over the four choices (NaN when undefined: fewer than 2 such pairs or one category only)."""
    multi = {p: list(v.values()) for p, v in votes.items() if len(v) >= 2}
    if not multi:
        return {"pairs_multi": 0, "percent_agreement": None, "fleiss_kappa": None}
    p_i, totals, n_ratings = [], Counter(), 0
    for choices in multi.values():
        n, counts = len(choices), Counter(choices)
        p_i.append(sum(c * (c - 1) for c in counts.values()) / (n * (n - 1)))  # agreeing rater pairs on this pair
        totals.update(counts)
        n_ratings += n
    p_bar = sum(p_i) / len(p_i)
    p_e = sum((c / n_ratings) ** 2 for c in totals.values())
    kappa = (p_bar - p_e) / (1 - p_e) if len(multi) >= 2 and p_e < 1 else math.nan
    return {"pairs_multi": len(multi), "percent_agreement": p_bar,
            "fleiss_kappa": None if math.isnan(kappa) else kappa}


def export(store: LabelStore, pairs: list[dict[str, Any]], out: str | Path) -> dict[str, Any]:
    """Write the majority-preferred pairs as parquet (preference_data.PAIR_COLUMNS and the optional ones) and
    `<out>.stats.json`; returns the statistics."""
    import pandas as pd

    votes: dict[str, dict[str, str]] = {}
    for j in store.judgements():
        votes.setdefault(j["pair_id"], {})[j["rater"]] = j["choice"]
    by_id = {p["pair_id"]: p for p in pairs}
    rows, outcome = [], Counter()
    for pair_id, who in votes.items():
        counts = Counter(who.values())
        top = counts.most_common()
        winner = top[0][0] if len(top) == 1 or top[0][1] > top[1][1] else None
        if winner not in ("a", "b"):
            outcome["no_preference" if winner else "split"] += 1
            continue
        outcome["preferred"] += 1
        pair = by_id[pair_id]
        chosen, rejected = pair[winner], pair["b" if winner == "a" else "a"]
        rows.append({
            "pair_id": pair_id, "text": pair["text"], "language": pair.get("language"),
            "prompt_text": pair.get("prompt_text"), "prompt_codes": pair.get("prompt_codes"),
            "chosen": chosen["codes"], "rejected": rejected["codes"],
            "chosen_stopped": chosen.get("stopped", True), "rejected_stopped": rejected.get("stopped", True),
            "chosen_cer": chosen.get("cer"), "rejected_cer": rejected.get("cer"),
            "votes": json.dumps(who, sort_keys=True), "num_raters": len(who),
            "agreement": counts[winner] / len(who),
        })
    if not rows:
        raise ValueError(f"no pair has a majority for a or b among {len(votes)} judged pairs: nothing to export")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(rows).to_parquet(out)
    stats = {"judgements": sum(len(v) for v in votes.values()), "pairs_judged": len(votes), "pairs": len(pairs),
             "exported": len(rows), **{k: outcome[k] for k in ("preferred", "no_preference", "split")},
             "raters": sorted({r for v in votes.values() for r in v}),
             "choices": dict(Counter(c for v in votes.values() for c in v.values())), **agreement(votes)}
    Path(f"{out}.stats.json").write_text(json.dumps(stats, indent=2) + "\n")
    return stats
