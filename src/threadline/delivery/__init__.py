"""Webhooks: what a finished run owes its callers' URLs, and the outbox sender.

A run that closes its messages (succeeded, failed, or cancelled by a client) writes one
delivery per distinct webhook URL into the ``deliveries`` table in the statement that ends the
run (``payload.py`` builds the rows before that statement). ``sender.Deliverer`` then claims due
rows with a lease, signs (``signing.py``) and POSTs them, and retries with back-off until a 2xx
or ``WEBHOOK_MAX_AGE_S``. ``targets.py`` decides which URLs a request may name.
"""
