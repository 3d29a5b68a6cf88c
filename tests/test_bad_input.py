"""Bad input through the real CLI: a store that is not a database or has a corrupt page, export
targets that cannot be written, homes that do not exist or are empty, prompts that would drive a
terminal. Each is one line naming the problem (exit 2; 1 for doctor's findings), no traceback
unless --debug, and nothing stored is changed."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
from pathlib import Path

from artloop.cli import app
from artloop.store.trajectories import TrajectoryStore
from typer.testing import CliRunner, Result

ARTLOOP = str(Path(sys.executable).with_name("artloop"))
RUN = "0" * 16  # the first run a_store writes


def cli(*args: str, **env: str) -> Result:
    """The CLI in this process (fast); an exception escaping a command shows as `exception`."""
    return CliRunner().invoke(app, list(args), env=env)


def artloop(*args: str, **env: str) -> subprocess.CompletedProcess:
    """The installed command in a fresh process: what a user's terminal shows."""
    return subprocess.run(
        [ARTLOOP, *args], capture_output=True, text=True, timeout=300, env={**os.environ, **env}
    )


def one_line(proc: Result | subprocess.CompletedProcess, code: int, message: str) -> None:
    """Exit `code`, no traceback, and stderr is one `error: ...` line holding `message`."""
    stderr = proc.stderr
    if isinstance(proc, Result):
        assert isinstance(proc.exception, SystemExit | None), repr(proc.exception)
    returncode = proc.exit_code if isinstance(proc, Result) else proc.returncode
    assert returncode == code, (returncode, stderr)
    assert "Traceback" not in stderr, stderr
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr
    assert message in lines[0], stderr


def a_store(home: Path, prompt: str = "a red fox", runs: int = 3) -> TrajectoryStore:
    """A real store of finished runs, written through the store's API (no models needed)."""
    store = TrajectoryStore(home)
    for r in range(runs):
        run_id = f"{r:016x}"
        store.create_run(run_id, prompt, {}, {}, "v1")
        for i in range(12):  # enough steps for their rows to fill many pages
            store.put_step(
                run_id,
                i,
                {
                    "iteration": i,
                    "prompt": prompt,
                    "params": {"seed": 0},
                    "image": None,
                    "timings": {},
                    "pad": "x" * 3000,
                },
            )
        store.finish_run(run_id, "max_iters", best_score=5.0)
    return store


