"""The OpenAPI document as the server really answers: FastAPI's, with the statuses and content
types it does not know of. Every error is 4xx / 5xx JSON of one shape (`Error`), never a 422:
a bad field is a 400 (OpenAI's status). Checked by tests/test_schema.py with schemathesis."""

from __future__ import annotations

ERROR = {"type": "object", "required": ["error"], "properties": {"error": {
    "type": "object", "required": ["message", "status"],
    "properties": {"message": {"type": "string"}, "status": {"type": "integer"}}}}}

REASONS = {400: "a field is wrong: the message names it", 401: "missing or wrong token",
           403: "not allowed on this server (the message says why)",
           404: "no such model, voice, file or feature", 409: "the name is taken, or a quota",
           413: "the body or the text is over its limit", 500: "generation failed",
           502: "the LLM answered with an error", 503: "busy or shutting down: retry later",
           504: "the LLM did not answer in time"}
OPEN = {"/health", "/", "/web/{name}"}  # no token needed
GENERATES = {"/api/generate", "/v1/audio/speech", "/v1/chat/speech", "/tts/bytes",
             "/v1/text-to-speech/{voice_id}", "/v1/text-to-speech/{voice_id}/stream"}
AUDIO = ["audio/mpeg", "audio/ogg", "audio/aac", "audio/flac", "audio/wav", "audio/pcm",
         "text/event-stream"]
SUCCESS_TYPES = {  # the success content types FastAPI cannot see (streamed or files)
    "/": ["text/html"], "/web/{name}": ["text/html", "text/javascript", "text/css"],
    "/metrics": ["text/plain"], "/v1/audio/speech": AUDIO,
    "/v1/chat/speech": ["audio/wav", "audio/pcm", "text/event-stream"],
    "/tts/bytes": ["audio/pcm", "audio/mpeg"], "/v1/text-to-speech/{voice_id}": AUDIO[:1] + [
        "audio/pcm"], "/v1/text-to-speech/{voice_id}/stream": AUDIO[:1] + ["audio/pcm"]}
EXTRA = {("post", "/v1/voices"): {403, 404, 409}, ("delete", "/v1/voices/{name}"): {403, 404},
         ("post", "/v1/audio/speech"): {404}, ("post", "/v1/chat/speech"): {404, 502, 504},
         ("get", "/web/{name}"): {404}}


def error_statuses(method: str, path: str, op: dict, token: bool) -> set[int]:
    statuses = set(EXTRA.get((method, path), ()))
    if path not in OPEN:
        statuses |= {401, 503} if token else {503}  # 503: the connection budget
    if op.get("requestBody") or op.get("parameters"):
        statuses |= {400}
    if op.get("requestBody"):
        statuses |= {413}
    if path in GENERATES:
        statuses |= {400, 500, 503}
    return statuses


def server_schema(schema: dict, token: bool) -> dict:
    """FastAPI's document -> the server's: 422 out, the real error statuses and the content
    types of streamed and file responses in."""
    schema.setdefault("components", {}).setdefault("schemas", {})["Error"] = ERROR
    error = {"content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}}
    for path, methods in schema.get("paths", {}).items():
        for method, op in methods.items():
            responses = op.setdefault("responses", {})
            responses.pop("422", None)
            for status in sorted(error_statuses(method, path, op, token)):
                responses[str(status)] = {"description": REASONS[status], **error}
            if path in SUCCESS_TYPES:
                ok = next(s for s in responses if s.startswith("2"))
                responses[ok]["content"] = {t: {} for t in SUCCESS_TYPES[path]}
    schema.get("components", {}).get("schemas", {}).pop("HTTPValidationError", None)
    schema.get("components", {}).get("schemas", {}).pop("ValidationError", None)
    return schema


def install(app, token: bool):
    """app.openapi() returns the server's document (built once)."""
    from fastapi.openapi.utils import get_openapi

    def openapi():
        if app.openapi_schema is None:
            app.openapi_schema = server_schema(get_openapi(
                title=app.title, version=app.version, routes=app.routes), token)
        return app.openapi_schema

    app.openapi = openapi
