"""Every panel route requires a logged-in Jupyter user: it can start, scale and cancel in the user's
name."""

from __future__ import annotations

import json

import pytest
import tornado.web
from tornado.httpclient import HTTPClientError
from tornado.websocket import WebSocketHandler

pytestmark = pytest.mark.integration  # a real Jupyter server with the routes

from jupyter_gpu.labext.handlers import handler_classes

HTTP_VERBS = ("get", "head", "post", "put", "patch", "delete", "options")


# Every function that tornado.web.authenticated returns runs this one code object (functools.wraps
# copies names and docstrings, so the name cannot tell a wrapper from the bare method; the code
# can).
_AUTHENTICATED_CODE = tornado.web.authenticated(lambda self: None).__code__


def _is_authenticated(method) -> bool:
    """True if ``method`` is the wrapper that ``tornado.web.authenticated`` makes."""
    return getattr(method, "__code__", None) is _AUTHENTICATED_CODE


def _own_verbs(handler: type) -> list[str]:
    """HTTP verb methods that this handler (or one of our base classes) defines rather than
    tornado's defaults, which answer 405 and so need no login."""
    verbs = []
    for verb in HTTP_VERBS:
        method = getattr(handler, verb)
        if method is getattr(tornado.web.RequestHandler, verb):
            continue
        if verb == "head" or verb == "options":
            owner = next(k for k in handler.__mro__ if verb in vars(k))
            if owner.__module__.startswith(("jupyter_server.", "tornado.")):
                continue  # jupyter_server's own CORS preflight / HEAD, no state change
        verbs.append(verb)
    return verbs


def test_every_verb_of_every_route_is_authenticated():
    routes = handler_classes()
    assert {pattern for pattern, _ in routes} == {
        "api/snapshot",
        "api/pool",
        "api/scale",
        r"api/cancel/(?P<item_id>[^/]+)",
        "api/stream",
    }
    unwrapped = []
    for pattern, handler in routes:
        verbs = _own_verbs(handler)
        assert verbs, f"{pattern}: no verb handled"
        unwrapped += [
            f"{handler.__name__}.{verb} ({pattern})"
            for verb in verbs
            if not _is_authenticated(getattr(handler, verb))
        ]
    assert not unwrapped, f"not wrapped by tornado.web.authenticated: {unwrapped}"


def test_the_check_catches_an_unwrapped_verb():
    """The enumeration above must fail for a handler that forgot the decorator."""

    class Forgetful(tornado.web.RequestHandler):
        async def post(self):
            pass

    assert _own_verbs(Forgetful) == ["post"]
    assert not _is_authenticated(Forgetful.post)


@pytest.fixture
def no_token(jp_serverapp):
    """Headers that override pytest-jupyter's token header with nothing."""
    return {"Authorization": ""}


@pytest.mark.parametrize(
    ("method", "parts", "body"),
    [
        ("GET", ("api", "snapshot"), None),
        ("POST", ("api", "pool"), b""),
        ("POST", ("api", "scale"), json.dumps({"n": 1})),
        ("POST", ("api", "cancel", "R1"), b""),
    ],
)
async def test_requests_without_token_are_refused(jp_fetch, no_token, method, parts, body):
    with pytest.raises(HTTPClientError) as err:
        await jp_fetch("jupyter-gpu", *parts, method=method, body=body, headers=no_token)
    assert err.value.code == 403


async def test_websocket_without_token_is_refused(jp_ws_fetch, no_token):
    with pytest.raises(HTTPClientError) as err:
        await jp_ws_fetch("jupyter-gpu", "api", "stream", headers=no_token)
    assert err.value.code == 403


async def test_requests_with_token_are_served(jp_fetch):
    response = await jp_fetch("jupyter-gpu", "api", "snapshot")
    assert response.code == 200


def test_stream_handler_is_a_websocket():
    handlers = dict(handler_classes())
    assert issubclass(handlers["api/stream"], WebSocketHandler)
