"""A small fake OpenAI-compatible streaming server with fixed token timing, for the load test's own tests.

It speaks what loadtest/ expects of any server: streamed /v1/completions and /v1/chat/completions (SSE,
`data: [DONE]`, a final usage chunk with stream_options.include_usage, ignore_eos/min_tokens honoured by
always producing max_tokens tokens), /v1/models, /metrics (Prometheus text, `elastic:` prefix) and
/v1/memory (pool telemetry that grows with the running requests). Tokens are words.

    python tests/loadtest/fake_openai_server.py --port 8123 [--ttft-ms 20] [--itl-ms 4]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import time
import uuid

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse

MODEL_ID = "fake-smollm2"
CHUNK_BYTES = 2 * 1024 * 1024
NUM_CHUNKS = 256
WEIGHT_CHUNKS = 40
WORDS = ("alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta")


def count_tokens(text: str) -> int:
    return len(re.findall(r"\w+|[^\w\s]|\n", text))


def error_response(status: int, message: str, param: str | None = None) -> JSONResponse:
    body = {"error": {"message": message, "type": "invalid_request_error", "param": param, "code": None}}
    return JSONResponse(body, status_code=status)


def create_app(ttft_ms: float = 20.0, itl_ms: float = 4.0) -> FastAPI:
    app = FastAPI()
    state = {"running": 0, "generated": 0, "requests": 0}

    def memory_rank() -> dict:
        kv = min(NUM_CHUNKS - WEIGHT_CHUNKS - 8, 2 * state["running"])
        activations = 4 + state["running"] // 4
        used = kv + activations + WEIGHT_CHUNKS
        return {
            "chunk_bytes": CHUNK_BYTES,
            "num_chunks": NUM_CHUNKS,
            "chunks_per_client": {"kv": kv, "activations": activations, "weights": WEIGHT_CHUNKS},
            "num_free_chunks": NUM_CHUNKS - used,
            "host_buffer_used_bytes": max(0, state["running"] - 8) * CHUNK_BYTES,
            "num_inflates": state["requests"],
        }

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": MODEL_ID, "object": "model", "max_model_len": 2048}]}

    @app.get("/v1/memory")
    async def memory():
        return {"replica": "fake-0", "ranks": [memory_rank()]}

    @app.get("/metrics")
    async def metrics():
        lines = [
            "# HELP elastic:num_requests_running Requests being generated.",
            "# TYPE elastic:num_requests_running gauge",
            f'elastic:num_requests_running{{model_name="{MODEL_ID}"}} {state["running"]}',
            "# TYPE elastic:num_requests_waiting gauge",
            f'elastic:num_requests_waiting{{model_name="{MODEL_ID}"}} 0',
            "# TYPE elastic:generation_tokens_total counter",
            f'elastic:generation_tokens_total{{model_name="{MODEL_ID}"}} {state["generated"]}',
        ]
        return PlainTextResponse("\n".join(lines) + "\n")

    async def generate(request: Request, is_chat: bool):
        try:
            body = await request.json()
        except ValueError:
            return error_response(400, "body is not JSON")
        if body.get("model") != MODEL_ID:
            return error_response(404, f"model {body.get('model')!r} does not exist", "model")
        if is_chat:
            messages = body.get("messages")
            if not isinstance(messages, list) or not messages:
                return error_response(400, "messages must be a non-empty list", "messages")
            num_prompt = sum(count_tokens(str(m.get("content", ""))) + 3 for m in messages)
        else:
            prompt = body.get("prompt")
            if not isinstance(prompt, str):
                return error_response(400, "prompt must be a string", "prompt")
            num_prompt = count_tokens(prompt)
        max_tokens = body.get("max_tokens", 16)
        if not isinstance(max_tokens, int) or max_tokens < 1:
            return error_response(400, "max_tokens must be a positive integer", "max_tokens")
        is_usage = bool((body.get("stream_options") or {}).get("include_usage"))
        request_id = f"{'chatcmpl' if is_chat else 'cmpl'}-{uuid.uuid4().hex[:12]}"
        created = int(time.time())
        kind = "chat.completion.chunk" if is_chat else "text_completion"

        def chunk(text: str | None, finish_reason: str | None = None, role: bool = False) -> str:
            if is_chat:
                delta = {"role": "assistant", "content": ""} if role else ({"content": text} if text else {})
                choice = {"index": 0, "delta": delta, "finish_reason": finish_reason}
            else:
                choice = {"index": 0, "text": text or "", "finish_reason": finish_reason}
            payload = {"id": request_id, "object": kind, "created": created, "model": MODEL_ID, "choices": [choice]}
            return f"data: {json.dumps(payload)}\n\n"

        async def stream():
            state["running"] += 1
            state["requests"] += 1
            try:
                if is_chat:
                    yield chunk(None, role=True)
                await asyncio.sleep(ttft_ms / 1000.0)
                for index in range(max_tokens):
                    if index:
                        await asyncio.sleep(itl_ms / 1000.0)
                    state["generated"] += 1
                    is_last = index == max_tokens - 1
                    yield chunk(" " + WORDS[index % len(WORDS)])
                    if is_last:
                        yield chunk(None, finish_reason="length")
                if is_usage:
                    usage = {
                        "prompt_tokens": num_prompt,
                        "completion_tokens": max_tokens,
                        "total_tokens": num_prompt + max_tokens,
                    }
                    payload = {
                        "id": request_id,
                        "object": kind,
                        "created": created,
                        "model": MODEL_ID,
                        "choices": [],
                        "usage": usage,
                    }
                    yield f"data: {json.dumps(payload)}\n\n"
                yield "data: [DONE]\n\n"
            finally:
                state["running"] -= 1

        if not body.get("stream"):
            return error_response(400, "this fake only streams", "stream")
        return StreamingResponse(stream(), media_type="text/event-stream")

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await generate(request, is_chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await generate(request, is_chat=True)

    return app


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8123)
    parser.add_argument("--ttft-ms", type=float, default=20.0)
    parser.add_argument("--itl-ms", type=float, default=4.0)
    args = parser.parse_args()
    uvicorn.run(create_app(args.ttft_ms, args.itl_ms), host=args.host, port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
