"""A real Prometheus (Debian's 2.42) scraping pushgateways (and pgwshard-sync) every second.

Targets come from a file_sd file that set_targets() rewrites, so a test can scale out or in.
Each target carries a `pushgateway` label with its address, as monitoring/README.md asks of a
production scrape config: scraped with honor_labels: true, a group's own job/instance labels
win, and `pushgateway` still tells which instance a series came from. `sync_targets` are
pgwshard-sync metrics endpoints; `rule_files` are loaded (monitoring/pgwshard.rules.yml).
"""
from __future__ import annotations

import json
import os
import shutil
import urllib.parse
from collections.abc import Sequence
from pathlib import Path

from .processes import ManagedProcess, free_port, http_get, temp_dir, wait_until

_CONFIG = """\
global:
  scrape_interval: 1s
  scrape_timeout: 900ms
  evaluation_interval: 1s
rule_files: {rule_files}
scrape_configs:
  - job_name: pushgateways
    honor_labels: true
    file_sd_configs:
      - files: [{targets}]
        refresh_interval: 1s
  - job_name: pgwshard-sync
    static_configs:
      - targets: {sync_targets}
"""


class Prometheus(ManagedProcess):
    """Prometheus on a free loopback port with a temporary storage dir."""

    BINARY = "prometheus"

    def __init__(self, targets: Sequence[str] = (), port: int | None = None, sync_targets: Sequence[str] = (),
                 rule_files: Sequence[str] = ()):
        self.port = port or free_port()
        self.dir = Path(temp_dir("pgwshard-prometheus-"))
        self.targets_file = self.dir / "targets.json"
        self.set_targets(list(targets))
        config = self.dir / "prometheus.yml"
        config.write_text(_CONFIG.format(targets=json.dumps(str(self.targets_file)),
                                         sync_targets=json.dumps(list(sync_targets)),
                                         rule_files=json.dumps([str(Path(f).resolve()) for f in rule_files])))
        binary = shutil.which(self.BINARY) or "/usr/bin/prometheus"
        super().__init__(f"prometheus-{self.port}", [
            binary, f"--config.file={config}", f"--storage.tsdb.path={self.dir / 'data'}",
            f"--web.listen-address=127.0.0.1:{self.port}", "--log.level=warn",
            "--storage.tsdb.retention.time=1h",
        ])

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> Prometheus:
        super().start()
        wait_until(lambda: http_get(self.url + "/-/ready")[0] == 200, 30, what=f"{self.name} ready")
        return self

    def set_targets(self, addresses: list[str]) -> None:
        """Scrape exactly these host:port addresses (picked up within about a second)."""
        entries = [{"targets": [a], "labels": {"pushgateway": a}} for a in addresses]
        tmp = self.targets_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(entries))
        os.replace(tmp, self.targets_file)  # atomic, so Prometheus never reads half a file

    def query(self, expr: str) -> list[dict]:
        """Run an instant query; returns the result vector (raises on an error answer)."""
        status, body = http_get(self.url + "/api/v1/query?" + urllib.parse.urlencode({"query": expr}))
        answer = json.loads(body)
        if status != 200 or answer.get("status") != "success":
            raise RuntimeError(f"query {expr!r} failed: {status} {body[:300]!r}")
        return answer["data"]["result"]

    def scraped(self, address: str) -> bool:
        """True once the target at address has been scraped successfully at least once."""
        result = self.query(f'up{{pushgateway="{address}"}}')
        return bool(result) and result[0]["value"][1] == "1"
