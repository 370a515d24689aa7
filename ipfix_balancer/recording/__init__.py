"""Recording mode (``BALANCER=Disabled``): the received stream goes to rotating dump files (RFC 5655: whole
messages as received, plus the templates that make each file decode on its own), and each completed file is
exported to the insert processes of ``DUMP_INSERT_PROCESSES``. The rules (names, templates at the head of a
file, rotation, export, spool, disk errors, crash safety) are specified once, in docs/configuration.md "Recording mode".

- ``recorder``: the handler's dispatcher; when a file starts and ends; status
- ``dumpfile``: the file being written (buffer, flush, truncation on error, fsync) and dump names
- ``spool``: the completed files, delivery markers, ``.part`` recovery, eviction
- ``export``: sending completed files to one insert process
- ``core.filescope`` (pure): which template messages go before a message
"""
