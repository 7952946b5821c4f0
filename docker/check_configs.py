"""Cross-checks of the deployment files that ``docker-compose config`` cannot see.

    python docker/check_configs.py REPO_ROOT

- each compose profile starts the services it should (docker-compose 1.29, the one
  packaged here, validates ``profiles:`` but does not filter ``config`` by them);
- Prometheus scrapes ``/metrics`` on port 8000 of the name every facegate service
  carries as a network alias in ``docker-compose.yml``;
- Grafana's provisioned data source is the one the dashboard's panels use, and the
  dashboard provider reads the folder compose mounts the dashboards into;
- nginx balances over the compose replica service on the service port, and accepts
  request bodies as large as the service does.

Runs where ``service`` is importable and PyYAML is installed (the service image has it
through ``uvicorn[standard]``).
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import yaml

from service.config import Settings

#: The services ``docker compose --profile <name> up`` must start.
PROFILES = {
    "gpu": ["facegate", "grafana", "prometheus"],
    "cpu": ["facegate-cpu", "grafana", "prometheus"],
    "postgres-replicas": ["facegate-replica", "grafana", "nginx", "postgres", "prometheus"],
}


def fail(message: str) -> None:
    raise SystemExit(f"config check failed: {message}")


def main(root: Path) -> None:
    compose = yaml.safe_load((root / "docker-compose.yml").read_text())
    services = compose["services"]
    for profile, expected in PROFILES.items():
        started = sorted(
            n for n, s in services.items() if not s.get("profiles") or profile in s["profiles"]
        )
        if started != expected:
            fail(f"profile {profile} starts {started}, expected {expected}")
    facegate_services = [
        n for n, s in services.items() if str(s.get("image", "")).startswith("facegate:")
    ]
    if not facegate_services:
        fail("docker-compose.yml defines no facegate service")
    for name in facegate_services:
        aliases = services[name].get("networks", {}).get("default", {}).get("aliases", [])
        if "facegate" not in aliases:
            fail(f"compose service {name} lacks the network alias `facegate`")

    prometheus = yaml.safe_load((root / "docker" / "prometheus" / "prometheus.yml").read_text())
    jobs = {job["job_name"]: job for job in prometheus["scrape_configs"]}
    job = jobs.get("facegate") or fail("prometheus.yml has no `facegate` job")
    if job.get("metrics_path", "/metrics") != "/metrics":
        fail("the facegate job does not scrape /metrics")
    sd = [c for c in job.get("dns_sd_configs", []) if "facegate" in c.get("names", [])]
    if not sd or sd[0].get("port") != 8000:
        fail("the facegate job does not discover `facegate` on port 8000")
    prom_mounts = services["prometheus"]["volumes"]
    if not any(v.startswith("./docker/prometheus/prometheus.yml:") for v in prom_mounts):
        fail("compose does not mount docker/prometheus/prometheus.yml into Prometheus")

    grafana = root / "docker" / "grafana"
    datasources = yaml.safe_load(
        (grafana / "provisioning" / "datasources" / "prometheus.yml").read_text()
    )["datasources"]
    uids = {d["uid"] for d in datasources if d["type"] == "prometheus"}
    providers = yaml.safe_load(
        (grafana / "provisioning" / "dashboards" / "facegate.yml").read_text()
    )["providers"]
    dashboard_dir = providers[0]["options"]["path"]
    mounts = services["grafana"]["volumes"]
    if f"./docker/grafana/dashboards:{dashboard_dir}:ro" not in mounts:
        fail(f"compose does not mount docker/grafana/dashboards at {dashboard_dir}")
    for path in sorted((grafana / "dashboards").glob("*.json")):
        dashboard = json.loads(path.read_text())
        for panel in dashboard["panels"]:
            for target in panel.get("targets", []):
                uid = target.get("datasource", panel.get("datasource", {})).get("uid")
                if uid not in uids:
                    fail(
                        f"{path.name}: panel {panel['title']!r} uses data source {uid!r}, "
                        f"provisioned: {sorted(uids)}"
                    )
                if not target.get("expr"):
                    fail(f"{path.name}: panel {panel['title']!r} has an empty query")

    nginx = (root / "docker" / "nginx" / "nginx.conf").read_text()
    servers = re.findall(r"^\s*server\s+([\w.-]+):(\d+)", nginx, re.M)
    if not servers:
        fail("nginx.conf has no upstream server")
    for host, port in servers:
        if host not in services or port != "8000":
            fail(f"nginx upstream {host}:{port} is not a compose service on port 8000")
    limit = Settings.model_fields["max_request_bytes"].default
    size = re.search(r"client_max_body_size\s+(\d+)m;", nginx)
    if not size or int(size.group(1)) * 1024 * 1024 < limit:
        fail(f"nginx client_max_body_size is below the service's request limit ({limit} bytes)")
    print(
        f"configs consistent: profiles {sorted(PROFILES)}, services {facegate_services}, "
        f"data sources {sorted(uids)}"
    )


if __name__ == "__main__":
    if len(sys.argv) != 2:
        raise SystemExit(__doc__)
    main(Path(sys.argv[1]))
