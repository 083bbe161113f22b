"""`cluster.yaml` (and the GCP / on-premise variants in docs/CLUSTER.md) pass Ray's own offline
validation and keep the project's rules: token auth on every `ray start`, a loopback-only dashboard,
GPU work on the GPU type and CRF work on the CPU type.

`prepare_config` fills the provider's defaults from YAML files inside the Ray package and
`validate_config` checks Ray's JSON schema plus a few rules: no network, no cloud credentials.
"""

from __future__ import annotations

import copy
import json
import re
import subprocess
from pathlib import Path

import click
import jsonschema
import pytest
import ray
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

REPO = Path(__file__).resolve().parents[1]
CLUSTER_YAML = REPO / "cluster.yaml"
CLUSTER_DOC = REPO / "docs" / "CLUSTER.md"
VARIANTS = ("aws", "gcp", "local")
NODE_TYPE_VARIANTS = ("aws", "gcp")  # the local provider has no node types of its own

HEAD, GPU_TYPE, CPU_TYPE = "ray.head.default", "ray.worker.gpu", "ray.worker.cpu"

# (vCPUs, GPUs) of the machine types the config and the docs use, from the providers' type lists.
# A type that is not here fails test_declared_cpus_and_gpus_match_the_machine: add it with its shape.
MACHINE_SHAPES = {
    "m5.2xlarge": (8, 0),
    "c6i.4xlarge": (16, 0),
    "c6i.8xlarge": (32, 0),
    "g5.xlarge": (4, 1),
    "g5.2xlarge": (8, 1),
    "g5.12xlarge": (48, 4),
    "g5.48xlarge": (192, 8),
    "n2-standard-8": (8, 0),
    "c2-standard-16": (16, 0),
    "g2-standard-48": (48, 4),
}

COMMAND_KEYS = (
    "initialization_commands", "setup_commands", "head_setup_commands", "worker_setup_commands",
    "head_start_ray_commands", "worker_start_ray_commands",
)


# ------------------------------------------------------------------------------------------ helpers


def load_cluster() -> dict:
    return yaml.safe_load(CLUSTER_YAML.read_text())


def doc_overlays() -> dict[str, dict]:
    """The ```yaml blocks of docs/CLUSTER.md marked `<!-- cluster.yaml overlay: NAME -->`."""
    pattern = re.compile(r"<!-- cluster\.yaml overlay: (\w+) -->\s*```yaml\n(.*?)```", re.DOTALL)
    return {name: yaml.safe_load(body) for name, body in pattern.findall(CLUSTER_DOC.read_text())}


def with_overlay(base: dict, overlay: dict) -> dict:
    """Top-level keys of the overlay replace those of base; a null value deletes the key."""
    config = copy.deepcopy(base)
    for key, value in overlay.items():
        if value is None:
            config.pop(key, None)
        else:
            config[key] = copy.deepcopy(value)
    return config


def variant(name: str) -> dict:
    base = load_cluster()
    if name == "aws":
        return base
    overlays = doc_overlays()
    assert name in overlays, f"docs/CLUSTER.md has no `<!-- cluster.yaml overlay: {name} -->` block"
    return with_overlay(base, overlays[name])


def ray_validated(config: dict) -> dict:
    """What `ray up` does before touching the cloud: fill defaults, then validate."""
    prepared = prepare_config(copy.deepcopy(config))
    validate_config(prepared)
    return prepared


def start_command(config: dict, key: str) -> str:
    commands = [c for c in config[key] if "ray start" in c]
    assert len(commands) == 1, f"{key}: expected one `ray start` command, got {commands}"
    return commands[0]


def machine_type(node_config: dict) -> str:
    return node_config.get("InstanceType") or node_config["machineType"]


# ---------------------------------------------------------------------------------- Ray's validation


@pytest.mark.parametrize("name", VARIANTS)
def test_ray_accepts_the_config(name):
    prepared = ray_validated(variant(name))

    assert prepared["cluster_name"] == "cse-ray"
    assert prepared["provider"]["type"] == name
    if name == "local":  # Ray turns the listed machines into its single on-premise node type
        (only_type,) = prepared["available_node_types"].values()
        assert only_type["max_workers"] == len(prepared["provider"]["worker_ips"])
    else:
        assert prepared["head_node_type"] == HEAD
        assert set(prepared["available_node_types"]) == {HEAD, GPU_TYPE, CPU_TYPE}


