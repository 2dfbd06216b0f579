"""Developer tools that are not part of the product packages (not installed by pip):
`python -m tools.configref docs/config.md` regenerates the configuration reference."""
