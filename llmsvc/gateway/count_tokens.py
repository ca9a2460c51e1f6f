"""`POST /v1/messages/count_tokens`: how many input tokens a Messages body is.

Not a generation: nothing is journaled or stored, no rate limit or budget is
charged, and the answer is not a reply a store must hold. The count comes from an
Anthropic provider serving the model (its own `/v1/messages/count_tokens`: only
it knows its tokenizer), else from llmsvc's tokenizer on the request's
chat-completion form (`llmsvc.tokens`, an estimate for a model it has no
vocabulary for), tools' definitions included.
"""

from __future__ import annotations

from typing import Any

import orjson

from llmsvc.callers import Caller
from llmsvc.errors import ModelNotAllowed, ProviderError
from llmsvc.gateway.router import Router
from llmsvc.providers.anthropic import AnthropicProvider
from llmsvc.providers.base import Native
from llmsvc.tokens import count_prompt


async def count_tokens(
    router: Router, caller: Caller | None, native: Native, chat: dict[str, Any]
) -> dict[str, Any]:
    """`{"input_tokens": N}` for the Messages body (`chat`: its chat-completion form)."""
    model = chat["model"]
    if caller is not None and caller.models is not None and model not in caller.models:
        raise ModelNotAllowed(
            f"the key {caller.key_name!r} may not use the model {model!r}", param="model"
        )
    targets = router.targets(model)  # UnknownModel for one not served
    for target in targets:
        if isinstance(target.provider, AnthropicProvider):
            answer = await target.provider.count_tokens(native, target.model)
            tokens = answer.get("input_tokens") if isinstance(answer, dict) else None
            if type(tokens) is not int:
                raise ProviderError(
                    f"{target.provider.name}: count_tokens answered without input_tokens",
                    code="upstream_malformed",
                )
            return {"input_tokens": tokens}
    messages = list(chat["messages"])
    if chat.get("tools"):  # the definitions are part of the prompt
        messages.append({"role": "system", "content": orjson.dumps(chat["tools"]).decode()})
    return {"input_tokens": count_prompt(targets[0].model, messages)[0]}
