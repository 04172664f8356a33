"""monitoring/pgwshard.rules.yml: valid for promtool, and every alert unit-tested both ways."""
from __future__ import annotations

import shutil
import subprocess

import pytest
import yaml

from tests.support import REPO

MONITORING = REPO / "monitoring"
RULE_FILES = [MONITORING / "pgwshard.rules.yml", MONITORING / "push-thresholds.example.yml"]
RULE_TESTS = MONITORING / "tests" / "pgwshard.rules.test.yml"


def promtool(*args: str) -> subprocess.CompletedProcess:
    binary = shutil.which("promtool") or "/usr/bin/promtool"  # Debian's prometheus package
    return subprocess.run([binary, *args], capture_output=True, text=True, timeout=120, cwd=REPO)


def alerts() -> list[dict]:
    groups = yaml.safe_load(RULE_FILES[0].read_text())["groups"]
    return [rule for group in groups for rule in group["rules"] if "alert" in rule]


def test_promtool_checks_the_rule_files():
    result = promtool("check", "rules", *map(str, RULE_FILES))
    assert result.returncode == 0, result.stdout + result.stderr


def test_promtool_unit_tests_of_the_rules_pass():
    result = promtool("test", "rules", str(RULE_TESTS))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


@pytest.mark.parametrize("alert", alerts(), ids=lambda rule: rule["alert"])
def test_every_alert_has_a_case_that_fires_it_and_one_that_does_not(alert):
    cases = [case for test in yaml.safe_load(RULE_TESTS.read_text())["tests"]
             for case in test.get("alert_rule_test", []) if case["alertname"] == alert["alert"]]
    assert any(case.get("exp_alerts") for case in cases), "no case fires it"
    assert any(not case.get("exp_alerts") for case in cases), "no case where it stays quiet"


@pytest.mark.parametrize("alert", alerts(), ids=lambda rule: rule["alert"])
def test_every_alert_says_how_bad_and_what_to_do(alert):
    assert alert["labels"]["severity"] in {"critical", "warning"}
    assert alert["annotations"]["summary"].strip()
    assert len(alert["annotations"]["description"].split()) >= 20  # what it means and what to check
