"""What the supernode and dfget share: wire records, ids, piece maths, ranges, errors."""

__version__ = "0.1.0"
