"""kubernetes/ validates against the Kubernetes schemas, and its parts fit each other and the image.

No cluster is available: kubernetes-validate (installed by `make k8s-venv` into .venv-k8s, apart
from the project's venv) checks each resource against the API's JSON schemas, strictly (unknown
fields are errors). The cross-references a schema cannot see are checked here: names of claims,
secrets, ports and labels, the image's user, volumes and health command.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest

from tests.integration.servers import REPO, run

K8S_DIR = REPO / "kubernetes"
VENV = REPO / ".venv-k8s"
VALIDATE = VENV / "bin" / "kubernetes-validate"
CONTAINERFILE = REPO / "container" / "Containerfile"
README = REPO / "README.md"
ENTRYPOINT = REPO / "container" / "entrypoint.sh"
HEALTH = ["lxd-image-server", "--state-dir", "/var/lib/lxd-image-server", "health"]


def manifests() -> list[Path]:
    return sorted(K8S_DIR.glob("*.yaml"))


def validate(*files: Path) -> tuple[int, str]:
    if not VALIDATE.exists():
        pytest.fail(f"{VALIDATE} is missing: run `make k8s-venv`")
    proc = run([VALIDATE, "--strict", *files], check=False, timeout=300)
    return proc.returncode, proc.stdout + proc.stderr


@pytest.fixture(scope="module")
def resources() -> dict[tuple[str, str], dict[str, Any]]:
    """(kind, name) -> resource, every document of every manifest (YAML read by .venv-k8s)."""
    if not VALIDATE.exists():
        pytest.fail(f"{VALIDATE} is missing: run `make k8s-venv`")
    script = (
        "import json, sys, yaml\n"
        "docs = [d for f in sys.argv[1:] for d in yaml.safe_load_all(open(f)) if d]\n"
        "print(json.dumps(docs))\n"
    )
    out = run([VENV / "bin" / "python", "-c", script, *manifests()]).stdout
    return {(d["kind"], d["metadata"]["name"]): d for d in json.loads(out)}


def test_manifests_validate_against_the_kubernetes_schemas() -> None:
    files = manifests()
    assert files, f"no manifests in {K8S_DIR}"
    code, out = validate(*files)
    assert code == 0, out
    lines = [line for line in out.splitlines() if line.strip()]
    # a kind without a schema is only a warning to the tool: here it is a failure
    assert lines and all(" passed for resource " in line for line in lines), out
    assert len(lines) == 5, out


def test_the_validator_rejects_a_broken_manifest(tmp_path: Path) -> None:
    """The check above can fail: a wrong type and an unknown field are both refused."""
    text = (K8S_DIR / "deployment.yaml").read_text()
    wrong_type = tmp_path / "wrong-type.yaml"
    wrong_type.write_text(text.replace("replicas: 1", 'replicas: "one"'))
    code, out = validate(wrong_type)
    assert code != 0 and "replicas" in out, out
    unknown = tmp_path / "unknown-field.yaml"
    unknown.write_text(text.replace("type: Recreate", "type: Recreate\n    maxSurge: 1"))
    code, out = validate(unknown)
    assert code != 0 and "maxSurge" in out, out


def test_nothing_applied_carries_a_password(
    resources: dict[tuple[str, str], dict[str, Any]],
) -> None:
    """`kubectl apply -f kubernetes/` after creating the Secret by hand must not replace it with
    a shipped password (issue 9, finding 17): no Secret, and no literal credential anywhere."""
    assert not [name for kind, name in resources if kind == "Secret"]
    for path in K8S_DIR.iterdir():
        applied = path.suffix in (".yaml", ".yml", ".json")
        assert not applied or path in manifests(), f"{path} would be applied but is not checked"
    for (kind, name), doc in resources.items():
        text = json.dumps(doc)
        assert "stringData" not in text and '"data"' not in text, (kind, name)
        for container in (
            doc.get("spec", {}).get("template", {}).get("spec", {}).get("containers", [])
        ):
            for e in container.get("env", []):
                if "PASSWORD" in e["name"]:
                    assert "value" not in e, f"{kind} {name}: {e['name']} has a literal value"


def test_the_parts_fit_together(resources: dict[tuple[str, str], dict[str, Any]]) -> None:
    kinds = sorted(kind for kind, _ in resources)
    assert kinds == [
        "Deployment",
        "Ingress",
        "PersistentVolumeClaim",
        "PersistentVolumeClaim",
        "Service",
    ]
    deploy = resources[("Deployment", "lxd-image-server")]
    spec = deploy["spec"]
    assert spec["replicas"] == 1
    assert spec["strategy"]["type"] == "Recreate"
    pod = spec["template"]["spec"]
    labels = spec["template"]["metadata"]["labels"]
    assert spec["selector"]["matchLabels"].items() <= labels.items()
    (container,) = pod["containers"]
    env = {e["name"]: e for e in container["env"]}

    # the image's user, volumes and health command
    containerfile = CONTAINERFILE.read_text()
    assert f"CMD {json.dumps(HEALTH)}" in containerfile  # the image's HEALTHCHECK
    user = re.search(r"^USER (\d+):(\d+)$", containerfile, re.M)
    assert user, "no numeric USER in the Containerfile"
    assert pod["securityContext"]["runAsUser"] == int(user[1])
    assert pod["securityContext"]["fsGroup"] == int(user[2])
    volumes = re.search(r"^VOLUME (\[.*\])$", containerfile, re.M)
    assert volumes
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    assert set(json.loads(volumes[1])) <= set(mounts)
    # one readiness everywhere (issue 18): the image's HEALTHCHECK, and every probe
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        assert container[probe]["exec"]["command"] == HEALTH

    # plain HTTP on 1080 behind the ingress; every variable is one the entrypoint reads
    assert env["PLAIN_HTTP"]["value"] == "1"
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"http": 1080}
    documented = ENTRYPOINT.read_text()
    for name in env:
        assert name in documented, f"{name} is not a variable the container reads"

    # claims and the secret exist under the names the pod uses
    claims = {
        v["name"]: v["persistentVolumeClaim"]["claimName"]
        for v in pod["volumes"]
        if "persistentVolumeClaim" in v
    }
    assert set(claims) <= set(mounts.values())
    for claim in claims.values():
        assert ("PersistentVolumeClaim", claim) in resources, claim
    # the Secret is the one the README's `kubectl create secret` makes (none is shipped)
    refs = [e["valueFrom"]["secretKeyRef"] for e in env.values() if "valueFrom" in e]
    assert {"UPLOAD_USER", "UPLOAD_PASSWORD"} <= set(env)
    created = re.search(
        r"kubectl create secret generic (\S+) \\\n"
        r"\s+--from-literal=(\w+)=\S+ --from-literal=(\w+)=",
        README.read_text(),
    )
    assert created, "the README does not say how to create the upload Secret"
    for ref in refs:
        assert ref["name"] == created[1] and ref["key"] in (created[2], created[3]), ref

    # service -> pod, ingress -> service, TLS and unlimited bodies at the ingress
    service = resources[("Service", "lxd-image-server")]
    assert service["spec"]["selector"].items() <= labels.items()
    (svc_port,) = service["spec"]["ports"]
    assert svc_port["targetPort"] in ports
    ingress = resources[("Ingress", "lxd-image-server")]
    annotations = ingress["metadata"]["annotations"]
    assert annotations["nginx.ingress.kubernetes.io/proxy-body-size"] == "0"
    assert annotations["nginx.ingress.kubernetes.io/proxy-request-buffering"] == "off"
    tls_hosts = {h for t in ingress["spec"]["tls"] for h in t["hosts"]}
    for rule in ingress["spec"]["rules"]:
        assert rule["host"] in tls_hosts
        for path in rule["http"]["paths"]:
            backend = path["backend"]["service"]
            assert backend["name"] == service["metadata"]["name"]
            assert backend["port"]["name"] == svc_port["name"]
