"""docker-compose.yml, checked without a Docker engine.

1. `docker-compose config` (or `docker compose config`) accepts the file, with and
   without the postgres profile and with the hardening override shown in docs/deploy.md.
2. The compose file's services run as local processes on loopback: each service's
   `command` and `environment` (interpolated as compose would, from a `.env`-like map),
   the `trainctl` entrypoint as `python -m trainctl.client.cli`, hostnames and published
   ports mapped to 127.0.0.1:<free port>, named volumes mapped to temp dirs, the server's
   own healthcheck command used as the readiness probe; a short digits run submitted
   through the published port must COMPLETE. An unknown flag, a renamed env var, a wrong
   address or volume path in the compose file breaks this test.
3. The worker image's entrypoint hands GPU slots to scaled replicas.
4. The slim server image (no torch, no timm) is emulated by hiding those packages.
"""
from __future__ import annotations

import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

from tests.conftest import digits_spec, free_port
from trainctl.client import Client

ROOT = Path(__file__).resolve().parent.parent
COMPOSE = ROOT / "docker-compose.yml"
ENTRYPOINT = ROOT / "docker" / "worker-entrypoint.sh"
DEPLOY_DOC = ROOT / "docs" / "deploy.md"

# What a user would put in `.env`: tokens on, so the token wiring is exercised too.
DOTENV = {"TRAINCTL_TOKEN": "compose-client-token", "TRAINCTL_WORKER_TOKEN": "compose-worker-token"}


# ---------------------------------------------------------------------- compose helpers
_VAR = re.compile(r"\$(?:(\$)|\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-?])([^}]*))?\}|([A-Za-z_][A-Za-z0-9_]*))")


def interpolate(value, env: dict):
    """Compose's variable substitution: $$, $VAR, ${VAR}, ${VAR:-d}, ${VAR-d}, ${VAR:?e}."""
    if isinstance(value, dict):
        return {k: interpolate(v, env) for k, v in value.items()}
    if isinstance(value, list):
        return [interpolate(v, env) for v in value]
    if not isinstance(value, str):
        return value

    def sub(m: re.Match) -> str:
        if m.group(1):
            return "$"
        name = m.group(2) or m.group(5)
        op, arg = m.group(3), m.group(4)
        val = env.get(name)
        if op == ":-":
            return val if val else arg
        if op == "-":
            return arg if val is None else val
        if op in (":?", "?") and (val is None or (op == ":?" and not val)):
            raise ValueError(f"compose variable {name} is required: {arg}")
        return val or ""

    return _VAR.sub(sub, value)


def load_compose(env: dict) -> dict:
    return interpolate(yaml.safe_load(COMPOSE.read_text()), env)


def as_argv(cmd) -> list[str]:
    return shlex.split(cmd) if isinstance(cmd, str) else [str(c) for c in cmd]


def environment(svc: dict) -> dict[str, str]:
    env = svc.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) if "=" in item else (item, os.environ.get(item, "")) for item in env)
    return {k: "" if v is None else str(v) for k, v in env.items()}


def container_ports(svc: dict) -> list[int]:
    ports = []
    for p in svc.get("ports") or []:
        target = p.get("target") if isinstance(p, dict) else str(p).split("/")[0].rsplit(":", 1)[-1]
        ports.append(int(target))
    return ports + [int(str(p).split("/")[0]) for p in svc.get("expose") or []]


def default_services(compose: dict) -> dict:
    """Services that `docker compose up` starts without --profile."""
    return {n: s for n, s in compose["services"].items() if not s.get("profiles")}


def start_order(services: dict) -> list[str]:
    order: list[str] = []

    def visit(name, path=()):
        assert name not in path, f"depends_on cycle through {name}"
        if name in order:
            return
        for dep in services[name].get("depends_on") or []:
            visit(dep, (*path, name))
        order.append(name)

    for n in services:
        visit(n)
    return order


def compose_cli() -> list[str] | None:
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    if shutil.which("docker"):
        r = subprocess.run(["docker", "compose", "version"], capture_output=True, text=True)
        if r.returncode == 0:
            return ["docker", "compose"]
    return None


