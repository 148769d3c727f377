"""The per-session turn queue: its vocabulary (``job``) and its pure state machine (``core``)."""
