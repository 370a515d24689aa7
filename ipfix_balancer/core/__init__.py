"""The data plane's deciding half: pure code over bytes, counters and snapshots.

Rule (checked by tests/core/test_purity.py): nothing here imports ``socket``, ``os``, ``time``, ``selectors``,
``signal``, ``select``, ``fcntl``, ``subprocess``, ``threading``, ``mmap`` or anything outside the standard
library, itself or through what it imports; of ``config`` only ``config.model``. Time is passed in. Every class can be built in a test without a file descriptor; the
``net`` package owns the descriptors and drives these objects.
"""
