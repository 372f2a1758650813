"""JSON schemas for the custom resources deploy/k8s uses, limited to the fields it may set.

kubernetes-validate knows the built-in kinds only. These follow the field names and types of the
CRDs the resources are applied against (Prometheus Operator's monitoring.coreos.com/v1
ServiceMonitor, KEDA's keda.sh/v1alpha1 ScaledObject), written down here for the fields a
manifest in this repository sets or may reasonably set. Every object is closed
(``additionalProperties: false``), so a misspelt or misplaced field fails the test; a field used
here that the CRD lacks would have to be added below, against the CRD, consciously.
"""

from __future__ import annotations

DURATION = {"type": "string", "pattern": r"^(0|(([0-9]+)y)?(([0-9]+)w)?(([0-9]+)d)?(([0-9]+)h)?(([0-9]+)m)?(([0-9]+)s)?(([0-9]+)ms)?)$"}
STRING_MAP = {"type": "object", "additionalProperties": {"type": "string"}}
INT32 = {"type": "integer", "minimum": -(2**31), "maximum": 2**31 - 1}


def closed(properties: dict, required: tuple[str, ...] = ()) -> dict:
    return {"type": "object", "properties": properties, "required": list(required), "additionalProperties": False}


LABEL_SELECTOR = closed({
    "matchLabels": STRING_MAP,
    "matchExpressions": {"type": "array", "items": closed({
        "key": {"type": "string"}, "operator": {"type": "string"},
        "values": {"type": "array", "items": {"type": "string"}}}, ("key", "operator"))},
})

METADATA = {"type": "object", "properties": {"name": {"type": "string"}, "namespace": {"type": "string"},
                                              "labels": STRING_MAP, "annotations": STRING_MAP},
            "required": ["name"]}


def resource(api_version: str, kind: str, spec: dict) -> dict:
    return closed({"apiVersion": {"const": api_version}, "kind": {"const": kind}, "metadata": METADATA, "spec": spec},
                  ("apiVersion", "kind", "metadata", "spec"))


SERVICE_MONITOR = resource("monitoring.coreos.com/v1", "ServiceMonitor", closed({
    "jobLabel": {"type": "string"},
    "targetLabels": {"type": "array", "items": {"type": "string"}},
    "podTargetLabels": {"type": "array", "items": {"type": "string"}},
    "selector": LABEL_SELECTOR,
    "namespaceSelector": closed({"any": {"type": "boolean"}, "matchNames": {"type": "array", "items": {"type": "string"}}}),
    "sampleLimit": {"type": "integer", "minimum": 0},
    "endpoints": {"type": "array", "minItems": 1, "items": closed({
        "port": {"type": "string"},
        "targetPort": {"type": ["integer", "string"]},
        "path": {"type": "string"},
        "scheme": {"type": "string", "enum": ["http", "https", "HTTP", "HTTPS"]},
        "interval": DURATION,
        "scrapeTimeout": DURATION,
        "honorLabels": {"type": "boolean"},
        "authorization": closed({"type": {"type": "string"}, "credentials": closed({
            "name": {"type": "string"}, "key": {"type": "string"}, "optional": {"type": "boolean"}}, ("key",))}),
    })},
}, ("selector",)))

