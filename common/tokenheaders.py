"""The header names that carry a piece token, apart from `common.tokens` so that dfget,
which only forwards tokens, does not import cryptography (tens of ms on every run)."""

TOKEN_HEADER = "X-Dragonfly-Token"
CLIENT_HEADER = "X-Dragonfly-Client"
