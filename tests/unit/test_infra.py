"""infra/ and prefect.yaml, checked offline: Kubernetes manifests and the work pools' job
templates against the Kubernetes schemas, Terraform parsed (and `terraform fmt` where the
binary is), Dockerfiles parsed; and the files agree with each other (pools, images, the GPU
nodes' label and taint, the non-root uid)."""

from __future__ import annotations

import importlib
import inspect
import json
import re
import shutil
import subprocess
from pathlib import Path

import hcl2
import kubernetes_validate
import pytest
import yaml
from dockerfile_parse import DockerfileParser

REPO = Path(__file__).resolve().parents[2]
INFRA = REPO / "infra"
K8S_VERSION = "1.30"
UID = 10001


def manifests() -> list[tuple[str, dict]]:
    return [(f"{path.name}#{i}", doc) for path in sorted((INFRA / "kubernetes").glob("*.yaml"))
            for i, doc in enumerate(yaml.safe_load_all(path.read_text())) if doc]


@pytest.mark.parametrize("name,doc", manifests(), ids=[n for n, _ in manifests()])
def test_kubernetes_manifests_are_valid(name, doc):
    if doc["kind"] == "DaskCluster":  # a custom resource: its pod specs are core PodSpecs
        pods = [doc["spec"]["worker"]["spec"], doc["spec"]["scheduler"]["spec"]]
        for spec in pods:
            kubernetes_validate.validate({"apiVersion": "v1", "kind": "Pod",
                                          "metadata": {"name": "x"}, "spec": spec},
                                         K8S_VERSION, strict=True)
        service = {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "x"},
                   "spec": doc["spec"]["scheduler"]["service"]}
        kubernetes_validate.validate(service, K8S_VERSION, strict=True)
        return
    kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


def test_a_broken_manifest_is_caught():
    """The check can fail: a misspelt field of a Job is refused."""
    _, job = next((n, d) for n, d in manifests() if d["kind"] == "Job")
    broken = json.loads(json.dumps(job))
    broken["spec"]["completionMod"] = broken["spec"].pop("completionMode")
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, K8S_VERSION, strict=True)


def pods(doc: dict) -> list[dict]:
    if doc["kind"] in ("Deployment", "Job"):
        return [doc["spec"]["template"]["spec"]]
    if doc["kind"] == "DaskCluster":
        return [doc["spec"]["worker"]["spec"], doc["spec"]["scheduler"]["spec"]]
    return []


def dockerfile(kind: str) -> DockerfileParser:
    return DockerfileParser(fileobj=open(INFRA / "docker" / f"Dockerfile.{kind}", "rb"))


def unquoted(value):
    """python-hcl2 keeps HCL's quotes on strings and keys: drop them."""
    if isinstance(value, dict):
        return {unquoted(k): unquoted(v) for k, v in value.items() if k != "__comments__"}
    if isinstance(value, list):
        return [unquoted(v) for v in value]
    if isinstance(value, str) and len(value) >= 2 and value[0] == value[-1] == '"':
        return value[1:-1]
    return value


def test_every_pod_runs_as_the_images_non_root_user():
    for name, doc in manifests():
        for pod in pods(doc):
            assert pod["securityContext"]["runAsNonRoot"] and pod["securityContext"]["runAsUser"] == UID, name
    for kind in ("cpu", "cuda"):
        parser = dockerfile(kind)
        users = [i["value"] for i in parser.structure if i["instruction"] == "USER"]
        assert users[-1] == str(UID)


@pytest.mark.parametrize("kind,index", [("cpu", "whl/cpu"), ("cuda", "whl/cu")])
def test_dockerfiles_install_the_right_torch_then_the_pinned_package(kind, index):
    parser = dockerfile(kind)
    runs = [i["value"] for i in parser.structure if i["instruction"] == "RUN"]
    torch_line = next(r for r in runs if "torch==" in r)
    assert index in parser.args["TORCH_INDEX"] and "${TORCH_INDEX}" in torch_line
    package = next(r for r in runs if "-c constraints.txt" in r)
    assert runs.index(torch_line) < runs.index(package)  # torch first: no CUDA wheel on CPU
    assert ".[flows,cloud]" in package and "prefect-kubernetes" in package
    copied = {i["value"].split()[0] for i in parser.structure if i["instruction"] == "COPY"}
    assert {"anysat", "flows", "catalogs", "prefect.yaml"} <= copied
    assert parser.baseimage.startswith("python:3.11")


def job_from_template(name: str) -> dict:
    """A work pool's Job manifest with its template variables filled as a worker would."""
    template = json.loads((INFRA / "kubernetes" / name).read_text())
    variables = template["variables"]["properties"]
    values = {k: v.get("default") for k, v in variables.items()}
    values.update(image="registry.example.com/anysat:cpu", command="python -m prefect.engine",
                  labels={"prefect.io/flow-run-id": "x"}, env={"A": "1"})
    text = json.dumps(template["job_configuration"]["job_manifest"])
    for key, value in values.items():  # "{{ x }}" -> the value (JSON-typed when whole)
        text = text.replace(f'"{{{{ {key} }}}}"', json.dumps(value))
        text = text.replace(f"{{{{ {key} }}}}", str(value))  # inside a longer string
    job = json.loads(text)
    container = job["spec"]["template"]["spec"]["containers"][0]
    container["args"] = container["args"].split()
    container["env"] = [{"name": k, "value": v} for k, v in container["env"].items()]
    assert "{{" not in json.dumps(job), job
    return job


