"""One Lambda handler for every event a function receives.

- HTTP (API Gateway REST v1, HTTP API v2, Function URL, ALB): Mangum translates the event to
  ASGI for the lean `EdgerunASGI` app (with the path the API serves: without a REST custom
  domain's base path mapping, the configured `base_path` (an HTTP API custom domain's API
  mapping key), or an HTTP API's named stage), so the function serves the fleet server's OIP v2
  and TF Serving routes (all but the repository's load and unload: the function's model is
  fixed when it is deployed, and any caller could unload it) and imports no web framework.
  Mangum runs with the lifespan off: the models are loaded at init and nothing is set up or
  torn down per invocation. The fields Mangum reads are checked first (`http_events`): an
  event it could not read gets a 400 naming the field, not Mangum's bare TypeError.
- SQS batches: every record is decoded first, then all are submitted to the data plane at
  once from one event loop, so the MicroBatcher sees them arrive together and merges them into
  as few forward passes as it can; results are plain OIP v2 JSON; the answer names exactly the
  records that failed (`batchItemFailures`), and Lambda retries only those: the queue's
  redrive policy moves one that keeps failing, bad input at its last receive, to the
  dead-letter queue, its body kept. A result its destination could never take (larger than an
  SQS message holds) is not a failure: its error is sent as its result, in every kind of batch.
- Ordered batches, an SQS FIFO queue's and a Kinesis stream's, keep their order instead: their
  records are done one after another (a stream's STREAM_WINDOW at a time), their results sent
  on before the next are run, and the first that fails with a retryable error (or whose result
  cannot be sent) stops the batch. A FIFO batch reports it and every later record, as AWS
  requires; a stream reports it alone, the sequence number Lambda resumes the shard from (it
  delivers every later record again, whatever is reported). A record that cannot succeed (bad
  input, an unknown model, data that is not base64) is logged and acknowledged, as the Cloud
  Functions Pub/Sub path does: reported, it would block its shard until it expired, or take
  the records after it in its message group to the dead-letter queue with it.
- Direct invocation (`aws lambda invoke`, Step Functions): the event is an OIP v2 JSON request
  (`model_name` picks a model other than the function's default); the answer is the OIP
  response, all JSON (an event answer carries no binary part), and a failure is raised as the
  core's error, whose class name Lambda reports as the `errorType`.
"""

from __future__ import annotations

import asyncio
import json
import logging
from contextvars import ContextVar
from typing import Any

import orjson
from mangum import Mangum
from mangum.types import LambdaHandler as EventShape

from edgerun.adapters.aws_lambda.destinations import Destination
from edgerun.adapters.aws_lambda.http_events import bad_event_answer, checked, served
from edgerun.adapters.aws_lambda.records import Record, kinesis_record, sqs_record
from edgerun.adapters.codecs import oip
from edgerun.adapters.dataplane import Call, DataPlane, InferResult, Reply
from edgerun.adapters.dataplane.call import INFER
from edgerun.adapters.http.asgi import EdgerunASGI, response_head
from edgerun.adapters.http.routes import READ_ONLY_ROUTES, match
from edgerun.runtime.errors import RETRYABLE, EdgerunError, InvalidInput, PayloadTooLarge

log = logging.getLogger(__name__)

#: Lambda's synchronous invocation payload limit; a larger HTTP body gets 413.
MAX_PAYLOAD_BYTES = 6 * 1024 * 1024
#: Time kept back from the function's remaining time to send results and answer.
RESERVE_S = 0.5
#: The largest answer Lambda returns from a synchronous invocation (its Runtime API refuses a
#: larger one, "Response payload size exceeded", and API Gateway or the Function URL answers
#: 502 with nothing to say why) ...
MAX_RESPONSE_BYTES = 6 * 1024 * 1024
#: ... and the largest an Application Load Balancer takes from a Lambda target (1 MB).
MAX_ALB_RESPONSE_BYTES = 1_000_000
#: The answer limit of the HTTP event being answered (an execution environment answers one
#: invocation at a time) and Mangum's handler for its kind of event, which shapes the answer,
#: for the data plane's check; None outside one.
_answering: ContextVar[tuple[int, EventShape] | None] = ContextVar("edgerun_answering",
                                                                  default=None)
