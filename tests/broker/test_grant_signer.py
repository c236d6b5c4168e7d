"""``broker/grant_signer.py``: the grant the broker signs for a session names the OS account the
broker decided it runs as (the pool user mapped by ``jupyter-gpu.session.accounts``, issue 23), so
the launcher, which takes the account from the grant alone, runs the session there; and a grant
another key signed, or one changed after it was signed, is refused.
"""

from __future__ import annotations

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from jupyter_gpu.broker.grant_signer import grant_for
from jupyter_gpu.broker.model import Allocation, Lease
from jupyter_gpu.common import grants


def lease() -> Lease:
    return Lease(
        id="L7",
        request="R7",
        user="alice@hub",
        kernel="k",
        client=None,
        worker="tcp://10.0.0.9:4000",
        allocations=[Allocation(gpu="tcp://10.0.0.9:4000#1", index=1, bytes=2**30)],
        fraction=0.1,
    )


def test_a_grant_names_the_account_the_broker_mapped_the_user_to():
    key = Ed25519PrivateKey.generate()
    as_account = grants.verify(grant_for(lease(), key, "gpu-alice"), key.public_key())
    assert as_account["user"] == "gpu-alice" and as_account["as_user"] is True
    assert (as_account["lease"], as_account["worker"], as_account["gpus"]) == (
        "L7",
        "tcp://10.0.0.9:4000",
        [1],
    )
    # a pool that does not isolate its users: the service account runs it, the user is a record
    as_service = grants.verify(grant_for(lease(), key, None), key.public_key())
    assert as_service["user"] == "alice@hub" and as_service["as_user"] is False


def test_a_grant_changed_or_signed_by_another_key_is_refused():
    key = Ed25519PrivateKey.generate()
    text = grant_for(lease(), key, "gpu-alice")
    with pytest.raises(grants.BadGrant, match="not the broker's"):
        grants.verify(text, Ed25519PrivateKey.generate().public_key())
    payload, signature = text.split(".")
    forged = grants.payload_bytes({**grants.verify(text, key.public_key()), "user": "root"})
    with pytest.raises(grants.BadGrant, match="not the broker's"):
        grants.verify(f"{grants._b64(forged)}.{signature}", key.public_key())
    with pytest.raises(grants.BadGrant, match="not a signed grant"):
        grants.verify(payload, key.public_key())
