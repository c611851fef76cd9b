"""Head-to-head benchmarks of flashsemicrf against flash-semicrf 0.2.0 and
torch-struct 0.5: ``python -m bench`` (``make bench``). See bench/README.md."""

from .cli import main, render_latest

__all__ = ["main", "render_latest"]
