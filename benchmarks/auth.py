"""What API keys cost a request: the hook chain's `before` with and without `ApiKeyHook`.

    python benchmarks/auth.py [--calls 20000] [--write]

In-process, no model: the default chain (`RequestId` alone, what every call already pays) is
the baseline; then the same chain plus `ApiKeyHook` over tokens files of 1, 10, 100 and 1,000
tokens, with a valid key and with a wrong one (what a flood of bad keys costs). Each figure is
the median of 5 rounds of `--calls` calls, interleaved. The hook stats the tokens file on every
call (so a revocation applies at the next request), hashes the key once (SHA-256) and compares
it with every entry (`hmac.compare_digest`): linear in the number of tokens by design.
`--write` records the table in benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import machine, markdown_table, record  # noqa: E402

from edgerun.adapters.auth import ApiKeyHook, TokenStore, create_token  # noqa: E402
from edgerun.adapters.auth.tokens import read_secret  # noqa: E402
from edgerun.adapters.dataplane import Call, HookChain, RequestId  # noqa: E402
from edgerun.adapters.dataplane.call import INFER  # noqa: E402
from edgerun.runtime.errors import Unauthenticated  # noqa: E402
from edgerun.runtime.metrics import Registry  # noqa: E402

TOKEN_COUNTS = (1, 10, 100, 1000)
ROUNDS = 5


def per_call_us(chain: HookChain, call: Call, calls: int) -> float:
    started = time.perf_counter()
    for _ in range(calls):
        try:
            chain.before(call)
        except Unauthenticated:
            pass
    return (time.perf_counter() - started) / calls * 1e6


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=20000)
    parser.add_argument("--write", action="store_true")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="edgerun-auth-bench-") as scratch:
        text = measure(Path(scratch), args.calls)
    print(text)
    if args.write:
        record("auth", text)
    return 0


def measure(folder: Path, calls: int) -> str:
    cases: dict[str, tuple[HookChain, Call]] = {
        "baseline: RequestId only": (HookChain([RequestId()]),
                                     Call(INFER, model="mlp", attributes={}.get))}
    for count in TOKEN_COUNTS:
        tokens = folder / f"tokens-{count}"
        for n in range(count):
            create_token("read", tokens, folder / f"secret-{count}-{n}", name=f"key-{n}")
        secret = read_secret(folder / f"secret-{count}-{count - 1}")  # the last line
        chain = HookChain([RequestId(), ApiKeyHook(TokenStore(tokens), registry=Registry())])
        for label, key in (("valid key", secret), ("wrong key", secret[:-1] + "x")):
            headers = {"authorization": f"Bearer {key}"}
            plural = "token" if count == 1 else "tokens"
            cases[f"+ ApiKeyHook, {count:,} {plural}, {label}"] = (
                chain, Call(INFER, model="mlp", attributes=headers.get))
    timings: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(ROUNDS):
        for name, (chain, call) in cases.items():
            timings[name].append(per_call_us(chain, call, calls))
    medians = {name: statistics.median(values) for name, values in timings.items()}
    baseline = medians["baseline: RequestId only"]
    rows = [(name, f"{us:.1f}", f"+{us - baseline:.1f}", f"{us / baseline:.1f}x")
            for name, us in medians.items()]
    table = markdown_table(("hook chain", "us per call", "added (us)", "vs baseline"), rows)
    return (f"Command: `python benchmarks/auth.py --write`  \nMachine: {machine()}\n\n"
            f"Median of {ROUNDS} interleaved rounds of {calls:,} calls each, in-process; "
            "the key matched is the file's last line.\n\n" + table + "\n")


if __name__ == "__main__":
    sys.exit(main())
