#!/usr/bin/env python3
"""Drives a running `blossom-p2p serve` with the official `openai` client.

Usage: openai_client_check.py BASE_URL [FOLLOW_DATA_DIR NEW_ROUND_SOURCE]

Lists the models, chats (plain and streamed) and completes. With a data dir,
it also starts a streamed chat, copies NEW_ROUND_SOURCE (an mlx-lm adapter
folder) into DATA_DIR/adapters/round-NNNN while the stream runs, checks the
stream still ends normally, and waits until /v1/models names the new round.
Exits 77 (skipped) when the `openai` package is missing.
"""

import shutil
import sys
import time
from pathlib import Path

try:
    import openai
except ImportError:
    print("SKIP: the openai package is not installed (pip install openai)")
    sys.exit(77)


def check(condition, message):
    if not condition:
        print(f"FAIL: {message}")
        sys.exit(1)


def main():
    base_url = sys.argv[1]
    client = openai.OpenAI(base_url=base_url, api_key="test-key", max_retries=0, timeout=120)

    models = client.models.list().data
    check(len(models) == 1, f"one model listed, got {models}")
    model = models[0].id
    print(f"model: {model}")

    chat = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "Say hello."}], max_tokens=8, temperature=0
    )
    check(chat.choices[0].message.role == "assistant", f"an assistant message: {chat}")
    check(chat.usage.completion_tokens >= 1 and chat.usage.prompt_tokens >= 1, f"usage counts: {chat.usage}")
    check(chat.choices[0].finish_reason in ("stop", "length"), f"a finish reason: {chat}")
    print(f"chat: {chat.choices[0].message.content!r} ({chat.usage.completion_tokens} tokens)")

    pieces = []
    finish = None
    for chunk in client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "Say hello."}], max_tokens=8, temperature=0, stream=True
    ):
        if chunk.choices:
            pieces.append(chunk.choices[0].delta.content or "")
            finish = chunk.choices[0].finish_reason or finish
    check("".join(pieces) == chat.choices[0].message.content, f"the stream gives the same text: {pieces!r}")
    check(finish == chat.choices[0].finish_reason, f"the stream's finish reason: {finish}")
    print(f"streamed chat: {len(pieces)} chunks")

    completion = client.completions.create(model=model, prompt="The capital of France is", max_tokens=5, temperature=0)
    check(completion.usage.completion_tokens >= 1, f"a completion: {completion}")
    print(f"completion: {completion.choices[0].text!r}")

    try:
        client.chat.completions.create(model=model, messages=[], max_tokens=4)
        check(False, "an empty conversation must be refused")
    except openai.BadRequestError as error:
        print(f"bad request refused: {error.status_code}")

    if len(sys.argv) == 4:
        data_dir, source = Path(sys.argv[2]), Path(sys.argv[3])
        before = client.models.list().data[0].model_extra.get("adapter") or {}
        next_round = (before.get("round") or 0) + 1
        stream = client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": "Count to twenty."}], max_tokens=48, temperature=0, stream=True
        )
        chunks = 0
        finish = None
        for chunk in stream:
            if chunks == 1:
                # A new round's average lands while this request streams.
                target = data_dir / "adapters" / f"round-{next_round:04d}"
                shutil.copytree(source, target)
            if chunk.choices:
                chunks += 1
                finish = chunk.choices[0].finish_reason or finish
        check(finish in ("stop", "length"), f"the stream survives the switch: {finish}")
        deadline = time.time() + 30
        while time.time() < deadline:
            adapter = client.models.list().data[0].model_extra.get("adapter") or {}
            if adapter.get("round") == next_round:
                break
            time.sleep(0.2)
        check(adapter.get("round") == next_round, f"/v1/models names round {next_round}: {adapter}")
        after = client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": "Say hello."}], max_tokens=4, temperature=0
        )
        check(after.choices[0].finish_reason in ("stop", "length"), "a request after the switch")
        print(f"followed: now serving round {adapter['round']} ({adapter.get('hash')})")
    print("OK")


main()
