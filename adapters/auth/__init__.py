"""Who may call what: bearer tokens (hashed at rest, reloaded live), the data plane's auth hook,
and Mosquitto password and ACL files for the fleet's MQTT broker. No web framework."""

from edgerun.adapters.auth.hook import ApiKeyHook, route_scope
from edgerun.adapters.auth.tokens import (SCOPES, TokenEntry, TokenStore, allows, basic,
                                          bearer, create_token, read_secret, read_tokens,
                                          revoke_token)

__all__ = ["SCOPES", "ApiKeyHook", "TokenEntry", "TokenStore", "allows", "basic", "bearer",
           "create_token", "read_secret", "read_tokens", "revoke_token", "route_scope"]
