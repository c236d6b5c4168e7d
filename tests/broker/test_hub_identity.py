"""JupyterHub as the identity source, the parts that need no Hub: the verdict on what the Hub
answered about a token, the settings, and quota teams whose members are Hub groups.

The Hub itself answering (a real JupyterHub with real accounts, a revoked token, a group change,
the Hub down) is tests/system/hub.
"""

from __future__ import annotations

import asyncio

import dask
import pytest

from jupyter_gpu.broker.hub_identity import (
    HubIdentity,
    HubSettings,
    HubSettingsError,
    hub_settings_from_config,
)
from jupyter_gpu.broker.quotas import QuotaConfigError, parse_quotas
from jupyter_gpu.broker.settings import PoolConfigError, load_settings

pytest.importorskip("jupyterhub.services.auth")


def identity(**overrides) -> HubIdentity:
    settings = {
        "api_url": "http://127.0.0.1:1/hub/api",
        "service_token": None,
        "service_name": "jupyter-gpu",
        "scopes": ("access:services!service=jupyter-gpu",),
        "admin_scope": "custom:jupyter-gpu:admin",
        "cache_time": 60.0,
        "groups_refresh": 60.0,
        "timeout": 5.0,
    }
    settings.update(overrides)
    return HubIdentity(HubSettings(**settings))


def model(name="alice", scopes=("access:services!service=jupyter-gpu",)) -> dict:
    return {"kind": "user", "name": name, "admin": False, "groups": [], "scopes": list(scopes)}


def test_a_token_of_the_user_with_the_service_scope_is_accepted_with_its_groups():
    verdict = identity().judge("alice", {**model(), "groups": ["ml", "viz"]})
    assert verdict.error is None and not verdict.admin and verdict.groups == {"ml", "viz"}


def test_the_unfiltered_scope_holds_the_filtered_one():
    # a user role with access:services (every service) may use the pool's too
    assert identity().judge("alice", model(scopes=["access:services"])).error is None


def test_a_token_without_the_scope_is_refused_naming_the_scope_and_the_fix():
    verdict = identity().judge(
        "alice", model(scopes=["access:servers!server=alice/", "users:activity!user=alice"])
    )
    assert "access:services!service=jupyter-gpu" in verdict.error
    assert "server_token_scopes" in verdict.error
    # another service's access is not the pool's
    assert identity().judge("alice", model(scopes=["access:services!service=other"])).error


def test_a_revoked_token_and_a_token_of_someone_else_are_refused():
    assert "revoked" in identity().judge("alice", None).error
    stolen = identity().judge("alice", model(name="bob"))
    assert "belongs to user 'bob'" in stolen.error and not stolen.admin
    service = identity().judge("alice", {"kind": "service", "name": "alice", "scopes": []})
    assert "belongs to service" in service.error


def test_hub_admins_and_holders_of_the_admin_scope_are_the_pools_admins():
    assert identity().judge("alice", {**model(), "admin": True}).admin
    scoped = model(scopes=["access:services!service=jupyter-gpu", "custom:jupyter-gpu:admin"])
    assert identity().judge("alice", scoped).admin
    assert not identity(admin_scope=None).judge("alice", scoped).admin


def verify(user, token):
    async def go():
        hub = identity()
        try:
            return await hub.verify(user, token)
        finally:
            await hub.close()

    return asyncio.run(go())


def test_no_user_or_no_token_says_what_a_hub_kernel_has():
    verdict = verify("alice", None)
    assert "JUPYTERHUB_API_TOKEN" in verdict.error and "no token" in verdict.error
    assert "no user name" in verify(None, "t").error


def test_a_hub_that_does_not_answer_is_a_refusal_that_says_so():
    # port 1 on the loopback: nothing listens, the connection is refused at once
    verdict = verify("alice", "a-token")
    assert "did not answer" in verdict.error and "127.0.0.1:1" in verdict.error
    assert "Cells of the GPU sessions you hold go on" in verdict.error


