"""Scheduling: which client fetches which piece from where.

Owns the pure decision (`policy`: state in, assignments out, no I/O), the in-process
view of a task kept exact by the store's change log (`view`, `views`), and the async
shell that reads the view, calls the policy and claims the result through the store
(`dispatch`).

May import `supernode.cdn` (the dispatcher asks the CDN to take over an orphaned fetch
and to check repair reports), `supernode.store` and `common`; never `api`.
"""
