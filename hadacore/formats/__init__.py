"""Tensor layouts on disk and in memory: GPTQ (:mod:`.gptq`). Leaves: they import only torch."""
