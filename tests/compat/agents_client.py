"""openai-agents (Python) against the server: `RealtimeRunner` with `model_config={"url": ...}`.

argv: WS_URL PCM24K_FILE [tools]. Does what the SDK's quickstart does: one voice turn (the
speech, then silence, as a microphone: the server's turn detection ends it), then one typed
message through `session.send_message`. With `tools` the agent has a function tool
(`get_weather`) instead, and the voice turn goes on until the SDK has run the function the
model called and the model has answered its result. Reports every session event type,
each error, each tool run, and the history as the session holds it after each turn.
"""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))
from _report import emit, forward_logging, microphone, read_pcm, run
from agents import function_tool
from agents.realtime import RealtimeAgent, RealtimeRunner

TEXT_MESSAGE = "What is the capital of France?"


@function_tool
def get_weather(city: str, unit: str) -> str:
    """The weather in a city."""
    emit("tool_called", city=city, unit=unit)
    return f"Sunny, 21 degrees {unit} in {city}."


def item_summary(item: Any) -> dict[str, Any]:
    """A history item as plain data: its id, role, status and the text it holds (a
    function call: its name, arguments and output)."""
    texts = []
    for part in getattr(item, "content", None) or []:
        text = getattr(part, "text", None) or getattr(part, "transcript", None)
        texts.append({"type": part.type, "text": text})
    summary = {
        "item_id": item.item_id,
        "type": item.type,
        "role": getattr(item, "role", None),
        "status": getattr(item, "status", None),
        "content": texts,
    }
    for name in ("name", "arguments", "output"):
        if hasattr(item, name):
            summary[name] = getattr(item, name)
    return summary


async def turn_end(turns_done: asyncio.Queue[Exception | None]) -> None:
    failure = await turns_done.get()
    if failure is not None:
        raise failure


async def main(argv: list[str]) -> None:
    url, pcm_path = argv[0], argv[1]
    tools = argv[2:] == ["tools"]
    forward_logging()
    agent = RealtimeAgent(
        name="Assistant",
        instructions="You are a helpful assistant.",
        tools=[get_weather] if tools else [],
    )
    runner = RealtimeRunner(starting_agent=agent)
    session = await runner.run(model_config={"url": url, "api_key": "not-needed"})
    # None: a turn ended; an exception: an error came, the answer will not.
    turns_done = asyncio.Queue[Exception | None]()
    # The history as a UI keeps it: replaced by history_updated, grown by history_added.
    history: list[Any] = []
    audio_bytes = 0

    async def listen() -> None:
        nonlocal history, audio_bytes
        async for event in session:
            if event.type == "raw_model_event":
                data = event.data
                if data.type == "raw_server_event":
                    emit("server_event", type=data.data.get("type"))
                continue
            if event.type == "audio":
                audio_bytes += len(event.audio.data)
                continue
            emit("session_event", type=event.type)
            if event.type == "tool_end":
                emit("tool_end", tool=event.tool.name, output=str(event.output))
            elif event.type == "error":
                emit("error", error=str(event.error))
                await turns_done.put(RuntimeError("the session reported an error"))
            elif event.type == "history_updated":
                history = list(event.history)
            elif event.type == "history_added":
                history = [i for i in history if i.item_id != event.item.item_id] + [event.item]
            elif event.type == "agent_end":
                emit("audio", bytes=audio_bytes)
                audio_bytes = 0
                await turns_done.put(None)

    async with session:
        listener = asyncio.create_task(listen())
        try:
            answered = asyncio.Event()
            mic = asyncio.create_task(microphone(session.send_audio, read_pcm(pcm_path), answered))
            await turn_end(turns_done)
            answered.set()
            await mic
            emit("turn", what="voice", history=[item_summary(i) for i in history])
            if tools:  # the model called the function; the SDK answers it, the model goes on
                await turn_end(turns_done)
                emit("turn", what="tool", history=[item_summary(i) for i in history])
                return
            await session.send_message(TEXT_MESSAGE)
            await turn_end(turns_done)
            emit("turn", what="text", history=[item_summary(i) for i in history])
        finally:
            listener.cancel()
            await asyncio.gather(listener, return_exceptions=True)


if __name__ == "__main__":
    run(main, float(os.environ.get("VOXTRAL_CLIENT_DEADLINE_S", "120")))
