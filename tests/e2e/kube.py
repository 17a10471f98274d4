"""What the end-to-end suite does with a real control plane: kubectl and helm as a user runs
them, chorus-operator as a process on this host with a ServiceAccount's token, and waits that
end on the event they wait for (bounded, never a fixed sleep).
"""

import base64
import json
import os
import pathlib
import signal
import socket
import subprocess
import tempfile
import threading
import time
import urllib.request

import yaml

ROOT = pathlib.Path(__file__).resolve().parents[2]
CHART = ROOT / "charts" / "chorus"
EXAMPLES = ROOT / "manifests" / "examples"
OPERATOR_BIN = os.environ.get("CHORUS_OPERATOR_BIN", str(ROOT / "target" / "debug" / "chorus-operator"))
SERVER_BIN = os.environ.get("CHORUS_SERVER_BIN", str(ROOT / "target" / "debug" / "chorus-server"))
LOGS = pathlib.Path(os.environ.get("CHORUS_E2E_LOGS") or tempfile.mkdtemp(prefix="chorus-e2e-"))

# Long enough for a busy machine; each wait ends as soon as what it waits for is there.
WAIT = 120


def run(*args, input=None, check=True, timeout=WAIT, env=None):
    """Runs a command; its stdout. A failure says what ran and what it printed."""
    done = subprocess.run(
        [str(a) for a in args],
        input=input,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
    )
    if check and done.returncode != 0:
        raise AssertionError(
            f"`{' '.join(map(str, args))}` exited {done.returncode}:\n{done.stdout}\n{done.stderr}"
        )
    return done.stdout if check else done


def kubectl(*args, **kw):
    return run("kubectl", *args, **kw)


def helm(*args, **kw):
    return run("helm", *args, **kw)


def get(kind, name=None, ns=None, selector=None, fields=False):
    """The object (or the list's items) as kubectl -o json gives it (with `fields`, its
    managedFields too); None when not found."""
    args = ["get", kind] + (["--show-managed-fields"] if fields else [])
    if name:
        args.append(name)
    if ns:
        args += ["-n", ns]
    if selector:
        args += ["-l", selector]
    done = kubectl(*args, "-o", "json", check=False)
    if done.returncode != 0:
        if "NotFound" in done.stderr or "not found" in done.stderr:
            return None
        raise AssertionError(f"kubectl {' '.join(args)}: {done.stderr}")
    obj = json.loads(done.stdout)
    return obj["items"] if name is None else obj


def apply(obj, ns=None, server_side=False):
    args = ["apply", "-f", "-"]
    if ns:
        args += ["-n", ns]
    if server_side:
        args.append("--server-side")
    return kubectl(*args, input=yaml.safe_dump(obj) if not isinstance(obj, str) else obj)


def wait_until(what, check, timeout=WAIT, every=0.2):
    """Polls `check` until it returns something truthy (returned); fails naming `what` and
    the last value seen."""
    deadline = time.monotonic() + timeout
    last = None
    while True:
        last = check()
        if last:
            return last
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout} s (last seen: {last!r})")
        time.sleep(every)


def condition(obj, kind):
    for c in (obj or {}).get("status", {}).get("conditions", []):
        if c.get("type") == kind:
            return c
    return None


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def secret_value(ns, name, key):
    s = get("secret", name, ns)
    assert s is not None, f"Secret {ns}/{name} exists"
    return base64.b64decode(s["data"][key]).decode()


def owned_by(uid, kinds, ns):
    """Objects of `kinds` in `ns` that name `uid` among their owners: "Kind/name" each."""
    found = []
    for kind in kinds:
        for o in get(kind, ns=ns) or []:
            if any(r.get("uid") == uid for r in o["metadata"].get("ownerReferences", [])):
                found.append(f"{o['kind']}/{o['metadata']['name']}")
    return found


