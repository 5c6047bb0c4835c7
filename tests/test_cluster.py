"""cluster/: launcher configs against Ray's own schema, KubeRay manifests, and the paths the READMEs name.

All offline and fast: Ray's config preparation reads the provider's defaults from the ray package and never
calls the cloud (the `no_network` fixture makes sure of it). Each check is also run on a broken copy, to show
it can fail.
"""

from __future__ import annotations

import copy
import json
import re
import socket
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import ray
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

ROOT = Path(__file__).resolve().parents[1]
LAUNCHER_CONFIGS = ["cluster/aws.yaml", "cluster/gcp.yaml"]
KUBERAY = ["cluster/kuberay/raycluster.yaml", "cluster/kuberay/rayjob.yaml", "cluster/kuberay/rayservice.yaml"]
READMES = ["cluster/README.md", "jobs/README.md"]
RAY_SCHEMA = Path(ray.__file__).parent / "autoscaler" / "ray-schema.json"


@pytest.fixture(autouse=True)
def no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    """Any attempt to open a connection (to a cloud API, say) fails the test."""

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError(f"test_cluster tried to open a network connection: {args}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


def load(path: str) -> dict[str, Any]:
    return yaml.safe_load((ROOT / path).read_text())


def ray_validate(config: dict[str, Any]) -> None:
    """What `ray up` does before touching the cloud: the raw file against ray-schema.json, then Ray's defaults
    filled in (the provider's defaults.yaml, setup commands merged, per-type worker bounds) and validated again."""
    jsonschema.validate(config, json.loads(RAY_SCHEMA.read_text()))
    validate_config(prepare_config(copy.deepcopy(config)))


# ---- cluster launcher -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", LAUNCHER_CONFIGS)
def test_launcher_config_validates_against_rays_schema(path: str) -> None:
    ray_validate(load(path))


BREAKAGES = {
    "fractional GPU": lambda c: c["available_node_types"]["gpu_1x"]["resources"].update(GPU=0.5),
    "node type without resources": lambda c: c["available_node_types"]["gpu_8x"].pop("resources"),
    "misspelt top-level key": lambda c: c.update(idle_timeout_minute=5),
    "unknown head node type": lambda c: c.update(head_node_type="cpu_head"),
    "min_workers above max_workers": lambda c: c["available_node_types"]["gpu_1x"].update(min_workers=11),
}


@pytest.mark.parametrize("path", LAUNCHER_CONFIGS)
@pytest.mark.parametrize("breakage", list(BREAKAGES))
def test_broken_launcher_config_fails_validation(path: str, breakage: str) -> None:
    config = load(path)
    BREAKAGES[breakage](config)
    with pytest.raises((jsonschema.ValidationError, ValueError)):
        ray_validate(config)


@pytest.mark.parametrize("path", LAUNCHER_CONFIGS)
def test_launcher_config_layout(path: str) -> None:
    """A CPU head that takes no work but sweep drivers (ddetr_driver), a 1-GPU and an 8-GPU worker type, ddetr
    installed and its op prebuilt."""
    config = load(path)
    types = config["available_node_types"]
    head = types[config["head_node_type"]]
    assert head["resources"] == {"CPU": 0, "ddetr_driver": 100}
    gpus = {name: t["resources"].get("GPU", 0) for name, t in types.items() if name != config["head_node_type"]}
    assert sorted(gpus.values()) == [1, 8], gpus
    for name in gpus:
        assert 0 <= types[name]["min_workers"] <= types[name]["max_workers"] <= config["max_workers"], name
    assert config["idle_timeout_minutes"] > 0
    setup = " && ".join(config["setup_commands"])
    assert re.search(r"pip install .*-e ~/ddetr", setup) and "ddetr op build" in setup
    assert config["file_mounts"]["~/ddetr"] == "."
    # Token auth: the submitting machine's token on every node, every Ray process in token mode.
    assert config["file_mounts"]["~/.ray/auth_token"] == "~/.ray/auth_token"
    assert "--env RAY_AUTH_MODE=token" in config["docker"]["run_options"]
    # Images of the Ray release installed here (a Jobs client and server of different releases may not agree).
    assert config["docker"]["image"] == f"rayproject/ray:{ray.__version__}-py311-gpu"
    assert config["docker"]["head_image"] == f"rayproject/ray:{ray.__version__}-py311-cpu"


# ---- KubeRay ----------------------------------------------------------------------------------------------------


def _pod_problems(where: str, pod: dict[str, Any], gpus: int) -> list[str]:
    problems = []
    container = pod["containers"][0]
    resources = container.get("resources", {})
    for kind in ("requests", "limits"):
        if int(resources.get(kind, {}).get("nvidia.com/gpu", 0)) != gpus:
            problems.append(f"{where}: {kind} of nvidia.com/gpu should be {gpus}")
    shm = [m["name"] for m in container.get("volumeMounts", []) if m.get("mountPath") == "/dev/shm"]
    volumes = {v["name"]: v for v in pod.get("volumes", [])}
    if not shm or volumes.get(shm[0], {}).get("emptyDir", {}).get("medium") != "Memory":
        problems.append(f"{where}: /dev/shm should be a memory emptyDir")
    if "image" not in container:
        problems.append(f"{where}: no image")
    return problems


def ray_cluster_spec_problems(spec: dict[str, Any]) -> list[str]:
    """What a RayCluster spec (alone or inside a RayJob) must have here; [] when it has it all."""
    problems = []
    if spec.get("rayVersion") != ray.__version__:
        problems.append(f"rayVersion {spec.get('rayVersion')!r} is not the installed Ray {ray.__version__}")
    if spec.get("enableInTreeAutoscaling") is not True:
        problems.append("enableInTreeAutoscaling should be true")
    options = spec.get("autoscalerOptions", {})
    if not isinstance(options.get("idleTimeoutSeconds"), int):
        problems.append("autoscalerOptions.idleTimeoutSeconds should be an integer")
    if options.get("upscalingMode") not in ("Default", "Aggressive", "Conservative"):
        problems.append("autoscalerOptions.upscalingMode should be Default, Aggressive or Conservative")
    if spec.get("authOptions", {}).get("mode") != "token":
        problems.append("authOptions.mode should be token")
    head = spec.get("headGroupSpec", {})
    if head.get("rayStartParams", {}).get("num-cpus") != "0":
        problems.append('head rayStartParams should have num-cpus: "0" (no work on the head)')
    for group in [head, *spec.get("workerGroupSpecs", [])]:
        # KubeRay passes rayStartParams to `ray start` as strings and rejects other types.
        if not all(isinstance(v, str) for v in group.get("rayStartParams", {}).values()):
            problems.append(f"rayStartParams values should be strings: {group.get('rayStartParams')}")
    problems += _pod_problems("head", head.get("template", {}).get("spec", {"containers": [{}]}), gpus=0)
    workers = spec.get("workerGroupSpecs", [])
    if not workers:
        problems.append("no workerGroupSpecs")
    for group in workers:
        name = group.get("groupName", "?")
        if not 0 <= group.get("minReplicas", -1) <= group.get("replicas", -1) <= group.get("maxReplicas", -1):
            problems.append(f"{name}: need 0 <= minReplicas <= replicas <= maxReplicas")
        problems += _pod_problems(name, group.get("template", {}).get("spec", {"containers": [{}]}), gpus=1)
    return problems


def test_raycluster_manifest() -> None:
    manifest = load("cluster/kuberay/raycluster.yaml")
    assert (manifest["apiVersion"], manifest["kind"]) == ("ray.io/v1", "RayCluster")
    assert manifest["metadata"]["name"]
    assert ray_cluster_spec_problems(manifest["spec"]) == []


def test_rayjob_manifest() -> None:
    manifest = load("cluster/kuberay/rayjob.yaml")
    assert (manifest["apiVersion"], manifest["kind"]) == ("ray.io/v1", "RayJob")
    spec = manifest["spec"]
    assert spec["entrypoint"].startswith("ddetr train --preset ")
    assert spec["shutdownAfterJobFinishes"] is True
    assert ray_cluster_spec_problems(spec["rayClusterSpec"]) == []
    # A retried job resumes the run: retries, and an explicit run name to resume by; GPUs.
    assert (
        spec["backoffLimit"] > 0 and "train.name=" in spec["entrypoint"] and "train.use_gpu=true" in spec["entrypoint"]
    )


def rayservice_problems(manifest: dict[str, Any]) -> list[str]:
    """What the RayService must have: Serve's own config schema for serveConfigV2 (a YAML string in the CRD), an
    application ddetr's builder makes from its args (GPU replicas), replicas the GPU worker group can hold."""
    from ray._common.utils import import_attr
    from ray.serve._private.api import call_user_app_builder_with_args_if_necessary
    from ray.serve.schema import ServeDeploySchema

    spec = manifest["spec"]
    problems = ray_cluster_spec_problems(spec.get("rayClusterConfig", {}))
    if not isinstance(spec.get("serveConfigV2"), str):
        return [*problems, "serveConfigV2 should be a string holding the Serve config's YAML"]
    try:
        config = ServeDeploySchema.model_validate(yaml.safe_load(spec["serveConfigV2"]))
    except ValueError as err:  # pydantic's ValidationError is a ValueError
        return [*problems, f"serveConfigV2 is not a Serve config: {err}"]
    for app in config.applications:
        try:
            built = call_user_app_builder_with_args_if_necessary(import_attr(app.import_path), app.args)
        except (ImportError, AttributeError, TypeError, ValueError) as err:  # ConfigError is a ValueError
            problems.append(f"application {app.name}: {err}")
            continue
        deployment = built._bound_deployment
        if deployment.ray_actor_options.get("num_gpus") != 1:
            problems.append(f"application {app.name}: replicas should take one GPU each")
        groups = spec["rayClusterConfig"].get("workerGroupSpecs", [])
        most = sum(g.get("maxReplicas", 0) for g in groups)  # one GPU per pod
        if deployment._deployment_config.autoscaling_config.max_replicas > most:
            problems.append(f"application {app.name}: max_replicas over the {most} GPU pods the cluster can have")
    return problems


def test_rayservice_manifest() -> None:
    manifest = load("cluster/kuberay/rayservice.yaml")
    assert (manifest["apiVersion"], manifest["kind"]) == ("ray.io/v1", "RayService")
    assert manifest["metadata"]["name"]
    assert rayservice_problems(manifest) == []
    serve_config = yaml.safe_load(manifest["spec"]["serveConfigV2"])
    assert serve_config["applications"][0]["import_path"] == "ddetr.deploy.serve:app_builder"


def _set_arg(manifest: dict[str, Any], **args: Any) -> None:
    config = yaml.safe_load(manifest["spec"]["serveConfigV2"])
    config["applications"][0]["args"].update(args)
    manifest["spec"]["serveConfigV2"] = yaml.safe_dump(config)


BROKEN_SERVICES = {
    "serveConfigV2 as a mapping": lambda m: m["spec"].update(serveConfigV2=yaml.safe_load(m["spec"]["serveConfigV2"])),
    "bad proxy_location": lambda m: m["spec"].update(
        serveConfigV2=m["spec"]["serveConfigV2"].replace("proxy_location: EveryNode", "proxy_location: Everywhere")
    ),
    "no import_path": lambda m: m["spec"].update(
        serveConfigV2=m["spec"]["serveConfigV2"].replace("import_path: ddetr.deploy.serve:app_builder", "")
    ),
    "unknown builder": lambda m: m["spec"].update(
        serveConfigV2=m["spec"]["serveConfigV2"].replace(":app_builder", ":nope")
    ),
    "unknown setting": lambda m: _set_arg(m, max_batch=8),
    "bad setting": lambda m: _set_arg(m, min_replicas=4, max_replicas=2),
    "CPU replicas": lambda m: _set_arg(m, use_gpu=False),
    "more replicas than GPU pods": lambda m: _set_arg(m, max_replicas=9),
    "autoscaler off": lambda m: m["spec"]["rayClusterConfig"].update(enableInTreeAutoscaling=False),
}


@pytest.mark.parametrize("breakage", list(BROKEN_SERVICES))
def test_broken_rayservice_manifest_is_caught(breakage: str) -> None:
    manifest = load("cluster/kuberay/rayservice.yaml")
    BROKEN_SERVICES[breakage](manifest)
    assert rayservice_problems(manifest) != []


@pytest.mark.parametrize("path", KUBERAY)
def test_kuberay_sigterm_becomes_a_drain(path: str) -> None:
    """A reclaimed worker pod lives longer than Ray's drain timeout, so its SIGTERM drains the node first."""
    manifest = load(path)
    spec = manifest["spec"].get("rayClusterSpec", manifest["spec"].get("rayClusterConfig", manifest["spec"]))
    head = spec["headGroupSpec"]["rayStartParams"]
    assert json.loads(json.loads(head["resources"])) == {"ddetr_driver": 100}
    for group in spec["workerGroupSpecs"]:
        pod = group["template"]["spec"]
        env = {e["name"]: e["value"] for e in pod["containers"][0].get("env", [])}
        drain_s = float(env["RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S"])
        assert 0 < drain_s < pod["terminationGracePeriodSeconds"], group["groupName"]


BROKEN_SPECS = {
    "no GPU limit": lambda s: s["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]["resources"].pop("limits"),
    "no /dev/shm": lambda s: s["workerGroupSpecs"][0]["template"]["spec"].pop("volumes"),
    "autoscaler off": lambda s: s.update(enableInTreeAutoscaling=False),
    "integer rayStartParams": lambda s: s["headGroupSpec"]["rayStartParams"].update({"num-cpus": 0}),
    "minReplicas above maxReplicas": lambda s: s["workerGroupSpecs"][0].update(minReplicas=9),
}


@pytest.mark.parametrize("breakage", list(BROKEN_SPECS))
def test_broken_raycluster_manifest_is_caught(breakage: str) -> None:
    spec = load("cluster/kuberay/raycluster.yaml")["spec"]
    BROKEN_SPECS[breakage](spec)
    assert ray_cluster_spec_problems(spec) != []


def test_kuberay_image_is_built_from_the_installed_ray_release() -> None:
    dockerfile = (ROOT / "cluster/kuberay/Dockerfile").read_text()
    assert f"FROM rayproject/ray:{ray.__version__}-py311-gpu" in dockerfile
    assert "ddetr op build" in dockerfile


# ---- the READMEs' commands name files that exist ----------------------------------------------------------------

# A repository path in a command or a code span: cluster/..., jobs/..., tune/..., benchmarks/..., not part of a
# URI or of a longer path (s3://BUCKET/runs, /home/ray/ddetr).
_PATH = re.compile(r"(?<![\w/.:~-])((?:cluster|jobs|tune|benchmarks)/[\w./-]*[\w])")
_CODE = re.compile(r"```[^\n]*\n(.*?)```|`([^`\n]+)`", re.S)


def missing_paths(markdown: str) -> tuple[set[str], set[str]]:
    """(paths named in the code blocks and code spans of `markdown`, those of them that do not exist)."""
    named = {p for match in _CODE.finditer(markdown) for p in _PATH.findall(match.group(1) or match.group(2))}
    return named, {p for p in named if not (ROOT / p).exists()}


@pytest.mark.parametrize("readme", READMES)
def test_readme_commands_name_existing_files(readme: str) -> None:
    named, missing = missing_paths((ROOT / readme).read_text())
    assert "jobs/submit.py" in named and "cluster/aws.yaml" in named  # the parser found the commands
    assert missing == set(), f"{readme} names files that do not exist: {sorted(missing)}"


def test_missing_path_check_can_fail() -> None:
    markdown = (
        "Run:\n```bash\nray up cluster/aws.yaml && ray up cluster/azure.yaml\n```\nthen `tune/nope.py`, s3://b/jobs/x"
    )
    named, missing = missing_paths(markdown)
    assert named == {"cluster/aws.yaml", "cluster/azure.yaml", "tune/nope.py"}
    assert missing == {"cluster/azure.yaml", "tune/nope.py"}
