"""Supervision for the actor kernel: OTP supervisors, dynamic supervisors, the host reaper.

See docs/actors.md for the model and a runnable example.
"""

from .errors import (
    AlreadyPresent,
    AlreadyStarted,
    ChildNotFound,
    ChildRunning,
    ChildStartFailed,
    MaxChildren,
    SupervisorError,
    SupervisorGaveUp,
)
from .spec import BRUTAL, INFINITY, AutoShutdown, Backoff, ChildSpec, Restart, Strategy
from .supervisor import (
    ChildCounts,
    ChildInfo,
    DynamicSupervisor,
    Supervisor,
    count_children,
    delete_child,
    restart_child,
    start_child,
    start_dynamic_child,
    terminate_child,
    which_children,
)

ONE_FOR_ONE = Strategy.ONE_FOR_ONE
ONE_FOR_ALL = Strategy.ONE_FOR_ALL
REST_FOR_ONE = Strategy.REST_FOR_ONE
PERMANENT = Restart.PERMANENT
TRANSIENT = Restart.TRANSIENT
TEMPORARY = Restart.TEMPORARY
NEVER = AutoShutdown.NEVER
ANY_SIGNIFICANT = AutoShutdown.ANY_SIGNIFICANT
ALL_SIGNIFICANT = AutoShutdown.ALL_SIGNIFICANT

__all__ = [
    "ALL_SIGNIFICANT",
    "ANY_SIGNIFICANT",
    "BRUTAL",
    "INFINITY",
    "NEVER",
    "ONE_FOR_ALL",
    "ONE_FOR_ONE",
    "PERMANENT",
    "REST_FOR_ONE",
    "TEMPORARY",
    "TRANSIENT",
    "AlreadyPresent",
    "AlreadyStarted",
    "AutoShutdown",
    "Backoff",
    "ChildCounts",
    "ChildInfo",
    "ChildNotFound",
    "ChildRunning",
    "ChildSpec",
    "ChildStartFailed",
    "DynamicSupervisor",
    "MaxChildren",
    "Restart",
    "Strategy",
    "Supervisor",
    "SupervisorError",
    "SupervisorGaveUp",
    "count_children",
    "delete_child",
    "restart_child",
    "start_child",
    "start_dynamic_child",
    "terminate_child",
    "which_children",
]

from .reaper import (  # noqa: E402
    ProcessActor,
    ProcessExited,
    ProcessFailed,
    ProcessHandle,
    ProcessTable,
    Reaper,
    Spawn,
    Watch,
    become_subreaper,
    is_subreaper,
    kill_tree,
    tree_pids,
)

__all__ += [
    "ProcessActor",
    "ProcessExited",
    "ProcessFailed",
    "ProcessHandle",
    "ProcessTable",
    "Reaper",
    "Spawn",
    "Watch",
    "become_subreaper",
    "is_subreaper",
    "kill_tree",
    "tree_pids",
]
