"""Device profiles: every one loads, yields a valid TVM target, and the CLI shows them."""

from __future__ import annotations

import json
import re
import shutil

import pytest
import tvm

from edgerun.devices import DeviceProfile, list_profiles, load_profile
from edgerun.optimizers.tvm_target import target_for
from tests.cli import edgerun

# name: (cpu arch, accelerator, precision)
EXPECTED = {
    "cpu": ("any", "cpu", "fp32"),
    "x86-64": ("x86_64", "cpu", "fp32"),
    "raspberry-pi-4": ("aarch64", "cpu", "int8"),
    "raspberry-pi-5": ("aarch64", "cpu", "int8"),
    "jetson-nano": ("aarch64", "cuda:sm_53", "fp16"),
    "jetson-xavier-nx": ("aarch64", "cuda:sm_72", "fp16"),
    "jetson-orin": ("aarch64", "cuda:sm_87", "fp16"),
    "cloud-gpu": ("x86_64", "cuda:sm_75", "fp16"),
    "nvidia-t4": ("x86_64", "cuda:sm_75", "fp16"),
    "nvidia-a10g": ("x86_64", "cuda:sm_86", "fp16"),
    "nvidia-l4": ("x86_64", "cuda:sm_89", "fp16"),
    "nvidia-a100": ("x86_64", "cuda:sm_80", "fp16"),
    "nvidia-h100": ("x86_64", "cuda:sm_90", "fp16"),
}
CPUS = {"raspberry-pi-4": "cortex-a72", "raspberry-pi-5": "cortex-a76", "x86-64": "haswell"}


def test_the_issue_s_profiles_are_shipped():
    assert set(EXPECTED) <= set(list_profiles())


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_profile_fields_and_tvm_target(name):
    profile = load_profile(name)
    arch, accelerator, precision = EXPECTED[name]
    assert (profile.arch, profile.accelerator, profile.precision) == (arch, accelerator, precision)
    target = target_for(profile)
    assert isinstance(target, tvm.target.Target)
    llvm = target.host if accelerator.startswith("cuda") else target
    if accelerator.startswith("cuda"):
        assert target.kind.name == "cuda"
        assert str(target.attrs["arch"]) == accelerator.split(":")[1]
        assert str(llvm.attrs["mtriple"]) == profile.host_triple
    else:
        assert target.kind.name == "llvm"
    assert int(llvm.attrs["num-cores"]) >= 1
    if arch == "aarch64":
        assert llvm.attrs["feature.is_aarch64"]
        assert "+neon" in list(llvm.attrs["mattr"])
        assert shutil.which(profile.cross_compiler), profile.cross_compiler
        assert not profile.allow_spinning
    if name in CPUS:
        assert str(llvm.attrs["mcpu"]) == CPUS[name]
    if arch != "any":
        assert profile.memory_mb > 0
    assert profile.execution_providers[-1] == "CPUExecutionProvider"


def test_raspberry_pi_5_has_dot_product_and_pi_4_does_not():
    pi5 = target_for(load_profile("raspberry-pi-5"))
    pi4 = target_for(load_profile("raspberry-pi-4"))
    assert pi5.attrs["feature.has_dotprod"] and not pi4.attrs["feature.has_dotprod"]


@pytest.mark.parametrize("bad, message", [
    ({"tvm_target": {"kind": "opencl"}}, "kind must be one of llvm, cuda"),
    ({"tvm_target": {"kind": "cuda", "host": {"kind": "llvm"}}}, "arch must name the GPU"),
    ({"tvm_target": {"kind": "cuda", "arch": "sm_87"}}, "host must be an llvm target"),
    ({"arch": "aarch64", "host_triple": "aarch64-linux-gnu",
      "tvm_target": {"kind": "llvm", "mtriple": "x86_64-linux-gnu"}}, "differs from host_triple"),
    ({"arch": "riscv"}, "arch must be one of"),
    ({"precision": "int4"}, "precision must be one of"),
    # TOML gives what was written: a string where a number or a list belongs
    ({"intra_op_threads": "4"}, "intra_op_threads must be an integer, got '4'"),
    ({"allow_spinning": "no"}, "allow_spinning must be true or false"),
    ({"execution_providers": "CUDAExecutionProvider"}, "execution_providers must be a list of "
                                                        "strings"),
])
def test_invalid_profiles_are_refused_with_the_field_named(bad, message):
    with pytest.raises(ValueError, match=message):
        DeviceProfile(name="bad", **bad)


def test_cli_devices_list_json_and_table():
    listed = edgerun("devices", "list", "--json")
    assert listed.returncode == 0, listed.stderr
    by_name = {p["name"]: p for p in json.loads(listed.stdout)}
    assert set(by_name) == set(list_profiles())
    assert by_name["jetson-orin"]["tvm_target"]["arch"] == "sm_87"
    assert by_name["raspberry-pi-4"]["cross_compiler"] == "aarch64-linux-gnu-g++"
    table = edgerun("devices", "list")
    assert table.returncode == 0
    for name in EXPECTED:
        assert name in table.stdout
    assert "cuda:sm_90" in table.stdout


def test_cli_devices_show():
    shown = edgerun("devices", "show", "nvidia-a10g", "--json")
    assert shown.returncode == 0, shown.stderr
    data = json.loads(shown.stdout)
    assert data["tvm_target"]["arch"] == "sm_86"
    assert data["tvm_target"]["host"]["mtriple"] == "x86_64-linux-gnu"
    table = edgerun("devices", "show", "raspberry-pi-5")
    assert "cortex-a76" in table.stdout and "int8" in table.stdout


