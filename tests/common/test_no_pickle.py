"""The pool's processes read no pickles from the network (``common/no_pickle.py``).

Each attack sends a value whose unpickling would create a file: the file must not appear. The
messages are made by Dask's own ``dumps`` (what any peer sends), read by the replacement ``loads``
and, over a real Dask server in this process, by the comm itself.
"""

from __future__ import annotations

import asyncio
import os

import pytest
from distributed.core import Server, error_message, rpc
from distributed.protocol import Serialize, ToPickle, dumps, to_serialize
from distributed.protocol.serialize import Serialized, serialize

from jupyter_gpu.common import no_pickle
from jupyter_gpu.common.refusals import NotAuthorized, NotYours


class Planted:
    """Unpickling it creates ``path``: the proof that a pickle ran."""

    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


@pytest.fixture
def planted(tmp_path):
    path = str(tmp_path / "ran")
    yield Planted(path), path
    assert not os.path.exists(path), "a pickle from the network ran"


@pytest.mark.parametrize("deserialize", [True, False])
def test_a_pickled_sub_frame_is_refused_whether_or_not_the_comm_deserializes(planted, deserialize):
    obj, _ = planted
    with pytest.raises(NotAuthorized, match="reads no pickled data"):
        no_pickle.loads(dumps({"op": "identity", "junk": ToPickle(obj)}), deserialize=deserialize)


def test_a_serialized_pickle_is_refused_when_deserialized_and_kept_as_frames_when_not(planted):
    obj, _ = planted
    frames = dumps({"op": "execute", "x": Serialize(obj)})
    with pytest.raises(NotAuthorized):
        no_pickle.loads(frames, deserialize=True)
    # a session's inputs: left as frames, for the executor to rebuild after the secret check
    kept = no_pickle.loads(frames, deserialize=False)
    assert isinstance(kept["x"], Serialized) and kept["x"].header["serializer"] == "pickle"


def test_a_dask_header_naming_another_type_than_bytes_is_refused(planted):
    """The ``dask`` family unpickles the type its header names first: only bytes may be named."""
    import pickle

    obj, _ = planted
    header, payload = serialize(b"data", serializers=["dask"])
    assert header["serializer"] == "dask"
    header["type-serialized"] = pickle.dumps(obj)
    frames = dumps({"op": "x", "y": Serialized(header, payload)})
    with pytest.raises(NotAuthorized):
        no_pickle.loads(frames, deserialize=True)


def test_plain_data_bytes_and_error_replies_still_read():
    reply = no_pickle.loads(
        dumps({"a": 1, "b": [1, "x", None], "c": Serialize(b"raw"), "d": {"e": 2.5}})
    )
    assert reply == {"a": 1, "b": (1, "x", None), "c": b"raw", "d": {"e": 2.5}}
    # an error reply: its exception travels pickled (as bytes); it is rebuilt from its text
    message = no_pickle.loads(dumps(error_message(NotYours("L1 belongs to bob"))))
    typ, exc, tb = no_pickle.clean_exception(**message)
    assert typ is NotYours and str(exc) == "L1 belongs to bob" and tb is None
    _, other, _ = no_pickle.clean_exception(**no_pickle.loads(dumps(error_message(KeyError("k")))))
    assert type(other) is Exception and "KeyError" in str(other)


def test_a_collection_of_plain_values_reads_and_one_of_pickles_does_not(planted):
    obj, _ = planted
    assert no_pickle.loads(dumps({"x": to_serialize((b"a", b"b"))})) == {"x": (b"a", b"b")}
    with pytest.raises(NotAuthorized):
        no_pickle.loads(dumps({"x": to_serialize([b"a", obj])}))


@pytest.mark.inprocess
def test_a_real_server_answers_a_pickle_with_a_refusal_and_keeps_serving(planted):
    """Over a real comm: the handler never runs, the caller gets the refusal, the server goes on."""
    asyncio.run(_serve_and_attack(planted[0]))
    assert not no_pickle.installed()


async def _serve_and_attack(obj: Planted) -> None:
    ran = []

    def handler(junk=None):
        ran.append(junk)
        return "ok"

    with no_pickle.refusing_pickles():
        server = Server({"handler": handler})
        await server.listen("tcp://127.0.0.1:0")
        try:
            async with rpc(server.address) as r:
                with pytest.raises(NotAuthorized, match="reads no pickled data"):
                    await r.handler(junk=ToPickle(obj))
                with pytest.raises(NotAuthorized):
                    await r.handler(junk=Serialize(obj))
                assert ran == []
                assert await r.handler(junk="plain") == "ok"
        finally:
            server.stop()
