"""edgerun under KServe: the single model KServe mounts, the image recipes, the manifests.

The model-dir tests run `edgerun serve --model-dir DIR --model-name NAME --port --grpc-port`
exactly as the ClusterServingRuntime does, over the layouts KServe's storage initializer
leaves in /mnt/models. The manifests are checked offline: PyYAML parses them, core kinds
validate with kubernetes-validate, KServe kinds against the KServe SDK's API types
(tests/kserve_schema.py, in a process of its own), and against what KServe's webhooks and
pod mutator do with them (those rules written out here from KServe's Go sources, each
function naming its source).
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import kubernetes_validate
import numpy as np
import onnx
import pytest
import tritonclient.grpc as tgrpc
import yaml
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.version import Version

from edgerun.adapters.http.server import GRACE_S
from edgerun.cli import build_parser
from edgerun.examples import mlp_onnx
from edgerun.runtime import Bundle, BundleError, Model, create_bundle
from edgerun.runtime.sources import SingleModelSource, _single_model
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


def test_a_renamed_bundle_folder_with_a_link_in_it_is_refused_not_followed(tmp_path, onnx_bytes):
    """Served under another name, a bundle folder is copied: the copy followed its links, so
    an unlisted `root -> /` began a copy of the whole filesystem. Links are copied as links,
    and the copy's check refuses them."""
    source = tmp_path / "model.onnx"
    source.write_bytes(onnx_bytes)
    mount = tmp_path / "models"
    create_bundle(source, mount, name="digits", version="3")
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "big.bin").write_bytes(b"\0" * 1024)
    (mount / "elsewhere").symlink_to(outside, target_is_directory=True)
    source = SingleModelSource(mount, "digits-prod")
    assert (source.path / "elsewhere").is_symlink()
    with pytest.raises(BundleError, match="files not in the manifest: elsewhere$"):
        Bundle.open(source.path)


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


def test_a_bare_onnx_file_with_external_data_serves(tmp_path, onnx_bytes):
    """model.onnx beside model.onnx.data (ONNX external data, as models over 2 GB are saved):
    the start failed naming a temporary folder the user never made (`External data path does
    not exist: /tmp/edgerun-model-.../bundle/model.onnx.data`). The data file is carried into
    the bundle, listed and hashed with the model."""
    mount = tmp_path / "mnt" / "models"
    mount.mkdir(parents=True)
    onnx.save_model(onnx.load_from_string(onnx_bytes), mount / "model.onnx",
                    save_as_external_data=True, all_tensors_to_one_file=True,
                    location="model.onnx.data", size_threshold=0)
    http, y = served_by_kserve_layout(mount, "big", tmp_path)
    assert http["model_name"] == "big" and http["model_version"] == "1"
    np.testing.assert_allclose(y, expected(onnx_bytes, tmp_path), rtol=1e-6)
    assert sorted(p.name for p in mount.iterdir()) == ["model.onnx", "model.onnx.data"]


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


