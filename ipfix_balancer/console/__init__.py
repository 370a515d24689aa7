"""The web console (``IPFIX_BALANCER_CONSOLE``): the manual's GUI — receivers with Add / Edit / Delete and
Apply, status, logs — served by its own control-plane process, which the supervisor starts and restarts.

It edits the ``.env`` (``envfile``), checks an edit with the checker of ``check-config``, and applies it the
way ``ipfix-balancer reload`` does (``control.reload``). It reads the handlers' status documents and the
log ring from the run directory, like ``ipfix-balancer status``: it never talks to a handler.
"""
