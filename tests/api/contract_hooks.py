"""Schemathesis hooks for ``test_contract.py``, loaded through ``SCHEMATHESIS_HOOKS``.

The fuzzer judges a request by its schema alone. A few refusals of schema-valid data rest on
what no schema can state, and only those are let through:

* ``idempotency_key_reused``: the key was stored by an *earlier* request with another body;
* ``invalid_idempotency_key``: the ``Idempotency-Key`` header and the body disagree, or the
  key comes without a session to scope it (a header and a body field together).

Every other refusal of schema-valid data still fails the run.
"""

from __future__ import annotations

from typing import Any

import schemathesis

BEYOND_THE_SCHEMA = frozenset({"idempotency_key_reused", "invalid_idempotency_key"})
# Under /v1 (OpenAI's shape, 400): a conversation whose last message is not a user's, or
# content parts other than text, are valid JSON for OpenAI's schema and refused here.
OPENAI_BEYOND_THE_SCHEMA = frozenset({"invalid_input", "unsupported_parameter"})


@schemathesis.hook
def filter_failure(context: Any, failure: Any, case: Any, response: Any) -> bool:
    """Keep every failure but a 422 (400 under /v1) for one of the refusals above (ST202)."""
    if failure.code != "ST202" or response.status_code not in (400, 422):
        return True
    try:
        code = response.json()["error"]["code"]
    except (ValueError, KeyError, TypeError):
        return True
    if response.status_code == 400:
        return code not in OPENAI_BEYOND_THE_SCHEMA
    return code not in BEYOND_THE_SCHEMA
