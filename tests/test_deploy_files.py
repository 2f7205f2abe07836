"""The deployment kit's files (deploy/): parsed and checked against each other and against Flower 1.41.

No Docker engine or cluster is needed: docker-compose.yml and every Kubernetes manifest are parsed with
PyYAML; the Flower flags they use are checked against the installed ``flower-superlink --help``,
``flower-supernode --help`` and ``flwr supernode register --help``; node configs are parsed with Flower's own
parser. Each SuperNode trains on its institution's own data: one data folder per institution, mounted
read-only into that SuperNode only, with the node config's ``data`` (and ``eval-data``) inside it. The real
TLS + SuperNode-auth flow on institutions' own files runs in tests/test_deployment.py.
"""

from __future__ import annotations

import http.server
import os
import re
import shlex
import shutil
import subprocess
import sys
import threading
from pathlib import Path, PurePosixPath

import pytest
import yaml

# Tiers are marked per test here: this module mixes e2e and unit tests.

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
COMPOSE = DEPLOY / "docker-compose.yml"
DOCKERFILE = DEPLOY / "Dockerfile"
K8S = DEPLOY / "k8s"
HEALTHCHECK = DEPLOY / "healthcheck.py"
FLWR_WRAPPER = DEPLOY / "fedfuse-flwr.sh"
INSTITUTIONS = ("hospital-a", "hospital-b")
NAMESPACE = "fedfuse"
NODE_CONFIG_KEYS = ("partition-id", "num-partitions", "institution", "signing-key", "data")
DATA_KEYS = ("data", "eval-data")  # node-config paths of the institution's own files
CLUSTER_SCOPED = {"Namespace", "PersistentVolume"}
SUPERLINK_REQUIRED = (
    "--ssl-ca-certfile",
    "--ssl-certfile",
    "--ssl-keyfile",
    "--enable-supernode-auth",
    "--disable-runtime-dependency-installation",
)
SUPERNODE_REQUIRED = ("--superlink", "--root-certificates", "--auth-supernode-private-key", "--node-config")
# Flags whose next token is their value (all others used here are switches).
SWITCHES = {"--enable-supernode-auth", "--disable-runtime-dependency-installation", "--insecure"}
HELP_COMMANDS = {
    "flower-superlink": ["flower-superlink", "--help"],
    "flower-supernode": ["flower-supernode", "--help"],
    "flwr supernode register": ["flwr", "supernode", "register", "--help"],
}


# --------------------------------------------------------------------------------------------- helpers
def flags(command: list[str]) -> list[str]:
    """Long options in a command line (``--flag value`` and ``--flag=value`` forms)."""
    return [token.split("=", 1)[0] for token in command if token.startswith("--")]


def flag_value(command: list[str], flag: str) -> str:
    """The value of ``flag`` in ``command``; fails the test when it is absent or has no value."""
    for index, token in enumerate(command):
        if token == flag:
            assert index + 1 < len(command), f"{flag} has no value in {command}"
            return command[index + 1]
        if token.startswith(flag + "="):
            return token.split("=", 1)[1]
    raise AssertionError(f"{flag} missing from {command}")


def as_list(command) -> list[str]:
    return shlex.split(command) if isinstance(command, str) else [str(token) for token in command]


def node_config(command: list[str]) -> dict:
    """The SuperNode's --node-config as Flower itself parses it."""
    from flwr.common.config import parse_config_args

    return parse_config_args([flag_value(command, "--node-config")])


def compose_volumes(service: dict) -> list[tuple[str, str, str]]:
    """(source, target, mode) of a compose service's volumes, short or long syntax."""
    out = []
    for volume in service.get("volumes", []):
        if isinstance(volume, dict):
            mode = "ro" if volume.get("read_only") else "rw"
            out.append((str(volume.get("source", "")), str(volume["target"]), mode))
            continue
        parts = str(volume).split(":")
        assert len(parts) in (2, 3), f"cannot read volume {volume!r}"
        out.append((parts[0], parts[1], parts[2] if len(parts) == 3 else "rw"))
    return out


def covered_by(path: str, mounts: list[str]) -> bool:
    """``path`` is a mount target or lies inside one."""
    target = PurePosixPath(path)
    return any(target == PurePosixPath(m) or PurePosixPath(m) in target.parents for m in mounts)


