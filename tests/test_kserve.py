"""edgerun under KServe: the single model KServe mounts, the image recipes, the manifests.

The model-dir tests run `edgerun serve --model-dir DIR --model-name NAME --port --grpc-port`
exactly as the ClusterServingRuntime does, over the layouts KServe's storage initializer
leaves in /mnt/models. The manifests are checked offline: PyYAML parses them, core kinds
validate with kubernetes-validate, KServe kinds against the KServe SDK's API types
(tests/kserve_schema.py, in a process of its own).
"""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path

import httpx
import kubernetes_validate
import numpy as np
import pytest
import tritonclient.grpc as tgrpc
import yaml
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.version import Version

from edgerun.cli import build_parser
from edgerun.examples import mlp_onnx
from edgerun.runtime import BundleError, Model, create_bundle
from edgerun.runtime.sources import SingleModelSource
from tests.cli import edgerun_command
from tests.serving import running_process

if sys.version_info >= (3, 11):
    import tomllib
else:
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy" / "kserve"
MANIFESTS = sorted(DEPLOY.glob("*.yaml"))
KUBERNETES = "1.33.0"


def documents() -> list[tuple[str, dict]]:
    found = []
    for path in MANIFESTS:
        for index, document in enumerate(yaml.safe_load_all(path.read_text())):
            found.append((f"{path.name}#{index}", document))
    return found


# ------------------------------------------------------------- the mounted model
@pytest.fixture(scope="module")
def onnx_bytes() -> bytes:
    return mlp_onnx([8, 16, 4], seed=5)


def served_by_kserve_layout(folder: Path, name: str, tmp: Path) -> tuple[dict, np.ndarray]:
    """Serve `folder` as KServe's runtime does; answer one request over HTTP and over gRPC."""
    x = np.random.default_rng(0).standard_normal((3, 8)).astype(np.float32)
    command = [*edgerun_command(), "serve", "--model-dir", str(folder), "--model-name", name]
    with running_process(command, log_dir=tmp, grpc=True) as server:
        http = httpx.post(f"{server.url}/v2/models/{name}/infer", timeout=30, json={
            "inputs": [{"name": "x", "datatype": "FP32", "shape": [3, 8],
                        "data": x.ravel().tolist()}]}).json()
        client = tgrpc.InferenceServerClient(server.grpc_address)
        tensor = tgrpc.InferInput("x", [3, 8], "FP32")
        tensor.set_data_from_numpy(x)
        answer = client.infer(name, [tensor])
        assert client.get_model_metadata(name).versions == [http["model_version"]]
        assert httpx.get(f"{server.url}/v2/models/other/ready").status_code == 404
    grpc_y = answer.as_numpy("y")
    np.testing.assert_array_equal(np.float32(http["outputs"][0]["data"]).reshape(3, 4), grpc_y)
    assert answer.get_response().model_version == http["model_version"]
    return http, grpc_y


def expected(onnx_bytes: bytes, tmp: Path) -> np.ndarray:
    (tmp / "reference.onnx").write_bytes(onnx_bytes)
    bundle = create_bundle(tmp / "reference.onnx", tmp / "reference", name="ref", version="1")
    x = np.random.default_rng(0).standard_normal((3, 8)).astype(np.float32)
    return Model.load(bundle.path).predict({"x": x})["y"]


def test_a_bare_onnx_file_serves_as_version_1(tmp_path, onnx_bytes):
    mount = tmp_path / "mnt" / "models"
    mount.mkdir(parents=True)
    (mount / "model.onnx").write_bytes(onnx_bytes)
    http, y = served_by_kserve_layout(mount, "mnist", tmp_path)
    assert http["model_name"] == "mnist" and http["model_version"] == "1"
    np.testing.assert_allclose(y, expected(onnx_bytes, tmp_path), rtol=1e-6)
    assert list(mount.iterdir()) == [mount / "model.onnx"], "the mount is read, never written"


def test_a_bundle_folder_under_another_name_serves_as_the_given_name(tmp_path, onnx_bytes):
    source = tmp_path / "model.onnx"
    source.write_bytes(onnx_bytes)
    mount = tmp_path / "models"
    create_bundle(source, mount, name="digits", version="3")  # manifest.json at the top
    http, y = served_by_kserve_layout(mount, "digits-prod", tmp_path)
    assert http["model_name"] == "digits-prod" and http["model_version"] == "3"
    np.testing.assert_allclose(y, expected(onnx_bytes, tmp_path), rtol=1e-6)


