"""The Helm chart, rendered for real by the Helm SDK, for each mode and values file.

Everything is rendered in one subprocess of the tool venv's python
(tests/deploy/chart_render.py), then linted, validated against the Kubernetes 1.28 and
1.31 schemas and read as objects: what a cluster would be given.
"""

from __future__ import annotations

import copy
import json
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from sidecar.backends import load_kind
from sidecar.config import parse_config
from tests.deploy import k8s_checks as k8s
from tests.deploy.k8s_checks import Obj
from tests.deploy.tooling import GID, METRICS_PORT, ROOT, SOCKET, SOCKET_DIR, UID, tool

CHART = ROOT / "helm" / "secret-sidecar"
VALUES = ROOT / "tests" / "deploy" / "values"
KONG_VALUES = ROOT / "deploy" / "kong-chart-values.yaml"
RENDER = ROOT / "tests" / "deploy" / "chart_render.py"
MATRIX = sorted(p.stem for p in VALUES.glob("*.yaml"))
RELEASE = "secret-sidecar"
NAMESPACE = "gateway"

FACADE_TOKEN = {"name": "kong", "existingSecret": "kong-facade-token", "allow": ["env/*"]}
FACADE_DIR = "/var/run/secrets/secret-sidecar-facade"

# Renders beyond the matrix: two configs for the checksum, values the schema refuses.
EXTRA: dict[str, dict[str, Any]] = {
    "ttl-300": {"config": {"cache": {"ttl": 300}}},
    "ttl-600": {"config": {"cache": {"ttl": 600}}},
    "ttl-300-bigger": {
        "config": {"cache": {"ttl": 300}},
        "resources": {"limits": {"memory": "1Gi"}},
    },
    "bad-mode": {"mode": "per-node"},
    "surge": {"updateStrategy": {"rollingUpdate": {"maxSurge": 1}}},
    "typo": {"servicemonitor": {"enabled": True}},
    "socket-override": {"config": {"listen": {"socket": "/tmp/other.sock"}}},
    "facade-daemonset": {"facade": {"enabled": True, "tokens": [FACADE_TOKEN]}},
    "facade-any-address": {
        "mode": "sidecar",
        "facade": {"enabled": True, "address": "0.0.0.0:8200", "tokens": [FACADE_TOKEN]},
    },
    "facade-in-config": {"mode": "sidecar", "config": {"facade": {"enabled": True}}},
}


def values_of(name: str) -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load((VALUES / f"{name}.yaml").read_text())
    return loaded


class Rendered:
    """One render: template name -> text, and the objects it holds."""

    def __init__(self, files: dict[str, str]) -> None:
        self.files = files
        self.objects: list[Obj] = [
            doc
            for name, text in sorted(files.items())
            if name.endswith(".yaml")
            for doc in yaml.safe_load_all(text)
            if doc
        ]

    def kinds(self) -> set[str]:
        return {o["kind"] for o in self.objects}

    def get(self, kind: str, name: str | None = None) -> Obj:
        return k8s.find(self.objects, kind, name)

    def pod(self) -> Obj:
        return k8s.pod_spec(self.get("DaemonSet"))

    def config(self) -> dict[str, Any]:
        return k8s.daemon_config(self.get("ConfigMap"))

    def stream(self) -> str:
        """The render as ``helm template`` prints it."""
        return "".join(
            f"---\n# Source: {name}\n{text.strip()}\n"
            for name, text in sorted(self.files.items())
            if name.endswith(".yaml") and text.strip()
        )


