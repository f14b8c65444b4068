"""Stage 3, the board side: interpreter discovery, input quantization, the manifest (numpy + stdlib only)."""

__all__ = ["interpreter", "manifest", "quant"]
