"""Offline conversion: fold norms, rotate, quantize (RTN / GPTQ), permute, save, load.

The package itself is callable, ``hadacore.convert(model_or_path, out_dir, ...)`` ==
:func:`hadacore.convert.pipeline.convert`: the public function and this package share
the name ``hadacore.convert``, and importing any submodule rebinds that attribute to
the package, so the package must behave as the function. Needs the ``hf`` extra.
"""

import sys
import types

from hadacore.checkpoint import load
from hadacore.convert.learn import LearnOptions
from hadacore.convert.pipeline import convert as _convert
from hadacore.convert.tune import TuneOptions

__all__ = ["convert", "load", "LearnOptions", "TuneOptions"]

convert = _convert


class _CallableModule(types.ModuleType):
    def __call__(self, *args, **kwargs):
        return _convert(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
