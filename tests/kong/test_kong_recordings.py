"""Real Kong 3.9.3 still answers what tests/vectors/kong-3.9.3.json recorded (the Admin API
double and the protocol driver are held to that file): its Status and Admin API answers to
pgwshard's calls, /config's 201 / 304 under check_hash, and the config Kong hands to
StartInstance (captured by a scripted plugin server on Kong's socket).
PGWSHARD_RECORD=1 rewrites the file from this Kong instead of comparing."""
from __future__ import annotations

import json
import os

import pytest

from kong_plugin_pgwshard.harness.processes import http_request, temp_dir, wait_until
from tests.support import kong_recordings as rec
from tests.support.scripted_plugin_server import ScriptedPluginServer, pdk_call, ret, started_instance

from .conftest import DblessGateway, raw_request

pytestmark = pytest.mark.kong


@pytest.fixture(scope="module")
def recorded(kong_bin) -> dict:
    directory = temp_dir("pgwshard-kong-recording-")
    os.chmod(directory, 0o711)
    socket_path = os.path.join(directory, "pgwshard.sock")
    # every request asks Kong for kong.request.get_path(): its answer comes back in the Step
    script = {"plugin.StartInstance": [started_instance()],
              "plugin.HandleEvent": [pdk_call("kong.request.get_path")], "plugin.Step": [ret()]}
    with ScriptedPluginServer(script, path=socket_path) as peer:
        world = DblessGateway(kong_bin, pushgateways=1, sync=False, plugin_socket=socket_path)
        try:
            live: dict = {}
            doc = json.dumps({"config": json.dumps(rec.config())}).encode()

            def post() -> int:
                return http_request(f"{world.kong.admin_url}/config?check_hash=1", "POST", doc, timeout=10,
                                    headers={"Content-Type": "application/json"})[0]
            live["config: new, then the same with check_hash"] = [post(), post()]
            wait_until(lambda: world.targets() != {}, 10, what="the recorded config applied")
            live.update(rec.play({"status": world.kong.status_url, "admin": world.kong.admin_url}))
            # a request starts the plugin instance: the config Kong hands over
            wait_until(lambda: http_request(world.kong.proxy_url + "/metrics/job/x", "PUT", b"x 1\n", timeout=10)[0]
                       and any(m == "plugin.StartInstance" and a[0]["Config"].find("admin_url") >= 0
                               and json.loads(a[0]["Config"]).get("admin_url") == rec.PLUGIN_CONFIG["admin_url"]
                               for m, a in peer.calls), 15, what="StartInstance with the recorded config")
            (call,) = [a for m, a in peer.calls if m == "plugin.StartInstance"
                       and json.loads(a[0]["Config"]).get("admin_url") == rec.PLUGIN_CONFIG["admin_url"]][-1:]
            live["StartInstance"] = {"Name": call[0]["Name"], "Config": rec.start_instance_config(call[0]["Config"])}
            paths = {}
            for raw in rec.RAW_PATHS:
                before = len(peer.calls)
                raw_request(world.kong.proxy_port, raw.encode())  # then to a recorded target: any answer
                steps = [a for m, a in peer.calls[before:] if m == "plugin.Step"]
                assert len(steps) == 1, (raw, peer.calls[before:])
                paths[raw] = steps[0][0]["Data"]
            live["get_path"] = paths
        finally:
            world.stop()
    return live


def test_kong_answers_what_the_recording_says(recorded):
    if os.environ.get("PGWSHARD_RECORD"):
        rec.RECORDING.write_text(json.dumps(recorded, indent=2, sort_keys=True) + "\n")
        pytest.skip(f"recorded {rec.RECORDING}")
    assert recorded == rec.load()
