""".ci/audit.py: a known vulnerability fails CI, an audit that could not run warns loudly and passes."""

from __future__ import annotations

import importlib.util
import json
import subprocess
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / ".ci" / "audit.py"


@pytest.fixture
def audit():
    spec = importlib.util.spec_from_file_location("ci_audit", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def fake_pip_audit(monkeypatch, audit, dependencies: list | None, stderr: str = ""):
    """Replace the pip-audit run: write `dependencies` as its JSON report, or no report at all (None)."""

    def run(argv, **_kwargs):
        if dependencies is not None:
            Path(argv[argv.index("--output") + 1]).write_text(json.dumps({"dependencies": dependencies}))
        return subprocess.CompletedProcess(argv, 1 if dependencies is None else 0, "", stderr)

    monkeypatch.setattr(audit.subprocess, "run", run)


def test_a_known_vulnerability_fails_and_is_named(audit, monkeypatch, capsys):
    fake_pip_audit(monkeypatch, audit, [
        {"name": "flask", "version": "0.12", "vulns": [{"id": "PYSEC-2018-66", "fix_versions": ["0.12.3"]}]},
        {"name": "redis", "version": "5.0", "vulns": []}])
    assert audit.main() == 1
    out = capsys.readouterr()
    assert "VULNERABLE: flask 0.12: PYSEC-2018-66 (fixed in: 0.12.3)" in out.err
    assert "2 packages audited, 1 with known vulnerabilities" in out.out


def test_packages_it_could_not_audit_are_a_warning_not_a_failure(audit, monkeypatch, capsys):
    fake_pip_audit(monkeypatch, audit, [{"name": "gunicorn", "version": "27.0.1", "skip_reason": "not on PyPI"},
                                        {"name": "redis", "version": "5.0", "vulns": []}])
    assert audit.main() == 0
    err = capsys.readouterr().err
    assert "WARNING: pip-audit could not audit 1 of 2 packages" in err and "gunicorn" in err


def test_an_unreachable_service_is_a_warning_not_a_failure(audit, monkeypatch, capsys):
    fake_pip_audit(monkeypatch, audit, None, stderr="ConnectionError: pypi.org unreachable")
    assert audit.main() == 0
    err = capsys.readouterr().err
    assert "none of the" in err and "was audited" in err and "unreachable" in err
