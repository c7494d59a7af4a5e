#!/usr/bin/env python3
"""Generates helm/hookline/values.schema.json (JSON Schema draft-07) for the Hookline chart.

The schema is written by this script rather than by hand because the four components
share one shape. After changing values.yaml, change this script and run

    python3 deploy/ci/gen_values_schema.py > helm/hookline/values.schema.json

deploy/ci/chart-check.sh fails when the committed schema differs from this output, and
chart_assertions.py when a value lacks a schema entry (or the reverse). Objects the chart
defines are closed (additionalProperties: false), so a misspelt key is an error;
Kubernetes objects passed through as they are (affinity, tolerations, ...) are only
type-checked here and validated by the API server.
"""

import json
import sys


def obj(props, required=None, desc=None, **extra):
    """A closed object: only the listed properties."""
    o = {"type": "object", "additionalProperties": False, "properties": props}
    if required:
        o["required"] = required
    if desc:
        o["description"] = desc
    o.update(extra)
    return o


def string(desc=None, **extra):
    o = {"type": "string"}
    if desc:
        o["description"] = desc
    o.update(extra)
    return o


def integer(desc=None, minimum=None, maximum=None, nullable=False):
    o = {"type": ["integer", "null"] if nullable else "integer"}
    if desc:
        o["description"] = desc
    if minimum is not None:
        o["minimum"] = minimum
    if maximum is not None:
        o["maximum"] = maximum
    return o


def boolean(desc=None):
    o = {"type": "boolean"}
    if desc:
        o["description"] = desc
    return o


def array(desc=None, items=None):
    o = {"type": "array", "items": items or {"type": "object"}}
    if desc:
        o["description"] = desc
    return o


def any_object(desc=None):
    """An open object (a Kubernetes type passed through as it is)."""
    o = {"type": "object"}
    if desc:
        o["description"] = desc
    return o


def ref(name):
    return {"$ref": "#/definitions/" + name}


def port():
    return integer(None, 1, 65535)


DURATION = {"type": "string", "pattern": "^([0-9]+(\\.[0-9]+)?(ms|s|m|h))+$"}
ENV_NAME = {"type": "string", "pattern": "^[A-Za-z_][A-Za-z0-9_]*$"}
# An IPv4 or IPv6 address or CIDR block (Hookline checks the exact form when it starts).
CIDR = {"type": "string", "pattern": "^[0-9A-Fa-f:.]+(/[0-9]{1,3})?$"}

definitions = {
    "labels": {"type": "object", "additionalProperties": {"type": "string"},
               "description": "string-to-string map"},
    "envVars": array("EnvVar objects", {
        "type": "object", "required": ["name"],
        "properties": {"name": {"type": "string", "pattern": "^[-._a-zA-Z][-._a-zA-Z0-9]*$"}}}),
    "resources": {"type": "object", "additionalProperties": False, "properties": {
        "requests": {"type": "object", "additionalProperties": {"type": ["string", "number"]}},
        "limits": {"type": "object", "additionalProperties": {"type": ["string", "number"]}},
        "claims": {"type": "array"}}},
    "pdb": obj({
        "enabled": boolean("render a PodDisruptionBudget"),
        "minAvailable": {"type": ["integer", "string", "null"],
                         "description": "pods that must stay available (integer or percentage); wins over maxUnavailable"},
        "maxUnavailable": {"type": ["integer", "string", "null"],
                           "description": "pods that may be unavailable (integer or percentage)"},
    }, ["enabled"]),
    "autoscaling": obj({
        "enabled": boolean(),
        "minReplicas": integer(None, 1),
        "maxReplicas": integer(None, 1),
        "targetCPUUtilizationPercentage": integer(None, 1, None, True),
        "targetMemoryUtilizationPercentage": integer(None, 1, None, True),
        "behavior": any_object("HorizontalPodAutoscalerBehavior"),
    }, ["enabled", "minReplicas", "maxReplicas"]),
    "updateStrategy": {"type": "object", "additionalProperties": False, "required": ["type"], "properties": {
        "type": {"type": "string", "enum": ["RollingUpdate", "Recreate"]},
        "rollingUpdate": {"type": "object", "additionalProperties": False, "properties": {
            "maxSurge": {"type": ["integer", "string"]},
            "maxUnavailable": {"type": ["integer", "string"]}}}}},
    "serviceType": {"type": "string", "enum": ["ClusterIP", "NodePort", "LoadBalancer"]},
}


