"""Checks of the deployment definitions under platform/ against the code and the pins they name.

Nothing here starts a cluster or builds an image. The Serve config goes through Ray's own schema,
the Feast configs through Feast's own loader, and every entry point that a manifest names must be
importable from this checkout.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import re
import shlex
import tomllib
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[1]
PLATFORM = ROOT / "platform"
SERVE_CONFIG = PLATFORM / "serve" / "serve_config.yaml"
RAYCLUSTER = PLATFORM / "kuberay" / "raycluster.yaml"
RAYJOB = PLATFORM / "kuberay" / "rayjob-training.yaml"
RAYSERVICE = PLATFORM / "kuberay" / "rayservice.yaml"
DATA_VOLUME = PLATFORM / "kuberay" / "data-volume.yaml"
DOCKERFILE = PLATFORM / "docker" / "Dockerfile"
DEFAULT_FEAST_CONFIG = ROOT / "feature_repo" / "feature_store.yaml"
REDIS_FEAST_CONFIG = PLATFORM / "feature_store" / "feature_store.redis.yaml"

# Where the image keeps the Feast repository and where the shared data volume is mounted.
IMAGE_FEATURE_REPO = "/app/feature_repo"
DATA_MOUNT_PATH = "/app/feature_repo/data"

ENV_REFERENCE = re.compile(r"\$\{(\w+)\}")
MODULE_ENTRY_POINT = re.compile(r"python3? -m ([\w.]+)")


def load_yaml(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


def pyproject_pins() -> dict[str, str]:
    """Return the exact version of every dependency pinned with == in pyproject.toml, by package name."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    pins = {}
    for line in project["dependencies"]:
        requirement = Requirement(line)
        for specifier in requirement.specifier:
            if specifier.operator == "==":
                pins[requirement.name] = specifier.version
    return pins


def project_version() -> str:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]


def ray_cluster_specs() -> dict[str, dict]:
    """Return the RayCluster spec of each manifest that defines one, by file name."""
    return {
        RAYCLUSTER.name: load_yaml(RAYCLUSTER)["spec"],
        RAYSERVICE.name: load_yaml(RAYSERVICE)["spec"]["rayClusterConfig"],
    }


def ray_pod_specs() -> list[tuple[str, dict]]:
    """Return (label, pod spec) for the head and every worker group of every Ray cluster."""
    pods = []
    for file_name, cluster in ray_cluster_specs().items():
        pods.append((f"{file_name} head", cluster["headGroupSpec"]["template"]["spec"]))
        for group in cluster["workerGroupSpecs"]:
            pods.append((f"{file_name} {group['groupName']}", group["template"]["spec"]))
    return pods


def ray_containers() -> list[tuple[str, dict]]:
    return [(f"{label} {c['name']}", c) for label, pod in ray_pod_specs() for c in pod["containers"]]


def serve_application() -> dict:
    return load_yaml(SERVE_CONFIG)["applications"][0]


def job_commands() -> list[list[str]]:
    """Split the RayJob entrypoint into the commands that && chains."""
    entrypoint = load_yaml(RAYJOB)["spec"]["entrypoint"]
    return [shlex.split(command) for command in entrypoint.split("&&")]


def module_entry_points() -> list[tuple[str, str]]:
    """Find (file, module) for every `python -m <module>` in a YAML, shell or Docker file under platform/."""
    found = []
    for path in sorted(PLATFORM.rglob("*")):
        if path.is_file() and path.suffix in {".yaml", ".yml", ".sh", ""}:
            for module in MODULE_ENTRY_POINT.findall(path.read_text()):
                found.append((str(path.relative_to(ROOT)), module))
    return found


def help_options(module_name: str, capsys) -> set[str]:
    """Return the option strings that ``python -m <module> --help`` lists."""
    module = importlib.import_module(module_name)
    with pytest.raises(SystemExit) as exit_info:
        module.main(["--help"])
    assert exit_info.value.code == 0, f"{module_name} --help exited with {exit_info.value.code}"
    return set(re.findall(r"--[\w-]+", capsys.readouterr().out))


def unknown_keys(values: dict, schema) -> set[str]:
    """Return the keys that a pydantic model does not define. Ray's Serve schemas drop them silently."""
    known = set(schema.model_fields) | {f.alias for f in schema.model_fields.values() if f.alias}
    return set(values) - known


# The Serve config.


def test_serve_config_validates():
    from ray.serve.schema import ServeDeploySchema

    config = ServeDeploySchema.model_validate(load_yaml(SERVE_CONFIG))
    assert [app.name for app in config.applications] == ["seqrec"]


def test_serve_config_has_no_unknown_keys():
    from ray.serve.config import AutoscalingConfig
    from ray.serve.schema import (
        DeploymentSchema,
        HTTPOptionsSchema,
        RayActorOptionsSchema,
        ServeApplicationSchema,
        ServeDeploySchema,
    )

    config = load_yaml(SERVE_CONFIG)
    assert unknown_keys(config, ServeDeploySchema) == set()
    assert unknown_keys(config["http_options"], HTTPOptionsSchema) == set()
    application = config["applications"][0]
    assert unknown_keys(application, ServeApplicationSchema) == set()
    for deployment in application["deployments"]:
        name = deployment["name"]
        assert unknown_keys(deployment, DeploymentSchema) == set(), name
        assert unknown_keys(deployment.get("ray_actor_options", {}), RayActorOptionsSchema) == set(), name
        assert unknown_keys(deployment.get("autoscaling_config", {}), AutoscalingConfig) == set(), name


