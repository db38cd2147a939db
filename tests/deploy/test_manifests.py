"""deploy/kubernetes/: the plain manifests for clusters without Helm.

Validated like the chart (kubernetes-validate --strict for 1.28 and 1.31, yamllint),
held to the same socket, probe and hardening rules, and compared with the chart's
default render so that the two cannot drift apart.
"""

from __future__ import annotations

import json
import subprocess
from typing import Any

import pytest

from sidecar.config import parse_config
from tests.deploy import k8s_checks as k8s
from tests.deploy.k8s_checks import Obj
from tests.deploy.tooling import ROOT, SOCKET_DIR, tool

MANIFESTS = ROOT / "deploy" / "kubernetes"
FILES = sorted(MANIFESTS.glob("*.yaml"))
HELM_ONLY_LABELS = {"helm.sh/chart", "app.kubernetes.io/managed-by", "app.kubernetes.io/version"}


def objects_of(name: str) -> list[Obj]:
    return k8s.load_documents(MANIFESTS / name)


@pytest.fixture(scope="module")
def chart_default() -> list[Obj]:
    """The chart rendered with its defaults (daemonset mode), as objects."""
    done = subprocess.run(
        [
            tool("python"),
            str(ROOT / "tests/deploy/chart_render.py"),
            str(ROOT / "helm/secret-sidecar"),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    rendered: list[Obj] = json.loads(done.stdout)
    return rendered


def without_helm(value: Any) -> Any:
    """``value`` less Helm's bookkeeping labels and the rollout checksum."""
    if isinstance(value, dict):
        return {
            key: without_helm(item)
            for key, item in value.items()
            if key not in HELM_ONLY_LABELS and key != "checksum/config"
        }
    if isinstance(value, list):
        return [without_helm(item) for item in value]
    return value


def test_manifests_validate_strict() -> None:
    """Every object of every file, against the 1.28 and 1.31 schemas, unknown fields refused."""
    assert {f.name for f in FILES} >= {"daemonset.yaml", "gateway-on-node.yaml", "sidecar.yaml"}
    k8s.validate([o for f in FILES for o in k8s.load_documents(f)])


def test_manifests_yamllint() -> None:
    k8s.yamllint(MANIFESTS)


def test_every_config_map_is_a_config_the_daemon_loads() -> None:
    for path in FILES:
        for each in k8s.load_documents(path):
            if each["kind"] == "ConfigMap":
                parse_config(k8s.daemon_config(each))


def test_daemonset_socket_probes_and_hardening() -> None:
    objects = objects_of("daemonset.yaml")
    daemonset = k8s.find(objects, "DaemonSet")
    spec = k8s.pod_spec(daemonset)
    k8s.assert_socket_shared(spec, "secret-sidecar", None, "hostPath")
    k8s.assert_sidecar_container(k8s.container(spec, "secret-sidecar"))
    k8s.assert_scrape_annotations(daemonset["spec"]["template"]["metadata"]["annotations"])
    assert daemonset["spec"]["updateStrategy"]["rollingUpdate"] == {
        "maxUnavailable": 1,
        "maxSurge": 0,
    }
    config = k8s.volume(
        spec, k8s.mount_at(k8s.container(spec, "secret-sidecar"), k8s.CONFIG_DIR)["name"]
    )
    k8s.find(objects, "ConfigMap", config["configMap"]["name"])
    k8s.find(objects, "ServiceAccount", spec["serviceAccountName"])
    namespace = k8s.find(objects, "Namespace")["metadata"]
    assert namespace["labels"]["pod-security.kubernetes.io/enforce"] == "privileged"  # hostPath
    assert {o["metadata"].get("namespace") for o in objects if o["kind"] != "Namespace"} == {
        namespace["name"]
    }


def test_gateway_on_node_mounts_the_sidecars_host_directory() -> None:
    """The gateway reads the directory the DaemonSet writes, read-only, in group 10001."""
    sidecar = k8s.pod_spec(k8s.find(objects_of("daemonset.yaml"), "DaemonSet"))
    written = k8s.volume(
        sidecar, k8s.mount_at(k8s.container(sidecar, "secret-sidecar"), SOCKET_DIR)["name"]
    )
    gateway = k8s.pod_spec(k8s.find(objects_of("gateway-on-node.yaml"), "Deployment"))
    k8s.assert_mounts_resolve(gateway)
    mount = k8s.mount_at(k8s.container(gateway, "proxy"), SOCKET_DIR)
    assert mount["readOnly"] is True
    assert k8s.volume(gateway, mount["name"])["hostPath"]["path"] == written["hostPath"]["path"]
    k8s.assert_gateway_can_connect(gateway, "proxy")


def test_sidecar_pod_shares_an_empty_dir_and_meets_restricted() -> None:
    objects = objects_of("sidecar.yaml")
    deployment = k8s.find(objects, "Deployment")
    spec = k8s.pod_spec(deployment)
    k8s.assert_socket_shared(spec, "secret-sidecar", "proxy", "emptyDir")
    k8s.assert_gateway_can_connect(spec, "proxy")
    k8s.assert_sidecar_container(k8s.container(spec, "secret-sidecar"))
    k8s.assert_scrape_annotations(deployment["spec"]["template"]["metadata"]["annotations"])
    k8s.assert_restricted(spec)
    namespace = k8s.find(objects, "Namespace")["metadata"]
    assert namespace["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"
    budget = k8s.find(objects, "PodDisruptionBudget")["spec"]
    assert (
        budget["selector"]["matchLabels"].items()
        <= deployment["spec"]["template"]["metadata"]["labels"].items()
    )
    assert budget["maxUnavailable"] < deployment["spec"]["replicas"]


def test_daemonset_is_the_charts_default_render(chart_default: list[Obj]) -> None:
    """The plain DaemonSet, ConfigMap and ServiceAccount are what the chart's defaults make."""
    ours = objects_of("daemonset.yaml")
    chart_ds = without_helm(k8s.find(chart_default, "DaemonSet"))
    plain_ds = k8s.find(ours, "DaemonSet")
    assert plain_ds["spec"]["template"]["spec"] == chart_ds["spec"]["template"]["spec"]
    assert plain_ds["spec"]["updateStrategy"] == chart_ds["spec"]["updateStrategy"]
    assert k8s.daemon_config(k8s.find(ours, "ConfigMap")) == k8s.daemon_config(
        k8s.find(chart_default, "ConfigMap")
    )
    chart_sa = k8s.find(chart_default, "ServiceAccount")
    assert (
        k8s.find(ours, "ServiceAccount")["automountServiceAccountToken"]
        == chart_sa["automountServiceAccountToken"]
    )


def test_sidecar_container_is_the_charts(chart_default: list[Obj]) -> None:
    chart = k8s.container(k8s.pod_spec(k8s.find(chart_default, "DaemonSet")), "secret-sidecar")
    plain = k8s.container(
        k8s.pod_spec(k8s.find(objects_of("sidecar.yaml"), "Deployment")), "secret-sidecar"
    )
    for key in (
        "image",
        "args",
        "ports",
        "livenessProbe",
        "readinessProbe",
        "securityContext",
        "resources",
    ):
        assert plain[key] == chart[key], key
