"""The OpenAI-compatible API under ``/v1``: what OpenAI's SDKs and the tools built on them
speak, served by the same queue (per-session FIFO, cancel-and-merge) as ``/api/v1``.

The conversation lives on the server (``conversation.py``): a request names its session, and
only its newest user message is new. Errors take OpenAI's shape (``api/errors.py``).
"""

from __future__ import annotations

from fastapi import APIRouter, Depends

from threadline.api.deps import require_openai_key
from threadline.api.openai import chat, responses

router = APIRouter(prefix="/v1", dependencies=[Depends(require_openai_key)], tags=["openai"])
router.include_router(chat.router)
router.include_router(responses.router)

__all__ = ["router"]
