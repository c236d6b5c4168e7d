"""Bad pool configuration is refused before the pool listens, naming the file, the line and the fix.

Bugs fixed: 10 of 14 malformed quota files raised inside the Dask preload, yet the scheduler printed
its banner and served without a broker (every request then failed with ``KeyError: 'gpu_request'``);
a NaN guarantee, ``members: alice`` as text and unknown keys were accepted silently; broken token
files made every request fail with an internal error.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from jupyter_gpu.broker.identity import TokenFileError, TokenStore
from jupyter_gpu.broker.quotas import QuotaConfigError, load_quotas
from tests.support.service_account import ENV as SERVICE_ENV
from tests.support.service_account import give, service_account
from tests.support.services import free_port

BAD_QUOTAS = [
    ("teams:\n  ml:\n    guarantee: .nan\n", 3, "not a number of GPUs"),
    ("teams:\n  ml:\n    guarantee: 1\n    members: alice\n", 4, "must be a list of user names"),
    ("teams:\n  ml:\n    guarantee: 1\n    gaurantee: 2\n", 2, "unknown setting(s) gaurantee"),
    ("half-life: 1h\nreserve_after: 10s\n", None, "unknown setting(s) reserve_after"),
    ("teams:\n  ml: {guarantee: -1}\n", 2, "must be >= 0"),
    ("teams:\n  ml: {guarantee: 2, limit: 1}\n", 2, "below its guarantee"),
    ("teams:\n  ml: {guarantee: 1, priority: high}\n", 2, "not a whole number"),
    ("teams: [ml, viz]\n", 1, "must be a mapping"),
    ("users:\n  bob: {limit: .inf}\n", 2, "finite number"),
    ("users:\n  bob: {team: [ml]}\n", 2, "must be a team name"),
    ("idle-timeout: forever\n", 1, "not a duration"),
    ("suspend-idle-after: -5s\n", 1, "not a duration"),
    ("teams:\n  a: {members: [x]}\n  b: {members: [x]}\n", 3, "member of two teams"),
    ("- just\n- a list\n", None, "must be a mapping"),
    ("teams: {ml: {guarantee: 1}\n", None, "not valid YAML"),
]


@pytest.mark.parametrize("text, line, message", BAD_QUOTAS)
def test_a_malformed_quota_file_names_the_file_the_line_and_the_fix(tmp_path, text, line, message):
    path = tmp_path / "pool.yaml"
    path.write_text(text)
    with pytest.raises(QuotaConfigError) as err:
        load_quotas(str(path))
    assert str(path) in str(err.value) and message in str(err.value), str(err.value)
    if line is not None:
        assert f"line {line}:" in str(err.value), str(err.value)


def test_a_toml_quota_file_names_the_line_too(tmp_path):
    path = tmp_path / "pool.toml"
    path.write_text('[teams.ml]\nguarantee = 1\nmembers = "alice"\n')
    with pytest.raises(QuotaConfigError, match=r"line 3: teams\.ml\.members: must be a list"):
        load_quotas(str(path))


def test_a_missing_quota_file_says_how_to_fix_it(tmp_path):
    with pytest.raises(QuotaConfigError, match="cannot read the pool's quota file .* Fix the path"):
        load_quotas(str(tmp_path / "nowhere.yaml"))


@pytest.fixture
def pool_files(tmp_path):
    """Where a test puts the pool's files, and how ``pool up`` is run on them: run as root, the
    folder is a fresh service account's (pool up gives root up for it before it reads them)."""
    if os.geteuid() != 0:
        yield tmp_path, lambda env: _pool_up(tmp_path, env)
        return
    with service_account() as entry:
        folder = Path(tempfile.mkdtemp(prefix="jgpusvc-settings-", dir="/var/tmp"))
        try:

            def run(env: dict[str, str]) -> subprocess.CompletedProcess:
                give(entry, folder)
                return _pool_up(folder, {**env, SERVICE_ENV: entry.pw_name})

            yield folder, run
        finally:
            shutil.rmtree(folder, ignore_errors=True)