def parse_options(help_text: str) -> dict[str, str]:
    """Option → its help entry, from argparse (``  --flag ...``) or rich/typer (``│ --flag ...``) help."""
    options: dict[str, str] = {}
    current: list[str] = []
    for line in help_text.splitlines():
        match = re.match(r"^(?:  |│ )(-\S.*)$", line)
        if match:
            head = re.split(r"\s{2,}", match.group(1).strip(), maxsplit=1)[0]
            current = re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", head)
            for name in current:
                options[name] = match.group(1)
        elif current and line.strip():
            for name in current:
                options[name] += " " + line.strip(" │")
    return options


def data_paths(config: dict) -> list[str]:
    """The node config's own-data paths (``data``, and ``eval-data`` when set)."""
    return [str(config[key]) for key in DATA_KEYS if config.get(key)]


def compose_data_mount(service: dict) -> tuple[str, str, str]:
    """The one (source, target, mode) volume of a SuperNode service that holds its node config's data."""
    command = as_list(service["command"])
    paths = data_paths(node_config(command))
    assert paths, f"node config names no data: {command}"
    volumes = compose_volumes(service)
    holding = {volume for path in paths for volume in volumes if covered_by(path, [volume[1]])}
    assert len(holding) == 1, f"data {paths} should lie in exactly one mounted folder: {volumes}"
    return holding.pop()


def pod_spec(doc: dict) -> dict:
    return doc["spec"]["template"]["spec"]


def host_paths_in(command: list[str]) -> list[str]:
    """Absolute paths a command names: flag values and path-valued node-config entries."""
    paths = [token for token in command if token.startswith("/")]
    paths += [token.split("=", 1)[1] for token in command if token.startswith("--") and "=/" in token]
    if "--node-config" in flags(command):
        paths += [v for v in node_config(command).values() if isinstance(v, str) and v.startswith("/")]
    return paths


# -------------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


@pytest.fixture(scope="module")
def services(compose) -> dict:
    return compose["services"]


@pytest.fixture(scope="module")
def manifests() -> dict[str, list[dict]]:
    """Every k8s YAML file → its documents (multi-document files included)."""
    files = sorted(K8S.glob("*.yaml")) + sorted(K8S.glob("*.yml"))
    assert files, f"no manifests in {K8S}"
    return {path.name: [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None] for path in files}


@pytest.fixture(scope="module")
def k8s_objects(manifests) -> list[dict]:
    return [doc for name, docs in manifests.items() if name != "kustomization.yaml" for doc in docs]


@pytest.fixture(scope="module")
def deployments(manifests) -> dict[str, dict]:
    return {
        doc["metadata"]["name"]: doc
        for name, docs in manifests.items()
        if name not in ("kustomization.yaml", "secrets.example.yaml")
        for doc in docs
        if doc.get("kind") == "Deployment"
    }


@pytest.fixture(scope="module")
def flower_help(tmp_path_factory) -> dict[str, dict[str, str]]:
    """Each Flower command's options from its --help, run once per module (in parallel)."""
    missing = [argv[0] for argv in HELP_COMMANDS.values() if shutil.which(argv[0]) is None]
    if missing:
        pytest.skip(f"Flower's command-line tools are not installed: {missing}")
    env = {
        **os.environ,
        "FLWR_HOME": str(tmp_path_factory.mktemp("flwr-home")),
        "FLWR_TELEMETRY_ENABLED": "0",
        "FLWR_DISABLE_UPDATE_CHECK": "1",
        "COLUMNS": "200",
    }
    running = {
        name: subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for name, argv in HELP_COMMANDS.items()
    }
    parsed = {}
    for name, process in running.items():
        out, _ = process.communicate(timeout=180)
        assert process.returncode == 0, f"{name} --help failed:\n{out}"
        parsed[name] = parse_options(out)
    return parsed


# ------------------------------------------------------------------------------------------ compose
@pytest.mark.unit
def test_compose_has_the_superlink_registration_and_one_supernode_per_institution(services):
    expected = {"superlink", "register", *(f"supernode-{name}" for name in INSTITUTIONS)}
    assert expected <= set(services), sorted(services)
    for name in expected:
        assert services[name].get("image") or services[name].get("build"), f"{name} names no image"