def as_user(uid: int, call) -> str:
    """`call()` in a child process that runs as `uid` (no groups): its repr, or the error."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: report and leave, never back into pytest
        try:
            os.close(read)
            os.setgroups([])
            os.setresgid(uid, uid, uid)
            os.setresuid(uid, uid, uid)
            result = repr(call())
        except BaseException as exc:
            result = f"{type(exc).__name__}: {exc}"
        os.write(write, result.encode())
        os._exit(0)
    os.close(write)
    with os.fdopen(read, "rb") as answer:
        result = answer.read().decode()
    os.waitpid(pid, 0)
    return result


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root, to make a folder another user owns")
def test_a_pvc_root_with_lost_and_found_serves_its_model(onnx_bytes):
    """A PVC's root holds a root-owned `lost+found` (mode 0700): looking into it for a
    manifest failed the start with "Permission denied: .../lost+found/manifest.json"."""
    with tempfile.TemporaryDirectory() as folder:  # under /tmp: pytest's is root's alone
        pvc = Path(folder)
        pvc.chmod(0o755)
        (pvc / "model.onnx").write_bytes(onnx_bytes)
        (pvc / "model.onnx").chmod(0o644)
        (pvc / "lost+found").mkdir(mode=0o700)
        os.chown(pvc / "lost+found", 12345, 12345)
        (pvc / "secret").mkdir(mode=0o700)  # any other entry this user may not look into
        os.chown(pvc / "secret", 12345, 12345)
        assert as_user(1000, lambda: _single_model(pvc)) == repr(pvc / "model.onnx")


def test_a_mount_that_holds_no_model_fails_fast_with_the_reason(tmp_path):
    result = subprocess.run([*edgerun_command(), "serve", "--model-dir", str(tmp_path),
                             "--model-name", "m", "--port", "0"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "found nothing" in result.stderr


@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("unshare"),
                    reason="needs root and unshare, to run edgerun as PID 1 of a namespace")
def test_sigterm_while_pid_1_starts_up_ends_it_with_status_0_before_it_serves(tmp_path):
    """The images run `edgerun serve` as PID 1, and a PID 1 ignores a signal it has no handler
    for: a SIGTERM during start-up (imports, bundling a bare model, unpacking) was lost, and
    the pod served on until the kubelet's SIGKILL. Here the start bundles a model whose golden
    run takes a while; SIGTERM once its bundling has begun ends it, with status 0, before it
    serves."""
    from tests.test_shutdown import slow_run_onnx

    mount, scratch = tmp_path / "models", tmp_path / "tmp"
    mount.mkdir()
    scratch.mkdir()
    (mount / "model.onnx").write_bytes(slow_run_onnx(products=10))
    command = ["unshare", "--pid", "--fork", "--mount-proc", *edgerun_command(), "serve",
               "--model-dir", str(mount), "--model-name", "slow", "--port", "0"]
    unshare = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               env={**os.environ, "TMPDIR": str(scratch)},
                               start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while not list(scratch.glob("edgerun-model-*/bundle/model.onnx")):  # bundling it
            assert unshare.poll() is None and time.monotonic() < deadline, "never bundled"
            time.sleep(0.01)
        (init,) = Path(f"/proc/{unshare.pid}/task/{unshare.pid}/children").read_text().split()
        assert "NSpid:\t" + init + "\t1\n" in Path(f"/proc/{init}/status").read_text()
        os.kill(int(init), signal.SIGTERM)
        try:  # start-up, left alone, would serve on (the golden run takes a second or so)
            status = unshare.wait(30)
        except subprocess.TimeoutExpired:
            status = "still running"
    finally:
        if unshare.poll() is None:
            os.killpg(unshare.pid, signal.SIGKILL)  # the namespace's PID 1 and unshare
        output = unshare.communicate(timeout=30)[0].decode()
    assert status == 0, f"{status} after SIGTERM:\n{output}"
    assert "Traceback" not in output and "Uvicorn running" not in output, output


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
        # an init as PID 1 (Kubernetes runs none): it reaps and forwards signals to edgerun
        assert argv[:4] == ["tini", "--", "edgerun", "serve"], argv
        assert re.search(r"apt-get install [^&]*\btini\b", text), name
        parsed = build_parser().parse_args(argv[3:])
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


# ------------------------------------------------------------ what KServe's webhooks refuse
#: KServe's default ClusterServingRuntimes, as far as its priority check reads them: name,
#: protocolVersions, and each supportedModelFormats entry (name, version, autoSelect,
#: priority). From kserve/kserve config/runtimes/kserve-*.yaml (the runtimes its
#: kustomization.yaml installs, and kserve-openvino.yaml), at aaac4e29 (2026-08).
KSERVE_DEFAULT_RUNTIMES = [
    ("kserve-tritonserver", ["v2", "grpc-v2"], [
        ("tensorrt", "8", True, 1), ("tensorflow", "1", True, 1), ("tensorflow", "2", True, 1),
        ("onnx", "1", True, 1), ("pytorch", "1", None, None), ("triton", "2", True, 1)]),
    ("kserve-openvino", ["v1", "v2", "grpc-v2"], [
        ("openvino", "10", True, 1), ("onnx", "1", True, 2), ("tensorflow", "1", True, 3),
        ("huggingface", None, True, None)]),
    ("kserve-torchserve", ["v1", "v2", "grpc-v2"], [("pytorch", "1", True, 2)]),
    ("kserve-tensorflow-serving", ["v1", "grpc-v1"], [
        ("tensorflow", "1", True, 2), ("tensorflow", "2", True, 2)]),
    ("kserve-mlserver", ["v2"], [
        ("sklearn", "0", True, 2), ("sklearn", "1", True, 2), ("xgboost", "1", True, 2),
        ("xgboost", "2", True, 2), ("lightgbm", "3", True, 2), ("lightgbm", "4", True, 2),
        ("mlflow", "1", True, 1), ("mlflow", "2", True, 1)]),
    ("kserve-sklearnserver", ["v1", "v2"], [("sklearn", "1", True, 1)]),
    ("kserve-xgbserver", ["v1", "v2"], [("xgboost", "2", True, 1)]),
    ("kserve-lgbserver", ["v1", "v2"], [("lightgbm", "4", True, 1)]),
    ("kserve-pmmlserver", ["v1", "v2"], [("pmml", "3", True, 1), ("pmml", "4", True, 1)]),
    ("kserve-paddleserver", ["v1", "v2"], [("paddle", "2", True, 1)]),
    ("kserve-huggingfaceserver", ["v2", "v1"], [("huggingface", "1", True, 1)]),
    ("kserve-autogluonserver", ["v1", "v2"], [("autogluon", "1", True, 1)]),
]


def as_spec(protocols: list[str], formats: list[tuple]) -> dict:
    return {"protocolVersions": protocols, "supportedModelFormats": [
        {"name": n, "version": v, "autoSelect": a, "priority": p} for n, v, a, p in formats]}


def priority_refusals(name: str, new: dict, existing_name: str, existing: dict) -> list[str]:
    """What KServe's ClusterServingRuntime webhook refuses `new` for, beside `existing`
    (pkg/webhook/admission/servingruntime/servingruntime_webhook.go: validateModelFormat-
    PrioritySame and validateServingRuntimePriority): an autoSelect format given two
    priorities in one runtime; or, where the runtimes share a protocol, an autoSelect format
    (name, case-insensitive, and version) that both give the same priority."""
    refusals = []
    own: dict[str, object] = {}
    for f in new["supportedModelFormats"]:
        if f.get("autoSelect"):
            if f["name"] in own and None not in (own[f["name"]], f.get("priority")) \
                    and own[f["name"]] != f.get("priority"):
                refusals.append(f"different priorities assigned for the model format {f['name']}")
            own.setdefault(f["name"], f.get("priority"))
    if (bool(new.get("multiModel")) != bool(existing.get("multiModel"))
            or existing.get("disabled") or name == existing_name
            or not set(new.get("protocolVersions", [])) & set(existing["protocolVersions"])):
        return refusals
    for theirs in existing["supportedModelFormats"]:
        for ours in new["supportedModelFormats"]:
            if (theirs.get("autoSelect") and ours.get("autoSelect")
                    and theirs["name"].lower() == ours["name"].lower()
                    and theirs.get("version") == ours.get("version")
                    and theirs.get("priority") is not None
                    and theirs.get("priority") == ours.get("priority")):
                refusals.append(f"same priority assigned for the model format {ours['name']} "
                                f"in the clusterservingruntimes {existing_name} and {name}")
    return refusals


def test_kserves_webhook_admits_the_runtimes_beside_its_default_ones():
    """The onnx format was autoSelect at priority 1, as kserve-tritonserver declares it (same
    version, protocols v2 and grpc-v2): KServe's webhook refused `kubectl apply` on a stock
    install. Formats no default runtime claims (tflite, edgerun) may still pick edgerun."""
    runtimes = [d for _, d in documents() if d["kind"] == "ClusterServingRuntime"]
    for runtime in runtimes:
        name = runtime["metadata"]["name"]
        for other, protocols, formats in KSERVE_DEFAULT_RUNTIMES:
            assert priority_refusals(name, runtime["spec"], other,
                                     as_spec(protocols, formats)) == [], name
        for mine in runtimes:  # and beside each other
            assert priority_refusals(name, runtime["spec"], mine["metadata"]["name"],
                                     mine["spec"]) == [], name
    edgerun = next(r for r in runtimes if r["metadata"]["name"] == "edgerun")
    auto = {f["name"] for f in edgerun["spec"]["supportedModelFormats"] if f.get("autoSelect")}
    assert auto == {"tflite", "edgerun"}
    # the rule has teeth: onnx as it was is refused beside Triton, and its protocols matter
    was = as_spec(["v2", "grpc-v2"], [("onnx", "1", True, 1)])
    triton = as_spec(*KSERVE_DEFAULT_RUNTIMES[0][1:])
    assert priority_refusals("edgerun", was, "kserve-tritonserver", triton) == [
        "same priority assigned for the model format onnx in the clusterservingruntimes "
        "kserve-tritonserver and edgerun"]
    assert priority_refusals("edgerun", {**was, "protocolVersions": ["v1"]},
                             "kserve-tritonserver", triton) == []
    twice = as_spec(["v2"], [("onnx", "1", True, 1), ("onnx", "2", True, 2)])
    assert priority_refusals("x", twice, "kserve-sklearnserver",
                             as_spec(["v1"], [])) == [
        "different priorities assigned for the model format onnx"]


def supporting_runtimes(model: dict, runtimes: dict[str, dict]) -> list[str]:
    """The runtimes KServe's controller may give a predictor `model` that names no `runtime`
    (pkg/apis/serving/v1beta1/predictor_model.go, GetSupportingRuntimes, as components/
    predictor.go reconcileModel calls it): those not disabled with an autoSelect format of the
    model's name (and version, where it gives one) and the model's protocol among theirs,
    which is v1 where the model names none (ModelSpec.GetProtocol); highest priority first."""
    protocol = model.get("protocolVersion") or "v1"
    fmt = model["modelFormat"]
    wanted = fmt["name"] + (f":{fmt['version']}" if fmt.get("version") else "")
    found = []
    for name, spec in runtimes.items():
        labels = set()
        for f in spec["supportedModelFormats"]:
            if f.get("autoSelect"):
                labels.add(f["name"])
                if f.get("version"):
                    labels.add(f"{f['name']}:{f['version']}")
        protocols = spec.get("protocolVersions") or []
        if (not spec.get("disabled") and wanted in labels
                and (not protocols or protocol in protocols)):
            priority = next((f.get("priority") for f in spec["supportedModelFormats"]
                             if f["name"] == fmt["name"]), None)
            found.append((priority is None, -(priority or 0), name))
    return [name for *_, name in sorted(found)]


def test_formats_edgerun_claims_pick_it_where_the_service_names_protocol_v2():
    """KServe picks a runtime for an InferenceService that names none by its format and its
    protocol, v1 where it names none; edgerun serves v2 and grpc-v2, so `modelFormat: tflite`
    (or `edgerun`) alone found no runtime ("no runtime found to support predictor with model
    type"), though the docs said such models pick edgerun by themselves."""
    runtimes = {name: as_spec(protocols, formats)
                for name, protocols, formats in KSERVE_DEFAULT_RUNTIMES}
    runtimes.update({d["metadata"]["name"]: d["spec"] for _, d in documents()
                     if d["kind"] == "ClusterServingRuntime"})
    auto = [f for f in runtimes["edgerun"]["supportedModelFormats"] if f.get("autoSelect")]
    assert {f["name"] for f in auto} == {"tflite", "edgerun"}
    for fmt in auto:
        for model_format in ({"name": fmt["name"]},
                             {"name": fmt["name"], "version": fmt["version"]}):
            assert supporting_runtimes({"modelFormat": model_format}, runtimes) == []
            for protocol in ("v2", "grpc-v2"):
                model = {"modelFormat": model_format, "protocolVersion": protocol}
                assert supporting_runtimes(model, runtimes) == ["edgerun"], (model_format,
                                                                              protocol)
    # the rule has teeth: a v1 format one of KServe's own runtimes claims is found with v1
    assert supporting_runtimes({"modelFormat": {"name": "sklearn"}}, runtimes)[0] == \
        "kserve-sklearnserver"
    # and the docs say what such an InferenceService needs
    readme = " ".join((ROOT / "README.md").read_text().split())
    comment = " ".join((DEPLOY / "cluster-serving-runtime.yaml").read_text()
                       .split("apiVersion:")[0].replace("#", "").split())
    for where in (readme, comment):
        claim = re.search(r"pick `?edgerun`? by themselves(.{0,160})", where)
        assert claim and "protocolVersion: v2" in claim.group(1), claim and claim.group(0)


def keda_refusals(predictor: dict) -> list[str]:
    """What KServe's InferenceService validation (pkg/apis/serving/v1beta1/
    inference_service_validation.go, validateScalingKedaCompExtension) refuses in a KEDA
    predictor's External metrics: KServe passes `target.value` on as the KEDA Prometheus
    trigger's threshold and reads no other target field."""
    refusals = []
    if "scaleMetric" in predictor:
        refusals.append("ScaleMetric is not supported for KEDA")
    for metric in predictor.get("autoScaling", {}).get("metrics", []):
        if metric["type"] != "External":
            continue
        external = metric.get("external") or {}
        if not external.get("metric", {}).get("query"):
            refusals.append("the query should not be empty")
        if external.get("target", {}).get("value") is None:
            refusals.append("the target threshold value should not be empty")
    return refusals


def test_the_keda_example_passes_kserves_validation():
    """`target: {type: AverageValue, averageValue: "32"}` was refused: KServe takes an
    External metric's threshold from `target.value` only (its own e2e test uses Value)."""
    services = [d for _, d in documents() if d["kind"] == "InferenceService"
                and d["metadata"].get("annotations", {}).get(
                    "serving.kserve.io/autoscalerClass") == "keda"]
    assert services
    for service in services:
        predictor = service["spec"]["predictor"]
        assert keda_refusals(predictor) == [], service["metadata"]["name"]
        for metric in predictor["autoScaling"]["metrics"]:
            assert metric["external"]["target"] == {"type": "Value", "value": "32"}
    assert keda_refusals({"autoScaling": {"metrics": [{"type": "External", "external": {
        "metric": {"query": "q"}, "target": {"type": "AverageValue", "averageValue": "32"}}}]}}
    ) == ["the target threshold value should not be empty"]


#: What serves each pod port that KServe's pod mutator may name in prometheus.io/port
#: (pkg/constants/constants.go): queue-proxy's own metrics, and its aggregate of them with the
#: kserve-container's (KServe's qpext queue-proxy). Neither exists in RawDeployment.
QUEUE_PROXY_METRICS, QUEUE_PROXY_AGGREGATE = "9091", "9088"


def scraped(service: dict, runtime: dict) -> tuple[str, str, bool] | None:
    """Where Prometheus's pod annotations lead for a predictor pod: (kserve-container port,
    path, whether queue-proxy's metrics come too), or None where edgerun's are not there.

    The pod's annotations are the runtime's and the InferenceService's; KServe's pod mutator
    (pkg/webhook/admission/pod/metrics_aggregate_injector.go, InjectMetricsAggregator, with
    the inferenceservice configmap's defaults: both off) then sets prometheus.io/port to 9091
    where enable-prometheus-scraping is "true", or to 9088 with enable-metric-aggregation too.
    """
    pod = {**runtime["spec"].get("annotations", {}),
           **service["metadata"].get("annotations", {})}
    raw = pod.get("serving.kserve.io/deploymentMode") == "RawDeployment"
    aggregate = pod.get("serving.kserve.io/enable-metric-aggregation", "false") == "true"
    if pod.get("serving.kserve.io/enable-prometheus-scraping", "false") == "true":
        pod["prometheus.io/port"] = QUEUE_PROXY_AGGREGATE if aggregate else QUEUE_PROXY_METRICS
        pod["prometheus.io/path"] = "/metrics"
    port, path = pod.get("prometheus.io/port"), pod.get("prometheus.io/path", "/metrics")
    if port == QUEUE_PROXY_AGGREGATE and aggregate and not raw:
        return (pod.get("prometheus.kserve.io/port", "8080"),
                pod.get("prometheus.kserve.io/path", "/metrics"), True)
    if port is None or port in (QUEUE_PROXY_METRICS, QUEUE_PROXY_AGGREGATE):
        return None
    return port, path, False


def test_prometheus_scrapes_edgeruns_metrics_where_the_annotations_say():
    """`enable-prometheus-scraping` alone makes KServe point prometheus.io/port at 9091,
    queue-proxy's port: in RawDeployment nothing listens there, so edgerun_queue_depth was
    never scraped and KEDA never scaled. RawDeployment names edgerun's own port; Serverless
    asks for queue-proxy's aggregate of both containers."""
    runtimes = {d["metadata"]["name"]: d for _, d in documents()
                if d["kind"] == "ClusterServingRuntime"}
    services = [d for _, d in documents() if d["kind"] == "InferenceService"
                and "serving.kserve.io/enable-prometheus-scraping" in
                d["metadata"].get("annotations", {})]
    assert {s["metadata"]["name"] for s in services} >= {"mnist", "mnist-queue"}
    for service in services:
        name = service["metadata"]["name"]
        runtime = runtimes[service["spec"]["predictor"]["model"]["runtime"]]
        (container,) = runtime["spec"]["containers"]
        http_port = build_parser().parse_args(["serve", *container["args"]]).port
        found = scraped(service, runtime)
        assert found is not None, f"{name}: Prometheus is pointed away from edgerun's metrics"
        assert found[:2] == (str(http_port), "/metrics"), name
        annotations = service["metadata"]["annotations"]
        if annotations.get("serving.kserve.io/deploymentMode") == "RawDeployment":
            assert annotations.get("prometheus.io/scrape") == "true", name
    for runtime in runtimes.values():
        (container,) = runtime["spec"]["containers"]
        http_port = build_parser().parse_args(["serve", *container["args"]]).port
        assert runtime["spec"]["annotations"]["prometheus.kserve.io/port"] == str(http_port)
        assert runtime["spec"]["annotations"]["prometheus.kserve.io/path"] == "/metrics"
    # as it was: scraping on, no aggregation, in RawDeployment
    was = {"metadata": {"annotations": {"serving.kserve.io/deploymentMode": "RawDeployment",
                                        "serving.kserve.io/enable-prometheus-scraping": "true"}}}
    assert scraped(was, runtimes["edgerun"]) is None


#: What a predictor holds beside the pod's fields (ComponentExtensionSpec, the model and the
#: framework shorthands), and what a model spec holds beside the container's (ModelSpec).
COMPONENT_FIELDS = {"minReplicas", "maxReplicas", "scaleTarget", "scaleMetric", "scaleMetricType",
                    "autoScaling", "containerConcurrency", "timeout", "canaryTrafficPercent",
                    "logger", "batcher", "labels", "annotations", "deploymentStrategy",
                    "storageUris", "model", "workerSpec"}
MODEL_FIELDS = {"modelFormat", "runtime", "runtimeVersion", "protocolVersion", "storageUri",
                "storage"}


def predictor_pod(service: dict, runtime: dict) -> dict:
    """The pod KServe makes for an InferenceService's predictor: the predictor's pod fields,
    and the runtime's container with the model spec's container fields laid over it
    (pkg/controller/v1beta1/inferenceservice/components/predictor.go, and utils.go
    MergeRuntimeContainers, a strategic merge of the two)."""
    predictor = service["spec"]["predictor"]
    (container,) = runtime["spec"]["containers"]
    container = {**container, **{k: v for k, v in predictor["model"].items()
                                 if k not in MODEL_FIELDS}}
    spec = {k: v for k, v in predictor.items() if k not in COMPONENT_FIELDS}
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": service["metadata"]["name"]},
            "spec": {**spec, "containers": [container]}}