def test_a_store_that_is_not_a_database(tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    (home / "artloop.sqlite").write_bytes(b"these bytes are not a database\n" * 100)
    before = (home / "artloop.sqlite").read_bytes()
    where = ["--home", str(home)]
    found = artloop("doctor", *where)  # a finding: exit 1, as for any broken store
    assert found.returncode == 1 and "Traceback" not in found.stderr, found.stderr
    assert "artloop.sqlite: not a readable SQLite database" in found.stdout
    one_line(artloop("list", *where), 2, "artloop.sqlite is not a readable SQLite database")
    for args in (
        ["list"],
        ["show", RUN],
        ["export", str(tmp_path / "out"), "--format", "raw"],
        ["session", "list"],
        ["session", "history", RUN],
    ):
        one_line(cli(*args, *where), 2, "artloop.sqlite is not a readable SQLite database")
    config = tmp_path / "scripted.toml"
    config.write_text(
        '[chat]\nbackend = "custom"\ncustom_class = "artloop.models.scripted:ScriptedChat"\n'
    )
    one_line(
        cli("run", "a fox", "--config", str(config), *where),
        2,
        "artloop.sqlite is not a readable SQLite database (file is not a database)",
    )
    assert (home / "artloop.sqlite").read_bytes() == before
    assert not (tmp_path / "out").exists()


def _corrupt_the_steps(store: TrajectoryStore) -> None:
    """Overwrite every page after the tables' root pages: the steps' rows (runs stay readable)."""
    with sqlite3.connect(store.db_path) as db:
        last_root = max(r[0] for r in db.execute("SELECT rootpage FROM sqlite_master"))
        size = db.execute("PRAGMA page_size").fetchone()[0]
    data = bytearray(store.db_path.read_bytes())
    for k in range(last_root, len(data) // size):  # the k-th page from 0 is page k + 1
        data[k * size : (k + 1) * size] = (b"\xff\x13 not a page " * size)[:size]
    store.db_path.write_bytes(bytes(data))


def test_a_corrupt_page(tmp_path):
    store = a_store(tmp_path / "home")
    _corrupt_the_steps(store)
    before = store.db_path.read_bytes()
    where = ["--home", str(store.home)]
    assert cli("list", *where).exit_code == 0  # the runs table is intact
    for args in (["show", RUN], ["export", str(tmp_path / "out"), "--format", "prompts"]):
        one_line(cli(*args, *where), 2, "(database disk image is malformed)")
    found = cli("doctor", *where)
    assert found.exit_code == 1 and found.exception.code == 1, found.output
    assert "error: artloop.sqlite:" in found.stdout
    assert store.db_path.read_bytes() == before and not (tmp_path / "out").exists()
    assert list(tmp_path.iterdir()) == [store.home]


def test_export_targets_that_cannot_be_written(tmp_path):
    store = a_store(tmp_path / "home")
    (tmp_path / "a-file").write_text("x")
    where = ["--home", str(store.home)]
    for target, message in (
        ("/sys/artloop-export", "cannot write to /sys: "),
        ("/proc/artloop-export", "cannot write to /proc: "),
        (str(tmp_path / "a-file" / "out"), "a-file is a file, not a directory"),
    ):
        one_line(cli("export", target, "--format", "prompts", *where), 2, message)
    assert (tmp_path / "a-file").read_text() == "x"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file", "home"]  # no temp dirs


def test_debug_shows_the_traceback(tmp_path):
    store = a_store(tmp_path / "home", runs=1)
    args = ["export", "/sys/artloop-export", "--format", "prompts", "--home", str(store.home)]
    plain = artloop(*args)
    one_line(plain, 2, "cannot write to /sys")
    for shown in (artloop("--debug", *args), artloop(*args, ARTLOOP_DEBUG="1")):
        assert shown.returncode == 2
        assert "Traceback (most recent call last)" in shown.stderr
        assert "PermissionError" in shown.stderr or "OSError" in shown.stderr, shown.stderr
        assert shown.stderr.strip().splitlines()[-1] == plain.stderr.strip()


READ_ONLY = (
    ["doctor"],
    ["list"],
    ["show", RUN],
    ["export", "{out}", "--format", "raw"],
    ["session", "list"],
    ["session", "show", RUN],
    ["session", "history", RUN],
)


def test_read_only_commands_never_create_a_home(tmp_path):
    missing = tmp_path / "mistyped"
    for args in READ_ONLY:
        args = [a.replace("{out}", str(tmp_path / "out")) for a in args]
        one_line(cli(*args, "--home", str(missing)), 2, f"no artloop home at {missing}")
    (tmp_path / "empty").mkdir()  # a directory, but no store in it: not "ok"
    one_line(cli("doctor", "--home", str(tmp_path / "empty")), 2, "holds no artloop store")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty"]
    assert not any((tmp_path / "empty").iterdir())


def test_an_empty_home_is_refused(tmp_path, monkeypatch):
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    for args in (
        ["list", "--home", ""],
        ["run", "a fox", "--home", ""],
        ["batch", "prompts.txt", "--home", ""],
        ["session", "list", "--home", ""],
    ):
        one_line(cli(*args), 2, "invalid config: home: is empty")
    one_line(cli("list", ARTLOOP_HOME=""), 2, "invalid config: home: is empty")
    assert list(cwd.iterdir()) == []  # nothing was written into the working directory


def test_a_home_under_tilde_is_the_users(tmp_path, monkeypatch):
    a_store(tmp_path / "h", runs=1)
    monkeypatch.chdir(tmp_path)
    listed = cli("list", "--home", "~/h", HOME=str(tmp_path))
    assert listed.exit_code == 0 and RUN in listed.stdout, listed.output
    assert not (tmp_path / "~").exists()


def test_prompts_cannot_drive_the_terminal(tmp_path):
    prompt = "a fox \x1b[2J\x1b[31mred\x1b[0m \u202eevil [/] [bold]x\x07"
    store = a_store(tmp_path / "home", prompt=prompt, runs=1)
    where = ["--home", str(store.home)]
    for args in (["list"], ["show", RUN]):
        shown = cli(*args, *where, COLUMNS="200")
        assert shown.exit_code == 0, shown.output
        assert not any(c in shown.stdout for c in "\x1b\u202e\x07"), repr(shown.stdout)
        assert "\\x1b[2J" in shown.stdout and "[/]" in shown.stdout, shown.stdout
    assert store.get_run(RUN)["prompt"] == prompt  # stored as given; only shown escaped


def test_overwrite_replaces_only_an_earlier_export(tmp_path):
    store = a_store(tmp_path / "home", runs=1)
    where = ["--format", "prompts", "--overwrite", "--home", str(store.home)]
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "thesis.tex").write_text("years of work")
    one_line(cli("export", str(mine), *where), 2, "is not an earlier artloop export")
    assert (mine / "thesis.tex").read_text() == "years of work"
    out = tmp_path / "out"
    assert cli("export", str(out), *where).exit_code == 0
    assert cli("export", str(out), *where).exit_code == 0  # an earlier export: replaced
    (out / "notes.txt").write_text("mine")
    one_line(cli("export", str(out), *where), 2, "holds notes.txt, which no artloop export writes")
    assert (out / "notes.txt").read_text() == "mine" and (out / "prompts.jsonl").is_file()


def test_doctor_reports_a_damaged_export_instead_of_crashing(tmp_path):
    store = a_store(tmp_path / "home", prompt="a fox\u2028in the snow", runs=2)
    where = ["--home", str(store.home)]
    for fmt in ("raw", "prompts"):
        assert cli("export", str(tmp_path / fmt), "--format", fmt, *where).exit_code == 0
        checked = cli("doctor", "--export", str(tmp_path / fmt))
        assert checked.exit_code == 0 and "ok" in checked.stdout, checked.output
    with (tmp_path / "raw" / "steps.jsonl").open("a") as f:
        f.write("{not json\n")
    (tmp_path / "prompts" / "data").mkdir()  # a truncated parquet file
    (tmp_path / "prompts" / "data" / "train-00000-of-00001.parquet").write_bytes(b"PAR1 garbage")
    for fmt, finding in (
        ("raw", "steps.jsonl:25: not a step record"),
        ("prompts", "train-00000-of-00001.parquet: not a readable parquet file"),
    ):
        checked = cli("doctor", "--export", str(tmp_path / fmt))
        assert checked.exit_code == 1 and checked.exception.code == 1, checked.output
        assert f"error: {finding}" in checked.stdout, checked.stdout


def test_an_unexpected_error_is_one_line_and_debug_shows_it(tmp_path, monkeypatch):
    """A fault no input causes (injected: a bug): exit 1, one line; --debug gives the traceback."""
    from artloop.store import doctor

    def broken(*args, **kwargs):
        raise RuntimeError("internal\nstate lost")

    monkeypatch.setattr(doctor, "check_store", broken)
    a_store(tmp_path / "home", runs=1)
    where = ["doctor", "--home", str(tmp_path / "home")]
    one_line(cli(*where), 1, "RuntimeError: internal state lost (--debug shows where)")
    shown = cli("--debug", *where)
    assert shown.exit_code == 1 and "Traceback (most recent call last)" in shown.stderr
    assert 'raise RuntimeError("internal\\nstate lost")' in shown.stderr
