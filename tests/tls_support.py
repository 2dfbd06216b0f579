"""The private CA of the TLS tests: bench/pki.py (bench/tls.py makes its certificates the
same way)."""

from bench.pki import CertFiles, TestCA

__all__ = ["CertFiles", "TestCA"]