#: A stream's records queued together (the batcher's largest batch): a Kinesis batch may hold
#: 10,000 records, and one forward pass a record would give up the micro-batching.
STREAM_WINDOW = 64
#: Results sent on in one destination call (SQS's batch) before the time left is looked at
#: again and a failure stops the rest.
SEND_STEP = 10
#: The ids one log line names (a line of a stream's 10,000 would pass CloudWatch's 256 KB).
MAX_LOGGED_ITEMS = 100


class LambdaHandler:
    """`handler(event, context)` over a data plane whose repository is already loaded."""

    def __init__(self, plane: DataPlane, *, default_model: str = "",
                 destination: Destination | None = None,
                 max_payload_bytes: int = MAX_PAYLOAD_BYTES, base_path: str = "") -> None:
        self.plane = plane
        self.default_model = default_model
        self.destination = destination
        #: A custom domain's API mapping key (`models`, `ml/v1`) as a path prefix, or "".
        self.base_path = "/" + base_path.strip("/") if base_path.strip("/") else ""
        self.loop = asyncio.new_event_loop()  # one loop for the life of the environment
        asyncio.set_event_loop(self.loop)
        self.asgi = EdgerunASGI(plane, max_body_bytes=max_payload_bytes, transport="lambda",
                                routes=READ_ONLY_ROUTES)
        self.http = Mangum(served(self.asgi), lifespan="off")
        plane.limit_answers(self._answer_size)

    def __call__(self, event: Any, context: Any = None) -> Any:
        kind = event_kind(event)
        if kind == "http":
            asyncio.set_event_loop(self.loop)  # Mangum runs on the thread's current loop
            try:
                event = checked(event)
            except InvalidInput as exc:  # a field Mangum would fail on, named, answered 400
                return bad_event_answer(event, exc)
            event = self._without_stage(self._without_mapping(_without_base_path(event)))
            limit = MAX_ALB_RESPONSE_BYTES if "elb" in event["requestContext"] \
                else MAX_RESPONSE_BYTES
            answering = _answering.set((limit, self.http.infer(event, context)))
            try:
                return self.http(event, context)
            finally:
                _answering.reset(answering)
        if kind == "direct":
            return self._direct(event, context)
        return self._batch(kind, event["Records"], context)

    def _answer_size(self, call: Call, reply: Reply) -> tuple[int, int] | None:
        """An HTTP answer's bytes as Lambda returns it against what Lambda (or an ALB) passes
        on: the data plane answers a larger one with a 413 naming the limit, and counts it so,
        where the caller would get a bare 502 without its request id, at every retry. The
        answer is the one Mangum makes for the event (its body as text or base64, its headers
        once or twice over), with the request id the hooks' after-step will add, in JSON as the
        runtime interface client writes it (non-ASCII escaped: never fewer bytes than it
        sends). An estimate with a margin refused answers up to 850 bytes under the limit."""
        answering = _answering.get()
        if answering is None or call.transport != "lambda":
            return None
        limit, shape = answering
        headers = {**reply.headers, **call.response_headers}
        if call.request_id is not None:
            headers["X-Request-Id"] = call.request_id
        status, raw = response_head(Reply(reply.body, reply.content_type, headers, reply.error))
        answer = shape({"status": status, "headers": raw, "body": reply.body})
        return len(json.dumps(answer).encode()), limit

    def _without_mapping(self, event: dict[str, Any]) -> dict[str, Any]:
        """An HTTP event with the path its API serves behind a custom domain's API mapping. An
        HTTP API reached at https://api.example.com/models/v2/... through the mapping key
        `models` has `/models/v2/...` in its path; no field of the event names the key, and its
        `$default` route has no `{proxy+}` parameter to take the path from (as a REST API's
        has), so the key is configured (`EDGERUN_BASE_PATH`). Guessing it (whatever comes
        before `/v2/`) would serve any prefix, and is ambiguous where a key or a model is
        named `v2`."""
        return self._without_prefix(event, self.base_path) if self.base_path else event

    def _without_stage(self, event: dict[str, Any]) -> dict[str, Any]:
        """An HTTP API event with the path its API serves. Called on a named stage (`prod`, not
        `$default`) at the API's own endpoint, API Gateway puts the stage in front of the path:
        `rawPath` and `requestContext.http.path` (payload 2.0), or `path` (payload 1.0), are
        `/prod/v2/models/m/infer`, which no route matches. On a custom domain the stage is not
        in the path."""
        context = event.get("requestContext")
        stage = context.get("stage") if isinstance(context, dict) else None
        if not isinstance(stage, str) or not stage or stage == "$default":
            return event
        return self._without_prefix(event, f"/{stage}")

    def _without_prefix(self, event: dict[str, Any], prefix: str) -> dict[str, Any]:
        """The event with `prefix` taken off the front of its path, only where the path as given
        is none of the function's routes and starts with `<prefix>/`: a prefix named like a
        route's first segment (`v2`) must not be taken off a path that is already the API's
        own."""
        context = event.get("requestContext")
        http = context.get("http") if isinstance(context, dict) else None
        v2 = event.get("version") == "2.0" and isinstance(http, dict)
        path = http.get("path") if v2 else event.get("path")
        if not isinstance(path, str) or not path.startswith(prefix + "/") \
                or self._serves(path):
            return event
        served = path[len(prefix):]
        if v2:
            raw = event.get("rawPath")
            return {**event, "rawPath": raw[len(prefix):] if isinstance(raw, str)
                    and raw.startswith(prefix + "/") else raw,
                    "requestContext": {**context, "http": {**http, "path": served}}}
        return {**event, "path": served}

    def _serves(self, path: str) -> bool:
        """Whether `path` is one of the function's routes, by any method."""
        route, _, allowed = match("GET", path, self.asgi.routes)
        return route is not None or bool(allowed)

    # ------------------------------------------------------------------ batches
    def _batch(self, kind: str, raw: list[dict[str, Any]], context: Any) -> dict[str, Any]:
        timeout = _budget(context)
        make = sqs_record if kind == "sqs" else kinesis_record
        records: list[Record] = []
        for item in raw:
            try:
                records.append(make(item, self.default_model, timeout))
            except (KeyError, TypeError, AttributeError) as exc:
                item_id = _item_id(item)
                if item_id is None:  # Lambda could not retry it alone: fail the whole batch
                    raise InvalidInput(f"a {kind} record has no id: {exc}") from exc
                records.append(Record(item_id, None, InvalidInput(
                    f"{kind} record {item_id} is malformed: {type(exc).__name__}: {exc}")))
        if kind == "kinesis":  # Lambda resumes the shard at the lowest sequence reported
            failed = self._in_order(kind, records, context, STREAM_WINDOW)[:1]
        elif _from_fifo_queue(raw):
            failed = self._in_order(kind, records, context)
        else:
            failed = self._all_at_once(kind, records)
        return {"batchItemFailures": [{"itemIdentifier": item_id} for item_id in failed]}

    def _all_at_once(self, kind: str, records: list[Record]) -> list[str]:
        """The failed records of a batch whose records are independent (a standard queue), all
        queued at once; the others' results are sent on."""
        answers = self.loop.run_until_complete(self._submit(records))
        failed: list[str] = []
        results: list[tuple[str, bytes]] = []
        for record, (body, error) in zip(records, answers):
            if error is None:
                results.append((record.item_id, body))
                continue
            failed.append(record.item_id)
            _log_failure(kind, record, error, retried=True)
        if self.destination is not None and results:
            unsent = self.destination.send(results)
            failed += [item_id for item_id, _ in results if item_id in unsent]
        return failed

    def _in_order(self, kind: str, records: list[Record], context: Any,
                  window: int = 1) -> list[str]:
        """The record that stopped an ordered batch and every record after it, or nothing. A
        record whose error no retry fixes (bad input) is logged and passed over, not a stop.

        SQS delivers a FIFO queue's message group in order, and AWS requires, with partial
        batch responses, that the function stop at the first record that fails and report it
        and every later record: reporting only the failed one lets its successors be processed
        (and their results sent) before it, out of order. A stream's shard is retried from the
        lowest sequence number reported, every later record delivered again: a result sent for
        one of them would be sent twice. So records run `window` at a time, their results up to
        the first that failed are sent on in order (`_send_in_order`), and the first failure
        (to answer, or to send its result) ends the batch. A FIFO batch's window is one record
        (ten records at most: its later records are not run at all); a stream's is
        STREAM_WINDOW, as a stream's batch may hold thousands: its micro-batching, and its
        sends in batches, are kept. A destination that takes some results of one call and
        refuses an earlier one gets those again on the retry (SQS and S3 destinations deliver
        at least once; a FIFO results queue drops them by their deduplication id). Nothing more
        is started, run or sent once the invocation has no more than RESERVE_S left: the batch
        answers with what is done instead of being cut off by Lambda, which would deliver
        every record again."""
        for start in range(0, len(records), window):
            if _nearly_out_of_time(context):
                return _not_done(kind, records[start:], "the invocation's time is nearly up")
            queued = records[start:start + window]
            for record in queued:
                if record.call is not None:  # the time left now, not when the batch began
                    record.call.timeout = _budget(context)
            answers = self.loop.run_until_complete(self._submit(queued))
            stop = next((i for i, (_, error) in enumerate(answers)
                         if error is not None and _retryable(error)), len(queued))
            answered = [i for i in range(stop) if answers[i][1] is None]  # to be sent on
            sent = self._send_in_order([(queued[i].item_id, answers[i][0]) for i in answered],
                                       context)
            if sent < len(answered):
                stop = answered[sent]
            for record, (_, error) in zip(queued[:stop], answers[:stop]):
                if error is not None:  # bad input, done with: logged, not delivered again
                    _log_failure(kind, record, error, retried=False)
            if stop < len(queued):
                record, (_, error) = queued[stop], answers[stop]
                if error is not None:
                    _log_failure(kind, record, error, retried=True)
                return [record.item_id, *_not_done(
                    kind, records[start + stop + 1:], f"the batch stopped at record "
                    f"{record.item_id}")]
        return []

    def _send_in_order(self, results: list[tuple[str, bytes]], context: Any) -> int:
        """How many of `results` were sent on, in order: SEND_STEP at a time, stopping at a
        step the destination did not take whole (destinations log why), or once the invocation
        has no more than RESERVE_S left (64 results to S3, one PUT each, outlasted it)."""
        if self.destination is None:
            return len(results)
        for start in range(0, len(results), SEND_STEP):
            if _nearly_out_of_time(context):
                return start
            step = results[start:start + SEND_STEP]
            unsent = self.destination.send(step)
            if unsent:
                return start + next(i for i, (item_id, _) in enumerate(step) if item_id in unsent)
        return len(results)

    async def _submit(self, records: list[Record]) -> list[tuple[bytes, EdgerunError | None]]:
        """Decode every record first, then queue them all at once: the batcher sees the whole
        batch arrive together and runs it in as few forward passes as it can."""
        decoded: list[oip.InferRequest | None] = []
        for record in records:
            try:
                decoded.append(None if record.call is None else oip.decode_request(
                    record.call.body, record.call.attributes(oip.HEADER_LENGTH)))
            except Exception:  # the data plane answers it below, with the error it makes
                decoded.append(None)

        async def answer(record: Record, request: oip.InferRequest | None
                         ) -> tuple[bytes, EdgerunError | None]:
            if record.call is None:
                return b"", record.error
            if request is None:  # decoded again by the data plane, which answers and counts it
                reply = await self.plane.handle_async(record.call)
                return reply.body, reply.error
            refused: list[EdgerunError] = []

            def result(outcome: InferResult) -> bytes:
                """Its JSON, inside the call: an output JSON cannot carry, or a result its
                destination could never take, is the call's error, counted as such."""
                body = outcome.json()
                error = None if self.destination is None else \
                    self.destination.too_large(record.item_id, body)
                if error is not None:
                    refused.append(error)
                    raise error
                return body

            try:
                return await self.plane.infer_async(record.call, request, result), None
            except EdgerunError as exc:
                if refused and exc is refused[0]:
                    return self._result_too_large(record, exc), None
                return b"", exc

        return list(await asyncio.gather(*(answer(record, request)
                                           for record, request in zip(records, decoded))))

    @staticmethod
    def _result_too_large(record: Record, error: EdgerunError) -> bytes:
        """The result a record gets in place of one its destination could never take (larger
        than an SQS message holds): its error, as the OIP error JSON, which is sent. Reported
        instead, the record was delivered again and its model run again at every receive, to
        fail the same way, until the dead-letter queue took it (or, on a stream or in a FIFO
        message group, it held back every record after it until it expired), and its sender
        never learned why. The data plane counted the call as payload_too_large."""
        assert record.call is not None
        _log_failure(record.call.transport, record, error, retried=False)
        return oip.encode_error(str(error))

    # ------------------------------------------------------------------- direct
    def _direct(self, event: dict[str, Any], context: Any) -> dict[str, Any]:
        version = event.get("model_version")
        try:
            body: bytes | None = orjson.dumps(event)
        except TypeError:  # an integer past 64 bits or a lone surrogate, which the runtime's
            body = None    # json reads: json writes them too, and the decoder refuses them
        if body is None or b"null" in body:  # orjson writes NaN and the infinities as null
            body = json.dumps(event).encode()
        call = Call(INFER, str(event.get("model_name") or self.default_model),
                    None if version is None else str(version), body,
                    transport="lambda", timeout=_budget(context))

        def answer(result: InferResult) -> dict[str, Any]:
            """The answer, inside the call: one larger than Lambda returns is the call's
            PayloadTooLarge, counted so, where the invoker would get Lambda's bare
            ResponseSizeTooLarge. Measured as the runtime client writes it (no fewer bytes)."""
            answer = oip.loads(result.json())
            size = len(json.dumps(answer))
            if size > MAX_RESPONSE_BYTES:
                raise PayloadTooLarge(f"the answer of {size} bytes is over the "
                                      f"{MAX_RESPONSE_BYTES}-byte limit of a Lambda invocation's "
                                      "answer; send fewer rows a request")
            return answer

        return self.plane.infer(call, lambda: oip.decode_request(body, None), answer)


