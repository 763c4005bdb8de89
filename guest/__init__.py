"""The in-sandbox agent, envd (`python -m guest.envd`), and the host↔guest protocol.

The host imports only `guest.protocol`; everything else here runs inside the sandbox.
See docs/guest.md.
"""
