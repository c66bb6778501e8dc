"""The CPU stage: fetch media, sample frames in the sandbox, store them, and deliver webhooks."""