@pytest.fixture(scope="session")
def helm() -> dict[str, Any]:
    """Every render and lint the tests need, from one Helm SDK process."""
    python = tool("python")
    jobs = {name: values_of(name) for name in MATRIX} | EXTRA
    renders = {
        name: {"values": values, "release": RELEASE, "namespace": NAMESPACE}
        for name, values in jobs.items()
    }
    request = {"chart": str(CHART), "renders": renders, "lint": {"defaults": {}}}
    done = subprocess.run(
        [python, str(RENDER), "--batch"],
        input=json.dumps(request),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    result: dict[str, Any] = json.loads(done.stdout)
    return result


@pytest.fixture(scope="session")
def rendered(helm: dict[str, Any]) -> dict[str, Rendered]:
    return {
        name: Rendered(files) for name, files in helm["renders"].items() if "error" not in files
    }


def daemonset_renders(rendered: dict[str, Rendered]) -> list[Rendered]:
    return [rendered[n] for n in MATRIX if values_of(n)["mode"] == "daemonset"]


def kong_values(text: str | None = None) -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load(KONG_VALUES.read_text() if text is None else text)
    return loaded


def kong_values_with_facade() -> dict[str, Any]:
    """The snippet with its commented facade option taken: each commented list item
    named ``secret-sidecar-facade-*``, and the commented lines under it, uncommented."""
    lines, taking = [], None
    for line in KONG_VALUES.read_text().splitlines():
        stripped = line.lstrip()
        indent = len(line) - len(stripped)
        if stripped.startswith("# - name: secret-sidecar-facade-"):
            taking = indent
        elif taking is None or indent != taking or not stripped.startswith("#   "):
            taking = None
        lines.append(line[:indent] + stripped[2:] if taking is not None else line)
    return kong_values("\n".join(lines))


def kong_pod(values: dict[str, Any] | None = None) -> Obj:
    """The pod the Kong chart makes from the snippet: its sidecars, volumes and proxy mounts.

    It follows charts/kong/templates/deployment.yaml (Kong/charts 3.x): the sidecar
    containers go to ``containers`` as they are, ``deployment.userDefinedVolumes`` to
    ``volumes``, ``deployment.userDefinedVolumeMounts`` to the proxy container's mounts,
    the top-level ``securityContext`` to the pod and ``podAnnotations`` to its metadata.
    """
    values = kong_values() if values is None else values
    deployment = values["deployment"]
    proxy = {
        "name": "proxy",
        "image": "kong:3.9",
        "volumeMounts": deployment["userDefinedVolumeMounts"],
    }
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "kong", "annotations": values["podAnnotations"]},
        "spec": {
            "serviceAccountName": deployment["serviceAccount"]["name"],
            "securityContext": values["securityContext"],
            "containers": [*deployment["sidecarContainers"], proxy],
            "volumes": deployment["userDefinedVolumes"],
        },
    }


def test_matrix_covers_both_modes_and_every_identity() -> None:
    """At least five values files, both modes, each credential source among them."""
    matrix = [values_of(n) for n in MATRIX]
    assert len(matrix) >= 5
    assert {v["mode"] for v in matrix} == {"daemonset", "sidecar"}
    identity = [v.get("cloudIdentity", {}) for v in matrix]
    credentials = [v.get("credentials", {}) for v in matrix]
    assert any(i.get("awsRoleArn") for i in identity)
    assert any(i.get("gcpServiceAccount") for i in identity)
    assert any(v.get("vaultKubernetesAuth", {}).get("enabled") for v in matrix)
    assert any(c.get("existingSecret") for c in credentials)
    assert any(c.get("env") for c in credentials)


def test_every_values_file_renders(helm: dict[str, Any]) -> None:
    errors = {n: helm["renders"][n] for n in MATRIX if "error" in helm["renders"][n]}
    assert errors == {}


def test_lint_strict_finds_nothing_above_info(helm: dict[str, Any]) -> None:
    report = helm["lint"]["defaults"]
    assert report["errors"] == []
    assert [m for m in report["messages"] if m["severity"] >= 2] == []


def test_values_schema_refuses_what_would_break_a_node(helm: dict[str, Any]) -> None:
    """A wrong mode, a surging rollout, a misspelt key or our own socket path fail to render."""
    renders = helm["renders"]
    assert "mode" in renders["bad-mode"]["error"]
    assert "maxSurge" in renders["surge"]["error"]
    assert "servicemonitor" in renders["typo"]["error"]
    assert "error" in renders["socket-override"]


