"""The aggregator's public door: nginx in front of the SuperLink, publishing Flower's Fleet API and nothing else.

Flower 1.42 serves its Fleet, Control and Runtime APIs as one HTTPS app on one port, and the open-source Control API
authenticates no one: whoever reaches that port with ``ca.crt`` (every merchant holds it) can list, stop and submit
runs — i.e. run their own ServerApp code on the aggregator. So the SuperLink listens on loopback only, and nginx
(a maintained reverse proxy, not code of ours) listens on the public address with the same TLS certificate and
forwards ``/v1/fleet/`` (what a SuperNode calls) to it; every other path gets 403. SuperNode authentication is
untouched: its signed headers pass through, and the SuperLink still checks them.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

from fedaug.common.atomic import write_bytes_atomic
from fedaug.common.errors import FedaugError
from fedaug.runtime.processes import start

FLEET_PREFIX = "/v1/fleet/"
"""Every route a SuperNode calls (flwr/supernode/fleet_http_client.py) lies under it."""
REFUSED = "fedaug: only Flower's Fleet API is published at this address"
TEMP_DIRS = ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
"""nginx's buffer folders, kept in the work dir (the packaged defaults under /var need root)."""


def nginx_command() -> str:
    found = shutil.which("nginx") or next((p for p in ("/usr/sbin/nginx", "/usr/local/sbin/nginx")
                                           if Path(p).is_file()), None)
    if not found:
        raise FedaugError("nginx: not found on PATH or in /usr/sbin (the aggregator publishes Flower's Fleet API "
                          "through it, so that merchants cannot reach the Control API; e.g. `apt-get install nginx`)")
    return found


def _listen(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def render_config(*, public: tuple[str, int], superlink: tuple[str, int], certificate: Path, key: Path,
                  ca_certificate: Path, workdir: Path) -> str:
    """nginx.conf for a foreground nginx whose files (pid, logs, buffers) all live in ``workdir``.

    ``public``: host and port merchants connect to (TLS with ``certificate`` / ``key``); ``superlink``: where the
    SuperLink listens on loopback (its certificate is checked against ``ca_certificate`` for the name localhost)."""
    temp = {name: workdir / "tmp" / name for name in TEMP_DIRS}
    return f"""# Written by fedaug (runtime/fleet_proxy.py) on every start; edits are lost.
worker_processes 1;
daemon off;
pid {workdir / "nginx.pid"};
error_log {workdir / "error.log"} warn;
events {{ worker_connections 1024; }}
http {{
    access_log {workdir / "access.log"};
    client_body_temp_path {temp["client_body"]};
    proxy_temp_path {temp["proxy"]};
    fastcgi_temp_path {temp["fastcgi"]};
    uwsgi_temp_path {temp["uwsgi"]};
    scgi_temp_path {temp["scgi"]};
    client_max_body_size 0;  # model updates; the SuperLink applies its own message limits
    server_tokens off;
    server {{
        listen {_listen(*public)} ssl;
        ssl_certificate {certificate};
        ssl_certificate_key {key};
        ssl_protocols TLSv1.2 TLSv1.3;
        location {FLEET_PREFIX} {{
            proxy_pass https://{_listen(*superlink)};
            proxy_http_version 1.1;
            proxy_set_header Host $host;
            proxy_ssl_trusted_certificate {ca_certificate};
            proxy_ssl_verify on;
            proxy_ssl_name localhost;
            proxy_ssl_server_name on;
            proxy_buffering off;          # streamed replies (pull-object) pass through as they come
            proxy_request_buffering off;
            proxy_read_timeout 3600s;     # long polls and slow rounds are not errors
            proxy_send_timeout 3600s;
        }}
        location / {{
            default_type text/plain;
            return 403 "{REFUSED}\\n";
        }}
    }}
}}
"""


def start_fleet_proxy(*, public: tuple[str, int], superlink: tuple[str, int], certificate: Path, key: Path,
                      ca_certificate: Path, workdir: Path) -> subprocess.Popen:
    """Write the config, check it (`nginx -t`, so a bad one fails in one line) and start nginx in the foreground;
    its output goes to ``workdir/nginx.log``."""
    command = nginx_command()
    for name in TEMP_DIRS:
        (workdir / "tmp" / name).mkdir(parents=True, exist_ok=True)
    config = workdir / "nginx.conf"
    write_bytes_atomic(config, render_config(public=public, superlink=superlink, certificate=certificate, key=key,
                                             ca_certificate=ca_certificate, workdir=workdir).encode())
    base = [command, "-p", str(workdir), "-e", str(workdir / "error.log"), "-c", str(config)]
    check = subprocess.run([*base, "-t", "-q"], capture_output=True, text=True)
    if check.returncode != 0:
        reason = " ".join((check.stderr or check.stdout).split()) or f"exit code {check.returncode}"
        raise FedaugError(f"nginx: the Fleet proxy's config {config} was refused: {reason}")
    return start(base, workdir / "nginx.log")
