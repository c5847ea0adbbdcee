"""Set-up stages wait for progress, not for one fixed deadline.

A set-up query (node info, projection statistics, target sums) goes to every client at once.
Where clients share few parallel slots (Ray simulation: cores / cpus-per-client) they run one
after the other, so the last client starts only when those before it are done: a single deadline
for the whole stage would have to grow with the number of clients per slot, and a slower machine
would fail where a faster one passes (10 clients on 2 cores, one at a time: the tenth waited
behind nine extractions and missed a 900 s deadline). Here the deadline is `idle_timeout` seconds
after the stage's latest progress, i.e. after it started or after its latest reply: while clients
keep finishing, the stage waits; a client that hangs is given up `idle_timeout` seconds after the
last reply of any other. A slower machine takes longer, it does not fail.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from time import monotonic, sleep

from flwr.app import Message
from flwr.serverapp import Grid

# Seconds between polls of the SuperLink (Flower's own loop polls every 3 s over HTTP, 0.1 s
# in simulation); a set-up stage takes seconds to minutes, so 1 s costs nothing.
POLL_SECONDS = 1.0


@dataclass(frozen=True)
class Wait:
    """How long a stage waits for its replies: `seconds` in all (a training round, Flower's own
    `send_and_receive`), or `seconds` after its latest progress (`from_last_reply`: set-up)."""

    key: str  # the run-config key that sets it (messages name it)
    seconds: float
    from_last_reply: bool = False

    def describe(self) -> str:
        """'setup-timeout (900 s) after the stage's last reply', as failure messages say it."""
        tail = " after the stage's last reply" if self.from_last_reply else ""
        return f"{self.key} ({self.seconds:g} s){tail}"


def send_and_receive_with_progress(
    grid: Grid, messages: Iterable[Message], idle_timeout: float, *,
    clock: Callable[[], float] | None = None, pause: Callable[[float], None] | None = None,
) -> list[Message]:
    """Push `messages`, collect replies until all arrived or none came for `idle_timeout` s.

    The same contract as `Grid.send_and_receive` (the replies that came, in arrival order), with
    the deadline counted from the latest reply. `clock`/`pause` default to the monotonic clock
    and `time.sleep` (tests pass a simulated clock)."""
    clock = clock or monotonic
    pause = pause or sleep
    pending = set(grid.push_messages(messages))
    replies: list[Message] = []
    deadline = clock() + idle_timeout
    while pending and clock() < deadline:
        arrived = list(grid.pull_messages(pending))
        if arrived:
            replies.extend(arrived)
            pending -= {m.metadata.reply_to_message_id for m in arrived}
            deadline = clock() + idle_timeout  # progress: the clients behind it are running now
            continue
        pause(POLL_SECONDS)
    return replies