def test_hub_settings_are_checked_before_the_pool_listens(tmp_path):
    with dask.config.set({"jupyter-gpu.hub.api-url": None}):
        assert hub_settings_from_config() is None
    with dask.config.set({"jupyter-gpu.hub.api-url": "http://hub:8081/"}):
        with pytest.raises(HubSettingsError, match="ending in /hub/api"):
            hub_settings_from_config()
    tokens = tmp_path / "tokens.json"
    with dask.config.set(
        {"jupyter-gpu.hub.api-url": "http://hub:8081/hub/api", "jupyter-gpu.token-file": tokens}
    ):
        with pytest.raises(HubSettingsError, match="identities one way"):
            hub_settings_from_config()
    with dask.config.set(
        {"jupyter-gpu.hub.api-url": "http://hub:8081/hub/api", "jupyter-gpu.hub.scopes": [""]}
    ):
        with pytest.raises(HubSettingsError, match="list of JupyterHub scopes"):
            hub_settings_from_config()
    with dask.config.set(
        {"jupyter-gpu.hub.api-url": "http://hub:8081/hub/api/", "jupyter-gpu.hub.cache-time": "5s"}
    ):
        settings = hub_settings_from_config()
    assert settings.api_url == "http://hub:8081/hub/api" and settings.cache_time == 5
    assert settings.scopes == ("access:services!service=jupyter-gpu",)


def test_teams_named_by_hub_groups_need_the_services_token(tmp_path):
    quotas = tmp_path / "quotas.yaml"
    quotas.write_text("teams:\n  ml: {guarantee: 1, hub-group: ml}\n")
    quotas.chmod(0o600)
    with dask.config.set(
        {
            "jupyter-gpu.hub.api-url": "http://hub:8081/hub/api",
            "jupyter-gpu.pool-config": str(quotas),
            "jupyter-gpu.hub.api-token-file": None,
        }
    ):
        with pytest.raises(PoolConfigError, match="no token of its own"):
            load_settings()
        token = tmp_path / "hub.token"
        token.write_text("service-secret\n")
        token.chmod(0o600)
        with dask.config.set({"jupyter-gpu.hub.api-token-file": str(token)}):
            settings = load_settings()
    assert settings.tokens.kind == "hub" and settings.tokens.settings.service_token == (
        "service-secret"
    )


def test_quota_teams_take_the_members_of_their_hub_groups_and_lose_who_left():
    quotas = parse_quotas(
        {
            "teams": {
                "ml": {"guarantee": 1.0, "hub-group": "ml-team"},
                "viz": {"guarantee": 0.5, "hub-group": "viz-team", "members": ["carol"]},
            },
            "users": {"bob": {"limit": 0.5}, "dave": {"team": "viz"}},
        }
    )
    assert quotas.hub_groups() == {"ml": "ml-team", "viz": "viz-team"}
    assert quotas.team_of("alice") == "default"
    changed = quotas.set_hub_members(
        {"ml-team": ["alice", "bob", "dave"], "viz-team": ["alice", "erin"], "other": ["frank"]}
    )
    assert changed
    # the first team of the file wins; the file's own placements (dave) stay; bob keeps his limit
    assert quotas.team_of("alice") == "ml" and quotas.team_of("erin") == "viz"
    assert quotas.team_of("bob") == "ml" and quotas.user_limit("bob") == 0.5
    assert quotas.team_of("dave") == "viz" and quotas.team_of("frank") == "default"
    assert quotas.teams["ml"].members == {"alice", "bob"}
    assert quotas.teams["viz"].members == {"carol", "dave", "erin"}
    assert not quotas.set_hub_members(
        {"ml-team": ["alice", "bob", "dave"], "viz-team": ["alice", "erin"]}
    )
    # bob and erin leave their groups in the Hub: at the next refresh they lose the teams' quotas
    assert quotas.set_hub_members({"ml-team": ["alice"], "viz-team": []})
    assert quotas.team_of("bob") == "default" and quotas.user_limit("bob") == 0.5
    assert quotas.team_of("erin") == "default" and "erin" not in quotas.users
    assert quotas.teams["ml"].members == {"alice"} and quotas.teams["viz"].members == {
        "carol",
        "dave",
    }


def test_a_hub_group_must_be_a_name():
    with pytest.raises(QuotaConfigError, match="teams.ml.hub-group: must be the name"):
        parse_quotas({"teams": {"ml": {"hub-group": ["ml"]}}})


def test_sessions_run_as_the_same_name_unless_the_administrator_maps_users_to_accounts():
    from jupyter_gpu.broker.identity import check_session_accounts, session_account

    assert session_account("alice") == "alice"
    with dask.config.set({"jupyter-gpu.session.accounts": "gpu-{user}"}):
        assert session_account("alice") == "gpu-alice"
    with dask.config.set({"jupyter-gpu.session.accounts": {"alice@example.org": "alice"}}):
        assert session_account("alice@example.org") == "alice"
        assert session_account("bob") == "bob"
    assert check_session_accounts(None) is None and check_session_accounts("gpu-{user}") is None
    assert "not be isolated" in check_session_accounts("gpu")
    assert "several users" in check_session_accounts({"a": "shared", "b": "shared"})
    assert "must be null" in check_session_accounts(["alice"])