@pytest.mark.unit
def test_compose_superlink_runs_tls_with_supernode_auth_and_no_runtime_install(services):
    superlink = services["superlink"]
    command = as_list(superlink["command"])
    assert command[0] == "flower-superlink"
    used = flags(command)
    for flag in SUPERLINK_REQUIRED:
        assert flag in used, f"superlink lacks {flag}"
    assert "--insecure" not in used
    assert flag_value(command, "--host") == "0.0.0.0", "the SuperLink must listen beyond the container's loopback"
    targets = {target: (source, mode) for source, target, mode in compose_volumes(superlink)}
    for flag in ("--ssl-ca-certfile", "--ssl-certfile", "--ssl-keyfile"):
        path = flag_value(command, flag)
        assert path in targets, f"{flag} {path} is not mounted"
        assert targets[path][1] == "ro", f"{path} must be mounted read-only"
    assert covered_by(PurePosixPath(flag_value(command, "--database")).parent.as_posix(), list(targets))
    port = flag_value(command, "--port")
    assert any(str(mapping).split(":")[-1] == port for mapping in superlink.get("ports", [])), "port not published"


@pytest.mark.unit
def test_compose_never_mounts_the_ca_private_key(services):
    for name, service in services.items():
        for source, target, _ in compose_volumes(service):
            assert not source.endswith("ca.key") and not target.endswith("ca.key"), f"{name} mounts the CA key"
            assert PurePosixPath(source).name != "certs", f"{name} mounts the whole certs folder (with ca.key)"


@pytest.mark.unit
@pytest.mark.parametrize("institution", INSTITUTIONS)
def test_compose_supernode_has_tls_auth_and_its_node_config(services, institution):
    service = services[f"supernode-{institution}"]
    command = as_list(service["command"])
    assert command[0] == "flower-supernode"
    used = flags(command)
    for flag in SUPERNODE_REQUIRED:
        assert flag in used, f"{institution} lacks {flag}"
    assert "--insecure" not in used
    superlink_port = flag_value(as_list(services["superlink"]["command"]), "--port")
    assert flag_value(command, "--superlink") == f"superlink:{superlink_port}"
    config = node_config(command)
    for key in NODE_CONFIG_KEYS:
        assert key in config, f"{institution}'s node config lacks {key}: {config}"
    assert config["institution"] == institution
    assert isinstance(config["partition-id"], int) and isinstance(config["num-partitions"], int)
    assert 0 <= config["partition-id"] < config["num-partitions"]

    targets = [target for _, target, _ in compose_volumes(service)]
    for path in (
        flag_value(command, "--root-certificates"),
        flag_value(command, "--auth-supernode-private-key"),
        config["signing-key"],
    ):
        assert covered_by(path, targets), f"{institution}: {path} is not inside a mounted volume"


@pytest.mark.unit
@pytest.mark.parametrize("institution", INSTITUTIONS)
def test_compose_supernode_mounts_only_its_own_keys_and_the_ca_cert(services, institution):
    service = services[f"supernode-{institution}"]
    volumes = compose_volumes(service)
    assert volumes, f"{institution} mounts nothing"
    others = [name for name in INSTITUTIONS if name != institution]
    data_mount = compose_data_mount(service)
    key_mounts = []
    for source, target, mode in volumes:
        assert mode == "ro", f"{institution}: {source} must be read-only"
        assert not any(other in source or other in target for other in others), f"{institution} mounts {source}"
        if PurePosixPath(source).name == "ca.crt" or (source, target, mode) == data_mount:
            continue
        assert institution in source, f"{institution} mounts {source}, which is not its own keys"
        assert "superlink" not in source and "registry" not in source
        key_mounts.append(target)
    assert len(key_mounts) == 1, f"{institution} should mount exactly its own keys folder: {volumes}"
    assert any(PurePosixPath(source).name == "ca.crt" for source, _, _ in volumes), f"{institution} lacks ca.crt"


@pytest.mark.unit
def test_compose_supernodes_split_the_task_between_them(services):
    configs = [node_config(as_list(services[f"supernode-{name}"]["command"])) for name in INSTITUTIONS]
    assert sorted(c["partition-id"] for c in configs) == list(range(len(INSTITUTIONS)))
    assert {c["num-partitions"] for c in configs} == {len(INSTITUTIONS)}
    assert len({c["signing-key"] for c in configs}) == 1, "same in-container path, different mounted keys"
    assert len({c["data"] for c in configs}) == 1, "same in-container data path, different mounted folders"