def _set(path: tuple, value):
    def mutate(config):
        node = config
        for key in path[:-1]:
            node = node[key]
        node[path[-1]] = value
    return mutate


def _drop(path: tuple):
    def mutate(config):
        node = config
        for key in path[:-1]:
            node = node[key]
        del node[path[-1]]
    return mutate


def _on_premise_keeping_node_types(config):
    config["provider"] = {"type": "local", "head_ip": "10.0.0.1", "worker_ips": ["10.0.0.2"]}


BROKEN = {
    "misspelt top-level key": (
        _set(("max_worker",), 3), jsonschema.ValidationError, "'max_worker' was unexpected",
    ),
    "max_workers as a string": (
        _set(("max_workers",), "10"), jsonschema.ValidationError, "'10' is not of type 'integer'",
    ),
    "node type without node_config": (
        _drop(("available_node_types", CPU_TYPE, "node_config")),
        jsonschema.ValidationError, "'node_config' is a required property",
    ),
    "fractional node resource": (
        _set(("available_node_types", CPU_TYPE, "resources", "crf"), 0.01),
        jsonschema.ValidationError, "0.01 is not of type 'integer'",
    ),
    "head type that does not exist": (
        _set(("head_node_type",), "ray.head.gpu"), ValueError, "`head_node_type` must be one of",
    ),
    "more min_workers than max_workers": (
        _set(("available_node_types", CPU_TYPE, "min_workers"), 11), ValueError, "smaller than the sum of",
    ),
    "node types on the local provider": (
        _on_premise_keeping_node_types, click.ClickException, "not supported for on-premise",
    ),
}


@pytest.mark.parametrize("breakage", list(BROKEN))
def test_ray_rejects_a_broken_copy(breakage):
    mutate, error, message = BROKEN[breakage]
    config = load_cluster()
    mutate(config)
    with pytest.raises(error, match=re.escape(message)):
        ray_validated(config)


# ------------------------------------------------------------------------------- the project's rules


@pytest.mark.parametrize("name", VARIANTS)
@pytest.mark.parametrize("key", ["head_start_ray_commands", "worker_start_ray_commands"])
def test_every_ray_start_keeps_token_auth(name, key):
    config = variant(name)
    command = start_command(config, key)
    before = command[: command.index("ray start")]
    # Either `RAY_AUTH_MODE=token ray start` or an earlier `export`; `RAY_AUTH_MODE=token; ray start`
    # would only set a shell variable that `ray start` never sees.
    inline = re.search(r"RAY_AUTH_MODE=token\s+ray start", command)
    exported = re.search(r"\bexport\s+RAY_AUTH_MODE=token\b", before)
    assert inline or exported, f"{key}: `ray start` without RAY_AUTH_MODE=token: {command}"
    assert "RAY_AUTH_MODE=disabled" not in json.dumps(config)


@pytest.mark.parametrize("name", VARIANTS)
def test_dashboard_listens_on_loopback_only(name):
    command = start_command(variant(name), "head_start_ray_commands")
    hosts = re.findall(r"--dashboard-host[= ](\S+)", command)
    assert hosts == ["127.0.0.1"] or hosts == ["localhost"], f"dashboard host {hosts} in: {command}"


@pytest.mark.parametrize("name", VARIANTS)
def test_the_token_file_is_copied_to_every_node(name):
    mounts = variant(name)["file_mounts"]
    assert mounts.get("~/.ray/auth_token") == "~/.ray/auth_token"


@pytest.mark.parametrize("name", NODE_TYPE_VARIANTS)
def test_node_types_place_each_stage(name):
    types = variant(name)["available_node_types"]
    head, gpu, cpu = (types[t]["resources"] for t in (HEAD, GPU_TYPE, CPU_TYPE))

    assert head.get("CPU") == 0, "the head runs the driver only"
    assert gpu.get("GPU", 0) >= 1 and gpu.get("cam", 0) >= 1, f"{GPU_TYPE}: {gpu}"
    assert cpu.get("crf", 0) >= 1 and cpu.get("CPU", 0) >= 1, f"{CPU_TYPE}: {cpu}"
    # Each custom resource on exactly one type, so {"cam": 0.01} / {"crf": 0.01} pin the stage there.
    assert "crf" not in gpu and "crf" not in head
    assert "cam" not in cpu and "cam" not in head
    assert "GPU" not in cpu


