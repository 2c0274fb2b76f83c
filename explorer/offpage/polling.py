"""How often a page polls the one server. Each poll is a script run there; in a room thirty
pages poll at once, so every kind of page polls more seldom as more of its kind do, keeping
their polls together near ROOM_POLLS_PER_S."""

ROOM_POLLS_PER_S = 15
QUEUED_POLL_S = 5.0  # in a room most pages wait in the queue: theirs were most of the server's script runs


def poll_seconds(pages: int, at_least: float, polls_per_s: float = ROOM_POLLS_PER_S) -> float:
    """Seconds between two polls of each of `pages` pages of one kind."""
    return max(at_least, pages / polls_per_s)