def event_kind(event: Any) -> str:
    """"http", "sqs", "kinesis" or "direct"; InvalidInput for anything else."""
    if isinstance(event, dict):
        records = event.get("Records")
        if isinstance(records, list) and records and isinstance(records[0], dict):
            # SNS spells it EventSource: without it the error named the source None
            source = records[0].get("eventSource") or records[0].get("EventSource")
            if source == "aws:sqs":
                return "sqs"
            if source == "aws:kinesis":
                return "kinesis"
            raise InvalidInput(f"records from {source!r} are not served; SQS and Kinesis are")
        if "requestContext" in event or "httpMethod" in event:
            return "http"
        if "inputs" in event:
            return "direct"
    raise InvalidInput("the event is none of: an HTTP event (API Gateway, Function URL, ALB), "
                       "an SQS or Kinesis batch, or an OIP v2 request with \"inputs\"")


def _without_base_path(event: dict[str, Any]) -> dict[str, Any]:
    """A REST API event with the path its API serves. Called through a custom domain whose
    base path mapping is, say, `ml`, API Gateway puts `/ml/v2/models/m/infer` in `path`, which
    no route matches; the `{proxy+}` resource and its `proxy` parameter hold the path without
    the mapping (or the stage)."""
    resource, path, parameters = event.get("resource"), event.get("path"), \
        event.get("pathParameters")
    proxy = parameters.get("proxy") if isinstance(parameters, dict) else None
    if not (isinstance(resource, str) and resource.endswith("/{proxy+}")
            and isinstance(proxy, str) and isinstance(path, str)):
        return event
    served = resource[:-len("{proxy+}")] + proxy
    if path == served or not path.endswith(served):
        return event
    return {**event, "path": served}


