"""The plugin's admin_token in real Kong 3.9.3, and the environment of the plugin server Kong starts.

README "The Admin API token": `admin_token: "{vault://env/...}"` is resolved by Kong (its env
vault reads Kong's own environment) before the config reaches the plugin server, and the Admin
API lists only the reference; unset, the plugin reads env KONG_ADMIN_TOKEN, which reaches a
plugin server Kong starts only through `nginx_main_env` (nginx workers keep TZ and the variables
`env` directives name). The plugin's admin_url points at a recording server here, which answers
the targets as Kong's Status API does and keeps the Kong-Admin-Token of every read.
"""
from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from kong_plugin_pgwshard.core.grouping import parse_push_path
from kong_plugin_pgwshard.harness.processes import http_request, wait_until

from .conftest import DblessGateway

pytestmark = pytest.mark.kong

VAULT_SECRET = "vault-s3cret-token"
ENV_SECRET = "env-s3cret-token"
REFERENCE = "{vault://env/pgwshard-test-admin-token}"  # Kong's env vault: PGWSHARD_TEST_ADMIN_TOKEN


class RecordingTargets:
    """GET /upstreams/<u>/targets answered with the given targets; each read's token kept."""

    def __init__(self, targets: list[str]):
        self.tokens: list[str | None] = []
        recorder = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - http.server's name
                recorder.tokens.append(self.headers.get("Kong-Admin-Token"))
                body = json.dumps({"data": [{"target": t, "weight": 100} for t in targets], "next": None}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture(scope="module")
def world(kong_bin):
    gateway = DblessGateway(
        kong_bin, sync=False, kong_settings={"nginx_main_env": "KONG_ADMIN_TOKEN"},
        kong_env={"PGWSHARD_TEST_ADMIN_TOKEN": VAULT_SECRET, "KONG_ADMIN_TOKEN": ENV_SECRET,
                  "PGWSHARD_TEST_NOT_NAMED": "1"})
    recorder = RecordingTargets([p.address for p in gateway.pgws])
    try:
        yield gateway, recorder
    finally:
        recorder.stop()
        gateway.stop()


def configure(gateway: DblessGateway, recorder: RecordingTargets, **plugin_config) -> None:
    doc = json.loads(json.dumps(gateway.declarative))
    (plugin,) = doc["services"][0]["plugins"]
    plugin["config"].update({"admin_url": recorder.url, "refresh_interval": 0.5, **plugin_config})
    plugin["config"] = {k: v for k, v in plugin["config"].items() if v is not None}
    status, body = gateway.post_config(doc)
    assert status == 201, body


def push_reaches_owner(gateway: DblessGateway, path: str) -> None:
    status, body = http_request(gateway.kong.proxy_url + path, "PUT", b"token_items 1\n", timeout=15)
    assert status == 200, body
    key = parse_push_path(path)
    assert gateway.holders(key) == [gateway.ring().owner(key).name]


def test_kong_resolves_a_vault_reference_before_the_plugin_server_sees_the_token(world):
    gateway, recorder = world
    configure(gateway, recorder, admin_token=REFERENCE)
    # the instance starts on the first request, and reads the targets with the token
    wait_until(lambda: http_request(gateway.kong.proxy_url + "/metrics/job/vault", "PUT", b"x 1\n", timeout=15)[0]
               == 200 and VAULT_SECRET in recorder.tokens, 20, what="a targets read with the resolved token")
    assert set(recorder.tokens[recorder.tokens.index(VAULT_SECRET):]) == {VAULT_SECRET}
    push_reaches_owner(gateway, "/metrics/job/vault/instance/a")
    # Kong's Admin API lists the reference, never the secret
    status, body = http_request(f"{gateway.kong.admin_url}/plugins")
    (plugin,) = [p for p in json.loads(body)["data"] if p["name"] == "pgwshard"]
    assert plugin["config"]["admin_token"] == REFERENCE
    assert VAULT_SECRET.encode() not in body
    assert VAULT_SECRET not in gateway.kong.error_log()


def test_kong_starts_the_plugin_server_with_only_the_variables_nginx_main_env_names(world):
    gateway, _ = world
    (pid,) = gateway.kong.plugin_server_pids()
    environ = gateway.kong.plugin_server_environ(pid)
    assert environ.get("KONG_ADMIN_TOKEN") == ENV_SECRET  # named by nginx_main_env
    assert "PGWSHARD_TEST_NOT_NAMED" not in environ and "PGWSHARD_TEST_ADMIN_TOKEN" not in environ
    assert "PATH" not in environ  # nginx keeps TZ and what `env` names, nothing else


def test_without_admin_token_the_plugin_reads_kong_admin_token_that_nginx_main_env_passes(world):
    gateway, recorder = world
    configure(gateway, recorder, admin_token=None)
    wait_until(lambda: http_request(gateway.kong.proxy_url + "/metrics/job/env", "PUT", b"x 1\n", timeout=15)[0]
               == 200 and recorder.tokens[-1] == ENV_SECRET, 20, what="a targets read with the environment's token")
    push_reaches_owner(gateway, "/metrics/job/env/instance/a")
