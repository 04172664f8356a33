"""monitoring/pgwshard.rules.yml: valid for promtool, and every alert unit-tested both ways."""
from __future__ import annotations

import re
import shutil
import subprocess

import pytest
import yaml

from tests.support import REPO

MONITORING = REPO / "monitoring"
RULE_FILES = [MONITORING / "pgwshard.rules.yml", MONITORING / "push-thresholds.example.yml"]
RULE_TESTS = MONITORING / "tests" / "pgwshard.rules.test.yml"
RUNBOOK = MONITORING / "runbook.md"


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


def runbook_section(alert: str) -> str:
    """The runbook's section of one alert, from its heading to the next."""
    sections = re.split(r"^## ", RUNBOOK.read_text(), flags=re.MULTILINE)
    found = [text for text in sections if text.split("\n", 1)[0].strip() == alert]
    assert len(found) == 1, f"runbook.md has {len(found)} sections headed {alert}"
    return found[0]


@pytest.mark.parametrize("alert", alerts(), ids=lambda rule: rule["alert"])
def test_every_alert_says_how_bad_and_what_to_do(alert):
    name = alert["alert"]
    assert alert["labels"]["severity"] in {"critical", "warning"}
    assert alert["annotations"]["summary"].strip()
    assert len(alert["annotations"]["description"].split()) >= 20  # what it means and what to check
    # its runbook_url is the heading's anchor in monitoring/runbook.md (as GitHub renders it)
    assert alert["annotations"]["runbook_url"] == f"monitoring/runbook.md#{name.lower()}"
    section = runbook_section(name)
    delay = re.search(r"\*\*Fires after\*\* (.+?)(?:\n\n)", section, re.DOTALL)
    assert delay, f"{name}: no 'Fires after'"
    if "for" in alert:  # the delay counts the rule's own `for:`
        assert f"`for: {alert['for']}`" in delay.group(1) or alert["for"] == delay.group(1).split()[0] + "m"
    steps = re.search(r"\*\*What to do\.\*\*\n((?:\d\. .+\n(?: {3}.+\n)*)+)", section)
    assert steps, f"{name}: no numbered steps under 'What to do.'"
    commands = re.findall(r"`([^`]+)`", steps.group(1))
    assert any(c.split()[0] in {"pgwshard", "curl", "journalctl", "systemctl", "consul", "df", "pgwshard-sync"}
               for c in commands), f"{name}: no command to run in its steps"
    # README here states the same delay
    row = next(line for line in (MONITORING / "README.md").read_text().splitlines() if line.startswith(f"| `{name}`"))
    minutes = re.match(r"(\d+) minutes?", delay.group(1))
    assert (row.split("|")[4].strip().startswith(f"{minutes.group(1)} m") if minutes
            else "limit" in row.split("|")[4]), (row, delay.group(1))
