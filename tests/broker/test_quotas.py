import pytest

from jupyter_gpu.broker.quotas import (
    QuotaConfigError,
    load_quotas,
    parse_quotas,
    quotas_from_config,
)


def test_yaml_teams_users_and_defaults(tmp_path):
    path = tmp_path / "pool.yaml"
    path.write_text("""
default-team: guests
half-life: 30m
teams:
  ml: {guarantee: 2.0, limit: 3, priority: 10, members: [alice, bob]}
  viz: {guarantee: 0.5, members: [carol]}
users:
  bob: {limit: 1.0}
  dave: {guarantee: 0.25}
""")
    q = load_quotas(str(path))
    assert q.configured and q.half_life == 1800
    assert q.team_of("alice") == "ml" and q.team_of("bob") == "ml" and q.team_of("carol") == "viz"
    # unknown: the default team
    assert q.team_of("mallory") == "guests" and q.team("guests").guarantee == 0
    assert q.user_limit("bob") == 1.0 and q.user_limit("alice") is None
    # a user's own guarantee
    assert q.team("dave").guarantee == 0.25 and q.team_of("dave") == "dave"
    assert q.priority("alice") == 10 and q.team("ml").limit == 3
    assert q.total_guarantee() == pytest.approx(2.75)


def test_toml(tmp_path):
    path = tmp_path / "pool.toml"
    path.write_text('[teams.ml]\nguarantee = 1.5\nmembers = ["alice"]\n')
    q = load_quotas(str(path))
    assert q.team("ml").guarantee == 1.5 and q.team_of("alice") == "ml"


@pytest.mark.parametrize(
    "data, message",
    [
        ({"teams": {"ml": {"guarantee": 2, "limit": 1}}}, "below its guarantee"),
        ({"teams": {"ml": {"guarantee": "lots"}}}, "not a number of GPUs"),
        ({"teams": {"a": {"members": ["x"]}, "b": {"members": ["x"]}}}, "member of two teams"),
        ({"half-life": "soon"}, "not a duration"),
        ({"suspend-idle-after": "whenever"}, "suspend-idle-after: 'whenever' is not a duration"),
    ],
)
def test_bad_config_names_the_entry(data, message):
    with pytest.raises(QuotaConfigError, match=message):
        parse_quotas(data, source="pool.yaml")


def test_no_config_means_no_quotas():
    import dask

    with dask.config.set({"jupyter-gpu.pool-config": None}):
        q = quotas_from_config()
    assert not q.configured and q.team_of("anyone") == "default"


def test_suspend_idle_after_defaults_to_a_minute_and_can_be_zero_or_off():
    assert parse_quotas({}).suspend_idle_after == 60.0
    assert parse_quotas({"suspend-idle-after": "0s"}).suspend_idle_after == 0.0
    assert parse_quotas({"suspend-idle-after": None}).suspend_idle_after is None
    assert parse_quotas({"suspend-idle-after": "2m"}).suspend_idle_after == 120.0