def clean_env(**extra: str) -> dict:
    """This process's environment without any TRAINCTL_* (the shell must not leak in)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TRAINCTL_", "POSTGRES_"))}
    env.update(extra)
    return env


# ---------------------------------------------------------------------- 1. compose config
def _config(cli: list[str], *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([*cli, "-f", str(COMPOSE), *args], cwd=ROOT, capture_output=True, text=True,
                          env=env or clean_env(), timeout=60)


@pytest.fixture(scope="module")
def cli():
    found = compose_cli()
    if found is None:
        pytest.skip("neither `docker-compose` nor a `docker compose` plugin is installed "
                    "(Debian: apt-get install --no-install-recommends docker-compose)")
    return found


def test_compose_config_accepts_the_file(cli):
    r = _config(cli, "config")
    assert r.returncode == 0, r.stderr
    rendered = yaml.safe_load(r.stdout)
    assert set(rendered["services"]) >= {"server", "worker", "postgres"}
    worker = rendered["services"]["worker"]
    assert worker["depends_on"]["server"]["condition"] == "service_healthy"
    assert worker["deploy"]["resources"]["reservations"]["devices"][0]["capabilities"] == ["gpu"]
    assert {"trainctl-db", "trainctl-checkpoints", "trainctl-data"} <= set(rendered["volumes"])


def test_compose_config_postgres_profile(cli):
    env = clean_env(TRAINCTL_DB="postgresql+psycopg://trainctl:trainctl@postgres:5432/trainctl")
    r = _config(cli, "--profile", "postgres", "config", env=env)
    assert r.returncode == 0, r.stderr
    server = yaml.safe_load(r.stdout)["services"]["server"]
    assert server["command"][server["command"].index("--db") + 1].startswith("postgresql+psycopg://")


def _doc_override() -> str:
    text = DEPLOY_DOC.read_text()
    blocks = re.findall(r"```yaml\n(# docker-compose\.override\.yml\n.*?)```", text, re.S)
    assert len(blocks) == 1, "docs/deploy.md must show exactly one docker-compose.override.yml block"
    return blocks[0]


def test_compose_config_accepts_the_documented_override(cli, tmp_path):
    """The tokens-from-files + TLS override in docs/deploy.md merges into a valid config."""
    override = tmp_path / "docker-compose.override.yml"
    override.write_text(_doc_override())
    (tmp_path / "secrets").mkdir()
    for name in ("client.token", "worker.token", "server.crt", "server.key", "ca.crt"):
        (tmp_path / "secrets" / name).write_text("x\n")
    # Relative paths in an override resolve against the first file's folder: copy both.
    shutil.copy(COMPOSE, tmp_path / "docker-compose.yml")
    r = subprocess.run([*cli, "-f", "docker-compose.yml", "-f", "docker-compose.override.yml", "config"],
                       cwd=tmp_path, capture_output=True, text=True, env=clean_env(), timeout=60)
    assert r.returncode == 0, r.stderr
    rendered = yaml.safe_load(r.stdout)
    assert rendered["services"]["server"]["environment"]["TRAINCTL_SERVER_CLIENT_TOKEN_FILE"].startswith("/run/secrets/")


# ---------------------------------------------------------------------- 2. run it locally
class LocalService:
    def __init__(self, name: str, argv: list[str], env: dict, cwd: Path, log: Path):
        self.name, self.argv, self.log = name, argv, log
        self._fh = open(log, "w")
        self.popen = subprocess.Popen(argv, cwd=cwd, env=env, stdout=self._fh, stderr=subprocess.STDOUT,
                                      start_new_session=True)

    def stop(self) -> None:
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(20)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait()
        self._fh.close()

    def output(self) -> str:
        return self.log.read_text()[-4000:] if self.log.exists() else ""


class LocalCompose:
    """docker-compose.yml's default services as processes on loopback."""

    def __init__(self, tmp: Path, dotenv: dict, extra_env: dict[str, dict] | None = None):
        self.tmp = tmp
        self.compose = load_compose(dotenv)
        self.services = default_services(self.compose)
        self.extra_env = extra_env or {}
        # Named volumes -> temp dirs; a bind source that is a host path stays a host path.
        self.volume_dirs = {name: tmp / "volumes" / name for name in self.compose.get("volumes") or {}}
        # service:port / 0.0.0.0:port / own localhost:port -> 127.0.0.1:<free>
        self.host_port = {(n, p): free_port() for n, s in self.services.items() for p in container_ports(s)}
        self.procs: dict[str, LocalService] = {}

    def address(self, service: str, port: int) -> str:
        return f"127.0.0.1:{self.host_port[(service, port)]}"

    def mounts(self, name: str) -> list[tuple[str, Path]]:
        out = []
        for v in self.services[name].get("volumes") or []:
            source, target = (v["source"], v["target"]) if isinstance(v, dict) else str(v).split(":")[:2]
            if source in self.volume_dirs:
                path = self.volume_dirs[source]
            else:
                path = Path(source)
            path.mkdir(parents=True, exist_ok=True)
            out.append((target, path))
        return sorted(out, key=lambda m: -len(m[0]))

    def rewrite(self, name: str, text: str) -> str:
        for (svc, port), host in self.host_port.items():
            local = f"127.0.0.1:{host}"
            text = text.replace(f"{svc}:{port}", local)
            if svc == name:
                for own in ("0.0.0.0", "localhost", "127.0.0.1", "[::]"):
                    text = re.sub(rf"(?<![\d.]){re.escape(own)}:{port}\b", local, text)
        for target, path in self.mounts(name):
            text = text.replace(target, str(path))
        return text

    def argv(self, name: str, command) -> list[str]:
        argv = [self.rewrite(name, a) for a in as_argv(command)]
        if argv[0] == "trainctl":
            return [sys.executable, "-m", "trainctl.client.cli", *argv[1:]]
        if argv[0] in ("python", "python3"):
            return [sys.executable, *argv[1:]]
        raise AssertionError(f"service {name}: command must start with `trainctl` (the image's CLI), got {argv}")

    def healthcheck(self, name: str) -> list[str] | None:
        hc = self.services[name].get("healthcheck")
        if not hc or hc.get("disable"):
            return None
        test = hc["test"]
        assert isinstance(test, list) and test[0] == "CMD", f"{name}: healthcheck should be an exec-form CMD"
        return self.argv(name, test[1:])

    def start(self, name: str) -> LocalService:
        svc = self.services[name]
        assert "command" in svc, f"service {name} has no command"
        env = clean_env(**{k: self.rewrite(name, v) for k, v in environment(svc).items()},
                        **self.extra_env.get(name, {}))
        cwd = self.tmp / f"cwd-{name}"
        cwd.mkdir(exist_ok=True)
        proc = LocalService(name, self.argv(name, svc["command"]), env, cwd, self.tmp / f"{name}.log")
        self.procs[name] = proc
        return proc

    def wait_healthy(self, name: str, timeout: float = 45) -> None:
        probe = self.healthcheck(name)
        assert probe is not None, f"service {name} is depended on as service_healthy but has no healthcheck"
        proc = self.procs[name]
        deadline = time.monotonic() + timeout
        last = None
        while time.monotonic() < deadline:
            if proc.popen.poll() is not None:
                raise AssertionError(f"{name} exited with {proc.popen.returncode}:\n{proc.output()}")
            last = subprocess.run(probe, capture_output=True, text=True, timeout=15, env=clean_env())
            if last.returncode == 0:
                return
            time.sleep(0.3)
        raise AssertionError(f"{name} never passed its healthcheck {probe}: {last and last.stderr[-2000:]}\n"
                             f"{proc.output()}")

    def up(self) -> None:
        for name in start_order(self.services):
            for dep, cond in _depends(self.services[name]).items():
                if cond == "service_healthy":
                    self.wait_healthy(dep)
            self.start(name)

    def check_alive(self) -> None:
        for name, p in self.procs.items():
            if p.popen.poll() is not None:
                raise AssertionError(f"{name} exited with {p.popen.returncode}:\n{p.output()}")

    def logs(self) -> str:
        return "\n".join(f"==== {n}\n{p.output()}" for n, p in self.procs.items())

    def down(self) -> None:
        for name in reversed(list(self.procs)):
            self.procs[name].stop()


