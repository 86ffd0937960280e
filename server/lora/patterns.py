"""Regular expressions from adapter configs (`target_modules`, `exclude_modules`, `rank_pattern` and
`alpha_pattern` keys), compiled with RE2.

They come from tenants' uploads. Python's `re` backtracks: a pattern like `(?:.+)+X` takes time
exponential in the module name's length and would freeze whatever thread matches it. RE2 matches in
time linear in the input, whatever the pattern; it has no lookaround and no backreferences, which PEFT's
module patterns do not need, and refuses them with a message that says so.
"""

from functools import lru_cache

import re2

MAX_PATTERN_LENGTH = 1024

_OPTIONS = re2.Options()
_OPTIONS.log_errors = False  # a bad pattern is the uploader's problem, reported to them, not logged


class PatternError(ValueError):
    """A pattern RE2 cannot compile, or one too long."""


@lru_cache(maxsize=1024)
def compile_pattern(pattern: str) -> "re2._Regexp":
    """The compiled pattern; PatternError naming the problem if it is invalid or too long."""
    if len(pattern) > MAX_PATTERN_LENGTH:
        raise PatternError(f"longer than {MAX_PATTERN_LENGTH} characters")
    try:
        return re2.compile(pattern, _OPTIONS)
    except re2.error as exc:
        reason = exc.args[0].decode() if exc.args and isinstance(exc.args[0], bytes) else str(exc)
        raise PatternError(f"not a valid regular expression for RE2 ({reason}); lookaround and "
                           "backreferences are not supported") from None
