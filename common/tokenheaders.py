"""The header names of a piece request: its token, apart from `common.tokens` so that
dfget, which only forwards tokens, does not import cryptography (tens of ms on every
run), and the source client the supernode named (a peer server tells whether the piece
is one its current download will report, dfget/server/app.py)."""

TOKEN_HEADER = "X-Dragonfly-Token"
CLIENT_HEADER = "X-Dragonfly-Client"
SOURCE_HEADER = "X-Dragonfly-Source"
