"""Incremental scan state: planning without decoding, per-batch commits, stable output order."""

from __future__ import annotations

import os
import sqlite3
from pathlib import Path

import numpy as np
import pytest

from osteoscan.errors import OutputError
from osteoscan.rows import ResultRow, ScoredRow, utc_now
from osteoscan.scan.plan import run_key
from osteoscan.scan.state import ScanState, default_state_path

KEY = run_key(["pkg-a"], {"threshold": None})


def _files(tmp_path: Path, n: int) -> list[Path]:
    out = []
    for i in range(n):
        p = tmp_path / "archive" / f"img{i:02d}.png"
        p.parent.mkdir(exist_ok=True)
        p.write_bytes(b"x" * (10 + i))
        out.append(p)
    return out


def _row(path: Path, frame: int = 0, score: float = 0.5, status: str = "ok") -> dict:
    return {
        "path": str(path),
        "frame": frame,
        "image_id": f"sha256:{abs(hash((str(path), frame))):032x}"[:39],
        "status": status,
        "reason": "" if status == "ok" else "broken",
        "score": score,
        "flagged": score >= 0.5,
    }


def _res(row: dict, file_frames: int = 1, **arrays: object) -> ScoredRow:
    return ScoredRow(
        ResultRow.from_dict({"scanned_at": utc_now(), **row}),
        file_frames,
        **arrays,  # type: ignore[arg-type]
    )


def _record_all(state: ScanState, files: list[Path], key: str = KEY) -> None:
    for i, p in enumerate(files):
        state.record([_res(_row(p, score=i / len(files)))], key)


def test_default_path_and_run_key_are_stable() -> None:
    assert default_state_path("/x/results.csv") == Path("/x/results.state.sqlite")
    assert run_key(["b", "a"], {"t": 1}) == run_key(["a", "b"], {"t": 1})
    assert run_key(["a"], {"t": 1}) != run_key(["a"], {"t": 2})


def test_second_plan_skips_unchanged_and_rescans_changed(tmp_path: Path) -> None:
    files = _files(tmp_path, 5)
    db = tmp_path / "s.sqlite"
    with ScanState.open(db) as st:
        plan = st.plan(files, KEY)
        assert plan.todo == files and not plan.unchanged
        _record_all(st, files)
        assert st.summary()["new"] == 5
    # change one file's content (size changes) and touch another (mtime changes)
    files[1].write_bytes(b"changed content")
    os.utime(files[2], ns=(1, 1))
    with ScanState.open(db) as st:
        plan = st.plan(files, KEY)
        assert set(plan.todo) == {files[1], files[2]}
        assert len(plan.unchanged) == 3 and plan.unchanged_rows == 3
        # a new model identity rescans everything; so does force
        assert len(st.plan(files, run_key(["pkg-b"])).todo) == 5
        assert len(st.plan(files, KEY, force=True).todo) == 5


def test_rows_in_recording_order_no_duplicates_and_keep_scanned_at(tmp_path: Path) -> None:
    files = _files(tmp_path, 4)
    with ScanState.open(tmp_path / "s.sqlite") as st:
        st.plan(files, KEY)
        for p in reversed(files):  # recorded out of path order: output order is record order
            st.record([_res({**_row(p), "scanned_at": "2020-01-01T00:00:00Z"})], KEY)
        assert [r.path for r in st.rows()] == [str(p) for p in reversed(files)]
        assert st.last_seq == 4 and st.edits == 0  # appended only: outputs may append
        st.plan(files, KEY, force=True)
        st.record([_res(_row(files[0], score=0.9))], KEY)  # rescored: replaced, not added
        rows = list(st.rows())
        assert [r.path for r in rows] == [str(p) for p in [*reversed(files[1:]), files[0]]]
        assert rows[-1].score == 0.9 and rows[-1].scanned_at != "2020-01-01T00:00:00Z"
        assert rows[0].scanned_at == "2020-01-01T00:00:00Z"
        assert st.edits > 0  # a stored row changed: outputs holding it are rewritten
        assert [r.path for r in st.rows(after=4)] == [str(files[0])]