def test_a_bundle_archive_serves(tmp_path, onnx_bytes):
    source = tmp_path / "model.onnx"
    source.write_bytes(onnx_bytes)
    bundle = create_bundle(source, tmp_path / "bundle", name="digits", version="2")
    mount = tmp_path / "models"
    mount.mkdir()
    bundle.pack(mount / "digits-2.tar.gz")
    http, _ = served_by_kserve_layout(mount, "digits", tmp_path)
    assert http["model_version"] == "2"


def test_a_model_that_does_not_load_ends_the_process_naming_why(tmp_path, onnx_bytes):
    """It stayed up, live and never ready, serving nothing: Kubernetes showed a pod running,
    and the reason sat in its log until Knative's progress deadline gave up on it."""
    source = tmp_path / "model.onnx"
    source.write_bytes(onnx_bytes)
    bundle = create_bundle(source, tmp_path / "models" / "digits", name="digits", version="1")
    model = bundle.path / "model.onnx"
    model.write_bytes(model.read_bytes()[:-1] + b"\x00")  # no longer what the manifest says
    ended = subprocess.run([*edgerun_command(), "serve", "--model-dir", str(bundle.path),
                            "--model-name", "digits", "--port", "0"],
                           capture_output=True, text=True, timeout=120)
    assert ended.returncode == 2, ended.stderr
    assert "model.onnx does not match its sha256" in ended.stderr


def test_a_bare_tflite_file_serves_as_version_1(tmp_path):
    """The runtime declares the tflite format: a bare model.tflite is served like model.onnx."""
    from tests.tflite_models import int8_dense_tflite
    rng = np.random.default_rng(1)
    weight = rng.standard_normal((4, 8)).astype(np.float32) * 0.5
    mount = tmp_path / "mnt" / "models"
    mount.mkdir(parents=True)
    (mount / "model.tflite").write_bytes(int8_dense_tflite(weight, np.zeros(4, np.float32)))
    http, _ = served_by_kserve_layout(mount, "lite", tmp_path)
    assert http["model_name"] == "lite" and http["model_version"] == "1"
    assert list(mount.iterdir()) == [mount / "model.tflite"], "the mount is read, never written"


def test_single_model_source_finds_the_one_model_or_says_why_not(tmp_path, onnx_bytes):
    nested = tmp_path / "nested" / "inner"
    nested.mkdir(parents=True)
    (nested / "Resnet.onnx").write_bytes(onnx_bytes)
    source = SingleModelSource(tmp_path / "nested")
    assert source.models() == ["Resnet"] and source.wanted("Resnet", source.config("Resnet")) \
        == ["1"]
    assert (source.bundle_path("Resnet", "1") / "manifest.json").is_file()

    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(BundleError, match="found nothing"):
        SingleModelSource(empty)
    two = tmp_path / "two"
    two.mkdir()
    for name in ("a.onnx", "b.onnx"):
        (two / name).write_bytes(onnx_bytes)
    with pytest.raises(BundleError, match="found a.onnx, b.onnx"):
        SingleModelSource(two)
    odd = tmp_path / "odd" / "model.pt"
    odd.parent.mkdir()
    odd.write_bytes(b"torch")
    with pytest.raises(BundleError, match=r"no backend runs \.pt files"):
        SingleModelSource(odd)
    with pytest.raises(BundleError, match="bundle name"):
        SingleModelSource(nested, "not/a name")