def pre_stop_sleep(container: dict) -> int | None:
    """The seconds a container's preStop hook sleeps (native or exec `sleep`), or None."""
    hook = container.get("lifecycle", {}).get("preStop")
    if hook is None:
        return None
    if "sleep" in hook:
        return int(hook["sleep"]["seconds"])
    command = hook.get("exec", {}).get("command", [])
    assert len(command) == 2 and command[0] == "sleep", command
    return int(command[1])


def test_a_raw_deployment_pod_serves_on_until_its_endpoints_are_gone():
    """In RawDeployment (no Knative, no queue-proxy) Kubernetes sends SIGTERM while the pod's
    endpoints are still being removed, and edgerun stops listening at SIGTERM: requests routed
    to it in those seconds were refused. A preStop sleep holds SIGTERM back; the grace period,
    counted from preStop's start, covers the sleep and edgerun's drain. Knative refuses
    `lifecycle` (and sets the grace itself), so Serverless pods and the runtimes carry none."""
    runtimes = {d["metadata"]["name"]: d for _, d in documents()
                if d["kind"] == "ClusterServingRuntime"}
    services = [d for _, d in documents() if d["kind"] == "InferenceService"]
    raw = [s for s in services if s["metadata"].get("annotations", {}).get(
        "serving.kserve.io/deploymentMode") == "RawDeployment"]
    assert [s["metadata"]["name"] for s in raw] == ["mnist-queue"]
    for runtime in runtimes.values():
        (container,) = runtime["spec"]["containers"]
        assert "lifecycle" not in container, runtime["metadata"]["name"]
    for service in services:
        name = service["metadata"]["name"]
        pod = predictor_pod(service, runtimes[service["spec"]["predictor"]["model"]["runtime"]])
        kubernetes_validate.validate(pod, KUBERNETES, strict=True)
        (container,) = pod["spec"]["containers"]
        sleep = pre_stop_sleep(container)
        grace = pod["spec"].get("terminationGracePeriodSeconds")
        if service in raw:
            assert sleep is not None and sleep >= 5, f"{name}: no preStop sleep"
            assert grace is not None and grace >= sleep + GRACE_S, (name, sleep, grace)
        else:
            assert sleep is None and "lifecycle" not in container, name
            assert grace is None, name
    # an exec `sleep` needs the binary: both images are Debian or Ubuntu, coreutils included
    for name in ("Dockerfile", "Dockerfile.cuda"):
        base = re.findall(r"^FROM (\S+)", (ROOT / name).read_text(), re.M)[-1]
        assert re.match(r"python:[\d.]+-slim(-bookworm)?$|nvidia/cuda:.*-ubuntu\d", base), base


def test_the_cuda_image_claims_no_tensorrt_it_does_not_have():
    """The CUDA runtime image has no TensorRT libraries (libnvinfer): said to try TensorRT
    first, it logged TensorRT's failure for every session and ran on CUDA."""
    text = (ROOT / "Dockerfile.cuda").read_text()
    installs_tensorrt = re.search(r"(apt-get|pip) install[^\n]*(libnvinfer|tensorrt)", text)
    runtime_comment = (DEPLOY / "cluster-serving-runtime.yaml").read_text().split(
        "name: edgerun-gpu")[0].rsplit("---", 1)[1]
    for where in (text, runtime_comment):
        if not installs_tensorrt:
            assert not re.search(r"TensorRT,[\s#]+then[\s#]+CUDA", where), where
            assert re.search(r"no TensorRT", where), where