def test_serve_autoscaling_config_validates():
    from ray.serve.config import AutoscalingConfig

    scaled = [d for d in serve_application()["deployments"] if "autoscaling_config" in d]
    assert scaled, "no deployment in the Serve config autoscales"
    for deployment in scaled:
        # The deploy schema keeps the dict unchecked, so this model checks the values.
        AutoscalingConfig.model_validate(deployment["autoscaling_config"])


def test_serve_http_options_for_cluster():
    http_options = load_yaml(SERVE_CONFIG)["http_options"]
    assert http_options["host"] == "0.0.0.0"
    assert http_options["port"] == 8000


def test_serve_app_entry():
    application = serve_application()
    assert application["import_path"] == "serving.app:build_app"
    assert application["route_prefix"] == "/"
    assert set(application["args"]) >= {"feature_repo", "model_dir"}


def test_serve_args_resolve_in_image_and_checkout():
    # Relative paths resolve against the folder where `ray start` ran: /app in the image.
    args = serve_application()["args"]
    assert f"/app/{args['feature_repo']}" == IMAGE_FEATURE_REPO
    assert f"/app/{args['model_dir']}".startswith(DATA_MOUNT_PATH + "/")
    assert (ROOT / args["feature_repo"] / "feature_store.yaml").is_file()


def test_serve_deployments_exist_in_app():
    from ray.serve import Deployment

    import serving.app

    for deployment in serve_application()["deployments"]:
        name = deployment["name"]
        target = getattr(serving.app, name, None)
        assert isinstance(target, Deployment), f"serving.app has no deployment {name}"
        assert target.name == name


def test_serve_config_covers_every_deployment():
    import serving.app

    application = serve_application()
    bound = serving.app.deployment_names(application["args"].get("topology", serving.app.DEFAULT_TOPOLOGY))
    configured = {deployment["name"] for deployment in application["deployments"]}
    assert bound == configured


def test_serve_num_cpus_fractional():
    for deployment in serve_application()["deployments"]:
        num_cpus = deployment["ray_actor_options"]["num_cpus"]
        assert 0 < num_cpus < 1, f"{deployment['name']} asks for {num_cpus} CPUs"


def test_rayservice_embeds_serve_config():
    serve_config_v2 = load_yaml(RAYSERVICE)["spec"]["serveConfigV2"]
    assert serve_config_v2 == SERVE_CONFIG.read_text()


# Entry points named by the manifests and configs.


def test_import_paths_resolve():
    import_paths = [app["import_path"] for app in load_yaml(SERVE_CONFIG)["applications"]]
    embedded = yaml.safe_load(load_yaml(RAYSERVICE)["spec"]["serveConfigV2"])
    import_paths += [app["import_path"] for app in embedded["applications"]]
    for import_path in import_paths:
        module_name, _, attribute = import_path.partition(":")
        assert importlib.util.find_spec(module_name) is not None, f"{module_name} is not importable"
        assert callable(getattr(importlib.import_module(module_name), attribute, None)), import_path


def test_module_entry_points_importable():
    entry_points = module_entry_points()
    assert (str(RAYJOB.relative_to(ROOT)), "training.train") in entry_points
    for file_name, module_name in entry_points:
        assert importlib.util.find_spec(module_name) is not None, f"{file_name}: {module_name} is not importable"


def test_rayjob_options_exist(capsys):
    commands = [command for command in job_commands() if command[:2] == ["python", "-m"]]
    assert [command[2] for command in commands] == ["training.features", "training.materialize", "training.train"]
    for command in commands:
        module_name = command[2]
        options = help_options(module_name, capsys)
        for argument in command[3:]:
            if argument.startswith("--"):
                assert argument in options, f"{module_name} has no option {argument}"


def test_rayjob_feast_apply_in_repo():
    feast_commands = [command for command in job_commands() if command[0] == "feast"]
    assert feast_commands == [["feast", "--chdir", IMAGE_FEATURE_REPO, "apply"]]


def test_rayjob_targets_raycluster():
    selector = load_yaml(RAYJOB)["spec"]["clusterSelector"]
    assert selector == {"ray.io/cluster": load_yaml(RAYCLUSTER)["metadata"]["name"]}


# Feast configs.


def test_default_feast_config_loads():
    from feast.repo_config import load_repo_config

    config = load_repo_config(DEFAULT_FEAST_CONFIG.parent, DEFAULT_FEAST_CONFIG)
    assert config.online_store.type == "sqlite"
    assert config.offline_store.type == "ray"
    assert config.batch_engine.type == "ray.engine"


