"""Who owns the sessions' checkpointer (graphs/runner.py): the CLI command, the UI or the batch
opens one saver for its lifetime and closes it; Postgres goes through a connection pool set up
once; opening failures name the checkpointer and keep their cause; an error from a session's
own work is never blamed on the checkpointer. Real SQLite, a real PostgreSQL server."""

from __future__ import annotations

import asyncio
import sqlite3
import threading

import pytest
from artloop.graphs.batch import read_prompts, run_batch
from artloop.graphs.runner import CheckpointerError, open_checkpointer, run_session
from artloop.store.trajectories import TrajectoryStore
from conftest import free_port, make_ctx
from fakes import ScriptedChat


def test_a_session_alone_closes_the_saver_it_opened(store, sd_tool):
    run_session(make_ctx(store, sd_tool, ScriptedChat(), max_iters=1), prompt="a red fox")
    # The last connection closed: SQLite folded its write-ahead log back into the file.
    assert (store.home / "checkpoints.sqlite").exists()
    assert not (store.home / "checkpoints.sqlite-wal").exists()


def test_the_owner_s_saver_is_shared_by_its_sessions_and_closed_when_it_ends(store, sd_tool):
    ctx = make_ctx(store, sd_tool, ScriptedChat(), max_iters=1)
    used = []

    def note(name: str, update: dict) -> None:  # what any code in a session thread gets
        with open_checkpointer(store) as saver:
            used.append(saver)

    with open_checkpointer(store) as owned:
        threads = [
            threading.Thread(
                target=run_session, args=(ctx,), kwargs={"prompt": f"a fox {i}", "on_update": note}
            )
            for i in range(2)
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert used and all(saver is owned for saver in used)
        assert {r["status"] for r in store.list_runs()} == {"max_iters"}
        owned.conn.execute("SELECT 1")  # still open between sessions
    with pytest.raises(sqlite3.ProgrammingError, match="closed"):
        owned.conn.execute("SELECT 1")
    assert not (store.home / "checkpoints.sqlite-wal").exists()


@pytest.mark.postgres
def test_a_batch_sets_postgres_up_once_and_leaves_no_connection(
    postgres_url, tmp_path, sd_tool, monkeypatch
):
    import psycopg
    from langgraph.checkpoint.postgres import PostgresSaver

    setups = []
    real_setup = PostgresSaver.setup
    monkeypatch.setattr(PostgresSaver, "setup", lambda self: (setups.append(1), real_setup(self)))

    def ours() -> int:  # the checkpointer's connections to the server now
        with psycopg.connect(postgres_url) as db:
            return db.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'artloop'"
            ).fetchone()[0]

    during = []
    store = TrajectoryStore(tmp_path / "home", checkpointer=postgres_url)
    ctx = make_ctx(store, sd_tool, ScriptedChat(), max_iters=1)
    prompts = tmp_path / "p.txt"
    prompts.write_text("a red fox\na lighthouse\na city street\n")
    result = asyncio.run(
        run_batch(
            ctx,
            read_prompts(prompts),
            name="pg",
            concurrency=3,
            on_progress=lambda r: during.append(ours()),
        )
    )
    assert (result.done, result.failed) == (3, 0), result.errors
    assert len(setups) == 1  # one pool for the batch, its tables checked once
    assert max(during) in range(1, 5)  # the pool's connections, while sessions run
    assert ours() == 0  # closed when the batch ended


def test_an_operational_error_from_the_session_is_not_blamed_on_the_checkpointer(
    postgres_url, tmp_path, sd_tool
):
    import psycopg

    store = TrajectoryStore(tmp_path / "home", checkpointer=postgres_url)
    # The session's own work (here its chat model) hits a database error of its own.
    boom = psycopg.OperationalError("server closed the connection unexpectedly")
    ctx = make_ctx(store, sd_tool, ScriptedChat(scripts={"Critique": [boom]}), max_iters=1)
    rid = "00000000000000cc"
    with pytest.raises(psycopg.OperationalError, match="server closed the connection"):
        run_session(ctx, prompt="a red fox", run_id=rid)
    run = store.get_run(rid)
    assert run["status"] == "failed"
    assert run["error"] == "OperationalError: server closed the connection unexpectedly"
    done = run_session(make_ctx(store, sd_tool, ScriptedChat(), max_iters=1), run_id=rid)
    assert done.status == "max_iters"  # the checkpointer was fine all along


def test_an_unreachable_checkpointer_keeps_its_cause(tmp_path):
    import psycopg

    port = free_port()  # nothing listens there
    bad = TrajectoryStore(
        tmp_path / "h", checkpointer=f"postgresql://me:s3cret@127.0.0.1:{port}/db"
    )
    with pytest.raises(CheckpointerError) as e, open_checkpointer(bad):
        pass
    assert isinstance(e.value.__cause__, psycopg.OperationalError)
    assert f"cannot use the checkpointer at postgresql://me:***@127.0.0.1:{port}/db" in str(e.value)
    assert "Connection refused" in str(e.value) and "s3cret" not in str(e.value)
    garbage = TrajectoryStore(tmp_path / "g")
    (garbage.home / "checkpoints.sqlite").write_bytes(b"not a database" * 100)
    with (
        pytest.raises(CheckpointerError, match=r"checkpoints.sqlite: file is not a database"),
        open_checkpointer(garbage),
    ):
        pass


@pytest.mark.parametrize("command", [["run", "a red fox"], ["batch", "PROMPTS"], ["serve", "ui"]])
def test_the_cli_refuses_an_unreachable_checkpointer_before_storing_anything(tmp_path, command):
    from artloop.cli import app
    from typer.testing import CliRunner

    cfg = tmp_path / "artloop.toml"
    cfg.write_text(
        f'home = "{tmp_path / "home"}"\ncheckpointer = "postgresql://me:s3cret@127.0.0.1:{free_port()}/db"\n'
        '[chat]\nbackend = "custom"\ncustom_class = "artloop.models.scripted:ScriptedChat"\n'
        '[diffusion]\nmodel = "tiny-sd"\nwidth = 64\nheight = 64\nsteps = 2\n[loop]\nmax_iters = 1\n'
    )
    (tmp_path / "p.txt").write_text("a red fox\n")
    args = [str(tmp_path / "p.txt") if a == "PROMPTS" else a for a in command]
    result = CliRunner().invoke(app, [*args, "--config", str(cfg)])
    message = " ".join(result.stderr.split())
    assert result.exit_code == 2, result.output
    assert "cannot use the checkpointer at postgresql://" in message and "refused" in message
    assert "Traceback" not in result.output and "s3cret" not in result.output
    assert TrajectoryStore(tmp_path / "home").list_runs() == []  # nothing half-made
