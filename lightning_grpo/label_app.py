"""`python -m lightning_grpo label`: a listening page for A/B judgements of a `pairs` directory.

    python -m lightning_grpo label --pairs runs/round1/pairs --db runs/round1/labels.sqlite --rater alice --rater bob
    python -m lightning_grpo label export --pairs runs/round1/pairs --db runs/round1/labels.sqlite \\
        --out runs/round1/prefs.parquet

The first command prints one address per new rater (`http://127.0.0.1:8765/#token=...`; the token lives in the
fragment, which browsers never send in requests or logs) and serves the page until stopped; `--new_token NAME`
issues a rater a fresh token. The page plays the two samples of one text in an order drawn per judgement and
recorded (label_store.py), takes "A" (key a or 1), "B" (b or 2), "tie" (t) or "both bad" (x), shows progress, and
resumes at the rater's first unjudged pair. Every judgement is committed before the page moves on. Listens on
127.0.0.1 unless `--host` says otherwise (plain HTTP: put it behind TLS to open it beyond one machine).

API (token as `Authorization: Bearer <token>`, or `?token=` for the audio elements):
    GET  /api/next                     {"done": false, "pair_id", "text", "first", "second" (audio URLs), "progress"}
    GET  /api/audio/{pair_id}/{first|second}   the wav shown in that place to this rater
    POST /api/judgements {"pair_id", "choice": "first" | "second" | "tie" | "both_bad"}  -> {"choice", "progress"}
401 wrong or missing token, 404 unknown pair, 409 a pair not yet served to the rater or already judged otherwise,
422 a malformed body.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict

from .label_store import LabelStore, export, read_manifest

PAGE = Path(__file__).parent / "assets" / "label.html"


class Judgement(BaseModel):
    """The body of POST /api/judgements: the place of the preferred sample as shown, or tie / both_bad."""

    model_config = ConfigDict(extra="forbid", strict=True)  # strict: a pair_id of 3 is an error, not "3"
    pair_id: str
    choice: Literal["first", "second", "tie", "both_bad"]


def build_app(pairs_dir: str | Path, db: str | Path):
    """The FastAPI app serving `pairs_dir`'s manifest with judgements in `db`."""
    from fastapi import Depends, FastAPI, Header, HTTPException, Query
    from fastapi.responses import FileResponse, HTMLResponse

    meta, pairs = read_manifest(pairs_dir)
    by_id = {p["pair_id"]: p for p in pairs}
    store = LabelStore(db, meta["round_id"], [p["pair_id"] for p in pairs])
    root = Path(pairs_dir)
    app = FastAPI(title="lightning_grpo listening page")
    app.state.store = store

    def rater(authorization: str | None = Header(None), token: str | None = Query(None)) -> str:
        given = token or (authorization.removeprefix("Bearer ").strip() if authorization else None)
        name = store.rater_of(given)
        if name is None:
            raise HTTPException(401, "wrong or missing access token: open the address `label` printed for you")
        return name

    @app.get("/", response_class=HTMLResponse)
    def page() -> str:
        return PAGE.read_text()

    @app.get("/api/next")
    def next_pair(name: str = Depends(rater)) -> dict:
        served = store.next_pair(name)
        if served is None:
            return {"done": True, "rater": name, "progress": store.progress(name)}
        pair_id, _ = served
        return {"done": False, "rater": name, "pair_id": pair_id, "text": by_id[pair_id]["text"],
                "first": f"/api/audio/{pair_id}/first", "second": f"/api/audio/{pair_id}/second",
                "progress": store.progress(name)}

    @app.get("/api/audio/{pair_id}/{place}")
    def audio(pair_id: str, place: Literal["first", "second"], name: str = Depends(rater)) -> FileResponse:
        if pair_id not in by_id:
            raise HTTPException(404, f"unknown pair {pair_id!r}")
        shown = store.shown_order(name, pair_id)
        if shown is None:
            raise HTTPException(409, f"pair {pair_id!r} has not been served to {name}: GET /api/next first")
        side = shown[0] if place == "first" else shown[1]
        return FileResponse(root / by_id[pair_id][side]["wav"], media_type="audio/wav")

    @app.post("/api/judgements")
    def judge(body: Judgement, name: str = Depends(rater)) -> dict:
        try:
            choice = store.judge(name, body.pair_id, body.choice)
        except KeyError:
            raise HTTPException(404, f"unknown pair {body.pair_id!r}") from None
        except LookupError:
            raise HTTPException(409, f"pair {body.pair_id!r} has not been served to {name}: GET /api/next first") from None
        except FileExistsError:
            raise HTTPException(409, f"{name} already judged pair {body.pair_id!r} otherwise; judgements are final") from None
        return {"choice": choice, "progress": store.progress(name)}

    return app


