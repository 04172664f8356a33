"""The protocol driver fails where Kong 3.9.3 does (rpc/mp_rpc.lua), so that tests run through it
meet Kong's behaviour and not an easier one: an answer that never began is "no data" (the request
goes on without the plugin), an answer cut off inside is a decoder error (500)."""
from __future__ import annotations

import msgpack
import pytest

from kong_plugin_pgwshard.harness.kong_rpc import KongPlugin, KongRPC, Request
from kong_plugin_pgwshard.plugin.handler import KONG_SCHEMA
from tests.support.scripted_plugin_server import Raw, ScriptedPluginServer, started_instance

UNEXPECTED = (500, {"message": "An unexpected error occurred"})


@pytest.mark.parametrize("answer, exit", [
    (Raw(b""), None),                                   # closed before answering: "no data"
    (Raw(msgpack.packb([2, "serverPid", 1])), None),    # a notification, then closed: "no data"
    (Raw(msgpack.packb([1, 2, None, {"EventId": 1, "Data": "ret"}])[:5]), UNEXPECTED),  # cut off
], ids=["no-data", "notification-then-nothing", "truncated"])
def test_the_driver_fails_a_handle_event_answer_as_kongs_decoder_does(answer, exit):
    script = {"plugin.StartInstance": [started_instance()], "plugin.HandleEvent": [answer]}
    with ScriptedPluginServer(script) as peer:
        rpc = KongRPC(peer.path, timeout=2)
        try:
            request = KongPlugin(rpc, KONG_SCHEMA, {"nodes": ["127.0.0.1:9091"]}).access(Request("/metrics/job/x"))
        finally:
            rpc.close()
    assert request.exit == exit
    assert request.target is None and request.logs and request.logs[-1][0] == "err"


def test_the_driver_passes_over_a_notification_before_the_answer():
    answer = msgpack.packb([2, "serverPid", 1]) + msgpack.packb([1, 1, None, started_instance(9)])
    with ScriptedPluginServer({"plugin.StartInstance": [Raw(answer)]}) as peer:
        rpc = KongRPC(peer.path, timeout=2)
        try:
            assert rpc.start_instance("pgwshard", {}) == 9
        finally:
            rpc.close()


def test_the_driver_hands_start_instance_the_config_kong_3_9_3_recorded():
    """kong_config() against the Config real Kong sent (tests/vectors/kong-3.9.3.json, held to Kong
    by tests/kong/test_kong_recordings.py): defaults filled, unset fields absent, the injected keys."""
    import uuid

    from kong_plugin_pgwshard.harness.kong_rpc import kong_config
    from tests.support import kong_recordings as rec

    sent = kong_config(KONG_SCHEMA, rec.PLUGIN_CONFIG, plugin_id=str(uuid.uuid4()), seq=3,
                       service_id=str(uuid.uuid4()))
    assert rec.normalize(sent) == rec.load()["StartInstance"]["Config"]
