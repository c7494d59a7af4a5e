#!/usr/bin/env python3
"""Checks on the Hookline chart that neither `helm lint` nor schema validation makes.

Usage: chart_assertions.py CHART_DIR DEFAULT_RENDER ALL_OPTIONS_RENDER

- every value in values.yaml has a schema entry and a row in the chart README;
- every pod (Deployments, the migration Job, the test Pod) runs with the restrictive
  security context, resources, and the image;
- each Deployment runs `serve --services <component>` with probes on the admin port;
- the migration hook: weights and delete policies, its Secret created before it, never
  a chart-created object it can't have on a first install (ConfigMap, ServiceAccount);
- every Secret a pod references is rendered by the chart or is a declared existingSecret;
- KEDA on means no chart HPA for the dispatcher, and its triggers read every work queue
  (unsharded and each shard of deliveries and retries), summed by scalingModifiers;
- Services: gRPC on registry, ingest, retry; admin only on the dispatcher.

Prints one line per failed check and exits 1 if any failed. Needs PyYAML only.
"""

import re
import sys
from pathlib import Path

import yaml

COMPONENTS = ["registry", "ingest", "dispatcher", "retry"]
GRPC = {"registry", "ingest", "retry"}

failures: list[str] = []
checks = 0


def check(cond: bool, message: str) -> None:
    global checks
    checks += 1
    if not cond:
        failures.append(message)


def load(path: str) -> list[dict]:
    with open(path) as f:
        return [d for d in yaml.safe_load_all(f) if d]


# ---------------------------------------------------------------- values, schema, README

def schema_node(schema: dict, node: dict) -> dict:
    while "$ref" in node:
        ref = node["$ref"]
        assert ref.startswith("#/definitions/"), ref
        node = schema["definitions"][ref[len("#/definitions/"):]]
    return node


# Kubernetes-shaped values documented as one row each, though their schema is closed.
LEAF_REFS = {"#/definitions/resources", "#/definitions/updateStrategy"}


def documented_keys(values: dict, schema: dict, node: dict, prefix: str = "") -> list[str]:
    """Leaves of values.yaml: recursion stops at values whose schema is not a closed object."""
    keys = []
    for key, value in values.items():
        path = f"{prefix}{key}"
        props = schema_node(schema, node).get("properties", {})
        check(key in props, f"values.schema.json has no entry for `{path}`")
        if key not in props:
            continue
        child = schema_node(schema, props[key])
        if (isinstance(value, dict) and child.get("additionalProperties") is False
                and props[key].get("$ref") not in LEAF_REFS):
            keys.extend(documented_keys(value, schema, child, path + "."))
        else:
            keys.append(path)
    return keys


def check_docs(chart: Path) -> None:
    values = yaml.safe_load((chart / "values.yaml").read_text())
    schema = yaml.safe_load((chart / "values.schema.json").read_text())
    check(schema.get("$schema", "").startswith("http://json-schema.org/draft-07/"),
          "values.schema.json is not draft-07")
    readme = (chart / "README.md").read_text()
    leaves = documented_keys(values, schema, schema)
    # A row `<component>.x` documents x of every component that has it.
    table_keys = set()
    for key in re.findall(r"^\|\s*`([^`]+)`\s*\|", readme, flags=re.M):
        if key.startswith("<component>."):
            expanded = {c + key[len("<component>"):] for c in COMPONENTS} & set(leaves)
            check(bool(expanded), f"README.md documents `{key}`, which no component has")
            table_keys |= expanded
        else:
            check(key in leaves, f"README.md documents `{key}`, which values.yaml does not have")
            table_keys.add(key)
    for key in leaves:
        check(key in table_keys, f"README.md has no table row for value `{key}`")
    # Keys of the closed objects in the schema that values.yaml leaves out would be
    # undocumented options: every schema property must appear in values.yaml.
    def walk(node: dict, vals, prefix: str) -> None:
        if node.get("$ref") in LEAF_REFS:
            return
        node = schema_node(schema, node)
        if node.get("additionalProperties") is not False or not isinstance(vals, dict):
            return
        for key, sub in node.get("properties", {}).items():
            if prefix == "" and key == "global":
                continue
            check(key in vals, f"values.schema.json allows `{prefix}{key}` but values.yaml does not set it")
            if key in vals:
                walk(sub, vals[key], f"{prefix}{key}.")
    walk(schema, values, "")


# ---------------------------------------------------------------- renderings

def pod_specs(docs: list[dict]):
    for d in docs:
        if d["kind"] in ("Deployment", "Job"):
            yield d, d["spec"]["template"]["spec"]
        elif d["kind"] == "Pod":
            yield d, d["spec"]


