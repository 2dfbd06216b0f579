"""The CDN: the supernode's own copy of each file, fetched from the origin once.

Owns the origin client and its address policy (`origin`), the fetch of a task
(`fetch`) under a cluster-wide lease (`lease`), what a fetch resumes from (`resume`),
the piece pipe that hashes, writes and publishes each piece (`pipe`), taking over
another supernode's partial fetch (`takeover`), repairing cached pieces reported bad
(`repair`), the piece cache on disk (`cache`) and the download port that serves it to
peers (`seed`).

May import `supernode.store` and `common`; never `scheduling` or `api`.
"""