def component(grpc, keda=False):
    service = {"type": ref("serviceType"), "annotations": ref("labels"), "adminPort": port()}
    service_required = ["type", "adminPort"]
    if grpc:
        service["grpcPort"] = port()
        service_required.append("grpcPort")
    props = {
        "replicaCount": integer("replicas when autoscaling is off", 0),
        "databaseMaxConnections": integer("PostgreSQL pool size per pod", 1, 1000),
        "resources": ref("resources"),
        "extraEnv": ref("envVars"),
        "podAnnotations": ref("labels"),
        "podLabels": ref("labels"),
        "priorityClassName": string(),
        "nodeSelector": ref("labels"),
        "tolerations": array(),
        "affinity": any_object(),
        "topologySpreadConstraints": array(None, {
            "type": "object", "required": ["maxSkew", "topologyKey", "whenUnsatisfiable"]}),
        "updateStrategy": ref("updateStrategy"),
        "terminationGracePeriodSeconds": integer(None, 0),
        "preStopSleepSeconds": integer(None, 0, 300),
        "service": obj(service, service_required),
        "pdb": ref("pdb"),
        "autoscaling": ref("autoscaling"),
    }
    if keda:
        props["keda"] = obj({
            "enabled": boolean(),
            "minReplicaCount": integer(None, 0),
            "maxReplicaCount": integer(None, 1),
            "pollingInterval": integer(None, 1),
            "cooldownPeriod": integer(None, 0),
            "queueLength": integer(None, 1),
            "activationQueueLength": integer(None, 0),
            "behavior": any_object(),
        }, ["enabled", "minReplicaCount", "maxReplicaCount", "queueLength"])
    # Pass-through Kubernetes settings may be dropped (`--set registry.affinity=null`);
    # the rest shapes the objects and must be there.
    optional = {"extraEnv", "podAnnotations", "podLabels", "priorityClassName", "nodeSelector",
                "tolerations", "affinity", "topologySpreadConstraints"}
    return obj(props, [k for k in props if k not in optional])


for name in ("registry", "ingest", "retry"):
    definitions["component_" + name] = component(grpc=True)
definitions["component_dispatcher"] = component(grpc=False, keda=True)


def probe(extra=None):
    props = {"periodSeconds": integer(None, 1), "failureThreshold": integer(None, 1),
             "timeoutSeconds": integer(None, 1)}
    props.update(extra or {})
    return obj(props, ["periodSeconds", "failureThreshold", "timeoutSeconds"])