def scrape(port):
    """The samples of an OpenMetrics page: {'name{labels}': value}."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        text = r.read().decode()
    samples = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            key, _, value = line.rpartition(" ")
            samples[key] = float(value)
    return samples


def token_kubeconfig(path, sa, ns):
    """A kubeconfig for ServiceAccount `sa` of `ns`: the admin kubeconfig's server and CA with
    a token the API server issues for it (TokenRequest), as a pod of that account would have."""
    token = kubectl("create", "token", sa, "-n", ns, "--duration=2h").strip()
    admin = json.loads(kubectl("config", "view", "--raw", "--minify", "-o", "json"))
    cluster = admin["clusters"][0]["cluster"]
    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "e2e", "cluster": cluster}],
        "users": [{"name": sa, "user": {"token": token}}],
        "contexts": [{"name": "e2e", "context": {"cluster": "e2e", "user": sa, "namespace": ns}}],
        "current-context": "e2e",
    }
    path.write_text(yaml.safe_dump(config))
    path.chmod(0o600)
    return path


class Operator:
    """chorus-operator run on this host as the chart's ServiceAccount (with `leader`, leader
    election on a short Lease), reading the Operator engine's connections from loopback
    servers."""

    def __init__(self, identity, sa, sa_ns, watch_ns=None, leader=True, lease_seconds=4):
        self.identity = identity
        self.port = free_port()
        self.log = LOGS / f"operator-{identity}.log"
        kubeconfig = token_kubeconfig(LOGS / f"operator-{identity}.kubeconfig", sa, sa_ns)
        args = [
            OPERATOR_BIN, "run",
            "--metrics-port", str(self.port),
            # Test-only: each app's Service port, on loopback, is where its servers answer.
            "--readings-address", "127.0.0.1:{port}",
        ]
        if leader:
            args += ["--leader-elect", "--lease-namespace", sa_ns, "--identity", identity,
                     "--lease-duration", str(lease_seconds)]
        if watch_ns:
            args += ["--watch-namespace", watch_ns]
        env = {
            "PATH": os.environ.get("PATH", ""),
            "KUBECONFIG": str(kubeconfig),
            "RUST_LOG": "info",
            "LOG_FORMAT": "text",
        }
        self.proc = subprocess.Popen(
            args, env=env, stdout=subprocess.DEVNULL, stderr=open(self.log, "w")
        )
        wait_until(f"operator {identity} serves /metrics", self._serving, timeout=30)

    def _serving(self):
        if self.proc.poll() is not None:
            raise AssertionError(f"operator {self.identity} exited {self.proc.returncode}:\n{self.log.read_text()[-3000:]}")
        try:
            return scrape(self.port) is not None
        except OSError:
            return False

    def metric(self, name):
        return sum(v for k, v in scrape(self.port).items() if k == name or k.startswith(name + "{"))

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


class Server:
    """A real chorus-server on a loopback port, standing in for an app's Service (the
    Operator engine reads its `/v1/nodes`)."""

    def __init__(self, port, token, pod):
        self.port = port
        self.log = LOGS / f"server-{port}.log"
        env = {"PORT": str(port), "API_TOKEN": token, "POD_NAME": pod, "DRAIN_SECONDS": "0"}
        self.proc = subprocess.Popen(
            [SERVER_BIN], env=env, stdout=subprocess.DEVNULL, stderr=open(self.log, "w")
        )
        wait_until(f"chorus-server on {port} healthy", self._healthy, timeout=30)

    def _healthy(self):
        if self.proc.poll() is not None:
            raise AssertionError(f"chorus-server exited:\n{self.log.read_text()[-2000:]}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/healthz", timeout=2) as r:
                return r.status == 200
        except OSError:
            return False

    def stop(self):
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


class Sockets:
    """`n` Socket.IO clients (socket.io-client v4, websocket) held open by tests/e2e/sockets.js
    until stop()."""

    def __init__(self, url, n):
        self.proc = subprocess.Popen(
            ["node", str(ROOT / "tests" / "e2e" / "sockets.js"), url, str(n)],
            stdout=subprocess.PIPE,
            stderr=open(LOGS / "sockets.log", "w"),
            text=True,
        )
        line = self.proc.stdout.readline().strip()
        assert line == f"connected {n}", f"sockets.js: {line!r} (see {LOGS / 'sockets.log'})"

    def stop(self):
        self.proc.terminate()
        self.proc.wait(timeout=30)


class Watch:
    """Every state of the objects a `kubectl get -w` watch reports, in order, until stop()."""

    def __init__(self, *args):
        self.events = []
        self.proc = subprocess.Popen(
            ["kubectl", "get", *args, "-w", "--output-watch-events", "-o", "json"],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        )
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self):
        decoder = json.JSONDecoder()
        buf = ""
        for chunk in iter(lambda: self.proc.stdout.read(1), ""):
            buf += chunk
            if chunk != "}":
                continue
            try:
                event, end = decoder.raw_decode(buf.lstrip())
            except ValueError:
                continue
            self.events.append(event)
            buf = ""

    def stop(self):
        self.proc.terminate()
        self.proc.wait(timeout=10)
        self.thread.join(timeout=10)
        return self.events


def refused(control_plane, group):
    """Requests of the ServiceAccounts of namespace `group` that the API server refused, from
    its audit log: every 4xx but a 404 (reading what is not there is ordinary), and a 409 on
    a Lease (two candidates racing for it is how leader election works)."""
    log = control_plane / "audit.log"
    assert log.exists(), f"{log}: the control plane writes no audit log (start it with --audit-policy)"
    found = []
    for line in log.read_text().splitlines():
        e = json.loads(line)
        if f"system:serviceaccounts:{group}" not in e.get("user", {}).get("groups", []):
            continue
        code = e.get("responseStatus", {}).get("code", 0)
        lease = e.get("objectRef", {}).get("resource") == "leases"
        if 400 <= code < 500 and code != 404 and not (code == 409 and lease):
            found.append(f"{code} {e.get('verb')} {e.get('requestURI')}: {e['responseStatus'].get('message', '')}")
    return found