def test_redis_feast_config_loads(monkeypatch):
    from feast.repo_config import load_repo_config

    monkeypatch.setenv("SEQREC_REDIS_CONNECTION_STRING", "redis.test:6380,db=1")
    config = load_repo_config(DEFAULT_FEAST_CONFIG.parent, REDIS_FEAST_CONFIG)
    assert config.online_store.type == "redis"
    assert config.online_store.connection_string == "redis.test:6380,db=1"
    assert config.offline_store.type == "ray"
    assert config.batch_engine.type == "ray.engine"


@pytest.mark.parametrize("path", [DEFAULT_FEAST_CONFIG, REDIS_FEAST_CONFIG], ids=["default", "redis"])
def test_feast_config_has_no_unknown_keys(path):
    from feast.repo_config import RepoConfig

    # RepoConfig keeps unknown top-level keys instead of rejecting them.
    assert unknown_keys(load_yaml(path), RepoConfig) == set()


def test_redis_config_matches_default(monkeypatch):
    from feast.repo_config import load_repo_config

    monkeypatch.setenv("SEQREC_REDIS_CONNECTION_STRING", "localhost:6379")
    default = load_repo_config(DEFAULT_FEAST_CONFIG.parent, DEFAULT_FEAST_CONFIG)
    redis = load_repo_config(DEFAULT_FEAST_CONFIG.parent, REDIS_FEAST_CONFIG)
    assert redis.project == default.project
    assert redis.provider == default.provider
    assert redis.registry.path == default.registry.path
    assert redis.offline_store == default.offline_store
    assert redis.batch_engine.type == default.batch_engine.type
    assert redis.entity_key_serialization_version == default.entity_key_serialization_version


def test_ray_pods_set_redis_env():
    variables = ENV_REFERENCE.findall(REDIS_FEAST_CONFIG.read_text())
    assert variables, "the Redis config reads no environment variable"
    for label, container in ray_containers():
        names = {entry["name"] for entry in container.get("env", [])}
        for variable in variables:
            assert variable in names, f"{label} does not set {variable}"


def test_ray_pods_mount_data_volume():
    claim = load_yaml(DATA_VOLUME)["metadata"]["name"]
    for label, pod in ray_pod_specs():
        volumes = {v["name"] for v in pod["volumes"] if v.get("persistentVolumeClaim", {}).get("claimName") == claim}
        assert volumes, f"{label} has no volume for the claim {claim}"
        for container in pod["containers"]:
            mounts = {m["mountPath"] for m in container["volumeMounts"] if m["name"] in volumes}
            assert mounts == {DATA_MOUNT_PATH}, f"{label} {container['name']} mounts {claim} at {mounts}"


# Versions and the image.


def test_ray_version_matches_pyproject():
    ray_version = pyproject_pins()["ray"]
    for file_name, cluster in ray_cluster_specs().items():
        assert cluster["rayVersion"] == ray_version, file_name


def test_base_image_matches_pyproject():
    base_images = re.findall(r"^FROM\s+(\S+)", DOCKERFILE.read_text(), re.MULTILINE)
    assert base_images == [f"rayproject/ray:{pyproject_pins()['ray']}-py311-cpu"]


def test_dockerfile_pins_match_pyproject():
    pins = pyproject_pins()
    in_dockerfile = re.findall(r"([A-Za-z][\w-]*)(?:\[[\w,]+\])?==([\w.+]+)", DOCKERFILE.read_text())
    assert "torch" in {name for name, _ in in_dockerfile}, "the Dockerfile does not pin torch"
    for name, version in in_dockerfile:
        assert version == pins.get(name), f"Dockerfile pins {name}=={version}, pyproject.toml {pins.get(name)}"


def test_manifest_images_match_project():
    for label, container in ray_containers():
        assert container["image"] == f"seqrec:{project_version()}", label


def test_dockerfile_copy_sources_exist():
    copies = re.findall(r"^COPY\s+(?:--\S+\s+)*(.+)$", DOCKERFILE.read_text(), re.MULTILINE)
    assert copies, "the Dockerfile copies nothing"
    for arguments in copies:
        for source in arguments.split()[:-1]:
            assert (ROOT / source).exists(), f"COPY source {source} not found"


def test_dockerfile_selects_redis_config():
    text = DOCKERFILE.read_text()
    workdir = re.findall(r"^WORKDIR\s+(\S+)", text, re.MULTILINE)[-1]
    source = str(REDIS_FEAST_CONFIG.relative_to(ROOT))
    destination = re.search(rf"^COPY\s+(?:--\S+\s+)*{re.escape(source)}\s+(\S+)$", text, re.MULTILINE)
    assert destination, f"the Dockerfile does not copy {source}"
    selected = re.search(r"^ENV\s+FEAST_FS_YAML_FILE_PATH=(\S+)$", text, re.MULTILINE)
    assert selected, "the Dockerfile does not set FEAST_FS_YAML_FILE_PATH"
    assert os.path.normpath(os.path.join(workdir, destination.group(1))) == selected.group(1)


# Layout.


def test_platform_has_no_python():
    assert list(PLATFORM.rglob("*.py")) == []
    assert list(PLATFORM.rglob("__init__.py")) == []
