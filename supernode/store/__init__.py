"""The store: everything the supernode keeps in Redis, and nothing else.

Owns the connection to Redis or the embedded in-process store (`connection`), every key
name, hash tag and TTL (`keys`), the Lua scripts that change a task atomically
(`scripts`), the change log those scripts publish and the hub that fans it out
(`events`), and the typed repository the rest of the supernode calls (`repo`).

May import `common` only. Nothing here imports another part of `supernode`; the layers
above (`cdn`, `scheduling`, `api`) import from here, never the other way round.
"""
