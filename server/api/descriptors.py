"""File descriptors for the connection cap, checked once at start.

Every open connection holds a descriptor, and so do the model's files while they load, the catalogue
database, adapter files being read or uploaded, the event loop and the log. Invariant after
`ensure_descriptors(max_connections)`: the soft RLIMIT_NOFILE covers `max_connections + RESERVE`, or an
error in the log says by how much it falls short and how to fix it.

Decision: a shortfall is logged, not fatal. The cap is a ceiling reached only under attack or extreme
load; refusing to start would turn a machine with a low hard limit (`ulimit -Hn 1024`, some containers)
from a server that works into none at all. The error names the two fixes: a lower `--max-connections`
or a higher hard limit.
"""

import logging
import resource

log = logging.getLogger(__name__)

# Descriptors besides connections: model and adapter files, the database, the loop's own, threads, logs.
RESERVE = 256


def soft_limit_for(needed: int, soft: int, hard: int) -> int:
    """The soft limit to set: `soft` when it covers `needed` already, else `needed`, but never above `hard`.
    RLIM_INFINITY in either stands for no limit."""
    if soft == resource.RLIM_INFINITY or soft >= needed:
        return soft
    return needed if hard == resource.RLIM_INFINITY else min(needed, hard)


def ensure_descriptors(max_connections: int) -> bool:
    """Raise the soft RLIMIT_NOFILE toward the hard one as far as `max_connections + RESERVE` needs.
    True when the limit now covers it; False after logging an error."""
    needed = max_connections + RESERVE
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = soft_limit_for(needed, soft, hard)
    if target != soft:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            log.info("raised the open-files limit from %d to %d (%d connections + %d reserve)",
                     soft, target, max_connections, RESERVE)
        except (ValueError, OSError) as exc:  # macOS caps the soft limit below its "unlimited" hard one
            log.error("could not raise the open-files limit from %d to %d: %s", soft, target, exc)
            target = soft
    if target != resource.RLIM_INFINITY and target < needed:
        log.error("only %d file descriptors for %d connections + %d reserve: under load the server will fail "
                  "to accept connections or open files. Lower --max-connections to %d or raise the hard "
                  "limit (ulimit -Hn, LimitNOFILE=, docker --ulimit nofile=)",
                  target, max_connections, RESERVE, max(target - RESERVE, 1))
        return False
    return True