def _depends(svc: dict) -> dict[str, str]:
    deps = svc.get("depends_on") or {}
    if isinstance(deps, list):
        return {d: "service_started" for d in deps}
    return {d: (c or {}).get("condition", "service_started") for d, c in deps.items()}


@pytest.mark.slow
def test_compose_services_train_a_run_on_loopback(tmp_path):
    stack = LocalCompose(tmp_path, DOTENV)
    assert set(stack.services) == {"server", "worker"}, "the default profile is one server and workers"
    published = [(n, p) for n, s in stack.services.items() for p in container_ports(s) if s.get("ports")]
    assert {n for n, _ in published} == {"server"}, "only the server publishes ports"
    assert sorted(p for _, p in published) == [8080, 50051], "gRPC and the web console"
    try:
        stack.up()  # server, its healthcheck passing, then the worker
        address = stack.address("server", 50051)
        with Client(address, token=DOTENV["TRAINCTL_TOKEN"]) as c:
            spec = digits_spec("compose", epochs=1, max_steps=3)
            spec["train"]["keep_checkpoints"] = 1  # by default a COMPLETED run's checkpoints go
            x = c.submit(spec)
            deadline = time.monotonic() + 45
            while not (x := c.get(x.id)).is_final:
                stack.check_alive()
                assert time.monotonic() < deadline, f"run still {x.state} after 45 s\n{stack.logs()}"
                time.sleep(0.2)
            assert x.state == "COMPLETED", f"{x.state} {x.message}\n{stack.logs()}"
            assert c.metrics(x.id), "no metrics came back through the published port"
        console = f"http://{stack.address('server', 8080)}/"
        with urllib.request.urlopen(console, timeout=10) as page:
            assert page.status == 200 and b"trainctl" in page.read().lower(), "the console is not served"
        # The volumes are where the CLI really writes: database and checkpoints.
        db_files = list(stack.volume_dirs["trainctl-db"].iterdir())
        assert any(f.name.endswith(".db") for f in db_files), f"no database in the db volume: {db_files}"
        ckpts = [p for p in stack.volume_dirs["trainctl-checkpoints"].rglob("*") if p.is_file()]
        assert ckpts, "the worker wrote nothing to the checkpoints volume"
    except BaseException:
        print(stack.logs())
        raise
    finally:
        stack.down()