def test_every_rendered_object_and_the_kong_pod_validate_strict(
    rendered: dict[str, Rendered],
) -> None:
    """kubernetes-validate --strict on every object of every render, for 1.28 and 1.31."""
    objects = [o for name in MATRIX for o in rendered[name].objects]
    k8s.validate([*objects, kong_pod()], unknown_kinds=frozenset({"ServiceMonitor"}))


def test_yamllint_values_chart_matrix_and_output(
    rendered: dict[str, Rendered], tmp_path: Path
) -> None:
    outputs = []
    for name in MATRIX:
        out = tmp_path / f"{name}.yaml"
        out.write_text(rendered[name].stream(), encoding="utf-8")
        outputs.append(out)
    k8s.yamllint(CHART / "values.yaml", CHART / "Chart.yaml", VALUES, KONG_VALUES, *outputs)


@pytest.mark.parametrize("name", MATRIX)
def test_rendered_config_is_one_the_daemon_loads(rendered: dict[str, Rendered], name: str) -> None:
    """The ConfigMap's config.yaml passes the daemon's own config and backend settings."""
    raw = rendered[name].config()
    config = parse_config(raw)
    for vault in config.vaults:
        load_kind(vault.name).settings.model_validate(vault.config)


def test_daemonset_shares_a_host_directory(rendered: dict[str, Rendered]) -> None:
    """Per node: the socket lives on the node, in the directory gateway pods mount."""
    for name in MATRIX:
        values = values_of(name)
        if values["mode"] != "daemonset":
            continue
        spec = rendered[name].pod()
        shared = k8s.assert_socket_shared(spec, "secret-sidecar", None, "hostPath")
        assert shared["hostPath"]["path"] == values.get("socket", {}).get("hostPath", SOCKET_DIR)
        prepare = values.get("socket", {}).get("prepareHostPath", True)
        assert bool(spec.get("initContainers")) is prepare


def test_socket_directory_is_handed_over_with_two_capabilities(
    rendered: dict[str, Rendered],
) -> None:
    """The init container chowns the kubelet-made directory; root only with CHOWN, FOWNER."""
    init = k8s.container(rendered["daemonset-defaults"].pod(), "socket-dir")
    assert init["command"][-1] == (f"chown {UID}:{GID} {SOCKET_DIR} && chmod 0750 {SOCKET_DIR}")
    context = init["securityContext"]
    assert context["capabilities"] == {"drop": ["ALL"], "add": ["CHOWN", "FOWNER"]}
    assert context["allowPrivilegeEscalation"] is False
    assert context["readOnlyRootFilesystem"] is True
    assert k8s.mount_at(init, SOCKET_DIR)["name"] == "socket"


def test_rollout_replaces_one_node_at_a_time_without_surge(
    rendered: dict[str, Rendered],
) -> None:
    """A surge pod could never bind the socket its predecessor serves on (unix_socket.py)."""
    for each in daemonset_renders(rendered):
        strategy = each.get("DaemonSet")["spec"]["updateStrategy"]
        assert strategy == {
            "type": "RollingUpdate",
            "rollingUpdate": {"maxUnavailable": 1, "maxSurge": 0},
        }