def _from_fifo_queue(raw: list[dict[str, Any]]) -> bool:
    """Whether SQS records come from a FIFO queue, whose name (the end of `eventSourceARN`)
    always ends in `.fifo`. A MessageGroupId alone does not say so: a standard queue's fair
    queueing groups messages by it too, without order. It decides only for a record that has
    no ARN (an event written by hand)."""
    for item in raw:
        if not isinstance(item, dict):
            continue
        arn = item.get("eventSourceARN")
        if isinstance(arn, str) and arn:
            if arn.endswith(".fifo"):
                return True
            continue
        attributes = item.get("attributes")
        if isinstance(attributes, dict) and attributes.get("MessageGroupId"):
            return True
    return False


def _not_done(kind: str, records: list[Record], reason: str) -> list[str]:
    """The ids of an ordered batch's records left undone (not run, or their results not sent),
    logged as one JSON line (the first MAX_LOGGED_ITEMS ids, and their count): Lambda delivers
    them again, in order."""
    items = [record.item_id for record in records]
    if items:
        log.error(json.dumps({"message": "records not done", "source": kind, "reason":
                              f"{'stream' if kind == 'kinesis' else 'FIFO queue'}: {reason}",
                              "count": len(items), "items": items[:MAX_LOGGED_ITEMS]}))
    return items


