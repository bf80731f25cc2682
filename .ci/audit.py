"""pip-audit of the installed dependencies: exit 1 on a known vulnerability, a loud warning when it cannot audit.

The advisory data comes from PyPI's JSON API. When that cannot answer (no network,
a private mirror, versions PyPI does not know), failing CI would be spurious and
passing it silently would be false comfort: the warning names what was not checked.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from importlib import metadata
from pathlib import Path

BIN = Path(sys.executable).parent


def main() -> int:
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "audit.json"
        run = subprocess.run([str(BIN / "pip-audit"), "--local", "--skip-editable", "--progress-spinner", "off",
                              "--format", "json", "--output", str(report)], capture_output=True, text=True)
        if not report.exists() or not report.read_text().strip():
            installed = len({d.metadata["Name"].lower() for d in metadata.distributions()})
            print(f"WARNING: pip-audit could not reach its vulnerability service; none of the {installed} installed "
                  "packages was audited:\n"
                  + (run.stderr.strip().splitlines() or [f"exit code {run.returncode}"])[-1][:800], file=sys.stderr)
            return 0
        dependencies = json.loads(report.read_text())["dependencies"]
    vulnerable = [d for d in dependencies if d.get("vulns")]
    skipped = [d for d in dependencies if d.get("skip_reason")]
    for dep in vulnerable:
        for vuln in dep["vulns"]:
            fixes = ", ".join(vuln.get("fix_versions") or []) or "none yet"
            print(f"VULNERABLE: {dep['name']} {dep['version']}: {vuln['id']} (fixed in: {fixes})", file=sys.stderr)
    audited = len(dependencies) - len(skipped)
    if skipped:
        print(f"WARNING: pip-audit could not audit {len(skipped)} of {len(dependencies)} packages (their versions "
              f"are unknown to the vulnerability service, e.g. {skipped[0]['name']}: {skipped[0]['skip_reason']})",
              file=sys.stderr)
    print(f"pip-audit: {audited} packages audited, {len(vulnerable)} with known vulnerabilities, "
          f"{len(skipped)} not audited")
    return 1 if vulnerable else 0


if __name__ == "__main__":
    sys.exit(main())