@pytest.mark.unit
@pytest.mark.parametrize("institution", INSTITUTIONS)
def test_compose_supernode_trains_on_its_own_data_folder_mounted_read_only(services, institution):
    service = services[f"supernode-{institution}"]
    command = as_list(service["command"])
    config = node_config(command)
    source, target, mode = compose_data_mount(service)
    assert mode == "ro", f"{institution}'s data folder {source} must be mounted read-only"
    assert PurePosixPath(source).parts[:2] == ("institutions", institution), (
        f"{institution}'s data should come from ./institutions/{institution}/..., not {source}"
    )
    assert not PurePosixPath(source).suffix, f"mount the data folder, not a single file: {source}"
    for path in data_paths(config):
        assert PurePosixPath(path) != PurePosixPath(target), f"{path} is the folder itself, not a file in it"
    keys = [flag_value(command, "--auth-supernode-private-key"), config["signing-key"]]
    assert not any(covered_by(path, [target]) for path in keys), "keys and data must be separate mounts"
    assert target not in ("/", "/keys", "/certs"), target


@pytest.mark.unit
def test_compose_each_data_folder_is_seen_by_its_own_supernode_only(services):
    sources = {name: compose_data_mount(services[f"supernode-{name}"])[0] for name in INSTITUTIONS}
    assert len(set(sources.values())) == len(INSTITUTIONS), f"institutions share a data folder: {sources}"
    for name, service in services.items():
        mounted = [source for source, _, _ in compose_volumes(service)]
        for institution, source in sources.items():
            if name != f"supernode-{institution}":
                assert not any(covered_by(source, [m]) or covered_by(m, [source]) for m in mounted), (
                    f"{name} sees {institution}'s data ({source})"
                )
        if not name.startswith("supernode-"):
            assert not any("institutions" in PurePosixPath(m).parts for m in mounted), f"{name} mounts data"


@pytest.mark.e2e
def test_compose_services_start_in_order_and_have_health_checks(services):
    superlink = services["superlink"]
    port = flag_value(as_list(superlink["command"]), "--port")
    check = " ".join(as_list(superlink["healthcheck"]["test"]))
    assert f"https://localhost:{port}/health" in check and "--cafile" in check, check
    for institution in INSTITUTIONS:
        service = services[f"supernode-{institution}"]
        assert service["depends_on"]["superlink"]["condition"] == "service_healthy"
        health = service.get("healthcheck", {})
        assert not health.get("disable") and "/health" in " ".join(as_list(health["test"])), institution
    assert services["register"]["depends_on"]["superlink"]["condition"] == "service_healthy"


@pytest.mark.unit
def test_compose_register_service_registers_public_keys_only(services):
    register = services["register"]
    command = as_list(register.get("entrypoint", [])) + as_list(register.get("command", []))
    assert "fedfuse-flwr" in command and "register-supernodes" in command, command
    pubkeys = command[command.index("register-supernodes") + 1]
    volumes = compose_volumes(register)
    assert pubkeys in [target for _, target, _ in volumes]
    for source, _, mode in volumes:
        assert mode == "ro"
        assert "keys/" not in source and not source.endswith(".key"), f"register sees private keys: {source}"
    for institution in INSTITUTIONS:
        assert services[f"supernode-{institution}"]["depends_on"]["register"]["condition"] == (
            "service_completed_successfully"
        )


@pytest.mark.e2e
def test_flwr_wrapper_registers_with_flwr_supernode_register_and_valid_flags(flower_help):
    script = FLWR_WRAPPER.read_text()
    calls = [
        line for line in script.splitlines() if "flwr supernode register" in line and not line.lstrip().startswith("#")
    ]
    assert calls, "the wrapper never calls flwr supernode register"
    accepted = flower_help["flwr supernode register"]
    assert "--name" in accepted, sorted(accepted)
    for call in calls:
        for flag in re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", call):
            assert flag in accepted, f"`flwr supernode register` does not accept {flag}"
    assert "root-certificates" in script and "[superlink.fedfuse]" in script


@pytest.mark.unit
def test_the_helpers_the_services_call_are_installed_by_the_dockerfile(services):
    dockerfile = DOCKERFILE.read_text()
    for helper, source in (("fedfuse-healthcheck", HEALTHCHECK), ("fedfuse-flwr", FLWR_WRAPPER)):
        assert re.search(rf"^COPY\s+deploy/{source.name}\s+\S*/{helper}\s*$", dockerfile, re.MULTILINE), helper
        assert source.is_file()
    used = " ".join(" ".join(as_list(s.get("healthcheck", {}).get("test", []))) for s in services.values())
    assert "fedfuse-healthcheck" in used


