"""Who may talk to whom, computed from the rendered NetworkPolicies with Kubernetes' semantics, against the
flows the deployment intends: hospitals isolated from each other, hospitals reaching only the aggregator,
central reaching hospitals only on the node API (5001) and metrics (8001)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pytest

from tests.k8s.test_manifests import K8S, kustomize, workloads

OUTSIDE = "outside"  # a client outside the cluster (through the Ingress or a LoadBalancer)
UNLISTED_PORT = 9999  # no container listens there: policies must not open it either


@dataclass(frozen=True)
class Pod:
    namespace: str
    name: str
    labels: dict[str, str]
    ports: tuple[int, ...]

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"


def selects(selector: dict[str, Any] | None, labels: dict[str, str]) -> bool:
    """Kubernetes label-selector semantics (matchLabels and matchExpressions with In / NotIn / Exists)."""
    if selector is None:
        return True
    if any(labels.get(k) != v for k, v in (selector.get("matchLabels") or {}).items()):
        return False
    for expression in selector.get("matchExpressions") or []:
        key, operator, values = expression["key"], expression["operator"], expression.get("values", [])
        if operator == "In" and labels.get(key) not in values:
            return False
        if operator == "NotIn" and labels.get(key) in values:
            return False
        if operator == "Exists" and key not in labels:
            return False
        if operator == "DoesNotExist" and key in labels:
            return False
    return True


def peer_matches(peer: dict[str, Any], other: Pod | None, own_namespace: str,
                 namespace_labels: dict[str, dict[str, str]]) -> bool:
    if other is None:  # outside the cluster: only an ipBlock or an empty peer list lets it in
        return "ipBlock" in peer
    if "ipBlock" in peer:
        return False  # pod traffic is not matched by ipBlocks here (pod IPs are not known)
    if "namespaceSelector" in peer:
        if not selects(peer["namespaceSelector"], namespace_labels[other.namespace]):
            return False
    elif other.namespace != own_namespace:
        return False  # a podSelector alone means: in the policy's own namespace
    return selects(peer.get("podSelector"), other.labels)


def rule_allows(rule: dict[str, Any], peers_key: str, other: Pod | None, port: int, own_namespace: str,
                namespace_labels: dict[str, dict[str, str]]) -> bool:
    ports = rule.get("ports")
    if ports and not any(p.get("port") == port for p in ports):
        return False
    peers = rule.get(peers_key)
    if not peers:
        return True  # no peers listed: every source or destination
    return any(peer_matches(p, other, own_namespace, namespace_labels) for p in peers)


def direction_allows(policies: list[dict[str, Any]], pod: Pod, direction: str, other: Pod | None, port: int,
                     namespace_labels: dict[str, dict[str, str]]) -> bool:
    """Whether `pod`'s policies let traffic in (Ingress, from `other`) or out (Egress, to `other`) on `port`."""
    relevant = [p for p in policies if p["metadata"]["namespace"] == pod.namespace
                and direction in p["spec"].get("policyTypes", ["Ingress"])
                and selects(p["spec"]["podSelector"], pod.labels)]
    if not relevant:
        return True  # no policy isolates this pod in that direction
    key, peers_key = ("ingress", "from") if direction == "Ingress" else ("egress", "to")
    return any(rule_allows(rule, peers_key, other, port, pod.namespace, namespace_labels)
               for policy in relevant for rule in policy["spec"].get(key) or [])


@pytest.fixture(scope="module")
def allowed() -> set[tuple[str, str, int]]:
    """Every (source, destination pod, port) the policies allow, the source being a pod or OUTSIDE."""
    objects = kustomize(K8S)
    namespace_labels = {o["metadata"]["name"]: {**(o["metadata"].get("labels") or {}),
                                                "kubernetes.io/metadata.name": o["metadata"]["name"]}
                        for o in objects if o["kind"] == "Namespace"}
    policies = [o for o in objects if o["kind"] == "NetworkPolicy"]
    pods = [Pod(o["metadata"]["namespace"], o["metadata"]["name"], t["metadata"]["labels"],
                tuple(p["containerPort"] for c in t["spec"]["containers"] for p in c.get("ports", [])))
            for o, t in workloads(objects)]
    flows = set()
    for destination in pods:
        for port in (*destination.ports, UNLISTED_PORT):
            if direction_allows(policies, destination, "Ingress", None, port, namespace_labels):
                flows.add((OUTSIDE, destination.key, port))
            for source in pods:
                if source is destination:
                    continue
                if (direction_allows(policies, source, "Egress", destination, port, namespace_labels)
                        and direction_allows(policies, destination, "Ingress", source, port, namespace_labels)):
                    flows.add((source.key, destination.key, port))
    return flows


CENTRAL = "health-mlops-central"
HOSPITALS = [f"hospital-{i}" for i in range(1, 6)]


def intended() -> set[tuple[str, str, int]]:
    central = {name: f"{CENTRAL}/{name}" for name in
               ("aggregator", "dashboard", "mlflow", "prometheus", "grafana", "start-training")}
    nodes = [f"{h}/federated-node" for h in HOSPITALS]
    flows = {(OUTSIDE, central["dashboard"], 7860), (OUTSIDE, central["grafana"], 3000)}
    flows |= {(node, central["aggregator"], 8080) for node in nodes}  # hospitals reach only the aggregator's API
    for name in ("dashboard", "start-training"):  # as the admin
        flows.add((central[name], central["aggregator"], 8080))
    # Only Prometheus reads the operations port, whose metrics carry every hospital's model metrics.
    flows.add((central["prometheus"], central["aggregator"], 8081))
    flows |= {(central[name], central["mlflow"], 5000) for name in ("aggregator", "dashboard")}
    flows.add((central["grafana"], central["prometheus"], 9090))
    flows.add((central["prometheus"], central["dashboard"], 7860))  # the aggregator it scrapes is above
    # Central reaches each hospital's node on its API and metrics ports, and nothing else there.
    flows |= {(central[name], node, port) for name in central for node in nodes for port in (5001, 8001)}
    return flows


def test_the_policies_allow_exactly_the_intended_flows(allowed: set[tuple[str, str, int]]) -> None:
    expected = intended()
    assert sorted(allowed - expected) == [], "allowed but not intended"
    assert sorted(expected - allowed) == [], "intended but blocked"


def test_hospitals_cannot_reach_each_other_on_any_port(allowed: set[tuple[str, str, int]]) -> None:
    between = [(s, d, p) for s, d, p in allowed
               if s.startswith("hospital-") and d.startswith("hospital-") and s.split("/")[0] != d.split("/")[0]]
    assert between == []
    assert not [f for f in allowed if f[2] == UNLISTED_PORT]