def test_sidecar_container_probes_hardening_and_metrics(rendered: dict[str, Rendered]) -> None:
    for each in daemonset_renders(rendered):
        spec = each.pod()
        k8s.assert_sidecar_container(k8s.container(spec, "secret-sidecar"))
        assert spec["securityContext"]["runAsNonRoot"] is True
        assert spec["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
        assert spec["automountServiceAccountToken"] is False
        k8s.assert_scrape_annotations(
            each.get("DaemonSet")["spec"]["template"]["metadata"]["annotations"]
        )


def test_config_checksum_follows_the_config_only(rendered: dict[str, Rendered]) -> None:
    """A config change rolls the pods; a change elsewhere leaves the checksum alone."""

    def checksum(name: str) -> str:
        template = rendered[name].get("DaemonSet")["spec"]["template"]
        value: str = template["metadata"]["annotations"]["checksum/config"]
        return value

    assert len(checksum("ttl-300")) == 64
    assert checksum("ttl-300") != checksum("ttl-600")
    assert checksum("ttl-300") == checksum("ttl-300-bigger")
    assert rendered["ttl-600"].config()["cache"]["ttl"] == 600


def test_irsa_annotation_on_the_pods_service_account(rendered: dict[str, Rendered]) -> None:
    each = rendered["daemonset-irsa-servicemonitor"]
    account = each.get("ServiceAccount")
    assert account["metadata"]["annotations"] == {
        "eks.amazonaws.com/role-arn": values_of("daemonset-irsa-servicemonitor")["cloudIdentity"][
            "awsRoleArn"
        ]
    }
    assert each.pod()["serviceAccountName"] == account["metadata"]["name"]


def test_gke_workload_identity_annotation(rendered: dict[str, Rendered]) -> None:
    each = rendered["gke-workload-identity"]
    annotations = each.get("ServiceAccount")["metadata"]["annotations"]
    assert annotations == {
        "iam.gke.io/gcp-service-account": "secret-sidecar@example-project.iam.gserviceaccount.com"
    }
    assert each.pod()["serviceAccountName"] == each.get("ServiceAccount")["metadata"]["name"]


def test_no_identity_no_annotations(rendered: dict[str, Rendered]) -> None:
    assert "annotations" not in rendered["daemonset-defaults"].get("ServiceAccount")["metadata"]


def test_vault_kubernetes_auth_reads_a_projected_token_of_its_audience(
    rendered: dict[str, Rendered],
) -> None:
    """The token has Vault's audience, and the hcv vault's kube_api_token_file is its path."""
    each = rendered["vault-kubernetes-auth"]
    values = values_of("vault-kubernetes-auth")["vaultKubernetesAuth"]
    spec = each.pod()
    mount = k8s.mount_at(k8s.container(spec, "secret-sidecar"), "/var/run/secrets/vault")
    assert mount["readOnly"] is True
    (source,) = k8s.volume(spec, mount["name"])["projected"]["sources"]
    assert source["serviceAccountToken"] == {
        "audience": values["audience"],
        "expirationSeconds": values["expirationSeconds"],
        "path": "token",
    }
    (vault,) = each.config()["vaults"]
    assert vault["config"]["kube_api_token_file"] == "/var/run/secrets/vault/token"
    assert "vault-token" not in str(rendered["daemonset-defaults"].pod()["volumes"])


def test_credentials_come_from_the_named_secret(rendered: dict[str, Rendered]) -> None:
    existing = rendered["existing-secret"]
    sidecar = k8s.container(existing.pod(), "secret-sidecar")
    assert sidecar["envFrom"] == [{"secretRef": {"name": "secret-sidecar-example-credentials"}}]
    assert {"name": "AWS_REGION", "value": "eu-west-1"} in sidecar["env"]
    assert "Secret" not in existing.kinds()
    assert "envFrom" not in k8s.container(rendered["daemonset-defaults"].pod(), "secret-sidecar")


def test_sidecar_mode_renders_no_workload(rendered: dict[str, Rendered]) -> None:
    """The Kong chart runs the container; here only what it uses."""
    each = rendered["sidecar-mode"]
    assert each.kinds() == {"ConfigMap", "Secret", "ServiceAccount"}
    secret = each.get("Secret")
    assert secret["metadata"]["name"] == f"{RELEASE}-credentials"
    assert secret["stringData"] == values_of("sidecar-mode")["credentials"]["env"]


def test_service_monitor_scrapes_the_metrics_service(rendered: dict[str, Rendered]) -> None:
    each = rendered["daemonset-irsa-servicemonitor"]
    service = each.get("Service")
    monitor = each.get("ServiceMonitor")
    pod_labels = each.get("DaemonSet")["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= pod_labels.items()
    assert service["spec"]["ports"] == [
        {"name": "metrics", "port": METRICS_PORT, "targetPort": "metrics", "protocol": "TCP"}
    ]
    assert (
        monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    )
    assert monitor["spec"]["namespaceSelector"] == {"matchNames": [NAMESPACE]}
    assert monitor["spec"]["endpoints"][0]["port"] == "metrics"
    assert monitor["metadata"]["labels"]["release"] == "prometheus"
    assert "ServiceMonitor" not in rendered["daemonset-defaults"].kinds()
    assert "Service" not in rendered["daemonset-defaults"].kinds()


def test_notes_tell_a_gateway_how_to_mount_the_socket(rendered: dict[str, Rendered]) -> None:
    notes = rendered["daemonset-defaults"].files["secret-sidecar/templates/NOTES.txt"]
    assert "readOnly: true" in notes
    assert "supplementalGroups: [10001]" in notes
    assert SOCKET in notes
    sidecar_notes = rendered["sidecar-mode"].files["secret-sidecar/templates/NOTES.txt"]
    assert "deploy/kong-chart-values.yaml" in sidecar_notes


# deploy/kong-chart-values.yaml, the Kong chart side of sidecar mode


def test_kong_snippet_uses_only_keys_the_kong_chart_reads() -> None:
    """Keys read by Kong/charts charts/kong 3.x templates (deployment.yaml, _helpers.tpl)."""
    values = kong_values()
    assert set(values) == {"deployment", "securityContext", "podAnnotations", "env"}
    assert values["env"] == {"vaults": "bundled,sidecar"}  # KONG_VAULTS
    assert set(values["deployment"]) == {
        "serviceAccount",
        "sidecarContainers",
        "userDefinedVolumes",
        "userDefinedVolumeMounts",
    }
    assert values["deployment"]["serviceAccount"]["create"] is False


def test_kong_snippet_puts_the_sidecar_vault_on_the_kong_charts_lua_path() -> None:
    """Each Lua module the vault needs is a file the chart's KONG_LUA_PACKAGE_PATH
    (/opt/?.lua;/opt/?/init.lua;;) finds, mounted from a file that exists in deploy/kong."""
    deployment = kong_values()["deployment"]
    volumes = {v["name"]: v for v in deployment["userDefinedVolumes"]}
    found: dict[str, str] = {}
    for mount in deployment["userDefinedVolumeMounts"]:
        if mount["name"] != "kong-vault-sidecar":
            continue
        assert mount["readOnly"] is True
        assert "configMap" in volumes[mount["name"]]
        path = mount["mountPath"].removeprefix("/opt/").removesuffix(".lua")
        module = path.removesuffix("/init").replace("/", ".")
        found[module] = mount["subPath"]
    assert found == {
        "kong.vaults.sidecar": "init.lua",
        "kong.vaults.sidecar.schema": "schema.lua",
        "secret_sidecar": "secret_sidecar.lua",
    }
    lua = ROOT / "deploy" / "kong"
    for module, name in found.items():
        source = lua / (module.replace(".", "/") + ".lua")
        if not source.exists():
            source = lua / module.replace(".", "/") / "init.lua"
        assert source.name == name, module


def test_kong_snippet_shares_the_socket_through_a_memory_empty_dir() -> None:
    spec = k8s.pod_spec(kong_pod())
    k8s.assert_socket_shared(spec, "secret-sidecar", "proxy", "emptyDir")
    k8s.assert_gateway_can_connect(spec, "proxy")
    k8s.assert_sidecar_container(k8s.container(spec, "secret-sidecar"))
    k8s.assert_scrape_annotations(kong_pod()["metadata"]["annotations"])


def test_kong_snippet_names_what_the_chart_renders(rendered: dict[str, Rendered]) -> None:
    """ConfigMap, ServiceAccount and Secret names in the snippet are the chart's own."""
    chart = rendered["sidecar-mode"]
    spec = k8s.pod_spec(kong_pod())
    sidecar = k8s.container(spec, "secret-sidecar")
    config_volume = k8s.volume(spec, k8s.mount_at(sidecar, k8s.CONFIG_DIR)["name"])
    chart.get("ConfigMap", config_volume["configMap"]["name"])
    chart.get("ServiceAccount", spec["serviceAccountName"])
    (source,) = sidecar["envFrom"]
    chart.get("Secret", source["secretRef"]["name"])


def test_kong_snippet_container_matches_the_charts(rendered: dict[str, Rendered]) -> None:
    """The snippet's sidecar is the chart's container: same args, probes, hardening, limits."""
    ours = k8s.container(rendered["daemonset-defaults"].pod(), "secret-sidecar")
    theirs = k8s.container(k8s.pod_spec(kong_pod()), "secret-sidecar")
    for key in ("image", "args", "ports", "livenessProbe", "readinessProbe", "resources"):
        assert theirs[key] == ours[key], key
    assert theirs["securityContext"] == copy.deepcopy(ours["securityContext"])


# The Vault-KV facade (docs/konnect.md): sidecar mode, loopback, tokens from Secrets


def test_facade_listens_on_loopback_with_each_token_a_file(rendered: dict[str, Rendered]) -> None:
    """The rendered config turns the facade on at 127.0.0.1:8200 with each token read
    from ``<FACADE_DIR>/<name>/token``, never inline, and the daemon's config model
    takes it; without facade values the config has no facade section."""
    facade = rendered["sidecar-facade"].config()["facade"]
    values = values_of("sidecar-facade")["facade"]
    assert facade == {
        "enabled": True,
        "address": "127.0.0.1:8200",
        "mount": "secret",
        "kv": "v2",
        "tokens": [
            {
                "name": t["name"],
                "token_file": f"{FACADE_DIR}/{t['name']}/token",
                "allow": t["allow"],
            }
            for t in values["tokens"]
        ],
    }
    assert parse_config(rendered["sidecar-facade"].config()).facade.host_port == ("127.0.0.1", 8200)
    assert "facade" not in rendered["sidecar-mode"].config()


def test_facade_is_refused_where_it_would_serve_nobody_or_everybody(
    helm: dict[str, Any],
) -> None:
    """In a DaemonSet the facade's loopback is not the gateway's; a non-loopback address
    or a facade hidden in config: (past these checks) does not render."""
    renders = helm["renders"]
    assert "facade.enabled needs mode: sidecar" in renders["facade-daemonset"]["error"]
    assert "/facade/address" in renders["facade-any-address"]["error"]
    assert "/config/facade" in renders["facade-in-config"]["error"]


def test_kong_snippet_facade_option_mounts_the_token_read_only(
    rendered: dict[str, Rendered],
) -> None:
    """Uncommented, the snippet's facade option mounts the token Secret's key read-only
    in the sidecar container alone, at the file the chart's config names, as the chart's
    NOTES print it; the pod validates."""
    values = kong_values_with_facade()
    pod = kong_pod(values)
    spec = k8s.pod_spec(pod)
    sidecar = k8s.container(spec, "secret-sidecar")
    (token,) = rendered["sidecar-facade"].config()["facade"]["tokens"]
    directory, _, file = token["token_file"].rpartition("/")
    mount = k8s.mount_at(sidecar, directory)
    assert mount["readOnly"] is True
    source = k8s.volume(spec, mount["name"])["secret"]
    (chart_token,) = values_of("sidecar-facade")["facade"]["tokens"]
    assert source["secretName"] == chart_token["existingSecret"]
    assert source["items"] == [{"key": chart_token["key"], "path": file}]
    proxy = k8s.container(spec, "proxy")
    assert mount["name"] not in {m["name"] for m in proxy["volumeMounts"]}
    notes = rendered["sidecar-facade"].files["secret-sidecar/templates/NOTES.txt"]
    printed = [
        f"- name: {mount['name']}",
        f"mountPath: {directory}",
        f"secretName: {source['secretName']}",
        f"- key: {chart_token['key']}",
    ]
    assert [line for line in printed if line not in notes] == []
    k8s.validate([pod])
    plain = k8s.pod_spec(kong_pod())
    added = {v["name"] for v in spec["volumes"]} - {v["name"] for v in plain["volumes"]}
    assert added == {mount["name"]}
