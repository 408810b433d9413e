"""FX passes of the hadacore compiler, one per file, run in order by :mod:`.manager`.

``find_linears`` / ``find_attention`` / ``block_graph`` analyse; ``rotate``,
``quantize``, ``fold_act_order``, ``fuse_horizontal``, ``rewrite_w4a16`` and
``fp8_attention`` rewrite; ``cleanup`` tidies. Counters live in :mod:`.stats`.
"""

from hadacore.fxpasses.context import AttentionBlock, LinearSite, PassContext
from hadacore.fxpasses.manager import default_passes, run_passes
from hadacore.fxpasses.stats import reset_stats, stats

__all__ = ["AttentionBlock", "LinearSite", "PassContext", "default_passes", "run_passes", "reset_stats", "stats"]
