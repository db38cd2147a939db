"""What every Kubernetes deployment of the sidecar must get right, for chart and manifests.

The Helm chart (tests/deploy/test_chart.py), the Kong chart snippet and the plain
manifests (tests/deploy/test_manifests.py) are checked by the same rules: the socket
directory is one volume that the sidecar writes and the gateway only reads, the probes
go through ``secret-sidecar health``, and the container runs hardened as 10001:10001.
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import yaml

from tests.deploy.tooling import GID, METRICS_PORT, ROOT, SOCKET, SOCKET_DIR, UID, run_tool

Obj = dict[str, Any]

CONFIG_DIR = "/etc/secret-sidecar"
KUBERNETES_VERSIONS = ("1.28.0", "1.31.0")
YAMLLINT_CONFIG = ROOT / ".yamllint.yaml"


def load_documents(path: Path) -> list[Obj]:
    """The non-empty YAML documents of a file, in order."""
    with path.open(encoding="utf-8") as handle:
        return [doc for doc in yaml.safe_load_all(handle) if doc]


def find(objects: Iterable[Obj], kind: str, name: str | None = None) -> Obj:
    """The one object of ``kind`` (and ``name``); fails naming what there is instead."""
    found = [
        o for o in objects if o["kind"] == kind and (name is None or o["metadata"]["name"] == name)
    ]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


def pod_spec(workload: Obj) -> Obj:
    """The pod spec of a Pod or of a workload's pod template."""
    spec: Obj = workload["spec"]
    return spec if workload["kind"] == "Pod" else spec["template"]["spec"]


def container(spec: Obj, name: str) -> Obj:
    """The container (or init container) of that name."""
    for each in [*spec.get("initContainers", []), *spec["containers"]]:
        if each["name"] == name:
            return dict(each)
    raise AssertionError(f"no container {name!r} in {[c['name'] for c in spec['containers']]}")


def mount_at(each: Obj, path: str) -> Obj:
    """The volume mount of a container at ``path``."""
    mounts = [m for m in each.get("volumeMounts", []) if m["mountPath"] == path]
    assert len(mounts) == 1, f"container {each['name']} mounts {path} {len(mounts)} times"
    return dict(mounts[0])


def volume(spec: Obj, name: str) -> Obj:
    """The pod volume of that name."""
    for each in spec.get("volumes", []):
        if each["name"] == name:
            return dict(each)
    raise AssertionError(f"no volume {name!r} in the pod")


def assert_mounts_resolve(spec: Obj) -> None:
    """Every volume mount of every container names a volume of the pod."""
    names = {v["name"] for v in spec.get("volumes", [])}
    for each in [*spec.get("initContainers", []), *spec["containers"]]:
        for mount in each.get("volumeMounts", []):
            assert mount["name"] in names, f"{each['name']} mounts unknown volume {mount['name']}"


def assert_socket_shared(spec: Obj, sidecar: str, gateway: str | None, source: str) -> Obj:
    """The socket directory is one volume: written by the sidecar, read-only for the gateway.

    ``source`` is ``hostPath`` (per node: the directory must exist or be created) or
    ``emptyDir`` (per pod: a tmpfs, whose sticky mode 1777 the daemon accepts where it
    refuses the 0777 of a disk emptyDir). Returns the volume.
    """
    assert_mounts_resolve(spec)
    mount = mount_at(container(spec, sidecar), SOCKET_DIR)
    assert not mount.get("readOnly", False), "the sidecar must be able to create its socket"
    shared = volume(spec, mount["name"])
    if source == "hostPath":
        assert shared["hostPath"]["type"] == "DirectoryOrCreate", shared
    else:
        assert shared["emptyDir"].get("medium") == "Memory", shared
    if gateway is not None:
        theirs = mount_at(container(spec, gateway), SOCKET_DIR)
        assert theirs["name"] == mount["name"]
        assert theirs.get("readOnly") is True, "the gateway only connects: mount it read-only"
    return shared


def assert_gateway_can_connect(spec: Obj, gateway: str) -> None:
    """The gateway's process is in the sidecar's group: the socket is 0660, 10001:10001."""
    groups = spec.get("securityContext", {}).get("supplementalGroups", [])
    effective = container(spec, gateway).get("securityContext", {}).get("runAsGroup")
    assert GID in groups or effective == GID, f"{gateway} is not in group {GID}"


