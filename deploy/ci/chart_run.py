"""Runs what the deployment files describe, on this machine, with the hookline binary in
place of the image: the Helm chart's rendered manifests (`chart`) or deploy/compose.yaml
(`compose`). Called by deploy/ci/chart-run.sh, which renders the chart.

chart: every pre-install hook Job runs (in hook-weight order) with exactly its rendered
args and environment, Secrets and ConfigMaps resolved (`valueFrom`, `envFrom`) from the
objects that exist at that point of an install (hooks of a lower weight only), and must
exit 0. Then every Deployment's container starts the same way, with its listen ports
moved (all share one host) and must pass its readiness probe. Then the admin key is
created with the command NOTES.txt gives an operator (in the pod it names, so with that
Deployment's environment), and one event is delivered through the ingest process to a
local receiver via the dispatcher (deliver.py).

compose: the same for the compose file's Hookline services: the one-shot services
(`restart: "no"`) must exit 0, the others must pass their healthcheck; the key is created
with the command deploy/README.md gives; one event is delivered. The compose network's
host names do not exist here: the database URL, the AMQP URL and the queue prefix are
replaced by this run's own, the only changes besides the ports.
"""

import argparse
import base64
import os
import re
import shlex
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request

import yaml

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from deliver import deliver_one  # noqa: E402

# The image's ENTRYPOINT and CMD (deploy/Dockerfile, deploy/ci/image.sh).
IMAGE_ENTRYPOINT = ["hookline"]
IMAGE_CMD = ["serve"]
# Longest a readiness check or a one-shot command may take here.
MAX_WAIT_S = 120


def fail(message):
    raise SystemExit(f"chart-run: FAILED: {message}")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ----------------------------------------------------------------------------- objects

class Objects:
    """Secrets and ConfigMaps by name, as the kubelet would resolve them."""

    def __init__(self, docs):
        self.secrets, self.configmaps = {}, {}
        for d in docs:
            name = d["metadata"]["name"]
            if d["kind"] == "Secret":
                data = {k: base64.b64decode(v).decode() for k, v in (d.get("data") or {}).items()}
                data.update(d.get("stringData") or {})
                self.secrets[name] = data
            elif d["kind"] == "ConfigMap":
                self.configmaps[name] = {k: str(v) for k, v in (d.get("data") or {}).items()}

    def _source(self, kind, ref, what):
        table = self.secrets if kind == "secret" else self.configmaps
        name = ref["name"]
        if name not in table:
            if ref.get("optional"):
                return None
            fail(f"{what}: {kind} {name!r} does not exist at this point of the install")
        return table[name]

    def env(self, container, what):
        """The environment of `container`: envFrom first, env entries over it."""
        env = {}
        for src in container.get("envFrom") or []:
            prefix = src.get("prefix", "")
            for kind in ("configMap", "secret"):
                ref = src.get(kind + "Ref")
                if ref:
                    data = self._source(kind.lower() if kind == "secret" else "configmap", ref, what)
                    env.update({prefix + k: v for k, v in (data or {}).items()})
        for e in container.get("env") or []:
            if "value" in e:
                env[e["name"]] = str(e["value"])
            elif "valueFrom" in e:
                vf = e["valueFrom"]
                if "secretKeyRef" in vf:
                    ref, kind = vf["secretKeyRef"], "secret"
                elif "configMapKeyRef" in vf:
                    ref, kind = vf["configMapKeyRef"], "configmap"
                else:
                    fail(f"{what}: env {e['name']} uses {list(vf)}, which this runner cannot resolve")
                data = self._source(kind, ref, what)
                if data is None:
                    continue
                if ref["key"] not in data:
                    fail(f"{what}: {kind} {ref['name']!r} has no key {ref['key']!r}")
                env[e["name"]] = data[ref["key"]]
            else:
                env[e["name"]] = ""
        return env


def move_ports(env, ports):
    """Gives every listen address in `env` whose port is one of `ports` (container port
    numbers) a free port on 127.0.0.1. Returns the new env and {container port: host port}."""
    moved = {p: free_port() for p in ports}
    out = {}
    for k, v in env.items():
        m = re.fullmatch(r"(?:\d{1,3}(?:\.\d{1,3}){3}|\[[0-9a-f:]*\]|localhost):(\d+)", v)
        if m and int(m.group(1)) in moved:
            v = f"127.0.0.1:{moved[int(m.group(1))]}"
        out[k] = v
    return out, moved