SCALED_OBJECT = resource("keda.sh/v1alpha1", "ScaledObject", closed({
    "scaleTargetRef": closed({"apiVersion": {"type": "string"}, "kind": {"type": "string"}, "name": {"type": "string"},
                              "envSourceContainerName": {"type": "string"}}, ("name",)),
    "pollingInterval": INT32,
    "cooldownPeriod": INT32,
    "initialCooldownPeriod": INT32,
    "idleReplicaCount": INT32,
    "minReplicaCount": INT32,
    "maxReplicaCount": INT32,
    "fallback": closed({"failureThreshold": INT32, "replicas": INT32}, ("failureThreshold", "replicas")),
    "advanced": closed({
        "restoreToOriginalReplicaCount": {"type": "boolean"},
        # behavior is autoscaling/v2's HorizontalPodAutoscalerBehavior: the test checks it with the
        # Kubernetes schema itself (wrapped in an HPA).
        "horizontalPodAutoscalerConfig": closed({"name": {"type": "string"}, "behavior": {"type": "object"}}),
    }),
    "triggers": {"type": "array", "minItems": 1, "items": closed({
        "type": {"type": "string"},
        "name": {"type": "string"},
        "metadata": STRING_MAP,            # map[string]string: every value a string ("4", not 4)
        "metricType": {"type": "string", "enum": ["AverageValue", "Value", "Utilization"]},
        "useCachedMetrics": {"type": "boolean"},
        "authenticationRef": closed({"name": {"type": "string"}, "kind": {"type": "string"}}, ("name",)),
    }, ("type", "metadata"))},
}, ("scaleTargetRef", "triggers")))

# A trigger's metadata is map[string]string in the CRD; each scaler reads its own keys and KEDA rejects a
# ScaledObject whose scaler finds a value it cannot parse, but a misspelt optional key ("lagcount") is
# silently ignored. These are the keys of the scalers used here (KEDA's pkg/scalers/prometheus_scaler.go,
# redis_streams_scaler.go and the connection fields in redis_scaler.go; "<key>FromEnv" reads a key from
# the scale target's environment), closed, with the counts as integer strings.
INTEGER_STRING = {"type": "string", "pattern": r"^[0-9]+$"}
NUMBER_STRING = {"type": "string", "pattern": r"^[0-9]+(\.[0-9]+)?$"}
BOOL_STRING = {"type": "string", "enum": ["true", "false"]}
TRIGGER_METADATA = {
    "prometheus": closed({
        "serverAddress": {"type": "string"}, "query": {"type": "string"}, "threshold": NUMBER_STRING,
        "activationThreshold": NUMBER_STRING, "namespace": {"type": "string"}, "customHeaders": {"type": "string"},
        "queryParameters": {"type": "string"}, "ignoreNullValues": BOOL_STRING, "unsafeSsl": BOOL_STRING,
        "timeout": INTEGER_STRING}, ("serverAddress", "query", "threshold")),
    "redis-streams": {**closed({
        **{key: {"type": "string"} for key in ("address", "host", "port", "addressFromEnv", "hostFromEnv",
                                               "portFromEnv", "usernameFromEnv", "passwordFromEnv")},
        "stream": {"type": "string", "minLength": 1}, "consumerGroup": {"type": "string"},
        "pendingEntriesCount": INTEGER_STRING, "streamLength": INTEGER_STRING, "lagCount": INTEGER_STRING,
        "activationLagCount": INTEGER_STRING, "databaseIndex": INTEGER_STRING, "enableTLS": BOOL_STRING,
        "unsafeSsl": BOOL_STRING}, ("stream",)),
        # where Redis is: an address, or a host and a port, given or read from the environment
        "anyOf": [{"required": ["address"]}, {"required": ["addressFromEnv"]},
                  {"anyOf": [{"required": ["host"]}, {"required": ["hostFromEnv"]}]}]},
}

# The Prometheus Adapter's rule format (its config.yaml; the Helm chart's rules.custom).
ADAPTER_RULE = closed({
    "seriesQuery": {"type": "string"},
    "seriesFilters": {"type": "array"},
    "resources": closed({"overrides": {"type": "object", "additionalProperties": closed({"resource": {"type": "string"}}, ("resource",))},
                         "template": {"type": "string"}}),
    "name": closed({"matches": {"type": "string"}, "as": {"type": "string"}}),
    "metricsQuery": {"type": "string"},
}, ("seriesQuery", "resources", "name", "metricsQuery"))

CUSTOM_RESOURCES = {("monitoring.coreos.com/v1", "ServiceMonitor"): SERVICE_MONITOR,
                    ("keda.sh/v1alpha1", "ScaledObject"): SCALED_OBJECT}