def test_a_mount_that_holds_no_model_fails_fast_with_the_reason(tmp_path):
    result = subprocess.run([*edgerun_command(), "serve", "--model-dir", str(tmp_path),
                             "--model-name", "m", "--port", "0"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "found nothing" in result.stderr


# ------------------------------------------------------------------- the manifests
def test_every_manifest_parses_and_names_itself():
    found = documents()
    assert len(MANIFESTS) >= 4 and len(found) >= 8
    for where, document in found:
        assert isinstance(document, dict), where
        assert document["apiVersion"] and document["kind"] and document["metadata"]["name"], \
            where


def test_core_kinds_validate_with_kubernetes_validate():
    core = [(where, d) for where, d in documents()
            if not d["apiVersion"].startswith("serving.kserve.io/")]
    assert {d["kind"] for _, d in core} >= {"Namespace", "Secret", "ServiceAccount"}
    for where, document in core:
        kubernetes_validate.validate(document, KUBERNETES, strict=True)
    bad = {"apiVersion": "v1", "kind": "ServiceAccount",
           "metadata": {"name": "x"}, "secrets": "models-s3"}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(bad, KUBERNETES, strict=True)


def kserve_check(*paths: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tests.kserve_schema", *map(str, paths)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)


def test_kserve_kinds_validate_against_the_kserve_sdk(tmp_path):
    result = kserve_check(*MANIFESTS)
    kserve_objects = sum(d["apiVersion"].startswith("serving.kserve.io/")
                         for _, d in documents())
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"checked {kserve_objects} KServe objects: 0 problems" in result.stdout

    # the check has teeth: each of these mistakes is reported
    runtime = next(yaml.safe_load_all((DEPLOY / "cluster-serving-runtime.yaml").read_text()))
    runtime["spec"]["protocolVersion"] = ["v2"]                  # no such field
    runtime["spec"]["containers"][0]["ports"] = [{"containerPort": "8080"}]   # not an int
    del runtime["spec"]["containers"][0]["name"]                 # required
    service = yaml.safe_load((DEPLOY / "inferenceservice.yaml").read_text())
    service["spec"]["predictor"]["minReplicas"] = "zero"
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump_all([runtime, service]))
    result = kserve_check(bad)
    assert result.returncode == 1
    for mistake in (r"spec\.protocolVersion: .* has no such field",
                    r"containers\[0\]\.ports\[0\]\.containerPort: expected int",
                    r"containers\[0\]: V1Container: .*name.*[Ff]ield required",
                    r"predictor\.minReplicas: expected int"):
        assert re.search(mistake, result.stdout), (mistake, result.stdout)


def test_runtime_arguments_are_what_edgerun_serve_takes():
    runtimes = [d for _, d in documents() if d["kind"] == "ClusterServingRuntime"]
    assert {r["metadata"]["name"] for r in runtimes} == {"edgerun", "edgerun-gpu"}
    formats = {f["name"] for f in runtimes[0]["spec"]["supportedModelFormats"]}
    assert formats == {"onnx", "tflite", "edgerun"}
    for runtime in runtimes:
        assert set(runtime["spec"]["protocolVersions"]) == {"v2", "grpc-v2"}
        (container,) = runtime["spec"]["containers"]
        args = [a.replace("{{.Name}}", "mnist") for a in container["args"]]
        parsed = build_parser().parse_args(["serve", *args])
        assert (str(parsed.model_dir), parsed.model_name, parsed.port, parsed.grpc_port) == \
            ("/mnt/models", "mnist", 8080, 8081)
        assert parsed.host == "0.0.0.0"
        assert container["securityContext"]["runAsNonRoot"] is True
    grpc_service = yaml.safe_load((DEPLOY / "inferenceservice-grpc.yaml").read_text())
    model = grpc_service["spec"]["predictor"]["model"]
    assert model["protocolVersion"] == "grpc-v2"
    assert model["ports"] == [{"name": "h2c", "containerPort": 8081, "protocol": "TCP"}]


def test_images_run_the_runtime_command_as_a_user_on_8080_and_8081():
    for name, base in (("Dockerfile", "python:3.11-slim"),
                       ("Dockerfile.cuda", "nvidia/cuda:")):
        text = (ROOT / name).read_text()
        assert re.search(rf"^FROM {re.escape(base)}", text, re.M), name
        assert re.search(r"^EXPOSE 8080 8081$", text, re.M), name
        assert re.search(r"^USER 1000", text, re.M), name
        assert re.search(r"EDGERUN_CACHE=/tmp/", text), name  # user 1000 has no home
        entrypoint = re.search(r"^ENTRYPOINT (.*)$", text, re.M).group(1)
        command = re.search(r"^CMD (.*)$", text, re.M).group(1)
        argv = yaml.safe_load(entrypoint) + yaml.safe_load(command)
        assert argv[:2] == ["edgerun", "serve"], argv
        parsed = build_parser().parse_args(argv[1:])
        assert (parsed.port, parsed.grpc_port, str(parsed.model_dir)) == \
            (8080, 8081, "/mnt/models"), name
        assert re.search(r"pip install .*edgerun\[server[],]|pip install .*\.\[server[],]", text), \
            name
    assert "onnxruntime-gpu" in (ROOT / "Dockerfile.cuda").read_text()


# ------------------------------------------------------------------ what the images install
#: What serves each model format the runtimes declare: any one of these distributions.
FORMAT_NEEDS = {"onnx": {"onnxruntime", "onnxruntime-gpu"},
                "edgerun": {"onnxruntime", "onnxruntime-gpu"},
                "tflite": {"ai-edge-litert"}}
#: The first onnxruntime-gpu release built for CUDA 13 (its CUDA provider needs
#: libcudart.so.13 and libcublas.so.13; 1.20 to 1.26 need the .so.12 ones).
ORT_GPU_CUDA_13 = Version("1.27.0")


def image_installs(dockerfile: Path) -> set[str]:
    """The distributions a Dockerfile's `pip install` lines leave installed."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]

    def expand(requirement: Requirement, found: set[str]) -> None:
        if requirement.name != "edgerun":
            found.add(requirement.name.lower())
            return
        for line in project["dependencies"]:
            expand(Requirement(line), found)
        for extra in requirement.extras:
            for line in project["optional-dependencies"][extra]:
                expand(Requirement(line), found)

    installed: set[str] = set()
    for command in re.findall(r"pip (install|uninstall) ([^&\n]*)",
                              dockerfile.read_text().replace("\\\n", " ")):
        verb, rest = command
        names = [word for word in shlex.split(rest) if not word.startswith("-")
                 and not word.startswith("/")]
        for word in names:
            requirement = Requirement("edgerun" + word[1:] if word.startswith(".[") else word)
            if verb == "install":
                expand(requirement, installed)
            else:
                installed.discard(requirement.name.lower())
    return installed


def test_each_runtime_image_installs_what_serves_every_format_it_declares():
    dockerfiles = {}
    for name in ("Dockerfile", "Dockerfile.cuda"):
        tag = re.search(r"docker build .*-t \S+:(\S+) \.$", (ROOT / name).read_text(), re.M)
        dockerfiles[tag.group(1)] = ROOT / name
    assert image_installs(ROOT / "Dockerfile") >= {"onnxruntime", "uvicorn", "grpcio"}
    for _, runtime in documents():
        if runtime["kind"] != "ClusterServingRuntime":
            continue
        (container,) = runtime["spec"]["containers"]
        dockerfile = dockerfiles[container["image"].rpartition(":")[2]]
        installed = image_installs(dockerfile)
        for model_format in runtime["spec"]["supportedModelFormats"]:
            assert FORMAT_NEEDS[model_format["name"]] & installed, \
                (runtime["metadata"]["name"], model_format["name"], dockerfile.name)


def test_the_cuda_image_installs_an_onnxruntime_gpu_built_for_its_cuda():
    text = (ROOT / "Dockerfile.cuda").read_text()
    cuda = int(re.search(r"^FROM nvidia/cuda:(\d+)\.", text, re.M).group(1))
    assert cuda == 12
    (pin,) = re.findall(r'"onnxruntime-gpu([^"]*)"', text)
    allowed = SpecifierSet(pin)
    assert Version("1.26.0") in allowed
    assert ORT_GPU_CUDA_13 not in allowed and Version("1.31.1") not in allowed, pin


def test_the_cuda_image_frees_uid_1000_before_creating_its_user():
    """Ubuntu's images from 23.04 on hold user `ubuntu` as uid 1000: `useradd --uid 1000` fails
    (exit 4, "UID 1000 is not unique") and so does the build, unless that user goes first."""
    text = (ROOT / "Dockerfile.cuda").read_text()
    release = re.search(r"^FROM \S*ubuntu(\d+)\.(\d+)", text, re.M)
    assert release and (int(release.group(1)), int(release.group(2))) >= (23, 4)
    useradd = text.index("useradd --uid 1000")
    assert re.search(r"userdel\b[^&]*\bubuntu\b", text[:useradd]), \
        "the base image's ubuntu user (uid 1000) must be removed before useradd --uid 1000"