@pytest.mark.parametrize("name", NODE_TYPE_VARIANTS)
def test_declared_cpus_and_gpus_match_the_machine(name):
    for type_name, node_type in variant(name)["available_node_types"].items():
        machine = machine_type(node_type["node_config"])
        assert machine in MACHINE_SHAPES, f"{type_name}: add {machine} to MACHINE_SHAPES with its shape"
        vcpus, gpus = MACHINE_SHAPES[machine]
        resources = node_type["resources"]
        if type_name == HEAD:
            assert resources.get("CPU", vcpus) <= vcpus
            continue
        declared = (resources.get("CPU"), resources.get("GPU", 0))
        assert declared == (vcpus, gpus), f"{type_name} ({machine}): CPU, GPU {declared} != {vcpus, gpus}"


@pytest.mark.parametrize("name", VARIANTS)
def test_nodes_get_the_same_ray_as_this_checkout(name):
    commands = " ".join(variant(name)["setup_commands"])
    pins = re.findall(r"\bray\[[\w,]+\]==([\w.]+)", commands)
    assert pins, "setup_commands should pin Ray (`ray[...]==VERSION`)"
    assert set(pins) == {ray.__version__}, f"cluster pins Ray {pins}, .venv has {ray.__version__}"


def test_mounted_paths_exist_and_suffice_for_pip_install():
    mounts = load_cluster()["file_mounts"]
    project = {}
    for remote, local in mounts.items():
        if local.startswith("~"):  # the user's own token, not part of the checkout
            continue
        assert (REPO / local).exists(), f"file_mounts {remote}: {local} does not exist in the checkout"
        if remote.startswith("~/cse-ray/"):
            project[remote.removeprefix("~/cse-ray/")] = (REPO / local).resolve()

    # `readme = "README.md"` (or `readme = {file = "..."}`) must be there for the build to start.
    pyproject = (REPO / "pyproject.toml").read_text()
    readme = re.search(r'^readme\s*=\s*(?:"([^"]+)"|\{[^}]*file\s*=\s*"([^"]+)")', pyproject, re.M)
    needed = {"pyproject.toml", "cse_ray"} | ({readme.group(1) or readme.group(2)} if readme else set())
    assert needed <= set(project), f"`pip install -e ~/cse-ray` needs {sorted(needed - set(project))}"
    for relative, source in project.items():
        assert source == (REPO / relative).resolve(), f"~/cse-ray/{relative} is not mounted from ./{relative}"
    assert any("pip install" in c and "-e ~/cse-ray" in c for c in load_cluster()["setup_commands"])


@pytest.mark.parametrize("name", VARIANTS)
def test_shell_commands_parse(name):
    config = variant(name)
    for key in COMMAND_KEYS:
        for command in config.get(key) or []:
            result = subprocess.run(["bash", "-n", "-c", command], capture_output=True, text=True)
            assert result.returncode == 0, f"{key}: {command}\n{result.stderr}"


@pytest.mark.parametrize("name", NODE_TYPE_VARIANTS)
def test_placeholder_guard_fires_only_while_a_placeholder_is_left(name, tmp_path):
    config = variant(name)
    (guard,) = [c for c in config["setup_commands"] if "ray_bootstrap_config.yaml" in c]
    bootstrap = tmp_path / "ray_bootstrap_config.yaml"  # `ray up` copies the whole config there

    def run_guard() -> subprocess.CompletedProcess:
        env = {"HOME": str(tmp_path), "PATH": "/usr/bin:/bin"}
        return subprocess.run(["bash", "-c", guard], env=env, capture_output=True, text=True)

    assert run_guard().returncode == 0, "a worker (no bootstrap config) must pass"

    as_written = json.dumps(ray_validated(config))
    assert "CHANGE-ME" in as_written
    bootstrap.write_text(as_written)
    refused = run_guard()
    assert refused.returncode == 1 and "placeholders" in refused.stderr

    # Fill in every placeholder except in the guard itself, which is part of the config too.
    guard_in_json = json.dumps(guard)[1:-1]
    assert guard_in_json in as_written
    filled = as_written.replace(guard_in_json, "\0").replace("CHANGE-ME", "filled-in")
    bootstrap.write_text(filled.replace("\0", guard_in_json))
    assert run_guard().returncode == 0, "the guard must not match its own text"


def test_on_premise_workers_announce_cam_or_crf_themselves():
    command = start_command(variant("local"), "worker_start_ray_commands")
    assert "--resources=" in command
    announced = [set(json.loads(blob)) for blob in re.findall(r"'(\{[^']*\})'", command)]
    assert sorted(map(sorted, announced)) == [["cam"], ["crf"]]
