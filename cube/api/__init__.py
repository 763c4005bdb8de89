"""The E2B-compatible HTTP and WebSocket API of a cube node (docs/api.md).

    async with open_node(config) as node:
        keys, generated = await ensure_api_keys(node, config.api_keys)
        await serve(node, keys, host="127.0.0.1", port=3000)

One listener serves the REST control API, the envd surface (Connect RPC, ``/files``) and the
code interpreter (``/execute``, ``/contexts``) of every sandbox; see routing.py for how a
request finds its surface.
"""

from .app import build_router, ensure_api_keys, serve
from .auth import ApiKeys, generate_api_key
from .context import ApiContext, Limits

__all__ = ["ApiContext", "ApiKeys", "Limits", "build_router", "ensure_api_keys", "generate_api_key", "serve"]
