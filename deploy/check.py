#!/usr/bin/env python3
"""Checks the deploy files: YAML parses, every flag they pass exists in the binary's --help,
the probes use only the paths that answer without credentials,
the compose stack's Prometheus config passes promtool, the systemd unit passes
systemd-analyze verify (when available), and the Dockerfile's commands exist.

    python3 deploy/check.py target/debug/qoder-exporter
"""
import pathlib
import re
import shutil
import subprocess
import sys
import tempfile

import yaml

ROOT = pathlib.Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"


def main(binary):
    problems = []
    help_text = subprocess.run([binary, "--help"], capture_output=True, text=True, check=True).stdout
    help_text += subprocess.run([binary, "demo", "--help"], capture_output=True, text=True, check=True).stdout
    subcommands = {"demo", "healthcheck"}

    files = [p for p in DEPLOY.rglob("*") if p.is_file() and p.suffix in (".yml", ".yaml")]
    for p in files:
        try:
            docs = list(yaml.safe_load_all(p.read_text()))
            if not docs or docs == [None]:
                problems.append(f"{p}: empty")
        except yaml.YAMLError as e:
            problems.append(f"{p}: {e}")

    flag = re.compile(r"--((?:qoder|web|state|config|log|otlp|demo|shard)\.[a-z-]+)")
    compose = yaml.safe_load((DEPLOY / "docker-compose/docker-compose.yml").read_text())
    # Only what the exporter itself is given (the compose file also starts Prometheus).
    sources = {
        "docker-compose.yml (qoder-exporter)": " ".join(compose["services"]["qoder-exporter"]["command"]),
        **{str(p.relative_to(ROOT)): p.read_text() for p in [
            DEPLOY / "kubernetes/base/statefulset.yaml", DEPLOY / "kubernetes/sharded/kustomization.yaml", DEPLOY / "Dockerfile",
            DEPLOY / "systemd/qoder-exporter.service", DEPLOY / "systemd/qoder-exporter.env"]},
    }
    for where, text in sources.items():
        for name in sorted(set(flag.findall(text))):
            if f"--{name}" not in help_text:
                problems.append(f"{where}: --{name} is not a flag of the binary")
    for cmd in re.findall(r'"/usr/local/bin/qoder-exporter", "([a-z]+)"', (DEPLOY / "Dockerfile").read_text()):
        if cmd not in subcommands:
            problems.append(f"Dockerfile: unknown subcommand {cmd}")
    demo_cmd = compose["services"]["qoder-exporter"]["command"]
    if demo_cmd[0] not in subcommands:
        problems.append(f"docker-compose.yml: unknown subcommand {demo_cmd[0]}")

    # The probes must work with basic auth on: only /healthz and /readyz answer without
    # credentials (src/server.rs), so an HTTP probe may use nothing else.
    open_paths = {"/healthz", "/readyz"}
    sts = yaml.safe_load((DEPLOY / "kubernetes/base/statefulset.yaml").read_text())
    for c in sts["spec"]["template"]["spec"]["containers"]:
        for kind in ("livenessProbe", "readinessProbe", "startupProbe"):
            probe = c.get(kind)
            if probe and "httpGet" in probe and probe["httpGet"].get("path") not in open_paths:
                problems.append(f"statefulset.yaml: {kind} uses {probe['httpGet'].get('path')}, which needs credentials when basic auth is on")
    for line in (DEPLOY / "Dockerfile").read_text().splitlines():
        for path in re.findall(r"http://127\.0\.0\.1:\d+(/[a-z]*)", line):
            if "HEALTHCHECK" in line or "healthcheck" in line:
                if path not in open_paths:
                    problems.append(f"Dockerfile: the healthcheck asks {path}, which needs credentials when basic auth is on")

    r = subprocess.run(["promtool", "check", "config", "--syntax-only", str(DEPLOY / "docker-compose/prometheus.yml")], capture_output=True, text=True)
    if r.returncode != 0:
        problems.append(f"promtool check config: {r.stdout}{r.stderr}")

    if shutil.which("systemd-analyze"):
        with tempfile.TemporaryDirectory() as d:
            # verify wants ExecStart to exist; point it at the binary under test.
            unit = (DEPLOY / "systemd/qoder-exporter.service").read_text().replace("/usr/local/bin/qoder-exporter", str(pathlib.Path(binary).resolve()))
            path = pathlib.Path(d) / "qoder-exporter.service"
            path.write_text(unit)
            r = subprocess.run(["systemd-analyze", "verify", str(path)], capture_output=True, text=True)
            errors = [l for l in (r.stdout + r.stderr).splitlines() if "qoder-exporter.service" in l and "EnvironmentFile" not in l]
            if r.returncode != 0 and errors:
                problems.append("systemd-analyze verify: " + "\n".join(errors))

    if problems:
        print("\n".join(problems))
        sys.exit(1)
    print(f"deploy files ok ({len(files)} YAML files)")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else str(ROOT / "target/debug/qoder-exporter"))