def test_cli_devices_show_unknown_name_lists_the_shipped_ones(tmp_path):
    result = edgerun("devices", "show", "jetson-tx9")
    assert result.returncode == 2
    assert "unknown device profile 'jetson-tx9'" in result.stderr
    assert "raspberry-pi-4" in result.stderr
    # a missing profile file, or a bad one, is a one-line error, never a traceback
    bad = tmp_path / "mine.toml"
    bad.write_text('execution_providers = "CUDAExecutionProvider"\n')
    for profile in ("raspberry-pi-5.toml", str(bad)):
        for command in (("devices", "show", profile),
                        ("serve", "--repository", str(tmp_path), "--device", profile)):
            result = edgerun(*command)
            assert result.returncode == 2, result.stderr
            assert "Traceback" not in result.stderr and "device profile" in result.stderr


def test_a_profile_nested_too_deep_to_parse_is_named(tmp_path):
    """tomllib parses arrays recursively: a RecursionError traceback, naming no file."""
    bad = tmp_path / "mine.toml"
    bad.write_text(f"name = 'mine'\nexecution_providers = {'[' * 3000}{']' * 3000}\n")
    result = edgerun("devices", "show", str(bad))
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert f"device profile {bad}: arrays or tables nested too deep" in result.stderr


@pytest.mark.parametrize("field", ["intra_op_threads", "inter_op_threads", "instances",
                                   "memory_mb"])
def test_a_profile_number_past_any_device_is_refused_at_load_naming_file_and_field(tmp_path,
                                                                                  field):
    """10**20 threads was ONNX Runtime's untyped TypeError ("incompatible function
    arguments"), a traceback from the model's load; 2**31 - 1 a std::bad_alloc; 10**20
    instances loaded sessions until memory ran out."""
    from edgerun.examples import mlp_onnx

    bad = tmp_path / "mine.toml"
    bad.write_text(f"name = 'mine'\n{field} = {10 ** 20}\n")
    model = tmp_path / "m.onnx"
    model.write_bytes(mlp_onnx([4, 2]))
    for command in (("devices", "show", str(bad)),
                    ("bundle", "create", str(model), "--name", "m", "--version", "1",
                     "--device", str(bad), "-o", str(tmp_path / "b"))):
        result = edgerun(*command)
        assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
        assert len(result.stderr.strip().splitlines()) == 1, result.stderr
        assert f"device profile {bad}: {field} must be at most " in result.stderr, result.stderr
    with pytest.raises(ValueError, match=f"{field} must be at most"):
        DeviceProfile(name="bad", **{field: 2 ** 31 - 1})
    assert getattr(DeviceProfile(name="big", **{field: 1024}), field) == 1024


@pytest.mark.parametrize("content, reason", [
    ("precision = 'int4'\n", "precision must be one of fp32"),
    (f"intra_op_threads = '{'9' * 5000}'\n", "intra_op_threads must be an integer, got '999"),
    ("arch = 'aarch64'\ntvm_target = { kind = 'llvm', mtriple = 'x86_64-linux-gnu' }\n",
     "tvm_target: mtriple 'x86_64-linux-gnu' is not for arch 'aarch64'"),
    # a quoted key's newline split the message over two lines: it is shown escaped
    ('"intra\\nop" = 1\nprecison = "fp16"\n', "unknown keys 'intra\\nop', precison"),
])
def test_a_profile_field_error_names_the_file_and_shortens_the_value(tmp_path, content, reason):
    """A field's error named the profile's `name` (here not the file's), not the file, and
    printed a value of thousands of characters whole."""
    bad = tmp_path / "mine.toml"
    bad.write_text(f"name = 'jetson-custom'\n{content}")
    result = edgerun("devices", "show", str(bad))
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert f"device profile {bad}: {reason}" in result.stderr, result.stderr
    assert len(result.stderr) < 300 + len(str(bad)), result.stderr


def test_a_profile_that_is_not_toml_is_named(tmp_path):
    """The parser's "Invalid value (at line 2, column 19)" said nothing of which file."""
    bad = tmp_path / "mine.toml"
    bad.write_text('name = "mine"\nintra_op_threads =\n')
    result = edgerun("devices", "show", str(bad))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert f"device profile {bad}: Invalid value (at line 2" in result.stderr, result.stderr


@pytest.mark.parametrize("content, reason", [
    (b'name = "mine"\ndescription = "caf\xe9"\n', "not UTF-8 text, as TOML must be"),
    (b'name = "mine"\nintra_op_threads =\n', "Invalid value (at line 2"),
])
def test_a_profile_that_is_not_utf8_or_not_toml_is_named_wherever_it_is_given(
        tmp_path, monkeypatch, content, reason):
    """A Latin-1 profile gave "'utf-8' codec can't decode byte 0xe9 in position 27: ...",
    naming no file, from every command that takes --device."""
    from edgerun.devices import profile as profiles
    from edgerun.examples import mlp_onnx

    bad = tmp_path / "mine.toml"
    bad.write_bytes(content)
    model = tmp_path / "m.onnx"
    model.write_bytes(mlp_onnx([4, 2]))
    for command in (("devices", "show", str(bad)),
                    ("serve", "--repository", str(tmp_path), "--device", str(bad)),
                    ("bundle", "create", str(model), "--name", "m", "--version", "1",
                     "--device", str(bad), "-o", str(tmp_path / "b")),
                    ("optimize", str(model), "--device", str(bad), "-o", str(tmp_path / "o"))):
        result = edgerun(*command)
        assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
        assert f"device profile {bad}: {reason}" in result.stderr, (command, result.stderr)
    monkeypatch.setattr(profiles, "PROFILE_DIR", tmp_path)  # as a shipped profile, by name
    with pytest.raises(ValueError, match=re.escape(f"device profile {bad}: {reason}")):
        load_profile("mine")