def _pool_up(folder, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "jupyter_gpu.cli", "pool", "up", "--port", str(free_port())],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=60,
        cwd=folder,
    )


@pytest.mark.integration
def test_pool_up_exits_non_zero_on_a_bad_quota_file_before_listening(pool_files):
    folder, pool_up = pool_files
    (folder / "pool.yaml").write_text("teams:\n  ml:\n    guarantee: 1\n    members: alice\n")
    done = pool_up({"DASK_JUPYTER_GPU__POOL_CONFIG": str(folder / "pool.yaml")})
    assert done.returncode == 1, done.stdout + done.stderr
    assert f"{folder / 'pool.yaml'}, line 4: teams.ml.members: must be a list" in done.stderr
    assert "scheduler at" not in done.stdout  # it never listened


@pytest.mark.integration
@pytest.mark.parametrize(
    "content, message",
    [
        (None, "does not exist. Create it with `jupyter-gpu token create"),
        ("{not json", "is not JSON"),
        ('{"people": {}}', 'has no "users" mapping'),
        ('{"users": {"alice": {"hash": "00"}}}', "lacks a salt and a SHA-256 hash"),
        ('{"users": {"alice": "secret"}}', "lacks a salt and a SHA-256 hash"),
    ],
)
def test_pool_up_exits_non_zero_on_a_bad_token_file(pool_files, content, message):
    folder, pool_up = pool_files
    path = folder / "tokens.json"
    if content is not None:
        path.write_text(content)
    done = pool_up({"DASK_JUPYTER_GPU__TOKEN_FILE": str(path)})
    assert done.returncode == 1, done.stdout + done.stderr
    assert str(path) in done.stderr and message in done.stderr, done.stderr


@pytest.mark.integration
def test_a_dask_scheduler_with_the_broker_preloaded_exits_on_bad_config(tmp_path):
    """``dask scheduler --preload jupyter_gpu.broker.plugin`` must not serve without its broker."""
    (tmp_path / "pool.yaml").write_text("teams:\n  ml: {guarantee: .nan}\n")
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "distributed.cli.dask_scheduler",
            "--port",
            str(free_port()),
            "--no-dashboard",
            "--preload",
            "jupyter_gpu.broker.plugin",
        ],
        env={**os.environ, "DASK_JUPYTER_GPU__POOL_CONFIG": str(tmp_path / "pool.yaml")},
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
    )
    assert done.returncode == 1, done.stderr[-2000:]
    assert "the broker cannot start" in done.stderr and "not a number of GPUs" in done.stderr


def test_a_token_file_that_turns_bad_while_running_keeps_the_last_good_copy(tmp_path, caplog):
    caplog.set_level(logging.ERROR, logger="jupyter_gpu.broker.identity")
    path = tmp_path / "tokens.json"
    store = TokenStore(str(path))
    alice = store.create("alice")
    assert store.validate() == 1 and store.check("alice", alice) is None
    path.write_text('{"users": {"alice": ')  # an editor's half-written save
    assert store.check("alice", alice) is None  # still accepted: the last good copy
    assert "not JSON" in caplog.text and "keeping the last good copy" in caplog.text
    bob = TokenStore(str(path)).create  # fixing the file (a new token for bob) takes effect at once
    with pytest.raises(TokenFileError):
        # create refuses to overwrite a file it cannot read (it would lose alice's token)
        bob("bob")
    path.write_text(json.dumps({"users": {}}))
    bob_token = TokenStore(str(path)).create("bob")
    assert store.check(
        "bob", bob_token
    ) is None and "does not know the user 'alice'" in store.check("alice", alice)


def test_a_token_file_unreadable_from_the_start_refuses_clearly(tmp_path):
    path = tmp_path / "tokens.json"
    path.write_text("garbage")
    message = TokenStore(str(path)).check("alice", "x")
    assert "token file is unreadable" in message and "Ask the pool's admin" in message
