"""Coordination recipes built on the client: small compositions of a session's lease, a
transaction on create revisions, and a watch started at a known revision.

Their errors (LockLost, LeadershipLost, SessionLost, ConfigStopped...) are in
:mod:`coord.errors`, and importable from :mod:`coord`.

Sessions: :class:`~coord.session.Session` (one kept-alive lease the recipes share),
:class:`~coord.session.SessionState`.
Locks (Go-compatible layout, fencing tokens): :class:`Lock`, :class:`RWLock`,
:class:`Semaphore`, and :func:`acquire_lock` (a lock with a session of its own).
Leader election (Go-compatible, ``etcdctl elect``): :class:`Election`, :func:`run_as_leader`.
Config: :class:`ConfigWatcher`, a consistent live view of a config prefix.
Barriers (Go-compatible layout): :class:`Barrier` (hold / release / wait) and
:class:`DoubleBarrier` (``count`` participants enter and leave together).
Counter: :class:`Counter`, an int64 in one key (decimal ASCII), changed by compare-and-swap.
Work queues (at-least-once, no herd): :class:`Queue`, :class:`PriorityQueue`, :class:`Item`.
Group membership (a service registry): :class:`Group`, :class:`GroupWatch`, :class:`Members`.
"""

from coord.recipes.barrier import Barrier, DoubleBarrier, DoubleBarrierState
from coord.recipes.config import (
    ConfigChange,
    ConfigSnapshot,
    ConfigState,
    ConfigWatcher,
)
from coord.recipes.counter import Counter
from coord.recipes.election import (
    Election,
    ElectionState,
    Leader,
    Observation,
    run_as_leader,
)
from coord.recipes.group import (
    Group,
    GroupState,
    GroupWatch,
    Members,
    MembershipChange,
)
from coord.recipes.lock import (
    Lock,
    LockState,
    ReadLock,
    RWLock,
    Semaphore,
    WriteLock,
    acquire_lock,
)
from coord.recipes.queue import Item, ItemState, PriorityQueue, Queue
from coord.session import Session, SessionState

__all__ = [
    "Barrier",
    "ConfigChange",
    "ConfigSnapshot",
    "ConfigState",
    "ConfigWatcher",
    "Counter",
    "DoubleBarrier",
    "DoubleBarrierState",
    "Election",
    "ElectionState",
    "Group",
    "GroupState",
    "GroupWatch",
    "Item",
    "ItemState",
    "Leader",
    "Lock",
    "LockState",
    "Members",
    "MembershipChange",
    "Observation",
    "PriorityQueue",
    "Queue",
    "RWLock",
    "ReadLock",
    "Semaphore",
    "Session",
    "SessionState",
    "WriteLock",
    "acquire_lock",
    "run_as_leader",
]
