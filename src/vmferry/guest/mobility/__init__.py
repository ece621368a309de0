"""The pseries guest's post-migration device-tree update (``mobility.c`` + ``dlpar.c``).

Theory of operation
-------------------
After ``ibm,suspend-me`` returns on the destination, :meth:`MobilityHandler.post_mobility_fixup`
runs, in this order: activate-firmware, cpus_read_lock, cacheinfo teardown, the
update-nodes walk (:meth:`MobilityHandler.devicetree_update`), cacheinfo rebuild,
cpus_read_unlock, mitigations, 24x7.  The walk asks firmware for pages of
(opcode, count, operands) records and, per phandle, looks the node up (counted) and
deletes it (``dlpar_detach_node``), updates it (``ibm,update-properties`` pages) or adds
a subtree below it (``ibm,configure-connector``), then drops the lookup reference.

Every questionable upstream behaviour (docs/models/pseries-mobility.md §12.3) is a named switch
(:data:`~vmferry.guest.mobility.core.SWITCHES`, setting :class:`MobilityOptions` fields);
presets group them (:data:`MOBILITY_MODES`, the scheme of :mod:`vmferry.hw.modes`; a mode
is ``preset[+switch...]``, :func:`options_of`), :data:`MODES` holds the presets' options:

``correct``     (default) platform-facilities delete/add ignored by device_type (the seed
                patch); whole cc subtrees attached through a changeset; busy/extended
                delay retried; ADD pairs always consumed; work areas bounds-checked and
                parsed whole before any change; partial values name-checked; user space
                held until the update is applied.
``upstream``    newest kernel as read: filter on, but single-node attach, no busy retry
                in update-nodes, drc word skipped on a failed ADD lookup, no bounds check,
                no partial-name check, user space running from resume.
``no_pf_skip``  ``upstream`` without the seed patch: the 2021 use-after-free and the lost
                children.
``misaligned_add`` / ``busy_abort``  ``correct`` with one upstream quirk switched back on.

Hazards met by a faulty mode never escape :meth:`post_mobility_fixup`: the tree runs in
observe mode, and whatever is detected is listed in the :class:`MobilityReport`.
"""


from vmferry.guest.mobility.core import (
    HOLDER,
    MOBILITY_MODES,
    MODES,
    Action,
    CcProtocolError,
    Change,
    MobilityOptions,
    MobilityReport,
    NullDereference,
    OutOfBoundsRead,
    RtasDataBuf,
    RtasInterface,
    SharedBufferCorruption,
    UserSpace,
    VirtualClock,
    options_of,
)
from vmferry.guest.mobility.handler import (
    MobilityHandler,
    MobilitySysfs,
    changed_paths,
    run_post_migration_updates,
)

__all__ = [
    "HOLDER", "MOBILITY_MODES", "MODES", "Action", "CcProtocolError", "Change", "MobilityHandler",
    "MobilityOptions", "MobilityReport", "MobilitySysfs", "NullDereference",
    "OutOfBoundsRead", "RtasDataBuf", "RtasInterface", "SharedBufferCorruption",
    "UserSpace", "VirtualClock", "changed_paths", "options_of", "run_post_migration_updates",
]
