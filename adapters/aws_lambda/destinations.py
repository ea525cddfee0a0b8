"""Where a batch's results go on: an SQS queue or an S3 prefix, through boto3.

boto3 comes with the Lambda Python runtime; elsewhere it is installed by hand. It is imported
only when a destination is configured, and a missing boto3 is an error at init, not at the
first batch. A result that cannot be sent makes its record a batch item failure, so the queue
delivers it again: nothing is lost. A result that could never be sent, larger than one SQS
message holds, is its record's error instead (`Destination.too_large`), which is sent.
"""

from __future__ import annotations

import hashlib
import logging
from typing import Any, Protocol

from edgerun.runtime.errors import PayloadTooLarge

log = logging.getLogger(__name__)

SQS_BATCH = 10  # SendMessageBatch takes at most ten entries
#: The most one message holds, its body and attributes (`message_size`) together, unless told
#: the queue's MaximumMessageSize: 256 KiB, what every queue takes (a queue's default, and the
#: most any took before 2025's raise to 1 MiB). A SendMessageBatch call carries at most this
#: much in all too (never over the call's own 1 MiB); a larger result goes alone.
SQS_MESSAGE_BYTES = 256 * 1024
SQS_MAX_MESSAGE_BYTES = 1024 * 1024  # the largest MaximumMessageSize SQS allows
SOURCE_ID = "source-id"
RESULTS_GROUP = "edgerun-results"  # a FIFO results queue's one message group


class Destination(Protocol):
    def send(self, results: list[tuple[str, bytes]]) -> set[str]:
        """Send (item id, result JSON) pairs; returns the ids that could not be sent."""

    def too_large(self, item_id: str, body: bytes) -> PayloadTooLarge | None:
        """The error a result is in place of itself where it is too large for the destination
        ever to take (sent, it would fail at every retry); None where it fits."""


class SqsDestination:
    """Each result as one message; the record's id in the `source-id` message attribute.

    A FIFO queue (its name ends in `.fifo`) refuses a message without a group: results go in
    one group, `edgerun-results`, in the order they are sent, each deduplicated by its record's
    id, so a record delivered again (after a failure later in its batch) sends no second copy
    within SQS's five-minute window.
    """

    def __init__(self, queue_url: str, client: Any,
                 max_bytes: int = SQS_MESSAGE_BYTES) -> None:
        self.queue_url = queue_url
        self.client = client
        self.fifo = queue_url.endswith(".fifo")
        self.max_bytes = max_bytes  # the queue's MaximumMessageSize, where told

    def send(self, results: list[tuple[str, bytes]]) -> set[str]:
        failed: set[str] = set()
        for chunk in _chunks(results, self.max_bytes):
            entries = [{"Id": str(i), "MessageBody": body.decode(),
                        "MessageAttributes": {SOURCE_ID: {"DataType": "String",
                                                          "StringValue": item_id}}}
                       for i, (item_id, body) in enumerate(chunk)]
            if self.fifo:
                for entry, (item_id, _) in zip(entries, chunk):
                    entry.update(MessageGroupId=RESULTS_GROUP,
                                 MessageDeduplicationId=_dedup_id(item_id))
            try:
                answer = self.client.send_message_batch(QueueUrl=self.queue_url,
                                                        Entries=entries)
            except Exception as exc:  # botocore's errors: the whole chunk goes back
                log.error("results to %s failed: %s", self.queue_url, exc)
                failed.update(item_id for item_id, _ in chunk)
                continue
            for entry in answer.get("Failed", []):
                item_id = chunk[int(entry["Id"])][0]
                log.error("result of %s to %s failed: %s", item_id, self.queue_url,
                          entry.get("Message", entry.get("Code")))
                failed.add(item_id)
        return failed

    def too_large(self, item_id: str, body: bytes) -> PayloadTooLarge | None:
        """A result over `max_bytes` with its attributes: SQS refuses it at every try, and
        only S3 (or a queue that takes larger messages) takes it."""
        size = message_size(item_id, body)
        if size <= self.max_bytes:
            return None
        return PayloadTooLarge(
            f"the result of {size} bytes (its body and message attributes) is over the "
            f"{self.max_bytes}-byte limit of one message on the results queue "
            f"{self.queue_url}; send fewer rows a request, raise the queue's "
            "MaximumMessageSize (up to 1 MiB) and EDGERUN_RESULTS_MAX_BYTES with it, or send "
            "results to S3 (EDGERUN_RESULTS=s3://BUCKET/PREFIX/), which takes any size")