@pytest.mark.parametrize("name", ["work-pool-cpu.json", "work-pool-gpu.json"])
def test_work_pool_job_templates_make_valid_jobs(name):
    job = job_from_template(name)
    kubernetes_validate.validate(job, K8S_VERSION, strict=True)
    limits = job["spec"]["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert ("nvidia.com/gpu" in limits) == (name == "work-pool-gpu.json")


def test_gpu_nodes_are_the_ones_gpu_pods_select_and_tolerate():
    with open(INFRA / "terraform" / "main.tf") as f:
        terraform = unquoted(hcl2.load(f))
    [group] = [r["aws_eks_node_group"]["gpu"] for r in terraform["resource"] if "aws_eks_node_group" in r]
    labels, [taint] = group["labels"], group["taint"]
    assert group["ami_type"].endswith("GPU") and group["scaling_config"][0]["min_size"] == 0
    gpu_pods = [job_from_template("work-pool-gpu.json")["spec"]["template"]["spec"],
                *[pod for _, doc in manifests() if doc["kind"] == "Job" for pod in pods(doc)]]
    for pod in gpu_pods:
        assert pod["nodeSelector"].items() <= labels.items()
        assert any(t["key"] == taint["key"] and t["effect"] == "NoSchedule" for t in pod["tolerations"])
    buckets = [r for r in terraform["resource"] if "aws_s3_bucket_public_access_block" in r]
    assert buckets and all(v for k, v in buckets[0]["aws_s3_bucket_public_access_block"]["anysat"].items()
                           if k.startswith(("block", "ignore", "restrict")))


def test_gpu_pods_share_tensors_through_a_memory_backed_dev_shm():
    """Reader processes (embedding) and DataLoader workers (pretraining) hand batches back
    through /dev/shm: a container's default of 64 MB fails at the first few squares."""
    gpu_pods = [job_from_template("work-pool-gpu.json")["spec"]["template"]["spec"],
                *[pod for _, doc in manifests() if doc["kind"] == "Job" for pod in pods(doc)]]
    for pod in gpu_pods:
        volumes = {v["name"]: v for v in pod["volumes"]}
        [mount] = [m for m in pod["containers"][0]["volumeMounts"] if m["mountPath"] == "/dev/shm"]
        assert volumes[mount["name"]]["emptyDir"]["medium"] == "Memory"


@pytest.mark.skipif(shutil.which("terraform") is None, reason="no terraform binary here")
def test_terraform_is_formatted():
    result = subprocess.run(["terraform", "fmt", "-check", "-recursive", str(INFRA / "terraform")],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_torchrun_job_finds_its_master_through_the_headless_service():
    docs = {d["kind"]: d for _, d in manifests() if d["metadata"]["name"] in ("anysat-train", "anysat-pretrain")}
    service, job = docs["Service"], docs["Job"]
    pod = job["spec"]["template"]["spec"]
    assert service["spec"]["clusterIP"] == "None" and pod["subdomain"] == service["metadata"]["name"]
    assert job["spec"]["completionMode"] == "Indexed"
    args = pod["containers"][0]["args"]
    nodes = int(re.search(r"--nnodes=(\d+)", " ".join(args)).group(1))
    assert nodes == job["spec"]["completions"] == job["spec"]["parallelism"]
    assert f"--master-addr={job['metadata']['name']}-0.{service['metadata']['name']}" in args
    assert "--node-rank=$(JOB_COMPLETION_INDEX)" in args


def test_prefect_yaml_deploys_every_flow_to_a_pool_the_infra_defines():
    config = yaml.safe_load((REPO / "prefect.yaml").read_text())
    pools = {"anysat-local"}
    for _, doc in manifests():
        if doc["kind"] == "Deployment" and doc["metadata"]["name"].startswith("anysat-worker"):
            args = doc["spec"]["template"]["spec"]["containers"][0]["args"]
            pools.add(args[args.index("--pool") + 1])
    assert pools == {"anysat-local", "anysat-k8s", "anysat-k8s-gpu"}
    for deployment in config["deployments"]:
        assert deployment["work_pool"]["name"] in pools, deployment["name"]
        path, function = deployment["entrypoint"].split(":")
        assert re.search(rf"^def {function}\(", (REPO / path).read_text(), re.M), deployment["entrypoint"]


def test_every_deployments_parameters_make_a_valid_request():
    """A deployment whose defaults the flow refuses fails only when it is run (on a GPU node,
    after the image pull): the requests and the training config are checked here instead."""
    from anysat.request import RegionRequest
    from anysat.train.trainer import TrainConfig

    config = yaml.safe_load((REPO / "prefect.yaml").read_text())
    for deployment in config["deployments"]:
        parameters = deployment.get("parameters", {})
        path, name = deployment["entrypoint"].split(":")
        flow = getattr(importlib.import_module(path.removesuffix(".py").replace("/", ".")), name)
        inspect.signature(flow.fn).bind_partial(**parameters)  # no parameter it does not take
        if "request" in parameters:  # device and dtype are judged on the flow's own node
            RegionRequest.model_validate({**parameters["request"], "device": "cpu", "dtype": "fp32"})
        if "config" in parameters:
            TrainConfig(**parameters["config"])
