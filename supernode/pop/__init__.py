"""Proof of possession: the supernode challenges peers, at random and rate-limited, to
prove they hold the pieces they claim (common/pop.py has the challenge and its answer).

`decide` is the pure part (which client, piece and range; what a verdict means);
`challenger` is the async shell that reads the store, sends the challenge and records a
failure. May import: store, cdn (the piece cache), common. Nothing imports it but app.py.
"""