# ----------------------------------------------------------------------------- processes

class Process:
    """One hookline process, as a container of a pod or compose service would run it."""

    def __init__(self, name, binary, argv, env, logdir):
        if not argv or argv[0] != "hookline":
            fail(f"{name}: the container runs {argv!r}; expected the image's hookline entrypoint")
        self.name, self.env = name, env
        self.argv = [binary] + argv[1:]
        self.cwd = tempfile.mkdtemp(prefix=f"{name}-", dir=logdir)  # the image's WORKDIR
        self.log_path = os.path.join(logdir, f"{name}.log")
        self.proc = None

    def base_env(self):
        return {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": self.cwd, **self.env}

    def run(self, timeout):
        with open(self.log_path, "w") as log:
            try:
                rc = subprocess.run(self.argv, env=self.base_env(), cwd=self.cwd, stdout=log,
                                    stderr=subprocess.STDOUT, timeout=timeout).returncode
            except subprocess.TimeoutExpired:
                rc = "timeout"
        return rc

    def start(self):
        self.log = open(self.log_path, "w")
        self.proc = subprocess.Popen(self.argv, env=self.base_env(), cwd=self.cwd,
                                     stdout=self.log, stderr=subprocess.STDOUT)

    def exited(self):
        return self.proc is not None and self.proc.poll() is not None

    def tail(self, lines=15):
        try:
            with open(self.log_path) as f:
                return "".join(f.readlines()[-lines:])
        except OSError:
            return ""

    def stop(self):
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def wait_until(process, check, what, budget):
    """Polls `check()` until it is true; fails when the process exits or `budget` passes."""
    deadline = time.monotonic() + min(budget, MAX_WAIT_S)
    while time.monotonic() < deadline:
        if process.exited():
            fail(f"{process.name} exited ({process.proc.returncode}) before {what}:\n{process.tail()}")
        if check():
            return time.monotonic()
        time.sleep(0.25)
    fail(f"{process.name}: {what} did not pass within {min(budget, MAX_WAIT_S)}s:\n{process.tail()}")


def http_ok(port, path):
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=3) as r:
            return 200 <= r.status < 400
    except (urllib.error.URLError, OSError):
        return False


def create_key(binary, argv, env, logdir, name):
    """Runs a `hookline admin create-key …` command line and returns the token it printed."""
    p = Process(name, binary, argv, env, logdir)
    rc = p.run(timeout=60)
    if rc != 0:
        fail(f"`{' '.join(argv)}` exited {rc}:\n{p.tail()}")
    with open(p.log_path) as f:
        tokens = [ln.strip() for ln in f if ln.strip().startswith("hl_")]
    if not tokens:
        fail(f"`{' '.join(argv)}` printed no token:\n{p.tail()}")
    return tokens[-1]


# ----------------------------------------------------------------------------- chart

def hook_info(doc):
    ann = doc["metadata"].get("annotations") or {}
    hooks = [h.strip() for h in ann.get("helm.sh/hook", "").split(",") if h.strip()]
    return hooks, int(ann.get("helm.sh/hook-weight", "0"))


def container_argv(container):
    return (container.get("command") or IMAGE_ENTRYPOINT) + (container.get("args") or ([] if container.get("command") else IMAGE_CMD))


def probe_port(container, probe, moved):
    port = probe["httpGet"]["port"]
    if isinstance(port, str):
        named = {p["name"]: p["containerPort"] for p in container.get("ports") or [] if "name" in p}
        if port not in named:
            fail(f"probe port {port!r} is not a port of container {container['name']}")
        port = named[port]
    if port not in moved:
        fail(f"probe port {port} is not a listen port of container {container['name']}")
    return moved[port]


