"""`DataPlane.infer_async` with a coroutine decoder, as gRPC hands it a big request to decode on
a worker thread: awaited only once the hooks let the call through and it is routed; hooked and
counted once whatever happens while it decodes."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from edgerun.adapters.codecs import oip
from edgerun.adapters.dataplane import Call, DataPlane, Hook, HookChain, RequestId
from edgerun.adapters.dataplane import call as routes
from edgerun.examples import mlp_onnx
from edgerun.runtime import InvalidInput, ModelNotFound, Unauthenticated
from edgerun.runtime.metrics import Registry
from edgerun.runtime.repository import Repository
from tests.serving import add_version

REQUEST = oip.InferRequest(None, {"x": np.ones((1, 8), np.float32)}, None, False, None)


class _KeyAndLog(Hook):
    """Refuses calls without `authorization: ok`; records each `after` it sees."""

    def __init__(self) -> None:
        self.after_calls: list[tuple[str | None, str | None]] = []

    def before(self, call: Call) -> None:
        if call.attributes("authorization") != "ok":
            raise Unauthenticated("a key is required")

    def after(self, call: Call, error) -> None:
        self.after_calls.append((call.request_id, None if error is None else error.kind))


@pytest.fixture
def plane(tmp_path):
    root = tmp_path / "models"
    add_version(root, "mlp", "1", mlp_onnx([8, 16, 4]))
    repository = Repository(root, registry=Registry())
    repository.load_all()
    hook = _KeyAndLog()
    yield DataPlane(repository, hooks=HookChain([RequestId(), hook])), hook
    repository.close()


def counted(plane: DataPlane) -> dict[tuple[str, ...], float]:
    family = next(f for f in plane.repository.registry.collect()
                  if f.name == "edgerun_requests_total")
    return {labels: child.value for labels, child in family.children()}


def call(model: str = "mlp", key: str | None = "ok") -> Call:
    values = {"authorization": key} if key else {}
    return Call(routes.INFER, model, attributes=values.get, transport="grpc")


def test_a_coroutine_decoder_runs_after_the_hooks_and_routing(plane):
    plane, hook = plane
    decoded: list[str] = []

    async def decoder() -> oip.InferRequest:
        await asyncio.sleep(0)
        decoded.append("decoded")
        return REQUEST

    async def run(c: Call):
        return await plane.infer_async(c, decoder)

    with pytest.raises(Unauthenticated):
        asyncio.run(run(call(key=None)))
    with pytest.raises(ModelNotFound):
        asyncio.run(run(call("ghost")))
    assert decoded == []  # refused by a hook, or routed nowhere: never decoded
    result = asyncio.run(run(call()))
    assert decoded == ["decoded"] and result.version == "1"
    assert result.outputs["y"].shape == (1, 4)

    async def bad() -> oip.InferRequest:
        raise InvalidInput("the request has no inputs")
    with pytest.raises(InvalidInput, match="no inputs") as info:
        asyncio.run(plane.infer_async(call(), bad))
    assert info.value.version == "1"
    assert [kind for _, kind in hook.after_calls] == \
        ["unauthenticated", "model_not_found", None, "invalid_input"]
    assert all(request_id for request_id, _ in hook.after_calls)
    assert counted(plane) == {("mlp", "", "grpc", "unauthenticated"): 1,
                              ("", "", "grpc", "model_not_found"): 1,
                              ("mlp", "1", "grpc", "ok"): 1,
                              ("mlp", "1", "grpc", "invalid_input"): 1}


def test_a_caller_gone_while_its_request_decodes_is_hooked_and_counted_once(plane):
    plane, hook = plane

    async def scenario() -> None:
        started = asyncio.Event()

        async def slow() -> oip.InferRequest:
            started.set()
            await asyncio.Event().wait()  # decodes until cancelled
            return REQUEST
        task = asyncio.create_task(plane.infer_async(call(), slow))
        waiting = asyncio.create_task(started.wait())
        await asyncio.wait((task, waiting), return_when=asyncio.FIRST_COMPLETED)
        assert started.is_set(), f"the decoder was never awaited: {task.result()!r}"
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(scenario())
    assert [kind for _, kind in hook.after_calls] == ["cancelled"]
    assert counted(plane) == {("mlp", "1", "grpc", "cancelled"): 1}
