"""The web console: a server-rendered back office served by posguard itself.

It runs inside the server process, on the same event loop as the gRPC server, on a port of its own
(``console_listen``). It calls the same stores as the RPCs (off the loop, as the servicers do), asks the
RPCs' role matrix (``api.access``) whether a key may see a page or take an action, and every change it
makes writes the same audit events as the matching RPC, with the signed-in key as the actor.
"""
