"""Who a request is for: its caller's key and team, the client's `user`, metadata and session.

Read and validated before anything is journaled (bad values are a 400 naming
them, and nothing is recorded), then carried in the request's start record, so
after any crash a row's attribution is as complete as its tokens.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

from pydantic import TypeAdapter, ValidationError

from llmsvc.callers import Caller
from llmsvc.errors import ClientError
from llmsvc.gateway.request import METADATA_KEYS, Metadata
from llmsvc.wal import Deployment, Sender

METADATA_HEADER = b"x-llmsvc-metadata"
SESSION_HEADER = b"x-llmsvc-session-id"
SESSION_MAX = 200

_metadata = TypeAdapter(Metadata)


class Attributed(Protocol):
    """A validated body's attribution fields, whichever API it came by."""

    @property
    def user(self) -> str | None: ...
    @property
    def metadata(self) -> dict[str, str] | None: ...
    @property
    def session_id(self) -> str | None: ...


@dataclass(frozen=True, slots=True)
class Attribution:
    """What the client said about who a request is for; None where it said nothing."""

    end_user: str | None = None
    metadata: dict[str, str] | None = None
    session_id: str | None = None


def read_attribution(
    data: dict[str, Any], request: Attributed, headers: dict[bytes, bytes]
) -> Attribution:
    """The body's `user`, `metadata` and `session_id` with the `x-llmsvc-*` headers.

    Metadata from the header is merged over the body's (the header wins a key both
    name: it is what a proxy in front of the client sets) and the merge is bounded
    like the body's. The header's session id wins the same way. `session_id` is
    taken out of `data`: the body goes on to the provider, and OpenAI refuses
    fields it does not know.
    """
    data.pop("session_id", None)
    return attribution(request.user, request.metadata, request.session_id, headers)


def attribution(
    user: str | None,
    body_metadata: dict[str, str] | None,
    session: str | None,
    headers: dict[bytes, bytes],
) -> Attribution:
    """What a body said about who a request is for, merged with the `x-llmsvc-*` headers
    (as `read_attribution` describes); for every API's body."""
    metadata = dict(body_metadata or {})
    raw = headers.get(METADATA_HEADER)
    if raw is not None:
        metadata.update(_header_metadata(raw))
        if len(metadata) > METADATA_KEYS:
            raise ClientError(
                f"metadata: the body's and the {METADATA_HEADER.decode()} header's keys "
                f"together are {len(metadata)}; at most {METADATA_KEYS} are allowed",
                param="metadata",
            )
    raw = headers.get(SESSION_HEADER)
    if raw is not None:
        session = _header_text(raw, SESSION_HEADER)
        if len(session) > SESSION_MAX:
            raise ClientError(
                f"the {SESSION_HEADER.decode()} header is {len(session)} characters; "
                f"at most {SESSION_MAX} are allowed"
            )
    return Attribution(user or None, metadata or None, session or None)


def _header_metadata(raw: bytes) -> dict[str, str]:
    name = METADATA_HEADER.decode()
    try:
        return _metadata.validate_json(raw, strict=True)
    except ValidationError as exc:
        err = exc.errors()[0]
        where = ".".join(str(part) for part in err["loc"])
        what = f"{where}: {err['msg']}" if where else err["msg"]
        raise ClientError(
            f"the {name} header must hold a JSON object of strings: {what}", param="metadata"
        ) from None


def _header_text(raw: bytes, name: bytes) -> str:
    try:
        return raw.decode()
    except UnicodeDecodeError:
        raise ClientError(f"the {name.decode()} header is not UTF-8") from None


def record_fields(caller: Caller | None, who: Attribution) -> Sender:
    """The request start record's attribution, only the fields present: a start record
    of a request with none stays as small as before."""
    fields: Sender = {}
    if caller is not None:
        fields["key_id"] = str(caller.key_id)
        if caller.team_id is not None:
            fields["team_id"] = str(caller.team_id)
    if who.end_user is not None:
        fields["user"] = who.end_user
    if who.metadata is not None:
        fields["metadata"] = who.metadata
    if who.session_id is not None:
        fields["session_id"] = who.session_id
    return fields


def deployment_fields(environment: str, version: str) -> Deployment:
    """The deployment's part of every start record (`deployment_*` settings); empty: left out."""
    fields: Deployment = {}
    if environment:
        fields["environment"] = environment
    if version:
        fields["version"] = version
    return fields
