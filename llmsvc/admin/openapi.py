"""The OpenAPI 3.1 document of every route, gateway and admin, served at `/openapi.json`.

Request bodies come from the same pydantic models that validate them, so the
document cannot drift from what the daemon accepts; tests/test_openapi.py
fuzzes the daemon from it (schemathesis). It lives with the admin API, the
outermost app, which is the one that knows both halves.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel

from llmsvc import __version__
from llmsvc.gateway.messages import CountRequest, MessagesRequest
from llmsvc.gateway.request import ChatRequest
from llmsvc.gateway.responses import ResponsesRequest
from llmsvc.gateway.sessions import SessionBody
from llmsvc.store.attribution import SPEND_BY
from llmsvc.store.search import SCAN

REF = "#/components/schemas/{model}"


def _error(description: str) -> dict[str, Any]:
    return {
        "description": description,
        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}},
    }


def _json(description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": {}}}}


def _body(model: type[BaseModel], required: bool = True) -> dict[str, Any]:
    return {
        "required": required,
        "content": {"application/json": {"schema": {"$ref": REF.format(model=model.__name__)}}},
    }


def document(admin_models: list[type[BaseModel]]) -> dict[str, Any]:
    """The document; `admin_models` are the admin API's bodies (`admin.app.ADMIN_BODIES`)."""
    schemas: dict[str, Any] = {
        "Error": {
            "type": "object",
            "required": ["error"],
            "properties": {"error": {"type": "object"}},
        }
    }
    models: list[type[BaseModel]] = [
        ChatRequest,
        MessagesRequest,
        CountRequest,
        SessionBody,
        ResponsesRequest,
        *admin_models,
    ]
    for model in models:
        schema = model.model_json_schema(ref_template=REF)
        schemas.update(schema.pop("$defs", {}))
        schemas[model.__name__] = schema
    body = {model.__name__: model for model in admin_models}
    prune, restore = body["PruneBody"], body["RestoreBody"]
    bearer: list[dict[str, list[str]]] = [{"admin": []}]
    unauthorized = _error("no or the wrong admin token (the same for every admin path)")
    request_id = {
        "name": "request_id",
        "in": "path",
        "required": True,
        "schema": {"type": "string"},
    }
    provider = {"name": "name", "in": "path", "required": True, "schema": {"type": "string"}}
    key = {"name": "key", "in": "path", "required": True, "schema": {"type": "string"}}
    team = {"name": "team", "in": "path", "required": True, "schema": {"type": "string"}}
    no_key = _error("no such key (by name or id)")
    no_response = _error("no such response stored (or deleted, or not this key's)")
    response_id = {
        "name": "response_id",
        "in": "path",
        "required": True,
        "schema": {"type": "string"},
    }
    no_team = _error("no such team (by name or id)")
    no_session = _error("no such session: unknown, expired, deleted, or another key's")

    def query(name: str, description: str, schema: dict[str, Any] | None = None) -> Any:
        return {
            "name": name,
            "in": "query",
            "description": description,
            "schema": schema or {"type": "string"},
        }

    since = query("since", "a duration back (30m, 24h, 7d, 2w) or an ISO date/time (UTC)")
    attribution_headers = [
        {
            "name": "x-llmsvc-metadata",
            "in": "header",
            "description": "a JSON object of strings merged over the body's `metadata`",
            "schema": {"type": "string"},
        },
        {
            "name": "x-llmsvc-session-id",
            "in": "header",
            "description": "the session (up to 200 characters), over the body's `session_id`",
            "schema": {"type": "string"},
        },
    ]

    def admin(summary: str, ok: str, **extra: Any) -> dict[str, Any]:
        responses = {"200": _json(ok), "401": unauthorized, **extra.pop("responses", {})}
        return {"summary": summary, "security": bearer, "responses": responses, **extra}

    return {
        "openapi": "3.1.0",
        "info": {"title": "llmsvc", "version": __version__},
        "paths": {
            "/v1/chat/completions": {
                "post": {
                    "summary": "An OpenAI chat completion, journaled before it is sent",
                    "parameters": attribution_headers,
                    "requestBody": _body(ChatRequest),
                    "responses": {
                        "200": {
                            "description": "the completion, or its SSE stream",
                            "content": {"application/json": {}, "text/event-stream": {}},
                        },
                        "400": _error("the body is not a valid chat request"),
                        "404": _error(
                            "the model is not served here, or the session named (an id from "
                            "POST /v1/sessions) does not exist"
                        ),
                        "408": _error("the request did not arrive within its timeout"),
                        "413": _error("the body is larger than max_body_bytes"),
                        "414": _error("the request line is longer than max_header_bytes"),
                        "431": _error("the headers are larger than max_header_bytes"),
                        "502": _error("the provider failed"),
                        "503": _error(
                            "not taking requests now (draining, paused, backlog, disk full, "
                            "max_connections)"
                        ),
                    },
                }
            },
            "/v1/messages": {
                "post": {
                    "summary": "An Anthropic Messages reply, journaled before it is sent; errors "
                    "in Anthropic's shape",
                    "parameters": attribution_headers,
                    "requestBody": _body(MessagesRequest),
                    "responses": {
                        "200": {
                            "description": "the message, or its SSE stream of Anthropic's events",
                            "content": {"application/json": {}, "text/event-stream": {}},
                        },
                        "400": _error("the body is not a valid Messages request"),
                        "404": _error("the model is not served here"),
                        "413": _error("the body is larger than max_body_bytes"),
                        "502": _error("the provider failed"),
                        "503": _error("not taking requests now"),
                    },
                }
            },
            "/v1/messages/count_tokens": {
                "post": {
                    "summary": "A Messages body's input tokens (not a generation: not stored)",
                    "requestBody": _body(CountRequest),
                    "responses": {
                        "200": _json("`input_tokens`"),
                        "400": _error("the body is not a valid Messages request"),
                        "404": _error("the model is not served here"),
                        "502": _error("the provider failed"),
                    },
                }
            },
            "/v1/responses": {
                "post": {
                    "summary": "An OpenAI response, journaled before it is sent",
                    "parameters": attribution_headers,
                    "requestBody": _body(ResponsesRequest),
                    "responses": {
                        "200": {
                            "description": "the response, or its SSE stream of events",
                            "content": {"application/json": {}, "text/event-stream": {}},
                        },
                        "400": _error(
                            "the body is not a valid Responses request, or its "
                            "previous_response_id names no stored response"
                        ),
                        "404": _error("the model is not served here"),
                        "502": _error("the provider failed"),
                        "503": _error("not taking requests now, or the store is not reachable"),
                    },
                }
            },
            "/v1/responses/{response_id}": {
                "get": {
                    "summary": "A stored response, rebuilt from the store",
                    "parameters": [response_id],
                    "responses": {"200": _json("the response"), "404": no_response},
                },
                "delete": {
                    "summary": "Delete a stored response: it is no longer read or continued",
                    "parameters": [response_id],
                    "responses": {"200": _json("deleted"), "404": no_response},
                },
            },
            "/v1/responses/{response_id}/input_items": {
                "get": {
                    "summary": "A stored response's input items, a page at a time",
                    "parameters": [
                        response_id,
                        query("order", "asc or desc (the default)"),
                        query("limit", "1 to 100 items (20)"),
                        query("after", "the id of the item the page starts after"),
                    ],
                    "responses": {
                        "200": _json("a list of input items"),
                        "400": _error("a bad order, limit or after"),
                        "404": no_response,
                    },
                }
            },
            "/v1/models": {
                "get": {"summary": "The models served", "responses": {"200": _json("")}}
            },
            "/v1/models/{model}": {
                "get": {
                    "summary": "One model served, as listed",
                    "parameters": [
                        {
                            "name": "model",
                            "in": "path",
                            "required": True,
                            "schema": {"type": "string"},
                        }
                    ],
                    "responses": {
                        "200": _json("the model"),
                        "404": _error("the model is not served here (or not to this key)"),
                    },
                }
            },
            "/v1/sessions": {
                "post": {
                    "summary": "A new session: chat requests naming it carry its conversation",
                    "requestBody": _body(SessionBody, required=False),
                    "responses": {
                        "201": _json("the session"),
                        "400": _error("the body is not a valid session"),
                        "503": _error("the database cannot answer now"),
                    },
                }
            },
            "/v1/sessions/{id}": {
                "parameters": [
                    {"name": "id", "in": "path", "required": True, "schema": {"type": "string"}}
                ],
                "get": {
                    "summary": "The session and its conversation so far",
                    "responses": {"200": _json("the session, with `messages`"), "404": no_session},
                },
                "delete": {
                    "summary": "End the session (its requests stay in the audit log)",
                    "responses": {"204": {"description": "deleted"}, "404": no_session},
                },
            },
            "/api/health": {
                "get": {"summary": "Liveness with detail", "responses": {"200": _json("")}}
            },
            "/api/ready": {
                "get": {
                    "summary": "Readiness",
                    "responses": {"200": _json("ready"), "503": _json("not ready, and why")},
                }
            },
            "/api/metrics": {
                "get": {
                    "summary": "Prometheus metrics",
                    "responses": {"200": {"description": "", "content": {"text/plain": {}}}},
                }
            },
            "/openapi.json": {"get": {"summary": "This document", "responses": {"200": _json("")}}},
            "/api/admin/status": {
                "get": admin("The status and every part's state, as /api/health", "the state")
            },
            "/api/admin/requests/{request_id}": {
                "get": admin(
                    "A request's metadata, attempts and token counts, by its id or by the"
                    " correlation id it was sent with",
                    "the request",
                    parameters=[request_id],
                    responses={
                        "400": _error("several requests were sent with that correlation id"),
                        "404": _error("no such request"),
                    },
                )
            },
            "/api/admin/requests": {
                "get": admin(
                    "Recent requests, newest first, filtered as `llmsvc status` filters them",
                    "the requests",
                    parameters=[
                        query("key", "a key's id or name"),
                        query("team", "a team's id or name"),
                        query("user", "the OpenAI `user` field"),
                        query(
                            "metadata",
                            "key:value the request's metadata must hold (repeatable)",
                            {"type": "array", "items": {"type": "string"}},
                        ),
                        since,
                        query("correlation_id", "the X-Correlation-ID they were sent with"),
                        query(
                            "text",
                            f"in the reply, ignoring case; reads at most {SCAN:,} replies and "
                            "adds `searched`: how many it read and whether older were left",
                        ),
                        query("limit", "how many (default 20)", {"type": "integer"}),
                    ],
                    responses={
                        "400": _error("a bad parameter"),
                        "404": _error("no key or team of that name"),
                    },
                )
            },
            "/api/admin/spend": {
                "get": admin(
                    "Requests, tokens and cost per key, team, user, model or day",
                    "the groups",
                    parameters=[
                        query("by", "the group (default key)", {"enum": list(SPEND_BY)}),
                        since,
                    ],
                    responses={"400": _error("a bad parameter")},
                )
            },
            "/api/admin/providers": {"get": admin("Providers, enabled or not", "the providers")},
            **{
                f"/api/admin/providers/{{name}}/{action}": {
                    "post": admin(
                        f"{action.capitalize()} a provider (kept across restarts)",
                        "done",
                        parameters=[provider],
                        responses={"404": _error("no such provider")},
                    )
                }
                for action in ("enable", "disable")
            },
            "/api/admin/prune": {
                "post": admin(
                    "Run retention now",
                    "the run",
                    requestBody=_body(prune, required=False),
                    responses={"400": _error("a bad body")},
                )
            },
            "/api/admin/backup": {"post": admin("Back up now", "the run")},
            "/api/admin/backups": {"get": admin("The backups", "the list")},
            "/api/admin/restore": {
                "post": admin(
                    "Restore a backup and replay the WAL since",
                    "the restore",
                    requestBody=_body(restore),
                    responses={
                        "400": _error("not a backup in backup_dir"),
                        "409": _error("a restore is running, or it failed"),
                    },
                )
            },
            "/api/admin/keys": {
                "get": admin("Callers' keys (never their secrets)", "the keys"),
                "post": admin(
                    "Create a key; its secret is in this answer only",
                    "",
                    requestBody=_body(body["KeySpec"]),
                    responses={
                        "201": _json("the key and its secret"),
                        "400": _error("a bad body, or no such team"),
                        "409": _error("a key of that name exists"),
                    },
                ),
            },
            "/api/admin/keys/{key}": {
                "get": admin("A key", "the key", parameters=[key], responses={"404": no_key})
            },
            "/api/admin/keys/{key}/revoke": {
                "post": admin(
                    "Revoke a key: refused everywhere within 2 s",
                    "the key",
                    parameters=[key],
                    responses={"404": no_key},
                )
            },
            "/api/admin/keys/{key}/rotate": {
                "post": admin(
                    "A new secret for a key; the old one is refused everywhere within 2 s",
                    "the key and its new secret",
                    parameters=[key],
                    responses={"404": no_key, "409": _error("the key is revoked")},
                )
            },
            "/api/admin/teams": {
                "get": admin("Teams with their limits", "the teams"),
                "post": admin(
                    "Create a team",
                    "",
                    requestBody=_body(body["TeamSpec"]),
                    responses={
                        "201": _json("the team"),
                        "400": _error("a bad body"),
                        "409": _error("a team of that name exists"),
                    },
                ),
            },
            "/api/admin/teams/{team}": {
                "get": admin(
                    "A team and its keys", "the team", parameters=[team], responses={"404": no_team}
                ),
                "patch": admin(
                    "Change a team's limits (null removes one)",
                    "the team",
                    parameters=[team],
                    requestBody=_body(body["TeamUpdate"]),
                    responses={"400": _error("a bad body"), "404": no_team},
                ),
            },
        },
        "components": {
            "schemas": schemas,
            "securitySchemes": {"admin": {"type": "http", "scheme": "bearer"}},
        },
    }