def run_chart(a):
    docs = [d for d in yaml.safe_load_all(open(a.rendered)) if d]
    notes = open(a.notes).read()
    started = []
    try:
        # 1. Hooks of an install, in weight order; each sees only the hook objects
        #    created before it (the release's own objects do not exist yet).
        hooks = sorted(((hook_info(d)[1], i, d) for i, d in enumerate(docs)
                        if "pre-install" in hook_info(d)[0]), key=lambda t: (t[0], t[1]))
        for weight, _, doc in hooks:
            if doc["kind"] != "Job":
                continue
            earlier = Objects([d for w, _, d in hooks if w < weight])
            spec = doc["spec"]["template"]["spec"]
            for c in spec["containers"]:
                what = f"hook Job {doc['metadata']['name']} container {c['name']}"
                p = Process(f"{doc['metadata']['name']}-{c['name']}", a.bin, container_argv(c),
                            earlier.env(c, what), a.workdir)
                t0 = time.monotonic()
                rc = p.run(timeout=min(spec.get("activeDeadlineSeconds", MAX_WAIT_S), MAX_WAIT_S))
                if rc != 0:
                    fail(f"{what}: `{' '.join(container_argv(c))}` exited {rc}:\n{p.tail()}")
                print(f"   hook {doc['metadata']['name']}: `{' '.join(container_argv(c))}` exited 0 "
                      f"in {time.monotonic() - t0:.1f}s")
        # 2. Deployments, with every object of the release present.
        objects = Objects([d for d in docs if not hook_info(d)[0]])
        by_component = {}
        for doc in (d for d in docs if d["kind"] == "Deployment" and not hook_info(d)[0]):
            name = doc["metadata"]["name"]
            spec = doc["spec"]["template"]["spec"]
            (c,) = spec["containers"]
            env, moved = move_ports(objects.env(c, f"Deployment {name}"),
                                    [p["containerPort"] for p in c.get("ports") or []])
            p = Process(name, a.bin, container_argv(c), env, a.workdir)
            p.start()
            started.append(p)
            p.moved = moved
            p.container = c
            component = doc["metadata"]["labels"].get("app.kubernetes.io/component", name)
            by_component[component] = p
        for p in started:
            c = p.container
            probe = c["readinessProbe"]
            port = probe_port(c, probe, p.moved)
            startup = c.get("startupProbe") or {}
            budget = startup.get("periodSeconds", 10) * startup.get("failureThreshold", 3)
            t0 = time.monotonic()
            wait_until(p, lambda: http_ok(port, probe["httpGet"]["path"]), "its readiness probe", budget)
            print(f"   deployment {p.name}: `{' '.join(container_argv(c))}` ready "
                  f"({probe['httpGet']['path']} on moved port {port}) after {time.monotonic() - t0:.1f}s")
        # 3. The first key, as NOTES.txt tells an operator.
        m = re.search(r"kubectl .*exec deploy/(\S+) -- (hookline admin create-key[^\n]*)", notes)
        if not m:
            fail("NOTES.txt does not say how to create an API key (kubectl exec deploy/… -- hookline admin create-key …)")
        pod = next((p for p in started if p.name == m.group(1)), None)
        if pod is None:
            fail(f"NOTES.txt runs the key command in deploy/{m.group(1)}, which the chart does not render")
        token = create_key(a.bin, shlex.split(m.group(2)), pod.env, a.workdir, "create-key")
        print(f"   key: `{m.group(2)}` in deploy/{pod.name} printed a token")
        # 4. One event through ingest, delivered by the dispatcher.
        grpc = {k: f"http://127.0.0.1:{probe_port(p.container, {'httpGet': {'port': 'grpc'}}, p.moved)}"
                for k, p in by_component.items() if k in ("registry", "ingest")}
        print("   " + deliver_one(a.bin, grpc["registry"], grpc["ingest"], token))
    finally:
        for p in reversed(started):
            p.stop()


# ----------------------------------------------------------------------------- compose

def interpolate(value):
    """Compose's ${VAR}, ${VAR:-default} and ${VAR-default}, from this environment."""
    def sub(m):
        name, op, default = m.group(1), m.group(2), m.group(3) or ""
        v = os.environ.get(name)
        if op == ":-":
            return v if v else default
        if op == "-":
            return v if v is not None else default
        return v or ""
    if isinstance(value, str):
        return re.sub(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?-)([^}]*))?\}", sub, value)
    if isinstance(value, list):
        return [interpolate(v) for v in value]
    if isinstance(value, dict):
        return {k: interpolate(v) for k, v in value.items()}
    return value