# -------------------------------------------------------------------------------------------- k8s
@pytest.mark.unit
def test_every_k8s_object_is_named_and_namespaced(k8s_objects):
    assert k8s_objects
    for doc in k8s_objects:
        for key in ("apiVersion", "kind"):
            assert doc.get(key), f"object without {key}: {doc}"
        metadata = doc.get("metadata") or {}
        assert metadata.get("name"), f"{doc['kind']} without metadata.name"
        if doc["kind"] == "Namespace":
            assert metadata["name"] == NAMESPACE
        elif doc["kind"] in CLUSTER_SCOPED:
            assert "namespace" not in metadata, f"{doc['kind']}/{metadata['name']} is cluster-scoped"
        else:
            assert metadata.get("namespace") == NAMESPACE, f"{doc['kind']}/{metadata['name']} not in {NAMESPACE}"


@pytest.mark.unit
def test_kustomization_lists_every_manifest_except_the_examples(manifests):
    (kustomization,) = manifests["kustomization.yaml"]
    assert kustomization["kind"] == "Kustomization"
    assert kustomization["namespace"] == NAMESPACE
    resources = kustomization["resources"]
    for resource in resources:
        assert (K8S / resource).is_file(), resource
    expected = {"namespace.yaml", "superlink.yaml", *(f"supernode-{name}.yaml" for name in INSTITUTIONS)}
    assert set(resources) == expected
    assert "secrets.example.yaml" in manifests, "document the Secrets (secrets.example.yaml)"
    assert "data-volumes.example.yaml" in manifests, "show how a data volume is bound (data-volumes.example.yaml)"


@pytest.mark.unit
def test_k8s_has_the_expected_deployments_and_service(manifests, deployments):
    assert set(deployments) == {"superlink", *(f"supernode-{name}" for name in INSTITUTIONS)}
    for institution in INSTITUTIONS:
        docs = manifests[f"supernode-{institution}.yaml"]
        assert [d["metadata"]["name"] for d in docs if d["kind"] == "Deployment"] == [f"supernode-{institution}"]
    services = [d for d in manifests["superlink.yaml"] if d["kind"] == "Service"]
    assert [s["metadata"]["name"] for s in services] == ["superlink"]


@pytest.mark.unit
def test_k8s_deployment_args_only_name_paths_that_are_mounted(deployments):
    for name, doc in deployments.items():
        spec = pod_spec(doc)
        volumes = {volume["name"]: volume for volume in spec.get("volumes", [])}
        for container in spec["containers"]:
            mounts = {m["mountPath"]: m for m in container.get("volumeMounts", [])}
            for mount in mounts.values():
                assert mount["name"] in volumes, f"{name}: mount of undefined volume {mount['name']}"
            command = as_list(container.get("command", [])) + as_list(container.get("args", []))
            paths = host_paths_in(command)
            assert paths, f"{name}: no paths in {command}"
            for path in paths:
                mount_path = next((m for m in mounts if covered_by(path, [m])), None)
                assert mount_path is not None, f"{name}: {path} is in no volumeMount ({sorted(mounts)})"
                volume = volumes[mounts[mount_path]["name"]]
                source = volume.get("secret") or volume.get("configMap")
                if source and source.get("items") and path != mount_path:
                    relative = PurePosixPath(path).relative_to(mount_path).as_posix()
                    assert relative in [item["path"] for item in source["items"]], (
                        f"{name}: {path} is not one of the items of volume {volume['name']}"
                    )