schema = {
    "$schema": "http://json-schema.org/draft-07/schema#",
    "title": "Values of the Hookline chart",
    "type": "object",
    "additionalProperties": False,
    "definitions": definitions,
    "properties": {
        "global": any_object("set by parent charts; unused"),
        "nameOverride": string(),
        "fullnameOverride": string(maxLength=52),
        "commonLabels": ref("labels"),
        "image": obj({
            "repository": string(minLength=1),
            "tag": string(),
            "digest": string(pattern="^(sha256:[a-f0-9]{64})?$"),
            "pullPolicy": {"type": "string", "enum": ["Always", "IfNotPresent", "Never"]},
        }, ["repository", "pullPolicy"]),
        "imagePullSecrets": array(None, {"type": "object", "required": ["name"],
                                         "properties": {"name": {"type": "string"}}}),
        "serviceAccount": obj({"create": boolean(), "name": string(), "annotations": ref("labels"),
                               "automountServiceAccountToken": boolean()},
                              ["create", "automountServiceAccountToken"]),
        "database": obj({"url": string(pattern="^$|^postgres(ql)?://"), "existingSecret": string(),
                         "existingSecretKey": string(minLength=1)}, ["existingSecretKey"]),
        "amqp": obj({"url": string(pattern="^$|^amqps?://"), "existingSecret": string(),
                     "existingSecretKey": string(minLength=1), "tlsSecretName": string(),
                     "clientCert": boolean()}, ["existingSecretKey"]),
        "encryption": obj({"existingSecret": string(), "existingSecretKey": string(minLength=1)},
                          ["existingSecretKey"]),
        "tls": obj({"enabled": boolean(), "secretName": string(), "clientAuth": boolean()},
                   ["enabled"]),
        "config": obj({
            "queuePrefix": string(pattern="^[A-Za-z0-9][A-Za-z0-9_.:-]{0,100}$"),
            "log": string(minLength=1),
            "logFormat": {"type": "string", "enum": ["json", "text"]},
            "migrateOnStart": boolean(),
            "maxPayloadBytes": integer(None, 1, 67108864),
            "dispatcherConcurrency": integer(None, 1),
            "dispatcherPrefetch": integer(None, 1, 65535),
            "dispatcherShardPrefetch": integer(None, 1, 65535),
            "deliveryShards": integer(None, 1, 256),
            "requestTimeoutMs": integer(None, 1),
            "retryPollIntervalMs": integer(None, 1),
            "relayGraceMs": integer(None, 0),
            "shutdownDrainSecs": integer(None, 0, 600),
            "extra": {"type": "object", "propertyNames": ENV_NAME,
                      "additionalProperties": {"type": ["string", "number", "boolean"]}},
        }, ["queuePrefix", "log", "logFormat", "migrateOnStart", "maxPayloadBytes",
            "dispatcherConcurrency", "dispatcherPrefetch", "dispatcherShardPrefetch",
            "deliveryShards", "requestTimeoutMs",
            "retryPollIntervalMs", "relayGraceMs", "shutdownDrainSecs"]),
        "extraEnv": ref("envVars"),
        "extraEnvFrom": array(),
        "extraVolumes": array(None, {"type": "object", "required": ["name"]}),
        "extraVolumeMounts": array(None, {"type": "object", "required": ["name", "mountPath"]}),
        "containerPorts": obj({"grpc": port(), "admin": port()}, ["grpc", "admin"]),
        "podAnnotations": ref("labels"),
        "podLabels": ref("labels"),
        "podSecurityContext": any_object("PodSecurityContext"),
        "securityContext": any_object("SecurityContext"),
        "probes": obj({"startup": probe(), "liveness": probe(),
                       "readiness": probe({"successThreshold": integer(None, 1)})},
                      ["startup", "liveness", "readiness"]),
        "revisionHistoryLimit": integer(None, 0),
        "registry": ref("component_registry"),
        "ingest": ref("component_ingest"),
        "dispatcher": ref("component_dispatcher"),
        "retry": ref("component_retry"),
        "migrations": obj({
            "enabled": boolean(),
            "serviceAccountName": string(),
            "databaseMaxConnections": integer(None, 1, 100),
            "backoffLimit": integer(None, 0),
            "activeDeadlineSeconds": integer(None, 1),
            "resources": ref("resources"),
            "podAnnotations": ref("labels"),
            "podLabels": ref("labels"),
            "nodeSelector": ref("labels"),
            "tolerations": array(),
            "affinity": any_object(),
        }, ["enabled", "databaseMaxConnections", "backoffLimit", "activeDeadlineSeconds", "resources"]),
        "ingress": obj({
            "enabled": boolean(),
            "className": string(),
            "annotations": ref("labels"),
            "hosts": array(None, {"type": "string", "minLength": 1}),
            "expose": {"type": "array", "uniqueItems": True,
                       "items": {"type": "string", "enum": ["ingest", "registry", "retry"]}},
            "tls": array(None, {"type": "object", "properties": {
                "secretName": {"type": "string"},
                "hosts": {"type": "array", "items": {"type": "string"}}}}),
        }, ["enabled", "hosts", "expose"]),
        "networkPolicy": obj({"enabled": boolean(), "grpcFrom": array(), "adminFrom": array()}, ["enabled"]),
        "egress": obj({
            "allow": array(None, CIDR),
            "deny": array(None, CIDR),
            "proxy": string(pattern="^(https?://[^\\s]+)?$"),
            "networkPolicy": obj({
                "enabled": boolean(),
                "deniedCidrs": array(None, CIDR),
                "dnsTo": array(),
                "extraEgress": array(),
            }, ["enabled"]),
        }, ["allow", "deny", "proxy", "networkPolicy"]),
        "receiverTls": obj({
            # A Secret name (DNS subdomain) or empty for none.
            "clientCertSecret": string(
                "Secret with tls.crt and tls.key: the default client certificate for receivers",
                maxLength=253, pattern="^([a-z0-9]([-a-z0-9.]*[a-z0-9])?)?$"),
            "caSecret": string(
                "Secret with extra PEM CA certificates trusted for receivers",
                maxLength=253, pattern="^([a-z0-9]([-a-z0-9.]*[a-z0-9])?)?$"),
            "caSecretKey": string("Key of the CA bundle in caSecret",
                                  minLength=1, maxLength=253, pattern="^[-._a-zA-Z0-9]+$"),
        }, ["clientCertSecret", "caSecret", "caSecretKey"]),
        "metrics": obj({
            "scrapeAnnotations": boolean(),
            "serviceMonitor": obj({
                "enabled": boolean(), "namespace": string(), "labels": ref("labels"),
                "interval": DURATION, "scrapeTimeout": DURATION,
                "relabelings": array(), "metricRelabelings": array(),
            }, ["enabled", "interval", "scrapeTimeout"]),
            "prometheusRule": obj({
                "enabled": boolean(), "namespace": string(), "labels": ref("labels"),
                "defaultRules": boolean(),
                "failedDeliveryRatio": {"type": "number", "exclusiveMinimum": 0, "maximum": 1},
                "additionalRules": array(),
            }, ["enabled", "defaultRules", "failedDeliveryRatio"]),
        }, ["serviceMonitor", "prometheusRule"]),
        "tests": obj({"enabled": boolean()}, ["enabled"]),
    },
    # Everything the templates read without a fallback; dropping one of these (for
    # example `--set securityContext=null`) would silently weaken or break the objects.
    "required": ["image", "serviceAccount", "database", "amqp", "encryption", "config", "containerPorts",
                 "podSecurityContext", "securityContext", "probes", "revisionHistoryLimit",
                 "registry", "ingest", "dispatcher", "retry", "migrations", "ingress",
                 "networkPolicy", "metrics", "tests", "egress", "receiverTls"],
}

json.dump(schema, sys.stdout, indent=2)
sys.stdout.write("\n")