def serve(pairs: str, db: str, rater: list[str] | None = None, new_token: list[str] | None = None,
          host: str = "127.0.0.1", port: int = 8765) -> None:
    """Serve the listening page.

    Args:
        pairs: a `python -m lightning_grpo pairs` output directory.
        db: the SQLite label store (created if missing; one per pairs directory).
        rater: raters to add (repeatable); each new one gets a token, printed once.
        new_token: existing raters to give a fresh token (the old one stops working).
        host: the address to listen on; 127.0.0.1 keeps the page on this machine.
        port: the port.
    """
    import uvicorn

    app = build_app(pairs, db)
    store: LabelStore = app.state.store
    for name in rater or []:
        token = store.add_rater(name)
        print(f"{name}: http://{host}:{port}/#token={token}" if token else
              f"{name}: has a token already (--new_token {name} issues a fresh one)")
    for name in new_token or []:
        print(f"{name}: http://{host}:{port}/#token={store.add_rater(name, replace=True)}")
    if host not in ("127.0.0.1", "localhost", "::1"):
        print(f"label: serving on {host} over plain HTTP: tokens and audio cross the network unencrypted; put a TLS "
              "proxy in front to open the page beyond this machine", file=sys.stderr)
    uvicorn.run(app, host=host, port=port, log_level="warning")


def export_labels(pairs: str, db: str, out: str) -> dict:
    """Write the preference pairs of a label store as parquet, with agreement statistics in <out>.stats.json.

    Args:
        pairs: the `pairs` directory that was labelled.
        db: its SQLite label store.
        out: the parquet to write (the DPO round's --data.train_pairs).
    """
    meta, manifest = read_manifest(pairs)
    if not Path(db).is_file():
        raise FileNotFoundError(f"--db={db} does not exist; `python -m lightning_grpo label` creates it")
    stats = export(LabelStore(db, meta["round_id"], [p["pair_id"] for p in manifest]), manifest, out)
    print(f"wrote {stats['exported']} preference pairs to {out} ({stats['judgements']} judgements of "
          f"{stats['pairs_judged']} pairs; agreement {stats['percent_agreement']}, Fleiss kappa {stats['fleiss_kappa']})")
    return stats


def main(argv: list[str] | None = None):
    """`label --pairs DIR --db DB [--rater NAME ...]` serves the page; `label export --pairs DIR --db DB --out P`."""
    from jsonargparse import ArgumentParser

    argv = list(argv or [])
    exporting = argv[:1] == ["export"]
    parser = ArgumentParser(prog="python -m lightning_grpo label" + (" export" if exporting else ""),
                            description=(export_labels if exporting else serve).__doc__.split("\n\n")[0])
    parser.add_argument("--pairs", required=True, help="a `python -m lightning_grpo pairs` output directory")
    parser.add_argument("--db", required=True, help="the SQLite label store, one per pairs directory")
    if exporting:
        parser.add_argument("--out", required=True, help="the parquet of preference pairs to write")
        args = parser.parse_args(argv[1:])
        return export_labels(args.pairs, args.db, args.out)
    parser.add_argument("--rater", action="append", default=[], help="add a rater (repeatable); prints its address")
    parser.add_argument("--new_token", action="append", default=[], help="issue a rater a fresh token (repeatable)")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (127.0.0.1: this machine only)")
    parser.add_argument("--port", type=int, default=8765)
    args = parser.parse_args(argv)
    return serve(args.pairs, args.db, args.rater, args.new_token, args.host, args.port)