def compose_env(service):
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(e.split("=", 1) if "=" in e else (e, os.environ.get(e, "")) for e in env)
    return {k: "" if v is None else str(v) for k, v in env.items()}


def run_compose(a):
    compose = interpolate(yaml.safe_load(open(a.compose)))
    readme = open(a.readme).read()
    image = compose["x-hookline"]["image"]
    services = {n: s for n, s in compose["services"].items()
                if s.get("image") == image and "command" in s and not s.get("profiles")}
    replaced = {"HOOKLINE_DATABASE_URL": a.database_url, "HOOKLINE_AMQP_URL": a.amqp_url,
                "HOOKLINE_QUEUE_PREFIX": a.queue_prefix}

    def env_of(s):
        env = compose_env(s)
        env.update({k: v for k, v in replaced.items() if k in env})
        return env

    oneshots = [n for n, s in services.items() if str(s.get("restart")) == "no"]
    started = []
    try:
        for n in oneshots:
            argv = IMAGE_ENTRYPOINT + services[n]["command"]
            p = Process(f"compose-{n}", a.bin, argv, env_of(services[n]), a.workdir)
            rc = p.run(timeout=MAX_WAIT_S)
            if rc != 0:
                fail(f"compose service {n}: `{' '.join(argv)}` exited {rc}:\n{p.tail()}")
            print(f"   compose {n}: `{' '.join(argv)}` exited 0")
        by_name = {}
        for n, s in services.items():
            if n in oneshots:
                continue
            # Inside the compose network every container listens on 50051 and 9090.
            env, moved = move_ports(env_of(s), [50051, 9090])
            p = Process(f"compose-{n}", a.bin, IMAGE_ENTRYPOINT + s["command"], env, a.workdir)
            p.moved, p.service = moved, s
            p.start()
            started.append(p)
            by_name[n] = p
        for p in started:
            test = p.service["healthcheck"]["test"]
            if test[0] != "CMD":
                fail(f"{p.name}: healthcheck {test[0]} is not supported here")
            argv = [re.sub(r"(?<=[/:])(50051|9090)\b", lambda m: str(p.moved[int(m.group(1))]), t)
                    for t in test[1:]]
            t0 = time.monotonic()
            wait_until(p, lambda: subprocess.run(argv, capture_output=True, timeout=10).returncode == 0,
                       "its healthcheck", MAX_WAIT_S)
            print(f"   compose {p.name[8:]}: `{' '.join(IMAGE_ENTRYPOINT + p.service['command'])}` healthy "
                  f"after {time.monotonic() - t0:.1f}s")
        # The walk-through's command line (`hc run --rm SERVICE admin create-key …`).
        m = re.search(r"^\w+ run --rm (\S+) (admin create-key[^\n#]*)", readme, re.M)
        if not m:
            fail("deploy/README.md does not say how to create an API key (… run --rm SERVICE admin create-key …)")
        svc = compose["services"].get(m.group(1))
        if svc is None:
            fail(f"deploy/README.md runs the key command in service {m.group(1)}, which compose.yaml lacks")
        token = create_key(a.bin, IMAGE_ENTRYPOINT + shlex.split(m.group(2)), env_of(svc), a.workdir,
                           "compose-create-key")
        print(f"   key: `run --rm {m.group(1)} {m.group(2).strip()}` printed a token")
        grpc = {n: f"http://127.0.0.1:{by_name[n].moved[50051]}" for n in ("registry", "ingest")}
        print("   " + deliver_one(a.bin, grpc["registry"], grpc["ingest"], token))
    finally:
        for p in reversed(started):
            p.stop()


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--bin", required=True)
    p.add_argument("--workdir", required=True, help="logs and working directories go here")
    sub = p.add_subparsers(dest="what", required=True)
    c = sub.add_parser("chart")
    c.add_argument("--rendered", required=True, help="output of helm template")
    c.add_argument("--notes", required=True, help="the rendered NOTES.txt")
    d = sub.add_parser("compose")
    d.add_argument("--compose", required=True)
    d.add_argument("--readme", required=True)
    d.add_argument("--database-url", required=True)
    d.add_argument("--amqp-url", required=True)
    d.add_argument("--queue-prefix", required=True)
    a = p.parse_args()
    (run_chart if a.what == "chart" else run_compose)(a)


if __name__ == "__main__":
    main()