def assert_probes(each: Obj) -> None:
    """Liveness asks /healthz and readiness /readyz, both through the CLI on our socket."""
    live = each["livenessProbe"]["exec"]["command"]
    ready = each["readinessProbe"]["exec"]["command"]
    for command in (live, ready):
        assert command[:2] == ["secret-sidecar", "health"], command
        assert command[command.index("--socket") + 1] == SOCKET, command
        if "--timeout" in command:
            timeout = float(command[command.index("--timeout") + 1])
            assert timeout < each["livenessProbe"]["timeoutSeconds"], "kubelet kills it first"
    assert "--ready" not in live
    assert "--ready" in ready


def assert_hardened(each: Obj) -> None:
    """Non-root 10001:10001, read-only root, nothing to escalate to, default seccomp."""
    context = each["securityContext"]
    assert context["runAsNonRoot"] is True
    assert (context["runAsUser"], context["runAsGroup"]) == (UID, GID)
    assert context["readOnlyRootFilesystem"] is True
    assert context["allowPrivilegeEscalation"] is False
    assert context["capabilities"] == {"drop": ["ALL"]}
    assert context["seccompProfile"] == {"type": "RuntimeDefault"}
    assert "privileged" not in context or context["privileged"] is False


def assert_restricted(spec: Obj) -> None:
    """Every container of the pod meets the Pod Security level "restricted"."""
    pod = spec.get("securityContext", {})
    for each in [*spec.get("initContainers", []), *spec["containers"]]:
        context = {**pod, **each.get("securityContext", {})}
        assert context.get("runAsNonRoot") is True, each["name"]
        assert context.get("allowPrivilegeEscalation") is False, each["name"]
        assert context.get("capabilities", {}).get("drop") == ["ALL"], each["name"]
        assert context.get("seccompProfile") == {"type": "RuntimeDefault"}, each["name"]


def assert_sidecar_container(each: Obj) -> None:
    """The sidecar container: config from its ConfigMap, metrics port, probes, hardening."""
    assert each["args"] == ["run", "-c", f"{CONFIG_DIR}/config.yaml"]
    assert {"name": "metrics", "containerPort": METRICS_PORT, "protocol": "TCP"} in each["ports"]
    assert mount_at(each, CONFIG_DIR)["readOnly"] is True
    assert each["resources"]["requests"]
    assert each["resources"]["limits"]["memory"]
    assert_probes(each)
    assert_hardened(each)


def assert_scrape_annotations(annotations: dict[str, str]) -> None:
    assert annotations["prometheus.io/scrape"] == "true"
    assert annotations["prometheus.io/port"] == str(METRICS_PORT)
    assert annotations["prometheus.io/path"] == "/metrics"


def daemon_config(configmap: Obj) -> dict[str, Any]:
    """The daemon's config file carried by the ConfigMap, as the daemon reads it."""
    loaded: dict[str, Any] = yaml.safe_load(configmap["data"]["config.yaml"])
    assert loaded["listen"]["socket"] == SOCKET
    assert loaded["metrics"]["address"] == f"0.0.0.0:{METRICS_PORT}"
    return loaded


def validate(objects: Iterable[Obj], *, unknown_kinds: frozenset[str] = frozenset()) -> None:
    """``kubernetes-validate --strict`` for 1.28 and 1.31, one call per version.

    Objects of ``unknown_kinds`` (CRDs such as ServiceMonitor) have no bundled schema;
    the validator only warns for them, so any other warning fails the test too.
    """
    objects = list(objects)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "objects.yaml"
        path.write_text(yaml.safe_dump_all(objects, sort_keys=False), encoding="utf-8")
        for version in KUBERNETES_VERSIONS:
            out = run_tool("kubernetes-validate", "--strict", "-k", version, str(path))
            passed = out.count("passed for resource")
            skipped = sum(1 for o in objects if o["kind"] in unknown_kinds)
            assert passed == len(objects) - skipped, out


def yamllint(*paths: Path) -> None:
    """yamllint with the repository's config; warnings fail too (``--strict``)."""
    run_tool("yamllint", "--strict", "-c", str(YAMLLINT_CONFIG), *map(str, paths))
