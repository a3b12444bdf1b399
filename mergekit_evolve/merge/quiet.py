"""Keep mergekit's own transformers deprecation noise out of our output.

mergekit 0.1.5 sets ``config.torch_dtype`` on the output config, which transformers 5 reports as
"`torch_dtype` is deprecated! Use `dtype` instead!" on every run. The value it sets is right (the
setter forwards to ``dtype``); only the message is noise, and it is not ours to fix in mergekit.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager


class _DropTorchDtypeDeprecation(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "`torch_dtype` is deprecated" not in record.getMessage()


@contextmanager
def mergekit_torch_dtype_quiet() -> Iterator[None]:
    """Drop transformers' torch_dtype deprecation message while mergekit builds an output config."""
    logger = logging.getLogger("transformers.configuration_utils")
    quiet = _DropTorchDtypeDeprecation()
    logger.addFilter(quiet)
    try:
        yield
    finally:
        logger.removeFilter(quiet)