def _remaining_s(context: Any) -> float | None:
    """The invocation's remaining time in seconds, when the context says."""
    remaining = getattr(context, "get_remaining_time_in_millis", None)
    return None if remaining is None else remaining() / 1000


def _nearly_out_of_time(context: Any) -> bool:
    """No more than RESERVE_S left: nothing more is started or sent, the batch answers."""
    left = _remaining_s(context)
    return left is not None and left <= RESERVE_S


def _budget(context: Any) -> float | None:
    """The queueing budget a call gets: the invocation's remaining time, less a reserve."""
    remaining = _remaining_s(context)
    if remaining is None:
        return None
    return max(remaining - RESERVE_S, 0.05)


def _item_id(item: Any) -> str | None:
    if not isinstance(item, dict):
        return None
    kinesis = item.get("kinesis")
    if isinstance(kinesis, dict) and kinesis.get("sequenceNumber"):
        return str(kinesis["sequenceNumber"])
    return str(item["messageId"]) if item.get("messageId") else None


def _retryable(error: EdgerunError | None) -> bool:
    """Whether an ordered batch's record is worth delivering again (RETRYABLE). Bad input, an
    unknown model or undecodable data fails at every delivery: reported, it would hold back a
    stream's shard until it expired (forever, with a stream's default MaximumRetryAttempts of
    -1), or a FIFO queue's group until the redrive policy took it and every record reported
    after it to the dead-letter queue."""
    return isinstance(error, RETRYABLE)


def _log_failure(kind: str, record: Record, error: EdgerunError | None, retried: bool) -> None:
    """One JSON line per failed record, with the request id its sender gave (`x-request-id`)
    or the data plane made, so the failure can be found from either end, and whether Lambda
    delivers it again (`retried`) or it is done with, acknowledged."""
    log.error(json.dumps({"message": "record failed", "source": kind, "item": record.item_id,
                          "request_id": None if record.call is None else record.call.request_id,
                          "kind": getattr(error, "kind", "error"), "error": str(error),
                          "retried": retried}))
