"""The PostgreSQL gallery store against a real throw-away cluster: schema, password, errors."""

from __future__ import annotations

import itertools

import psycopg
import pytest

from adaface_server.errors import FailedPrecondition, Unavailable
from adaface_server.gallery import changelog
from adaface_server.gallery import store as db
from adaface_server.gallery.postgres import SCHEMA_VERSION, PostgresStore

from .conftest import POSTGRES_PASSWORD

_names = itertools.count()


@pytest.fixture
def database(postgres, tmp_path) -> tuple[str, str]:
    """(URL without password, password file) of a fresh database."""
    name = f"unit{next(_names)}"
    with psycopg.connect(postgres.url, password=POSTGRES_PASSWORD, autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name}")
    password_file = tmp_path / "pw"
    password_file.write_text(POSTGRES_PASSWORD + "\n")
    return postgres.url.rsplit("/", 1)[0] + "/" + name, str(password_file)


def test_schema_is_created_once_and_a_newer_one_is_refused(database):
    url, password_file = database
    first, second = PostgresStore(url, password_file), PostgresStore(url, password_file)
    first.open()
    second.open()  # a second process: the migration is already there
    try:
        row = first.submit(
            lambda c: (db.insert_gallery(c, "g", "c" * 64, "m", 4, {}), None)
        ).result()
        seq = first.submit(lambda c: (changelog.append(c, row.gallery_id, "create"), None)).result()
        assert second.latest_seq() == seq == 1  # committed through one, seen through the other
        with second.snapshot() as conn:
            assert db.gallery_row(conn, row.gallery_id).name == "g"
            version = conn.execute("SELECT value FROM meta WHERE key = 'schema_version'")
            assert version.fetchone()[0] == str(SCHEMA_VERSION)
        first.submit(
            lambda c: (c.execute("UPDATE meta SET value = '99' WHERE key = 'schema_version'"), None)
        ).result()
    finally:
        second.close()
        first.close()
    with pytest.raises(FailedPrecondition, match="schema version 99, newer than this server"):
        PostgresStore(url, password_file).open()


def test_a_wrong_password_is_unavailable_naming_host_and_port_only(database, tmp_path, postgres):
    url, _ = database
    wrong = tmp_path / "wrong"
    wrong.write_text("not-the-password-77\n")
    with pytest.raises(Unavailable) as err:
        PostgresStore(url, str(wrong)).open()
    message = str(err.value)
    assert f"127.0.0.1:{postgres.port}" in message
    assert "not-the-password-77" not in message
    assert POSTGRES_PASSWORD not in message
