"""The OpenAPI 3.1 document of the admin API (C{/api/v1/openapi.json} on the plain port)."""

from __future__ import annotations

from typing import Any

_NUM = {"type": ["number", "null"]}
_INT = {"type": ["integer", "null"]}
_STR = {"type": ["string", "null"]}


def _get(operation: str, summary: str, schema: str) -> dict[str, Any]:
    return {"get": {
        "operationId": operation, "summary": summary,
        "responses": {
            "200": {"description": summary, "content": {"application/json": {
                "schema": {"$ref": f"#/components/schemas/{schema}"}}}},
            "401": {"description": "The admin token is configured and was not given",
                    "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}}}}}


def admin_openapi_document() -> dict[str, Any]:
    port = {
        "type": "object", "required": ["port", "protocol", "public", "target", "name"],
        "properties": {
            "port": {"type": "integer"}, "protocol": {"type": "string"}, "public": {"type": "boolean"},
            "target": {"type": "string", "description": "address:port the gateway connects to"},
            "name": {"type": "string", "description": "The SNI name of the port"},
            "pinned_name": {"type": "string", "description": "The SNI name pinning this shard"},
            "active_connections": {**_INT, "description": "Connections open now (null: a udp or quic port)"},
            "connections": {**_INT, "description": "Connections routed since the gateway started"},
            "bytes_up": {**_INT, "description": "Bytes relayed from clients to the shard"},
            "bytes_down": {**_INT, "description": "Bytes relayed from the shard to clients"},
        }}
    shard = {
        "type": "object", "required": ["id", "task", "hostname_label", "address", "primary", "ports"],
        "properties": {
            "id": {"type": "string"}, "task": {"type": "string"}, "hostname_label": {"type": "string"},
            "address": {"type": "string"}, "primary": {"type": "boolean"},
            "key_begin": {"type": "integer"}, "rclock_begin": {"type": "integer"},
            "labels": {"type": "object", "additionalProperties": {"type": "string"}},
            "ports": {"type": "array", "items": {"$ref": "#/components/schemas/Port"}},
        }}
    certificate = {
        "type": "object", "required": ["names", "source"],
        "properties": {
            "names": {"type": "array", "items": {"type": "string"}},
            "source": {"type": "string", "enum": ["file", "local_ca", "acme"]},
            "subject": {"type": "string"}, "issuer": {"type": "string"}, "serial": {"type": "string"},
            "not_before": {"type": "string", "format": "date-time"},
            "not_after": {**_STR, "format": "date-time"},
            "not_after_timestamp": _NUM, "path": {"type": "string"}, "ca": {"type": "boolean"},
            "missing": {"type": "boolean", "description": "An ACME name with no certificate yet"},
            "renew_at": {**_NUM, "description": "ACME: when renewal is due (unix time)"},
            "failures": {"type": "integer", "description": "ACME: failed orders since the last success"},
            "last_error": {**_STR, "description": "ACME: the last failed order's error"},
            "last_error_time": _NUM, "next_attempt": _NUM,
        }}
    refusal = {
        "type": "object", "required": ["time", "client", "reason"],
        "properties": {
            "time": {"type": "number"}, "client": {"type": "string"}, "sni": _STR,
            "reason": {"type": "string", "description": "As gateway_route_refusals_total and "
                                                        "gateway_connections_refused_total count it"},
            "detail": {"type": "string"}, "worker": _INT,
        }}
    worker = {
        "type": "object", "required": ["index", "pid", "restarts"],
        "properties": {
            "index": _INT, "pid": _INT, "started": _NUM, "uptime_seconds": _NUM,
            "restarts": {"type": "integer"}, "open_connections": _INT, "draining": {"type": "boolean"},
            "answered": {"type": "boolean"},
        }}
    provider = {
        "type": "object", "required": ["kind", "state"],
        "properties": {
            "kind": {"type": "string", "description": "file, redis, cloud"}, "source": _STR,
            "state": {"type": "string", "enum": ["ok", "degraded", "error"]},
            "version": {"type": ["integer", "string", "null"]}, "last_change": _NUM, "lag_seconds": _NUM,
            "last_error": _STR, "shards": _INT,
            "workers": {"type": "array", "items": {"type": "object"}},
        }, "additionalProperties": True}
    return {
        "openapi": "3.1.0",
        "info": {"title": "twisted-gateway admin API", "version": "1",
                 "description": "Read-only views of one gateway (merged over its workers) on the "
                                "plain port: routes, certificates, refusals, workers, providers."},
        "security": [{"bearer": []}, {}],
        "paths": {
            "/api/v1/routes": _get("routes", "The directory as routed, with live counts per port", "Routes"),
            "/api/v1/certificates": _get("certificates", "Certificates in force, their expiry and renewal", "Certificates"),
            "/api/v1/refusals": _get("refusals", "Recent refusals, newest first", "Refusals"),
            "/api/v1/workers": _get("workers", "The gateway's processes", "Workers"),
            "/api/v1/providers": _get("providers", "The directory's providers", "Providers"),
            "/api/v1/openapi.json": {"get": {"operationId": "openapi", "summary": "This document",
                                             "responses": {"200": {"description": "OpenAPI 3.1"}}}},
        },
        "components": {
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer",
                                           "description": "admin.token_file, when set"}},
            "schemas": {
                "Port": port, "Shard": shard, "Certificate": certificate, "Refusal": refusal,
                "Worker": worker, "Provider": provider,
                "Routes": {"type": "object", "required": ["shards", "totals"], "properties": {
                    "time": {"type": "number"}, "hostname": {"type": "string"},
                    "directory": {"type": "object", "properties": {
                        "loaded": {"type": "boolean"}, "shards": {"type": "integer"}}},
                    "shards": {"type": "array", "items": {"$ref": "#/components/schemas/Shard"}},
                    "totals": {"type": "object", "additionalProperties": {"type": "integer"}},
                    "workers_answered": {"type": "integer"}}},
                "Certificates": {"type": "object", "required": ["certificates"], "properties": {
                    "time": {"type": "number"},
                    "certificates": {"type": "array", "items": {"$ref": "#/components/schemas/Certificate"}}}},
                "Refusals": {"type": "object", "required": ["refusals"], "properties": {
                    "time": {"type": "number"}, "kept": {"type": "integer"}, "recorded": {"type": "integer"},
                    "refusals": {"type": "array", "items": {"$ref": "#/components/schemas/Refusal"}}}},
                "Workers": {"type": "object", "required": ["workers"], "properties": {
                    "time": {"type": "number"},
                    "supervisor": {"type": ["object", "null"], "properties": {
                        "pid": {"type": "integer"}, "started": {"type": "number"},
                        "uptime_seconds": {"type": "number"}, "restarts": {"type": "integer"}}},
                    "workers": {"type": "array", "items": {"$ref": "#/components/schemas/Worker"}}}},
                "Providers": {"type": "object", "required": ["providers"], "properties": {
                    "time": {"type": "number"},
                    "providers": {"type": "array", "items": {"$ref": "#/components/schemas/Provider"}}}},
                "Error": {"type": "object", "required": ["error", "message"], "properties": {
                    "error": {"type": "string"}, "message": {"type": "string"}}},
            },
        },
    }
