#!/usr/bin/env python3
"""A stand-in for the model in README's `agent` recipe, so CI runs the recipe without the
internet: an OpenAI-compatible /v1/chat/completions endpoint (stdlib only) whose answers are
fixed rules, not a language model. First it asks for `search_orders` (no arguments); once the
conversation carries that tool's result, it answers with the order ids and statuses it read.
The agent loop, the tools, the gateway and the shop it exercises are the real ones.

    python3 .ci/readme-model.py PORT
"""
import json
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


def answer(request):
    messages = request.get("messages", [])
    results = [m for m in messages if m.get("role") == "tool"]
    if not results:
        message = {
            "role": "assistant",
            "content": None,
            "tool_calls": [{
                "id": "call_1",
                "type": "function",
                "function": {"name": "search_orders", "arguments": "{}"},
            }],
        }
        finish = "tool_calls"
    else:
        found = json.loads(results[-1]["content"])
        orders = found.get("orders", [])
        lines = [f"{o['id']} is {o['status']}" for o in orders]
        text = f"You have {len(orders)} order(s): " + "; ".join(lines) if orders else "You have no orders."
        message = {"role": "assistant", "content": text}
        finish = "stop"
    return {
        "id": "chatcmpl-readme",
        "object": "chat.completion",
        "model": request.get("model", "readme"),
        "choices": [{"index": 0, "message": message, "finish_reason": finish}],
        "usage": {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0},
    }


class Handler(BaseHTTPRequestHandler):
    def do_POST(self):
        if self.path.rstrip("/") != "/v1/chat/completions":
            self.send_error(404)
            return
        length = int(self.headers.get("content-length", "0"))
        body = json.dumps(answer(json.loads(self.rfile.read(length)))).encode()
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


if __name__ == "__main__":
    ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), Handler).serve_forever()