def test_compose_env_names_are_read_by_trainctl():
    """Every TRAINCTL_* variable the compose file or the documented override sets is read
    by the package or the entrypoint: a renamed variable would be silently ignored."""
    sources = "\n".join(p.read_text() for d in ("trainctl", "server", "workers", "client")
                        for p in (ROOT / d).rglob("*.py"))
    sources += ENTRYPOINT.read_text()
    unread = set()
    for where, doc in (("docker-compose.yml", load_compose({})), ("docs override", yaml.safe_load(_doc_override()))):
        for name, svc in doc["services"].items():
            unread |= {f"{where}: {name}.{key}" for key in environment(svc)
                       if key.startswith("TRAINCTL_") and not re.search(rf"\b{key}\b", sources)}
    assert not unread, f"variables nothing reads: {sorted(unread)}"


# ---------------------------------------------------------------------- 3. GPU slots
@pytest.mark.skipif(shutil.which("flock") is None, reason="flock (util-linux) is not installed")
def test_worker_entrypoint_gives_each_replica_its_own_gpus(tmp_path):
    env = clean_env(TRAINCTL_GPUS_PER_WORKER="2", TRAINCTL_GPU_COUNT="4",
                    TRAINCTL_GPU_SLOT_DIR=str(tmp_path), TRAINCTL_GPU_SLOT_RETRY="0.1")
    hold = 'echo "$CUDA_VISIBLE_DEVICES"; sleep 3'
    replicas = [subprocess.Popen(["sh", str(ENTRYPOINT), "sh", "-c", hold], env=env, stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, text=True) for _ in range(2)]
    time.sleep(0.5)
    # A third replica has no slot left: it stands by until one frees.
    standby = subprocess.Popen(["sh", str(ENTRYPOINT), "sh", "-c", "echo $CUDA_VISIBLE_DEVICES"], env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(0.5)
    assert standby.poll() is None, "a replica beyond the last slot must wait, not start"
    got = sorted(p.communicate(timeout=10)[0].strip() for p in replicas)
    assert got == ["0,1", "2,3"]
    out, err = standby.communicate(timeout=10)
    assert out.strip() in ("0,1", "2,3") and "standing by" in err

    # `all` (the default) and an already-set CUDA_VISIBLE_DEVICES pass through untouched.
    r = subprocess.run(["sh", str(ENTRYPOINT), "sh", "-c", 'echo "[$CUDA_VISIBLE_DEVICES]"'],
                       env=clean_env(TRAINCTL_GPUS_PER_WORKER="all"), capture_output=True, text=True)
    assert r.stdout.strip() == "[]"
    bad = subprocess.run(["sh", str(ENTRYPOINT), "true"], env=clean_env(TRAINCTL_GPUS_PER_WORKER="x"),
                         capture_output=True, text=True)
    assert bad.returncode == 2 and "positive integer" in bad.stderr


# ---------------------------------------------------------------------- 4. slim server image
_HIDE_TORCH = '''
import sys
class _SlimImage:
    """docker/server.Dockerfile installs no torch, torchvision, timm, numpy or scikit-learn."""
    HIDDEN = {"torch", "torchvision", "timm", "numpy", "sklearn", "scipy"}
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in self.HIDDEN:
            raise ModuleNotFoundError(f"No module named {name!r} (slim server image)", name=name)
sys.meta_path.insert(0, _SlimImage())
'''


@pytest.fixture
def slim_server(tmp_path):
    site = tmp_path / "slim-site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(_HIDE_TORCH)
    stack = LocalCompose(tmp_path, {}, extra_env={"server": {"PYTHONPATH": f"{site}{os.pathsep}{ROOT}"}})
    try:
        stack.start("server")
        stack.wait_healthy("server")
        yield stack, stack.address("server", 50051)
    finally:
        stack.down()


def test_slim_server_serves_without_torch(slim_server):
    stack, address = slim_server
    with Client(address) as c:
        assert c.list() == []
        bad = digits_spec("bad", epochs=0)
        with pytest.raises(Exception) as err:
            c.submit(bad)
        assert "epochs" in str(err.value)
    assert "slim server image" not in stack.procs["server"].output()


def test_slim_server_accepts_a_valid_spec(slim_server):
    _, address = slim_server
    with Client(address) as c:
        x = c.submit(digits_spec("slim", epochs=1, max_steps=1))
        assert x.state == "QUEUED"