def message_size(item_id: str, body: bytes) -> int:
    """The bytes SQS counts of a result's message against its limits, one message's and one
    SendMessageBatch call's: the body, and each message attribute's name, type and value."""
    return len(body) + len(SOURCE_ID) + len("String") + len(item_id.encode())


def _dedup_id(item_id: str) -> str:
    """A FIFO deduplication id: the record's id where SQS takes it (128 characters of letters,
    digits and punctuation), else its sha256."""
    if len(item_id) <= 128 and item_id.isascii() and item_id.isprintable() and " " not in item_id:
        return item_id
    return hashlib.sha256(item_id.encode()).hexdigest()


def _chunks(results: list[tuple[str, bytes]],
            max_bytes: int = SQS_MESSAGE_BYTES) -> list[list[tuple[str, bytes]]]:
    """Results in order, as SendMessageBatch calls SQS takes: ten entries, `max_bytes` in all.
    A call over the size limit fails whole (BatchRequestTooLong), and the same results would
    fail again at every retry until the queue gives the records up to its dead letters."""
    chunks: list[list[tuple[str, bytes]]] = []
    size = 0
    for item_id, body in results:
        entry = message_size(item_id, body)
        if not chunks or len(chunks[-1]) == SQS_BATCH or size + entry > max_bytes:
            chunks.append([])
            size = 0
        chunks[-1].append((item_id, body))
        size += entry
    return chunks


class S3Destination:
    """Each result as `PREFIX<item id>.json`."""

    def __init__(self, bucket: str, prefix: str, client: Any) -> None:
        self.bucket = bucket
        self.prefix = prefix
        self.client = client

    def send(self, results: list[tuple[str, bytes]]) -> set[str]:
        failed: set[str] = set()
        for item_id, body in results:
            key = f"{self.prefix}{item_id}.json"
            try:
                self.client.put_object(Bucket=self.bucket, Key=key, Body=body,
                                       ContentType="application/json")
            except Exception as exc:  # botocore's errors: this record is retried
                log.error("result of %s to s3://%s/%s failed: %s", item_id, self.bucket, key,
                          exc)
                failed.add(item_id)
        return failed

    def too_large(self, item_id: str, body: bytes) -> PayloadTooLarge | None:
        """Never: an S3 object takes up to 5 GB, more than Lambda holds in memory."""
        return None


def destination_from(uri: str, variable: str = "EDGERUN_RESULTS",
                     max_bytes: int = SQS_MESSAGE_BYTES) -> Destination | None:
    """`s3://bucket/prefix/` or an SQS queue URL (`https://sqs.<region>.amazonaws.com/...`),
    whose messages hold `max_bytes` (its MaximumMessageSize)."""
    if not uri:
        return None
    if uri.startswith("s3://"):
        bucket, _, prefix = uri[len("s3://"):].partition("/")
        if not bucket:
            raise ValueError(f"{variable}={uri!r}: an S3 destination needs a bucket")
        return S3Destination(bucket, prefix, _client(variable, uri, "s3"))
    if uri.startswith("https://sqs.") or uri.startswith("https://queue.amazonaws.com/"):
        return SqsDestination(uri, _client(variable, uri, "sqs"), max_bytes)
    raise ValueError(f"{variable}={uri!r}: expected s3://BUCKET/PREFIX or an SQS queue URL "
                     "(https://sqs.REGION.amazonaws.com/ACCOUNT/QUEUE)")


def _client(variable: str, uri: str, service: str) -> Any:
    try:
        import boto3
    except ImportError:
        raise RuntimeError(f"{variable}={uri!r} sends results through boto3, which is not "
                           "installed (the Lambda runtime has it; elsewhere: pip install "
                           "boto3)") from None
    return boto3.client(service)
