"""template.yaml: clean under cfn-lint, and the SAM transform (aws-sam-translator) run offline."""

from __future__ import annotations

import copy
import json
import re
import subprocess
import sys
from pathlib import Path

import boto3
import pytest
from samtranslator.translator.managed_policy_translator import ManagedPolicyLoader
from samtranslator.translator.transform import transform
from samtranslator.yaml_helper import yaml_parse

ROOT = Path(__file__).resolve().parents[1]
TEMPLATE = ROOT / "template.yaml"


def test_cfn_lint_is_clean():
    done = subprocess.run([str(Path(sys.executable).with_name("cfn-lint")), str(TEMPLATE)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout == ""


@pytest.fixture
def translate(monkeypatch):
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    iam = boto3.client("iam", region_name="us-east-1", aws_access_key_id="offline",
                       aws_secret_access_key="offline")
    loader = ManagedPolicyLoader(iam)

    def run(parameters: dict[str, str]) -> dict:
        template = yaml_parse(TEMPLATE.read_text())
        template["Resources"]["InferenceFunction"]["Properties"]["CodeUri"] = \
            "s3://edgerun-artifacts/inference.zip"  # what `sam deploy` uploads
        return transform(copy.deepcopy(template), parameters, loader)

    return run


def resources(output: dict, kind: str) -> list[dict]:
    return [r for r in output["Resources"].values() if r["Type"] == kind]


def test_sam_transform_builds_the_scale_to_zero_function(translate):
    output = translate({"Architecture": "arm64", "MemorySize": "3008"})
    (function,) = resources(output, "AWS::Lambda::Function")
    props = function["Properties"]
    assert props["Runtime"] == "python3.12" and props["Handler"] == "app.handler"
    assert props["Architectures"] == [{"Ref": "Architecture"}]
    assert props["MemorySize"] == {"Ref": "MemorySize"}
    assert props["Environment"]["Variables"]["EDGERUN_MODEL"] == {"Ref": "ModelLocation"}
    assert props["Code"] == {"S3Bucket": "edgerun-artifacts", "S3Key": "inference.zip"}
    # scale to zero: no alias, no version, no provisioned concurrency
    assert not resources(output, "AWS::Lambda::Alias")
    assert "ProvisionedConcurrencyConfig" not in str(output)
    (mapping,) = resources(output, "AWS::Lambda::EventSourceMapping")
    assert mapping["Properties"]["FunctionResponseTypes"] == ["ReportBatchItemFailures"]
    assert mapping["Properties"]["EventSourceArn"] == {"Fn::GetAtt": ["RequestQueue", "Arn"]}
    (url,) = resources(output, "AWS::Lambda::Url")
    assert url["Properties"]["AuthType"] == {"Ref": "FunctionUrlAuth"}
    (api,) = resources(output, "AWS::ApiGatewayV2::Api")
    (route,) = api["Properties"]["Body"]["paths"].values()
    assert route["x-amazon-apigateway-any-method"]["security"] == [{"AWS_IAM": []}]
    assert {"ApiUrl", "FunctionUrl", "RequestQueueUrl"} <= set(output["Outputs"])
    assert output["Parameters"]["Architecture"]["AllowedValues"] == ["arm64", "x86_64"]


def test_the_function_gets_the_tmp_space_an_s3_model_needs(translate):
    """An s3:// model's archive and its extraction are in /tmp at once: with Lambda's default
    512 MB a bundle over ~250 MB failed init, out of space, and nothing could raise it."""
    output = translate({"EphemeralStorageMB": "4096"})
    (function,) = resources(output, "AWS::Lambda::Function")
    assert function["Properties"]["EphemeralStorage"] == {"Size": {"Ref": "EphemeralStorageMB"}}
    parameter = output["Parameters"]["EphemeralStorageMB"]
    assert (parameter["Type"], parameter["Default"], parameter["MinValue"],
            parameter["MaxValue"]) == ("Number", 512, 512, 10240)


def test_sam_transform_grants_the_model_bucket_and_results_queue_only_when_asked(translate):
    plain = translate({})
    (role,) = resources(plain, "AWS::IAM::Role")
    policies = role["Properties"].get("Policies", [])
    assert all("Fn::If" in p for p in policies)  # both conditional on the parameters
    conditions = plain["Conditions"]
    assert {"ModelInS3", "WithResults"} <= set(conditions)
    (results,) = [r for name, r in plain["Resources"].items() if name == "ResultsQueue"]
    assert results["Condition"] == "WithResults"


def evaluate(node, parameters: dict[str, str], conditions: dict):
    """`node` with CloudFormation's intrinsic functions worked out as a deployment would, for
    the ones the function's role uses: Ref, Fn::If (and its conditions), Fn::Sub, Fn::Select,
    Fn::Split, Fn::GetAtt (left as `Resource.Attribute`)."""
    def value(node):
        if isinstance(node, list):
            return [v for v in map(value, node) if v is not NO_VALUE]
        if not isinstance(node, dict):
            return node
        if len(node) == 1:
            ((name, arg),) = node.items()
            if name == "Ref":
                return {"AWS::NoValue": NO_VALUE, "AWS::Partition": "aws",
                        "AWS::Region": "us-east-1", "AWS::AccountId": "123456789012",
                        **parameters}.get(arg, arg)
            if name == "Condition":
                return value(conditions[arg])
            if name == "Fn::Equals":
                left, right = value(arg)
                return left == right
            if name == "Fn::Not":
                return not value(arg[0])
            if name == "Fn::If":
                condition, then, otherwise = arg
                return value(then if value(conditions[condition]) else otherwise)
            if name == "Fn::Split":
                return value(arg[1]).split(arg[0])
            if name == "Fn::Select":
                return value(arg[1])[int(arg[0])]
            if name == "Fn::GetAtt":
                return ".".join(arg)
            if name == "Fn::Sub":
                text, names = arg if isinstance(arg, list) else (arg, {})
                names = {k: value(v) for k, v in names.items()}
                return re.sub(r"\$\{([^}]+)\}",
                              lambda m: names.get(m[1]) or value({"Ref": m[1]}), text)
        return {k: v for k, v in ((k, value(v)) for k, v in node.items()) if v is not NO_VALUE}
    return value(node)


NO_VALUE = object()


def role_statements(output: dict, parameters: dict[str, str]) -> list[dict]:
    (role,) = resources(output, "AWS::IAM::Role")
    policies = evaluate(role["Properties"].get("Policies", []), parameters,
                        output.get("Conditions", {}))
    return [statement for policy in policies
            for statement in policy["PolicyDocument"]["Statement"]]


def test_the_function_may_read_the_model_object_and_nothing_else_in_its_bucket(translate):
    """S3ReadPolicy granted list and read on the whole model bucket (every object in it, any
    other model or data kept beside the bundle); the function downloads one object."""
    parameters = {"ModelLocation": "s3://models/mlp/3.tar.gz", "ModelSha256": "0" * 64,
                  "FunctionUrlAuth": "AWS_IAM", "SendResults": "false"}
    output = translate(parameters)
    s3 = [s for s in role_statements(output, parameters)
          if any(str(action).startswith("s3:") for action in
                 (s["Action"] if isinstance(s["Action"], list) else [s["Action"]]))]
    assert s3 == [{"Effect": "Allow", "Action": "s3:GetObject",
                   "Resource": "arn:aws:s3:::models/mlp/3.tar.gz"}]
    (role,) = resources(output, "AWS::IAM::Role")
    assert not any("S3" in str(arn) for arn in role["Properties"]["ManagedPolicyArns"])
    # a model in the package or a layer: no S3 grant at all (and nothing to evaluate that
    # fails, as an s3:// split of a path did)
    for location in ("model", "/opt/model/mlp.tar.gz", "model/s3://x"):
        packaged = {**parameters, "ModelLocation": location}
        assert not [s for s in role_statements(translate(packaged), packaged)
                    if "s3:" in json.dumps(s)]


def test_the_s3_grant_follows_model_location_alone(translate):
    """The grant was switched by a second parameter, ModelBucket: an s3:// ModelLocation
    without it got no S3 read (init failed, 403), and ModelBucket set beside a packaged model
    split a path without s3:// in it (Fn::Select out of range: the deploy failed)."""
    output = translate({})
    assert "ModelBucket" not in output["Parameters"]
    assert evaluate({"Condition": "ModelInS3"}, {"ModelLocation": "s3://b/k.tar.gz"},
                    output["Conditions"]) is True
    assert evaluate({"Condition": "ModelInS3"}, {"ModelLocation": "model"},
                    output["Conditions"]) is False


def test_function_url_auth_none_grants_public_invocation(translate):
    """SAM adds a public URL's permissions only for a literal `AuthType: NONE`, not for the
    parameter, so the template grants them itself, under the parameter's condition."""
    output = translate({"FunctionUrlAuth": "NONE"})
    granted = {r["Properties"]["Action"]: r for r in resources(output, "AWS::Lambda::Permission")
               if r["Properties"]["Principal"] == "*"}
    assert set(granted) == {"lambda:InvokeFunctionUrl", "lambda:InvokeFunction"}
    assert granted["lambda:InvokeFunctionUrl"]["Properties"]["FunctionUrlAuthType"] == "NONE"
    assert granted["lambda:InvokeFunction"]["Properties"]["InvokedViaFunctionUrl"] is True
    assert {r["Condition"] for r in granted.values()} == {"PublicUrl"}
    assert output["Conditions"]["PublicUrl"] == {
        "Fn::Equals": [{"Ref": "FunctionUrlAuth"}, "NONE"]}
    assert output["Parameters"]["FunctionUrlAuth"]["Default"] == "AWS_IAM"