def test_version2_state_is_numbered_in_its_old_output_order(tmp_path: Path) -> None:
    import sqlite3

    db = tmp_path / "s.sqlite"
    files = _files(tmp_path, 3)
    with ScanState.open(db) as st:
        st.plan(files, KEY)
        for p in reversed(files):
            st.record([_res(_row(p))], KEY)
    conn = sqlite3.connect(db)  # make it look like a state written by the previous release
    conn.executescript(
        "DROP INDEX rows_seq; DROP TRIGGER rows_updated; DROP TRIGGER rows_deleted;"
        "ALTER TABLE rows DROP COLUMN seq; DELETE FROM meta WHERE key IN ('next_seq','edits');"
        "PRAGMA user_version=2;"
    )
    conn.close()
    with ScanState.open(db) as st:
        assert [r.path for r in st.rows()] == [str(p) for p in files]  # path order, as before
        assert st.last_seq == 3
        st.plan([tmp_path / "new.png"], KEY)
        st.record([_res(_row(tmp_path / "new.png"))], KEY)
        assert [r.path for r in st.rows(after=3)] == [str(tmp_path / "new.png")]


def test_multiframe_file_done_only_when_all_frames_recorded(tmp_path: Path) -> None:
    (f,) = _files(tmp_path, 1)
    db = tmp_path / "s.sqlite"
    with ScanState.open(db) as st:
        st.plan([f], KEY)
        st.record([_res(_row(f, 0), file_frames=3), _res(_row(f, 1), file_frames=3)], KEY)
    with ScanState.open(db) as st:  # "killed" before frame 2: the file must be planned again
        assert st.plan([f], KEY).todo == [f]
        st.record([_res(_row(f, i), file_frames=3) for i in range(3)], KEY)
    with ScanState.open(db) as st:
        assert st.plan([f], KEY).todo == []
        assert st.n_rows() == 3
        # the file now has one frame (became an error): stale frames are removed
        st.plan([f], KEY, force=True)
        st.record([_res(_row(f, 0, status="error"))], KEY)
        assert st.n_rows() == 1
        assert st.summary()["failed"] == 1


def test_arrays_round_trip(tmp_path: Path) -> None:
    (f,) = _files(tmp_path, 1)
    mp = np.random.default_rng(0).random((3, 2)).astype(np.float32)
    hm = np.linspace(0, 1, 64 * 48, dtype=np.float32).reshape(64, 48)
    with ScanState.open(tmp_path / "s.sqlite") as st:
        st.plan([f], KEY)
        row = _row(f)
        st.record([_res(row, member_probs=mp, heatmap=hm)], KEY)
        (stored,) = st.stored_rows()
        np.testing.assert_array_equal(stored.member_probs, mp)
        assert stored.heatmap.dtype == np.float16 and stored.heatmap.shape == (64, 48)
        np.testing.assert_allclose(stored.heatmap, hm, atol=1e-3)
        assert stored.row == ResultRow.from_dict(stored.row.as_dict())


def test_export_marks_follow_generation(tmp_path: Path) -> None:
    files = _files(tmp_path, 2)
    out = tmp_path / "results.csv"
    out.write_text("x")
    with ScanState.open(tmp_path / "s.sqlite") as st:
        assert st.needs_export("csv", out)
        st.mark_exported("csv")
        assert not st.needs_export("csv", out)
        st.plan(files, KEY)
        _record_all(st, files)
        assert st.needs_export("csv", out)
        st.mark_exported("csv")
        assert not st.needs_export("csv", out)
        assert st.needs_export("csv", tmp_path / "missing.csv")


def test_commit_is_atomic_per_batch(tmp_path: Path) -> None:
    files = _files(tmp_path, 3)
    db = tmp_path / "s.sqlite"
    with ScanState.open(db) as st:
        st.plan(files, KEY)
        bad = _res({"path": str(files[2]), "frame": 0, "status": "ok", "image_id": "x"})
        bad.member_probs = object()  # type: ignore[assignment]  # fails while encoding
        with pytest.raises((TypeError, ValueError)):
            st.record([_res(_row(files[0])), _res(_row(files[1])), bad], KEY)
        assert st.n_rows() == 0


def test_wal_and_full_sync(tmp_path: Path) -> None:
    with ScanState.open(tmp_path / "s.sqlite") as st:
        assert st._conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert st._conn.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL


def test_unusable_state_file_is_an_output_error(tmp_path: Path) -> None:
    bad = tmp_path / "s.sqlite"
    bad.write_bytes(b"this is not a database" * 100)
    with pytest.raises(OutputError):
        ScanState.open(bad)
    conn = sqlite3.connect(tmp_path / "future.sqlite")
    conn.execute("PRAGMA user_version=99")
    conn.close()
    with pytest.raises(OutputError, match="schema version 99"):
        ScanState.open(tmp_path / "future.sqlite")