def check_render(name: str, docs: list[dict], existing_secrets: set[str], keda: bool, prefix: str,
                 shards: int = 16) -> None:
    by_kind: dict[str, list[dict]] = {}
    for d in docs:
        by_kind.setdefault(d["kind"], []).append(d)
    rendered_secrets = {d["metadata"]["name"] for d in by_kind.get("Secret", [])}
    images = set()

    for obj, spec in pod_specs(docs):
        where = f"[{name}] {obj['kind']} {obj['metadata']['name']}"
        psc = spec.get("securityContext", {})
        check(psc.get("runAsNonRoot") is True, f"{where}: pod runAsNonRoot is not true")
        check(psc.get("runAsUser") == 10001, f"{where}: pod runAsUser is not 10001")
        check(psc.get("seccompProfile", {}).get("type") == "RuntimeDefault", f"{where}: seccompProfile is not RuntimeDefault")
        check(spec.get("automountServiceAccountToken") is False, f"{where}: service account token is mounted")
        check(spec.get("enableServiceLinks") is False, f"{where}: service links are on (they inject HOOKLINE_* variables)")
        for c in spec["containers"]:
            csc = c.get("securityContext", {})
            cw = f"{where} container {c['name']}"
            check(csc.get("readOnlyRootFilesystem") is True, f"{cw}: root filesystem is writable")
            check(csc.get("allowPrivilegeEscalation") is False, f"{cw}: allowPrivilegeEscalation is not false")
            check("ALL" in csc.get("capabilities", {}).get("drop", []), f"{cw}: capabilities do not drop ALL")
            check(bool(c.get("resources", {}).get("requests")), f"{cw}: no resource requests")
            images.add(c["image"])
            for env in c.get("env", []):
                ref = env.get("valueFrom", {}).get("secretKeyRef")
                if ref:
                    check(ref["name"] in rendered_secrets or ref["name"] in existing_secrets,
                          f"{cw}: env {env['name']} reads Secret {ref['name']}, which is neither rendered nor an existingSecret")
    check(len(images) == 1, f"[{name}] pods use more than one image: {sorted(images)}")

    deployments = {d["metadata"]["labels"]["app.kubernetes.io/component"]: d for d in by_kind.get("Deployment", [])}
    check(sorted(deployments) == sorted(COMPONENTS), f"[{name}] Deployments are {sorted(deployments)}, want {COMPONENTS}")
    for comp, d in deployments.items():
        c = d["spec"]["template"]["spec"]["containers"][0]
        where = f"[{name}] Deployment {d['metadata']['name']}"
        check(c.get("args") == ["serve", "--services", comp], f"{where}: args are {c.get('args')}")
        check(c["readinessProbe"]["httpGet"]["path"] == "/readyz", f"{where}: readiness is not /readyz")
        check(c["livenessProbe"]["httpGet"]["path"] == "/healthz", f"{where}: liveness is not /healthz")
        check("startupProbe" in c, f"{where}: no startupProbe")
        ports = {p["name"] for p in c["ports"]}
        check(("grpc" in ports) == (comp in GRPC), f"{where}: container ports {sorted(ports)}")
        check("checksum/config" in d["spec"]["template"]["metadata"].get("annotations", {}), f"{where}: no checksum/config annotation")
        refs = [e["configMapRef"]["name"] for e in c.get("envFrom", []) if "configMapRef" in e]
        check(refs and refs[0] in {m["metadata"]["name"] for m in by_kind.get("ConfigMap", [])},
              f"{where}: does not read the chart's ConfigMap")
        sel = d["spec"]["selector"]["matchLabels"]
        tmpl = d["spec"]["template"]["metadata"]["labels"]
        check(all(tmpl.get(k) == v for k, v in sel.items()), f"{where}: pod labels do not match the selector")

    services = {s["metadata"]["labels"]["app.kubernetes.io/component"]: s for s in by_kind.get("Service", [])}
    check(sorted(services) == sorted(COMPONENTS), f"[{name}] Services are {sorted(services)}")
    for comp, s in services.items():
        ports = {p["name"] for p in s["spec"]["ports"]}
        want = {"grpc", "http-admin"} if comp in GRPC else {"http-admin"}
        check(ports == want, f"[{name}] Service {s['metadata']['name']}: ports {sorted(ports)}, want {sorted(want)}")

    # The migration hook and what it may rely on.
    jobs = by_kind.get("Job", [])
    check(len(jobs) == 1, f"[{name}] expected one migration Job, got {len(jobs)}")
    for job in jobs:
        ann = job["metadata"].get("annotations", {})
        where = f"[{name}] Job {job['metadata']['name']}"
        check(ann.get("helm.sh/hook") == "pre-install,pre-upgrade", f"{where}: hook is {ann.get('helm.sh/hook')}")
        check(ann.get("helm.sh/hook-delete-policy") == "before-hook-creation,hook-succeeded", f"{where}: delete policy")
        spec = job["spec"]["template"]["spec"]
        c = spec["containers"][0]
        check(c.get("args") == ["migrate"], f"{where}: args are {c.get('args')}")
        check(not any("configMapRef" in e for e in c.get("envFrom", [])), f"{where}: reads a ConfigMap (absent on first install)")
        chart_sa = {sa["metadata"]["name"] for sa in by_kind.get("ServiceAccount", [])}
        check(spec.get("serviceAccountName") not in chart_sa, f"{where}: uses the chart-created ServiceAccount (absent on first install)")
        job_weight = int(ann.get("helm.sh/hook-weight", "0"))
        secrets = {s["metadata"]["name"]: s for s in by_kind.get("Secret", [])}
        for env in c.get("env", []):
            ref = env.get("valueFrom", {}).get("secretKeyRef")
            if not ref:
                continue
            if ref["name"] in existing_secrets:
                continue
            sec = secrets.get(ref["name"])
            sann = (sec or {}).get("metadata", {}).get("annotations", {})
            check(sec is not None and "pre-install" in sann.get("helm.sh/hook", ""),
                  f"{where}: Secret {ref['name']} is not a pre-install hook (absent on first install)")
            if sec is not None:
                check(int(sann.get("helm.sh/hook-weight", "0")) < job_weight,
                      f"{where}: Secret {ref['name']} is not created before the Job (hook weight)")
                check(ref["key"] in sec.get("data", {}), f"{where}: Secret {ref['name']} has no key {ref['key']}")

    hpas = by_kind.get("HorizontalPodAutoscaler", [])
    scaled = by_kind.get("ScaledObject", [])
    dispatcher_hpa = [h for h in hpas if h["spec"]["scaleTargetRef"]["name"].endswith("-dispatcher")]
    if keda:
        check(not dispatcher_hpa, f"[{name}] KEDA is on but the chart renders an HPA for the dispatcher")
        check(len(scaled) == 1, f"[{name}] KEDA is on but {len(scaled)} ScaledObjects are rendered")
        for so in scaled:
            triggers = so["spec"]["triggers"]
            queues = {t["metadata"]["queueName"] for t in triggers}
            want = {f"{prefix}.deliveries", f"{prefix}.retries"} | {
                f"{prefix}.{kind}.{i}" for kind in ("deliveries", "retries") for i in range(shards)}
            check(queues == want, f"[{name}] ScaledObject queues {sorted(queues - want)} extra, {sorted(want - queues)} missing")
            formula = so["spec"].get("advanced", {}).get("scalingModifiers", {}).get("formula", "")
            check(sorted(formula.split(" + ")) == sorted(t["name"] for t in triggers),
                  f"[{name}] ScaledObject formula {formula!r} does not sum every trigger")
            for trig in triggers:
                check(trig["type"] == "rabbitmq", f"[{name}] ScaledObject trigger is {trig['type']}")
            trig = triggers[0]
            auth = {t["metadata"]["name"]: t for t in by_kind.get("TriggerAuthentication", [])}
            ta = auth.get(trig["authenticationRef"]["name"])
            check(ta is not None, f"[{name}] ScaledObject references a missing TriggerAuthentication")
            if ta:
                ref = ta["spec"]["secretTargetRef"][0]
                check(ref["name"] in rendered_secrets or ref["name"] in existing_secrets,
                      f"[{name}] TriggerAuthentication reads Secret {ref['name']}, which is neither rendered nor an existingSecret")
    else:
        check(not scaled, f"[{name}] ScaledObject rendered with KEDA off")

    pdbs = by_kind.get("PodDisruptionBudget", [])
    for p in pdbs:
        check(("minAvailable" in p["spec"]) != ("maxUnavailable" in p["spec"]),
              f"[{name}] PDB {p['metadata']['name']} must set exactly one of minAvailable/maxUnavailable")


def main() -> int:
    chart, default_render, all_render = Path(sys.argv[1]), sys.argv[2], sys.argv[3]
    all_values = yaml.safe_load((chart / "ci" / "all-options-values.yaml").read_text())
    check_docs(chart)
    check_render("default values", load(default_render), set(), keda=False, prefix="hookline")
    existing = {all_values["database"]["existingSecret"], all_values["amqp"]["existingSecret"]} - {""}
    check_render("all options", load(all_render), existing,
                 keda=all_values["dispatcher"]["keda"]["enabled"], prefix=all_values["config"]["queuePrefix"],
                 shards=all_values["config"].get("deliveryShards", 16))
    for f in failures:
        print(f"FAIL {f}")
    print(f"chart assertions: {checks - len(failures)} of {checks} held")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