@pytest.mark.unit
def test_k8s_superlink_runs_tls_with_supernode_auth_and_probes(deployments, manifests):
    (container,) = pod_spec(deployments["superlink"])["containers"]
    command = as_list(container.get("command", [])) + as_list(container.get("args", []))
    assert command[0] == "flower-superlink"
    for flag in SUPERLINK_REQUIRED:
        assert flag in flags(command), f"k8s superlink lacks {flag}"
    assert "--insecure" not in flags(command)
    assert flag_value(command, "--host") == "0.0.0.0"
    port = int(flag_value(command, "--port"))
    ports = {p.get("name"): p["containerPort"] for p in container["ports"]}
    assert port in ports.values()
    for probe in ("readinessProbe", "livenessProbe"):
        get = container[probe]["httpGet"]
        assert get["path"] == "/health" and get["scheme"] == "HTTPS"
        assert ports.get(get["port"], get["port"]) == port, f"{probe} checks another port"
    (service,) = [d for d in manifests["superlink.yaml"] if d["kind"] == "Service"]
    (service_port,) = service["spec"]["ports"]
    assert ports.get(service_port["targetPort"], service_port["targetPort"]) == port
    labels = deployments["superlink"]["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= labels.items()


@pytest.mark.unit
@pytest.mark.parametrize("institution", INSTITUTIONS)
def test_k8s_supernode_uses_its_own_secret_and_has_probes(deployments, institution):
    doc = deployments[f"supernode-{institution}"]
    assert doc["spec"]["replicas"] == 1
    spec = pod_spec(doc)
    (container,) = spec["containers"]
    command = as_list(container.get("command", [])) + as_list(container.get("args", []))
    assert command[0] == "flower-supernode"
    for flag in SUPERNODE_REQUIRED:
        assert flag in flags(command), f"k8s {institution} lacks {flag}"
    assert "--insecure" not in flags(command)
    config = node_config(command)
    for key in NODE_CONFIG_KEYS:
        assert key in config, f"k8s {institution}'s node config lacks {key}"
    assert config["institution"] == institution
    secrets = [v["secret"]["secretName"] for v in spec["volumes"] if "secret" in v]
    assert secrets == [f"{institution}-keys"], f"{institution} mounts secrets {secrets}"
    others = [name for name in INSTITUTIONS if name != institution]
    assert not any(other in yaml.safe_dump(doc) for other in others), f"{institution} names another institution"
    assert "superlink-tls" not in yaml.safe_dump(doc), "a SuperNode must not see the SuperLink's TLS key"
    for probe in ("readinessProbe", "livenessProbe"):
        assert container[probe].get("exec", {}).get("command") or container[probe].get("httpGet"), probe
    context = spec.get("securityContext", {})
    assert context.get("runAsNonRoot") is True and context.get("runAsUser", 0) != 0


@pytest.mark.unit
def test_k8s_supernodes_split_the_task_between_them(deployments):
    configs = []
    for institution in INSTITUTIONS:
        (container,) = pod_spec(deployments[f"supernode-{institution}"])["containers"]
        configs.append(node_config(as_list(container["args"])))
    assert sorted(c["partition-id"] for c in configs) == list(range(len(INSTITUTIONS)))
    assert {c["num-partitions"] for c in configs} == {len(INSTITUTIONS)}


def k8s_data_claim(doc: dict) -> tuple[dict, dict]:
    """(volumeMount, volume) of a SuperNode Deployment that hold its node config's data paths."""
    spec = pod_spec(doc)
    (container,) = spec["containers"]
    paths = data_paths(node_config(as_list(container["args"])))
    assert paths, f"{doc['metadata']['name']}'s node config names no data"
    mounts = [m for m in container.get("volumeMounts", []) if any(covered_by(p, [m["mountPath"]]) for p in paths)]
    assert len(mounts) == 1, f"data {paths} should lie in exactly one volumeMount: {mounts}"
    (volume,) = [v for v in spec["volumes"] if v["name"] == mounts[0]["name"]]
    return mounts[0], volume


@pytest.mark.unit
@pytest.mark.parametrize("institution", INSTITUTIONS)
def test_k8s_supernode_trains_on_its_own_claim_mounted_read_only(manifests, deployments, institution):
    doc = deployments[f"supernode-{institution}"]
    mount, volume = k8s_data_claim(doc)
    assert mount.get("readOnly") is True, f"{institution}: the data mount must be readOnly"
    assert "hostPath" not in volume, "Pod Security 'restricted' forbids hostPath in a pod: use a PVC"
    claim = volume.get("persistentVolumeClaim")
    assert claim, f"{institution}'s data volume is not a PersistentVolumeClaim: {volume}"
    assert claim.get("readOnly") is True, "the claim itself must be mounted read-only too"
    assert claim["claimName"] == f"{institution}-data", claim
    (container,) = pod_spec(doc)["containers"]
    for path in data_paths(node_config(as_list(container["args"]))):
        assert PurePosixPath(path) != PurePosixPath(mount["mountPath"]), f"{path} is the mount itself, not a file"
    claims = [d for d in manifests[f"supernode-{institution}.yaml"] if d["kind"] == "PersistentVolumeClaim"]
    assert [c["metadata"]["name"] for c in claims] == [claim["claimName"]], "the claim ships with its SuperNode"


@pytest.mark.unit
def test_k8s_each_data_claim_is_mounted_by_its_own_supernode_only(deployments):
    owners = {}
    for name, doc in deployments.items():
        for volume in pod_spec(doc).get("volumes", []):
            if "persistentVolumeClaim" in volume:
                owners.setdefault(volume["persistentVolumeClaim"]["claimName"], []).append(name)
    for institution in INSTITUTIONS:
        assert owners.get(f"{institution}-data") == [f"supernode-{institution}"], owners


@pytest.mark.unit
def test_k8s_data_volume_example_binds_each_claim_read_only_and_retained(manifests):
    volumes = {d["metadata"]["name"]: d for d in manifests["data-volumes.example.yaml"]}
    for institution in INSTITUTIONS:
        (claim,) = [d for d in manifests[f"supernode-{institution}.yaml"] if d["kind"] == "PersistentVolumeClaim"]
        volume = volumes[claim["spec"]["volumeName"]]
        assert volume["kind"] == "PersistentVolume"
        assert volume["spec"]["claimRef"] == {"namespace": NAMESPACE, "name": claim["metadata"]["name"]}
        assert volume["spec"]["storageClassName"] == claim["spec"]["storageClassName"] == "", "static binding"
        assert set(claim["spec"]["accessModes"]) <= set(volume["spec"]["accessModes"])
        assert volume["spec"]["persistentVolumeReclaimPolicy"] == "Retain", "deleting a claim must keep the data"
        assert volume["spec"]["hostPath"]["type"] == "Directory"
        assert institution in volume["spec"]["hostPath"]["path"]
        others = [name for name in INSTITUTIONS if name != institution]
        assert not any(other in yaml.safe_dump(volume) for other in others)


@pytest.mark.unit
def test_k8s_secrets_example_holds_placeholders_and_no_ca_key(manifests):
    docs = manifests["secrets.example.yaml"]
    kinds = {(d["kind"], d["metadata"]["name"]) for d in docs}
    assert ("Secret", "superlink-tls") in kinds
    assert {("Secret", f"{name}-keys") for name in INSTITUTIONS} <= kinds
    for doc in docs:
        for key, value in {**doc.get("stringData", {}), **doc.get("data", {})}.items():
            assert key != "ca.key", "the CA key never goes into the cluster"
            assert str(value).startswith("<") and str(value).endswith(">"), f"{key} is not a placeholder"


# ------------------------------------------------------------------------------------ all deploy files
@pytest.mark.unit
def test_no_file_holds_key_or_certificate_material():
    files = [p for p in DEPLOY.rglob("*") if p.is_file() and "secrets" not in p.relative_to(DEPLOY).parts]
    assert len(files) >= 8, files
    pem = re.compile(r"-----BEGIN [A-Z0-9 ]+-----")
    openssh = re.compile(r"\b(?:ssh-ed25519|ecdsa-sha2-nistp\d+|ssh-rsa) AAAA[A-Za-z0-9+/]{16,}")
    for path in files:
        text = path.read_text(errors="replace")
        assert not pem.search(text), f"{path} holds PEM/OpenSSH material"
        assert not openssh.search(text), f"{path} holds a key"


@pytest.mark.unit
def test_dockerfile_installs_cpu_torch_then_the_app_as_a_non_root_user():
    text = DOCKERFILE.read_text()
    instructions = [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    assert re.match(r"^FROM\s+python:3\.11-slim\b", next(i for i in instructions if i.startswith("FROM")))
    code = "\n".join(instructions)  # without comments
    assert re.search(r"pip install \S*torch==\$\{TORCH_VERSION\}\S*\s+--index-url", code)
    assert re.search(r"^ARG TORCH_VERSION=2\.13\.0$", code, re.MULTILINE)
    assert "ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu" in code
    assert re.search(r"pip install \.(\s|$)", code), "the image must `pip install .` the app"
    assert code.index("torch==") < code.index("pip install ."), "CPU torch must come before the app"
    users = [i.split()[1] for i in instructions if i.startswith("USER ")]
    assert users and users[-1].split(":")[0] not in ("root", "0"), "the image must run as a non-root user"
    assert any(i.startswith("HEALTHCHECK") and "CMD" in i for i in instructions)
    assert any(i.startswith("ENTRYPOINT") for i in instructions) and any(i.startswith("CMD") for i in instructions)
    for instruction in instructions:
        if instruction.startswith(("COPY", "ADD")):
            sources = [t for t in instruction.split()[1:-1] if not t.startswith("--")]
            for source in sources:
                assert (ROOT / source).exists(), f"COPY source {source} does not exist"
                assert not re.search(r"secret|\.key|certs|keys|registry", source), f"COPY of {source}"
        if instruction.startswith(("ENV", "ARG")):
            assert not re.search(r"(?i)(password|token|secret)\s*=", instruction), instruction


# ---------------------------------------------------------------------------- flags vs Flower's --help
@pytest.mark.e2e
def test_help_parser_reads_flower_options(flower_help):
    superlink, supernode = flower_help["flower-superlink"], flower_help["flower-supernode"]
    assert {"--ssl-certfile", "--enable-supernode-auth", "--host", "--port", "--database"} <= set(superlink)
    assert {"--superlink", "--root-certificates", "--node-config"} <= set(supernode)
    assert "deprecated" in superlink["--auth-list-public-keys"].lower(), "the deprecation check could not fail"
    assert "--no-such-flag" not in superlink


def used_flower_flags(services, deployments) -> dict[str, set[str]]:
    used: dict[str, set[str]] = {"flower-superlink": set(), "flower-supernode": set()}
    commands = [as_list(s.get("command", [])) for s in services.values()]
    for doc in deployments.values():
        for container in pod_spec(doc)["containers"]:
            commands.append(as_list(container.get("command", [])) + as_list(container.get("args", [])))
    for command in commands:
        if command and command[0] in used:
            used[command[0]].update(flags(command))
    return used


@pytest.mark.e2e
def test_every_flower_flag_used_is_accepted_and_not_deprecated(flower_help, services, deployments):
    used = used_flower_flags(services, deployments)
    assert used["flower-superlink"] and used["flower-supernode"]
    for tool, tool_flags in used.items():
        accepted = flower_help[tool]
        for flag in sorted(tool_flags):
            assert flag in accepted, f"`{tool}` does not accept {flag} (flwr 1.41 --help)"
            assert "deprecated" not in accepted[flag].lower(), f"`{tool}` {flag} is deprecated: {accepted[flag]}"


@pytest.mark.unit
def test_valued_flags_have_values(services, deployments):
    commands = [as_list(s.get("command", [])) for s in services.values()]
    commands += [as_list(c.get("args", [])) for d in deployments.values() for c in pod_spec(d)["containers"]]
    for command in commands:
        if not command or not command[0].startswith("flower-"):
            continue
        for index, token in enumerate(command):
            if token.startswith("--") and "=" not in token and token not in SWITCHES:
                assert index + 1 < len(command) and not command[index + 1].startswith("--"), (
                    f"{token} has no value in {command}"
                )


# ----------------------------------------------------------------------------------- health check helper
class _Health(http.server.BaseHTTPRequestHandler):
    def do_GET(self):  # http.server calls it by this name
        self.send_response(200 if self.path == "/health" else 503)
        self.end_headers()

    def log_message(self, *args):
        pass


@pytest.mark.e2e
def test_healthcheck_script_exits_zero_only_on_http_200():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Health)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    port = server.server_address[1]
    try:

        def check(*args: str) -> int:
            done = subprocess.run(
                [sys.executable, str(HEALTHCHECK), *args], capture_output=True, timeout=60, check=False
            )
            return done.returncode

        assert check(f"http://127.0.0.1:{port}/health") == 0
        assert check(f"http://127.0.0.1:{port}/broken") == 1
    finally:
        server.shutdown()
        server.server_close()
    assert check(f"http://127.0.0.1:{port}/health", "--timeout", "2") == 1, "a closed port must be unhealthy"


@pytest.mark.unit
def test_readme_replaced_the_placeholder_and_covers_the_roles():
    text = (DEPLOY / "README.md").read_text()
    assert "Not built yet" not in text
    for needle in (
        "flwr supernode register",
        "signer-registry",
        "gateway-members",
        "tier",
        "docker compose",
        "kubectl",
        "fedfuse certs",
        "fedfuse keys",
        ".pub",
    ):
        assert needle in text, f"deploy/README.md does not mention {needle}"


@pytest.mark.unit
def test_readme_tells_an_institution_how_to_use_its_own_data():
    text = (DEPLOY / "README.md").read_text()
    for needle in (
        'data="/data/train.jsonl"',
        "eval-data",
        "validation-fraction",
        "text-column",
        "label-column",
        'task="classify"',
        "labels=",
        "JSONL",
        "CSV",
        "Parquet",
        "save_to_disk",
        ":/data:ro",
        "readOnly: true",
        "data_rows",
        "data_sha256",
        "data-volumes.example.yaml",
    ):
        assert needle in text, f"deploy/README.md does not mention {needle}"
    runs = [
        block for block in re.findall(r"docker run .*?(?:\n\n|```)", text, re.DOTALL) if "flower-supernode" in block
    ]
    assert runs and all(":/data:ro" in run and 'data="/data/' in run for run in runs), (
        "every `docker run` of a SuperNode mounts its data read-only and names it in the node config"
    )
